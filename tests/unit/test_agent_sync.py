"""The agent's reconciliation against a switch and an OVSDB of its own (fakes: the flows and
groups a bundle leaves, the ports plugged): after a change of the desired state alone, the
bundle holds exactly the flows the incremental plan touched and the switch ends up with the
full plan's flows, without a read-back; a burst of changes arriving while syncs run costs a
few syncs, not one each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent import config
from agent.main import DvrAgent
from agent.ofswitch import InstalledFlow, installed
from agent.ovsdb import Wakeup
from agent.source import Source
from flows.incremental import Change
from flows.model import Topology, TopologyError, build_topology
from flows.ofp import Flow, Group, groups_of
from flows.planner import plan
from flows.ports import Plugged
from tests.unit.changes import Cloud, copy, shapes

NODE = "c0"
GATEWAY_MAC = "02:00:00:00:00:01"


class FakeSwitch:
    """The flows and groups of ours a switch holds, changed bundle by bundle."""

    def __init__(self) -> None:
        self.connections = 1
        self.connected = True
        self.flows: dict[int, Flow] = {}
        self.groups: dict[int, Group] = {}
        self.bundles: list[tuple[int, int]] = []  # (deleted, added) of each
        self.dumps = 0
        self.on_bundle: Any = None  # called in each bundle (changes arriving meanwhile)

    def dump_owned(self) -> list[InstalledFlow]:
        self.dumps += 1
        return [installed(f) for f in self.flows.values()]

    def dump_groups(self) -> dict[int, Group | None]:
        return dict(self.groups)

    @contextlib.contextmanager
    def bundle(self) -> Iterator[Any]:
        switch = self

        class Bundle:
            def __init__(self) -> None:
                self.ops: list[tuple[str, Any]] = []

            def add_groups(self, groups: list[Group], modify: bool = False) -> None:
                self.ops += [("group", g) for g in groups]

            def delete_groups(self, ids: list[int]) -> None:
                self.ops += [("ungroup", i) for i in ids]

            def delete(self, flows: list[InstalledFlow]) -> None:
                self.ops += [("delete", f) for f in flows]

            def add(self, flows: list[Flow]) -> None:
                self.ops += [("add", f) for f in flows]

        b = Bundle()
        yield b
        if self.on_bundle is not None:
            self.on_bundle()
        for op, x in b.ops:
            if op == "group":
                switch.groups[x.group_id] = x
            elif op == "ungroup":
                switch.groups.pop(x, None)
            elif op == "delete":
                switch.flows.pop(x.cookie, None)
            else:
                switch.flows[x.cookie] = x
        self.bundles.append((sum(op == "delete" for op, _ in b.ops),
                             sum(op == "add" for op, _ in b.ops)))

    def packet_out(self, port: int, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


class FakeOvsdb:
    """The node's OVSDB: what the test cloud has plugged on the node's switch."""

    def __init__(self, cloud: Cloud, topo: Topology) -> None:
        self.cloud, self.topo = cloud, topo
        self.changed = Wakeup()

    def plugged(self, bridge: str) -> Plugged:
        vms = {self.topo.vms[v].port_id: o for v, o in self.cloud.plugged[NODE].items()
               if v in self.topo.vms}
        tunnels = dict(self.cloud.tunnels[NODE])
        return Plugged(vms, tunnels, {p: ("vxlan", "") for p in tunnels}, provider=60000)

    def ensure_tunnels(self, *args: Any) -> bool:
        return False

    def ensure_provider_patch(self, *args: Any) -> bool:
        return False

    def flow_restore_wait(self) -> bool:
        return False

    def close(self) -> None:
        self.changed.close()


class FakeSource(Source):
    """Topologies handed out in turn; the newest one wins when several arrived."""

    def __init__(self) -> None:
        self.arrived: list[Topology] = []
        self.seen = 0
        self.done: Any = None  # called on each poll once everything has arrived

    def poll(self) -> bool:
        if self.done is not None:
            self.done()
        return len(self.arrived) > self.seen

    def load(self) -> Topology:
        self.seen = len(self.arrived)
        return self.arrived[-1]


def make_agent(tmp_path: Path, cloud: Cloud, topo: Topology, source: Source) -> DvrAgent:
    ini = tmp_path / "agent.ini"
    ini.write_text(f"[DEFAULT]\nnode = {NODE}\n[ovs]\nexternal_bridge =\n"
                   f"ovs_rundir = {tmp_path}\n[topology]\nfile = {tmp_path}/none.yaml\n"
                   f"[agent]\nstatus_file = {tmp_path}/status.json\npoll_interval = 0.01\n")
    agent = DvrAgent(config.make_conf(["--config-file", str(ini)]), source)
    agent.switch = FakeSwitch()  # type: ignore[assignment]
    agent.ovsdb = FakeOvsdb(cloud, topo)  # type: ignore[assignment]
    agent.topo = topo
    return agent


def start(seed: int) -> tuple[Cloud, Topology]:
    doc = copy(shapes()["mixed"])
    doc["external"]["gateway_mac"] = GATEWAY_MAC  # nothing to resolve by ARP
    cloud = Cloud(doc, random.Random(seed))
    topo = build_topology(doc)
    cloud.plugged[NODE], cloud.tunnels[NODE] = {}, {}
    cloud.follow(topo)
    return cloud, topo


def next_topology(cloud: Cloud, topo: Topology) -> Topology:
    """The next valid topology after a random change (refused ones are skipped)."""
    while True:
        before = copy(cloud.doc)
        cloud.mutate()
        try:
            new = build_topology(cloud.doc)
        except TopologyError:
            cloud.doc = before
            continue
        cloud.follow(new)
        return new


def on_switch(agent: DvrAgent) -> tuple[dict[int, Flow], dict[int, Group]]:
    sw = agent.switch
    return sw.flows, sw.groups  # type: ignore[attr-defined]


def test_a_change_of_the_desired_state_sends_only_its_flows(tmp_path: Path) -> None:
    cloud, topo = start(4)
    agent = make_agent(tmp_path, cloud, topo, FakeSource())
    agent.sync(full=True)
    switch: FakeSwitch = agent.switch  # type: ignore[assignment]
    assert switch.dumps == 1
    for _ in range(60):
        before = dict(switch.flows)
        topo = next_topology(cloud, topo)
        agent.topo = agent.ovsdb.topo = topo  # type: ignore[union-attr]
        agent._change = None
        agent.sync(full=False)
        assert agent.planner is not None
        want = plan(topo, NODE, agent.planner.ports)
        flows, groups = on_switch(agent)
        assert set(flows) == {f.cookie for f in want}
        assert groups == groups_of(want)
        # the bundle held the difference and nothing else
        deleted, added = switch.bundles[-1]
        assert added == len(flows.keys() - before.keys())
        assert deleted == len(before.keys() - flows.keys())
    assert switch.dumps == 1  # never read back
    agent.sync(full=True)  # a full sync reads back and finds nothing to change
    assert switch.dumps == 2 and switch.bundles[-1] == (0, 0)


def test_a_burst_of_changes_costs_a_few_syncs(tmp_path: Path) -> None:
    """60 changes arrive, 10 during each sync: the loop merges those that arrived while
    it synced into its next sync."""
    cloud, topo = start(5)
    source = FakeSource()
    source.arrived.append(dataclasses.replace(topo, digest="g0"))
    agent = make_agent(tmp_path, cloud, topo, source)
    switch: FakeSwitch = agent.switch  # type: ignore[assignment]
    burst: list[Topology] = []
    for i in range(60):
        topo = next_topology(cloud, topo)
        burst.append(dataclasses.replace(topo, digest=f"g{i + 1}"))
    final = burst[-1]

    def arrive() -> None:
        source.arrived.extend(burst[:10])
        del burst[:10]

    def done() -> None:
        if not burst and agent.status.get("generation") == final.digest:
            agent.stop()

    switch.on_bundle = arrive
    source.done = done
    fake_ovsdb: FakeOvsdb = agent.ovsdb  # type: ignore[assignment]
    fake_ovsdb.topo = final  # plugged as the cloud is at the end
    agent.topo = None
    agent.run()
    assert agent.topo is final
    assert agent.planner is not None
    want = plan(final, NODE, agent.planner.ports)
    assert set(switch.flows) == {f.cookie for f in want}
    assert len(switch.bundles) <= 8, switch.bundles  # 1 + 60 / 10, not 61


class DeltaSource(FakeSource):
    """Hands out what changed since the topology it handed out before, as the northbound
    source does."""

    def __init__(self) -> None:
        super().__init__()
        self.last: Topology | None = None
        self._delta: Change | None = None

    def load(self) -> Topology:
        topo = super().load()
        self._delta = None if self.last is None else Change.between(self.last, topo)
        self.last = topo
        return topo

    def delta(self) -> Change | None:
        return self._delta


def test_a_topology_the_agent_refuses_loses_no_change(tmp_path: Path) -> None:
    """The source hands out a topology without this node (refused: the last one stays),
    a sync runs meanwhile (a port plugged), then a valid one: the plan follows every change
    since the one it planned, the refused one's included."""
    cloud, topo = start(6)
    source = DeltaSource()
    source.arrived.append(topo)
    agent = make_agent(tmp_path, cloud, topo, source)
    assert agent._load()
    agent.sync(full=True)
    changed = next_topology(cloud, topo)  # a change in the refused topology...
    doc = copy(cloud.doc)
    del doc["nodes"][NODE]
    for name in [n for n, v in doc["vms"].items() if v["node"] == NODE]:
        del doc["vms"][name]
    source.arrived.append(build_topology(doc))
    assert not agent._load() and agent.topo is topo  # refused: node missing
    agent.sync(full=False)
    source.arrived.append(changed)  # ...and back, with that change
    assert agent._load()
    agent.sync(full=False)
    assert agent.planner is not None
    want = plan(changed, NODE, agent.planner.ports)
    assert agent.planner.flows() == want
    assert set(agent.switch.flows) == {f.cookie for f in want}  # type: ignore[attr-defined]


def test_a_periodic_whole_plan_finds_and_repairs_a_wrong_incremental_one(
        tmp_path: Path, caplog: Any) -> None:
    cloud, topo = start(7)
    agent = make_agent(tmp_path, cloud, topo, FakeSource())
    agent.sync(full=True)
    assert agent.planner is not None
    wrong = next(iter(agent.planner.by_cookie))
    del agent.planner.by_cookie[wrong]  # as a forgotten dependency would leave it
    agent.sync(full=True)  # a resync follows the plan it has
    assert wrong not in agent.switch.flows  # type: ignore[attr-defined]
    with caplog.at_level("ERROR"):
        agent.sync(full=True, replan=True)
    assert "differs from the whole plan (1 flows missing, 0 extra)" in caplog.text
    want = plan(topo, NODE, agent.planner.ports)
    assert set(agent.switch.flows) == {f.cookie for f in want}  # type: ignore[attr-defined]
