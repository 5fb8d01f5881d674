"""The agent's reconciliation against a real ovs-vswitchd (userspace datapath) and its real
OVSDB: a bridge of the test's own on a one-node lab's node, the VMs plugged into it as real
internal ports (with `external_ids:iface-id`, as Nova/os-vif plug them), the tunnels and the
provider patch the agent makes itself. After a change of the desired state alone, the bundle
holds exactly the flows the incremental plan touched and the switch ends up with the flows
of a whole plan of the state with its real ports, without a read-back; a burst of changes
arriving while syncs run costs a few syncs, not one each; a refused topology loses no
change; the periodic whole plan repairs a wrong incremental one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ovsdbapp.schema.open_vswitch import impl_idl

from agent import config
from agent.main import DvrAgent
from agent.ofswitch import InstalledFlow, Switch
from agent.ovsdb import Ovsdb
from agent.source import Source
from flows.incremental import Change
from flows.model import Topology, TopologyError, build_topology
from flows.ofp import groups_of
from flows.planner import NodePorts, plan
from flows.ports import node_ports
from tests.lab.harness import LabHandle, running_lab
from tests.unit.changes import Cloud, copy, shapes

ONE_NODE = Path(__file__).parent / "topologies" / "one-node.yaml"
NODE = "c0"  # the node of the generated cloud the agent plays, on the lab's node `solo`
LAB_NODE = "solo"
GATEWAY_MAC = "02:00:00:00:00:01"
# the test's bridges (the node's own agent keeps to br-int and br-ex)
BRIDGE, PROVIDER = "br-sync", "br-sync-ex"
# a VM's port asks for OpenFlow port OFPORT_BASE + the number the cloud gives it: clear of
# the numbers OVS picks for the tunnels and the provider patch
OFPORT_BASE = 1000
STEPS = 60


@pytest.fixture(scope="module")
def lab() -> Iterator[LabHandle]:
    with running_lab(ONE_NODE) as lab:
        yield lab


class Node:
    """The test's bridges on the lab's node, as a compute node's agent finds them (the
    integration bridge, a provider bridge), and the VMs plugged into the integration
    bridge as the cloud's switch says."""

    def __init__(self, lab: LabHandle, tmp_path: Path):
        self.dir = lab.rundir / "nodes" / LAB_NODE
        self.db = f"unix:{self.dir}/db.sock"
        self.tmp = tmp_path
        self.ports: dict[str, tuple[str, int]] = {}  # VM -> (iface-id, ofport) plugged
        self.agents: list[DvrAgent] = []
        self.probe = Switch(f"unix:{self.dir}/{BRIDGE}.mgmt")  # the test's own reads
        self.vsctl("--may-exist", "add-br", BRIDGE, "--", "set", "Bridge", BRIDGE,
                   "datapath_type=netdev", "fail_mode=secure",
                   "--", "--may-exist", "add-br", PROVIDER, "--", "set", "Bridge", PROVIDER,
                   "datapath_type=netdev")

    def vsctl(self, *args: str) -> str:
        """ovs-vsctl on the node's database (it waits for ovs-vswitchd to apply the change:
        a port added has its number when it returns)."""
        res = subprocess.run(["ovs-vsctl", f"--db={self.db}", "--timeout=20", *args],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, f"ovs-vsctl {' '.join(args)}: {res.stderr}"
        return res.stdout

    def close(self) -> None:
        for agent in self.agents:
            if not agent.running:
                continue  # run() closed its connections
            if agent.ovsdb is not None:
                agent.ovsdb.close()
            agent.switch.close()
        self.probe.close()
        self.vsctl("--if-exists", "del-br", BRIDGE, "--", "--if-exists", "del-br", PROVIDER)

    # --- the agent ------------------------------------------------------------------------
    def agent(self, source: Source) -> DvrAgent:
        """An agent of node NODE on the test's bridge, connected as the lab's agents are
        (dvr.lab.lab: the node's db.sock, the bridge's .mgmt socket in the node's run
        directory), the desired state from `source`."""
        ini = self.tmp / "agent.ini"
        ini.write_text(
            f"[DEFAULT]\nnode = {NODE}\n"
            f"[ovs]\novsdb_connection = {self.db}\novs_rundir = {self.dir}\n"
            f"integration_bridge = {BRIDGE}\nexternal_bridge = {PROVIDER}\n"
            "datapath_type = netdev\ntunnel_type = vxlan\n"
            f"[topology]\nfile = {self.tmp}/none.yaml\n"
            f"[agent]\nstatus_file = {self.tmp}/status.json\npoll_interval = 0.01\n"
            "resync_interval = 600\n")
        conf = config.make_conf(["--config-file", str(ini)])
        agent = DvrAgent(conf, source)
        self.agents.append(agent)
        # as run() connects it; ovsdbapp keeps the first connection a process makes for
        # every later OvsdbIdl (a class attribute): this agent gets its own
        impl_idl.OvsdbIdl._ovsdb_connection = None
        agent.ovsdb = Ovsdb(conf.ovs.ovsdb_connection, conf.ovs.ovsdb_timeout)
        agent.ovsdb.ensure_bridge(BRIDGE, conf.ovs.datapath_type)
        return agent

    # --- the VMs --------------------------------------------------------------------------
    def follow(self, cloud: Cloud, topo: Topology) -> None:
        """Plug, unplug and renumber the VMs' ports as the cloud has them plugged on NODE
        (a renumbered port: a new `ofport_request`), in one transaction."""
        want = {vm: OFPORT_BASE + o for vm, o in cloud.plugged[NODE].items()}
        cmds: list[str] = []
        for vm in sorted(self.ports.keys() - want.keys()):
            cmds += ["--", "del-port", BRIDGE, iface(vm)]
            del self.ports[vm]
        for vm, ofport in sorted(want.items()):
            name = iface(vm)
            if vm not in self.ports:
                port_id = topo.vms[vm].port_id
                cmds += ["--", "add-port", BRIDGE, name, "--", "set", "Interface", name,
                         "type=internal", f"external_ids:iface-id={port_id}",
                         f"ofport_request={ofport}"]
            elif self.ports[vm][1] != ofport:
                port_id = self.ports[vm][0]
                cmds += ["--", "set", "Interface", name, f"ofport_request={ofport}"]
            else:
                continue
            self.ports[vm] = (port_id, ofport)
        if cmds:
            self.vsctl(*cmds[1:])

    def settle(self, agent: DvrAgent, timeout: float = 10.0) -> None:
        """Wait until the agent's copy of OVSDB shows every port of the bridge numbered
        (the tunnels and the patch the agent made included) and the VMs' ports as plugged."""
        assert agent.ovsdb is not None
        want = dict(self.ports.values())
        deadline = time.monotonic() + timeout
        while True:
            ifaces = agent.ovsdb.interfaces(BRIDGE)
            if all(i.ofport > 0 for i in ifaces) and agent.ovsdb.plugged(BRIDGE).ports == want:
                return
            assert time.monotonic() < deadline, (ifaces, want)
            time.sleep(0.005)

    def real_ports(self, agent: DvrAgent, topo: Topology) -> NodePorts:
        """The planner's view of the node from what its OVSDB says is plugged."""
        assert agent.ovsdb is not None
        return node_ports(topo, NODE, agent.ovsdb.plugged(BRIDGE), GATEWAY_MAC, frozenset())

    def cookies(self) -> set[int]:
        """The cookies of our flows on the switch, read on a connection of the test's."""
        return {f.cookie for f in self.probe.dump_owned()}


def iface(vm: str) -> str:
    return f"s-{vm}"


@pytest.fixture
def node(lab: LabHandle, tmp_path: Path) -> Iterator[Node]:
    n = Node(lab, tmp_path)
    try:
        yield n
    finally:
        n.close()


class Watch:
    """What the agent asks of its (real) switch: the read-backs, and how many flows each
    bundle deleted and added; `during` runs inside each bundle, before its commit (changes
    arriving meanwhile)."""

    def __init__(self, switch: Switch):
        self.dumps = 0
        self.bundles: list[tuple[int, int]] = []
        self.during: Any = None
        dump, bundle = switch.dump_owned, switch.bundle

        def dump_owned(planned: Any = None) -> list[InstalledFlow]:
            self.dumps += 1
            return dump(planned)

        @contextlib.contextmanager
        def counted() -> Iterator[Any]:
            with bundle() as b:
                yield b
                if self.during is not None:
                    self.during()
            self.bundles.append((b.deleted, b.added))

        switch.dump_owned = dump_owned  # type: ignore[method-assign]
        switch.bundle = counted  # type: ignore[method-assign]


def sync(agent: DvrAgent, node: Node, watch: Watch, full: bool = False,
         replan: bool = False) -> None:
    """One sync; the bundle held exactly the difference between the switch's flows before
    and after it."""
    before = node.cookies()
    agent.sync(full=full, replan=replan)
    after = node.cookies()
    assert watch.bundles[-1] == (len(before - after), len(after - before))


def converge(agent: DvrAgent, node: Node, watch: Watch, topo: Topology,
             full: bool = False) -> None:
    """Sync; once the ports that sync made (a new node's tunnel, the provider patch) have
    their numbers, sync again if they change the node's ports; then the switch holds the
    flows and groups of the whole plan of `topo` with the node's real ports."""
    sync(agent, node, watch, full)
    node.settle(agent)
    assert agent.planner is not None
    if agent.planner.ports != node.real_ports(agent, topo):
        sync(agent, node, watch)
    ports = node.real_ports(agent, topo)
    assert agent.planner.ports == ports
    assert ports.vms == {vm: o for vm, (_, o) in node.ports.items() if vm in topo.vms}
    assert set(ports.tunnels) == {n for n, s in topo.nodes.items()
                                  if n != NODE and s.tunnel_ip is not None}
    assert ports.provider is not None
    want = plan(topo, NODE, ports)
    assert node.cookies() == {f.cookie for f in want}
    assert node.probe.dump_groups() == groups_of(want)


class Topologies(Source):
    """Topologies handed out in turn; the newest one wins when several arrived."""

    def __init__(self) -> None:
        self.arrived: list[Topology] = []
        self.seen = 0
        self.done: Any = None  # called on each poll

    def poll(self) -> bool:
        if self.done is not None:
            self.done()
        return len(self.arrived) > self.seen

    def load(self) -> Topology:
        self.seen = len(self.arrived)
        return self.arrived[-1]


class DeltaSource(Topologies):
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


def switch_change(cloud: Cloud, topo: Topology) -> None:
    """A VM's port unplugged, plugged (maybe one the topology puts elsewhere) or given
    another number, on the cloud's switch of NODE (numbers stay unique)."""
    rng, have = cloud.rng, cloud.plugged[NODE]
    kind = rng.choice(["unplug", "plug", "ofport"])
    if kind == "unplug" and have:
        del have[rng.choice(sorted(have))]
    elif kind == "plug" and (free := sorted(topo.vms.keys() - have.keys())):
        have[rng.choice(free)] = 1 + max(have.values(), default=0)
    elif kind == "ofport" and have:
        have[rng.choice(sorted(have))] = rng.choice(
            sorted(set(range(500, 600)) - set(have.values())))


def test_a_change_of_the_desired_state_sends_only_its_flows(node: Node) -> None:
    cloud, topo = start(4)
    node.follow(cloud, topo)
    agent = node.agent(Topologies())
    watch = Watch(agent.switch)
    agent.topo = topo
    node.settle(agent)
    converge(agent, node, watch, topo, full=True)  # makes the tunnels and the patch
    assert watch.dumps == 1
    for _ in range(STEPS):
        topo = next_topology(cloud, topo)
        if cloud.rng.random() < 0.3:
            switch_change(cloud, topo)
        node.follow(cloud, topo)
        node.settle(agent)
        agent.topo = topo
        agent._change = None
        converge(agent, node, watch, topo)
    assert watch.dumps == 1  # never read back
    sync(agent, node, watch, full=True)  # a full sync reads back and finds nothing to change
    assert watch.dumps == 2 and watch.bundles[-1] == (0, 0)


def test_a_burst_of_changes_costs_a_few_syncs(node: Node) -> None:
    """60 changes arrive, 10 during each sync: the loop merges those that arrived while
    it synced into its next sync."""
    cloud, topo = start(5)
    source = Topologies()
    source.arrived.append(dataclasses.replace(topo, digest="g0"))
    burst: list[Topology] = []
    for i in range(60):
        topo = next_topology(cloud, topo)
        burst.append(dataclasses.replace(topo, digest=f"g{i + 1}"))
    final = burst[-1]
    node.follow(cloud, final)  # plugged as the cloud is at the end
    agent = node.agent(source)
    watch = Watch(agent.switch)
    synced: list[str] = []  # the generation of each sync
    agent_sync = agent.sync

    def counted_sync(full: bool = True, replan: bool = False, check: bool = False) -> Any:
        assert agent.topo is not None
        synced.append(agent.topo.digest)
        return agent_sync(full, replan, check)

    def arrive() -> None:
        source.arrived.extend(burst[:10])
        del burst[:10]

    def done() -> None:
        # every change arrived and synced, with the ports the agent made numbered
        assert agent.ovsdb is not None
        if not burst and agent.status.get("generation") == final.digest \
                and agent.planner is not None \
                and all(i.ofport > 0 for i in agent.ovsdb.interfaces(BRIDGE)) \
                and agent.planner.ports == node.real_ports(agent, final):
            agent.stop()

    agent.sync = counted_sync  # type: ignore[method-assign]
    watch.during = arrive
    source.done = done
    node.settle(agent)
    watchdog = threading.Timer(20, agent.stop)  # a loop that never converges fails
    watchdog.start()
    try:
        agent.run()
    finally:
        watchdog.cancel()
    assert agent.topo is final
    assert agent.planner is not None
    want = plan(final, NODE, node.real_ports(agent, final))
    assert node.cookies() == {f.cookie for f in want}
    # each sync took the newest topology: 1 + 60 / 10 of them, not 61
    assert [g for i, g in enumerate(synced) if i == 0 or synced[i - 1] != g] == [
        f"g{i}" for i in range(0, 61, 10)], synced
    # ... and a sync of its own at most when the last one made a tunnel, whose number
    # OVS gives it after the sync (and one for its OVSDB change)
    assert len(watch.bundles) == len(synced) <= 9, (synced, watch.bundles)


def test_a_topology_the_agent_refuses_loses_no_change(node: Node) -> None:
    """The source hands out a topology without this node (refused: the last one stays),
    a sync runs meanwhile (a port plugged), then a valid one: the plan follows every change
    since the one it planned, the refused one's included."""
    cloud, topo = start(6)
    node.follow(cloud, topo)
    source = DeltaSource()
    source.arrived.append(topo)
    agent = node.agent(source)
    watch = Watch(agent.switch)
    assert agent._load()
    node.settle(agent)
    converge(agent, node, watch, topo, full=True)
    changed = next_topology(cloud, topo)  # a change in the refused topology...
    doc = copy(cloud.doc)
    del doc["nodes"][NODE]
    for name in [n for n, v in doc["vms"].items() if v["node"] == NODE]:
        del doc["vms"][name]
    source.arrived.append(build_topology(doc))
    assert not agent._load() and agent.topo is topo  # refused: node missing
    plugged = dict(cloud.plugged[NODE])
    while cloud.plugged[NODE].keys() <= plugged.keys():
        switch_change(cloud, changed)  # a port plugged (and maybe others unplugged)
    node.follow(cloud, changed)
    node.settle(agent)
    sync(agent, node, watch)
    source.arrived.append(changed)  # ...and back, with that change
    assert agent._load()
    sync(agent, node, watch)
    assert agent.planner is not None
    want = plan(changed, NODE, agent.planner.ports)
    assert agent.planner.flows() == want
    assert node.cookies() == {f.cookie for f in want}
    converge(agent, node, watch, changed)  # with the real ports, once numbered
    assert watch.dumps == 1


def test_a_periodic_whole_plan_finds_and_repairs_a_wrong_incremental_one(
        node: Node, caplog: Any) -> None:
    cloud, topo = start(7)
    node.follow(cloud, topo)
    agent = node.agent(Topologies())
    watch = Watch(agent.switch)
    agent.topo = topo
    node.settle(agent)
    converge(agent, node, watch, topo, full=True)
    assert agent.planner is not None
    wrong = next(iter(agent.planner.by_cookie))
    del agent.planner.by_cookie[wrong]  # as a forgotten dependency would leave it
    sync(agent, node, watch, full=True)  # a resync follows the plan it has
    assert wrong not in node.cookies()
    with caplog.at_level("ERROR"):
        sync(agent, node, watch, full=True, replan=True)
    assert "differs from the whole plan (1 flows missing, 0 extra)" in caplog.text
    want = plan(topo, NODE, node.real_ports(agent, topo))
    assert node.cookies() == {f.cookie for f in want}
    assert wrong in node.cookies()


def test_the_periodic_check_reads_nothing_back_until_the_switch_differs(
        node: Node, lab: LabHandle) -> None:
    """Every `resync_interval` the agent asks the switch how many flows of ours it holds
    (one round trip) and reads them back only when that differs from what it installed: a
    flow deleted behind its back is found and put back. ovs-vswitchd rewriting a port's
    counters (every 5 s) does not wake it."""
    cloud, topo = start(8)
    node.follow(cloud, topo)
    source = Topologies()
    source.arrived.append(topo)
    agent = node.agent(source)
    agent.conf.set_override("resync_interval", 0.5, group="agent")
    watch = Watch(agent.switch)
    checks: list[int] = []
    count = agent.switch.count_owned

    def counted() -> int:
        checks.append(count())
        return checks[-1]

    agent.switch.count_owned = counted  # type: ignore[method-assign]
    vm = sorted(node.ports)[0]
    node.settle(agent)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        assert agent.ovsdb is not None
        deadline = time.monotonic() + 10
        while not (agent.status.get("converged") and agent.planner is not None
                   and agent.planner.ports == node.real_ports(agent, topo)
                   and all(i.ofport > 0 for i in agent.ovsdb.interfaces(BRIDGE))):
            assert time.monotonic() < deadline, agent.status
            time.sleep(0.05)
        # the VM's port up, sending (ARP, IPv6's own): its counters move
        lab.node(LAB_NODE, "ip", "addr", "add", "192.0.2.1/24", "dev", iface(vm))
        lab.node(LAB_NODE, "ip", "link", "set", iface(vm), "up")
        time.sleep(0.3)
        want = {f.cookie for f in plan(topo, NODE, node.real_ports(agent, topo))}
        assert node.cookies() == want
        dumps, changes, before = watch.dumps, agent.ovsdb.changes, len(checks)
        counters = _counters(agent, iface(vm))
        lab.dvr("node", LAB_NODE, "--", "ping", "-c", "6", "-i", "1", "-W", "1", "-I",
                iface(vm), "192.0.2.2", check=False)  # unanswered: ARP requests
        assert _counters(agent, iface(vm)) != counters  # rewritten meanwhile ...
        assert agent.ovsdb.changes == changes  # ... and not one wakeup for it
        assert len(checks) - before >= 7, checks  # a check every 0.5 s
        assert watch.dumps == dumps  # and not one read-back
        assert set(checks[before:]) == {len(want)}
        victim = sorted(want)[len(want) // 2]
        lab.node(LAB_NODE, "ovs-ofctl", "-O", "OpenFlow13", "del-flows", BRIDGE,
                 f"cookie={victim:#x}/-1")
        deadline = time.monotonic() + 3
        while node.cookies() != want:
            assert time.monotonic() < deadline, "the deleted flow did not come back"
            time.sleep(0.05)
        assert watch.dumps == dumps + 1  # found by the count: read back once, put back
    finally:
        agent.stop()
        thread.join(10)


def _counters(agent: DvrAgent, name: str) -> dict[str, int]:
    """A port's counters as the agent's copy of OVSDB has them."""
    assert agent.ovsdb is not None
    rows = agent.ovsdb._conn.idl.tables["Interface"].rows.values()
    return next(dict(r.statistics) for r in rows if r.name == name)
