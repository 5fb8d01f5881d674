"""The incremental planner (flows.incremental) against the full plan, the reference.

Random sequences of changes, on clouds of several shapes (tests/unit/changes.py): the
desired state (VMs, floating IPs, router interfaces, networks, routers, nodes, SNAT chains,
and changes the model refuses: those leave the plan as it was) and each node's switch (VMs
plugged, unplugged and renumbered, tunnels renumbered and gone, SNAT claims, translations
held). After every step, on compute and network nodes: the incremental plan equals
`plan()` of the same inputs, its groups those the plan's flows apply, and the delta it
returned turns the previous flow set into the new one.
"""

from __future__ import annotations

import random

import pytest

from flows import incremental
from flows.incremental import Change, IncrementalPlan
from flows.live import LiveTopology
from flows.model import Topology, TopologyError, build_topology
from flows.ofp import Flow, groups_of
from flows.planner import plan
from tests.unit.changes import Cloud, copy, edits, shapes

SHAPES = shapes()
STEPS = 120


def check(inc: IncrementalPlan, topo: Topology, node: str, before: dict[int, Flow],
          step: str) -> None:
    want = plan(topo, node, inc.ports)
    assert inc.flows() == want, f"{node} after {step}: {_differ(inc.flows(), want)}"
    assert inc.groups == groups_of(want), f"{node} after {step}: groups"
    delta = inc._delta  # the next update's: empty
    assert not delta.added and not delta.removed


def _differ(have: frozenset[Flow], want: frozenset[Flow]) -> str:
    extra = sorted(str(f.hint) + " " + f.to_ofctl() for f in have - want)[:3]
    missing = sorted(str(f.hint) + " " + f.to_ofctl() for f in want - have)[:3]
    return f"extra {extra}, missing {missing}"


def apply_delta(flows: dict[int, Flow], delta) -> dict[int, Flow]:  # type: ignore[no-untyped-def]
    out = dict(flows)
    for c in delta.removed:
        assert c in out, "removed a flow that was not there"
        del out[c]
    for c, f in delta.added.items():
        assert c not in out, "added a flow already there"
        out[c] = f
    return out


def run(shape: str, seed: int, steps: int = STEPS, live: bool = False) -> int:
    """`steps` random changes on `shape`, checked after each; how many were refused. With
    `live`, the topologies come from the agent's model kept up to date (flows.live: the
    unchanged objects shared) with the change it reports, as in the agent."""
    rng = random.Random(seed)
    cloud = Cloud(copy(SHAPES[shape]), rng)
    model = LiveTopology(shape)
    topo = model.load(copy(cloud.doc)) if live else build_topology(cloud.doc, shape)
    nodes = sorted(topo.nodes)
    watched = [n for n in nodes if not topo.nodes[n].is_network][:3]
    watched += [n for n in nodes if topo.nodes[n].is_network][:2]
    for node in watched:
        cloud.plugged[node], cloud.tunnels[node] = {}, {}
    cloud.follow(topo)
    incs = {n: IncrementalPlan(topo, n, cloud.ports(topo, n)) for n in watched}
    for node, inc in incs.items():
        check(inc, topo, node, {}, "start")
    refused = 0
    for i in range(steps):
        if rng.random() < 0.3:
            node = rng.choice(watched)
            step = cloud.switch_change(topo, node)
            new = topo
            change: Change | None = Change()
        else:
            before = copy(cloud.doc)
            step = cloud.mutate()
            try:
                if live:
                    vms, infra = edits(before, cloud.doc)
                    new = model.update(vms, infra)
                else:
                    new = build_topology(cloud.doc, shape)
            except TopologyError:
                if live:  # undone, as the operator would: the model follows
                    vms, infra = edits(cloud.doc, before)
                    model.update(vms, infra)
                cloud.doc = before  # refused: the agent keeps its last state
                refused += 1
                continue
            cloud.follow(new)
            # half the time the change is given (as the agent's source does), else compared
            change = model.change if live else Change.between(topo, new) if i % 2 else None
        for node, inc in incs.items():
            was = dict(inc.by_cookie)
            delta = inc.update(new, cloud.ports(new, node), change)
            # (a flow whose group changed keeps its cookie: the group is in `delta.groups`)
            assert apply_delta(was, delta).keys() == inc.by_cookie.keys()
            check(inc, new, node, was, f"step {i} ({step})")
        topo = new
    return refused


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("seed", [1, 2])
def test_the_incremental_plan_is_the_full_plan_after_every_change(shape: str, seed: int
                                                                    ) -> None:
    assert run(shape, seed) > 5  # the refused changes were exercised too


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_plan_follows_the_agent_s_model_and_its_changes(shape: str) -> None:
    """The topologies of the agent's model (unchanged objects shared, the change it
    reports), as the agent plans them."""
    assert run(shape, 3, live=True) > 5


@pytest.mark.parametrize("broken", ["router of a network", "reachable networks",
                                    "VMs on a renumbered tunnel's node"])
def test_a_missed_dependency_fails_the_check(monkeypatch: pytest.MonkeyPatch,
                                             broken: str) -> None:
    """The property test can fail: an update that forgets one kind of dependency is caught
    within a few dozen changes."""
    if broken == "router of a network":
        monkeypatch.setattr(incremental, "_routers_of", lambda *a: set())
    elif broken == "reachable networks":
        real = incremental._derive

        def stale(topo: Topology, node: str, ports):  # type: ignore[no-untyped-def]
            d = real(topo, node, ports)
            d.reachable = frozenset(d.reachable | {"n0", "n1", "n2"})
            return d
        monkeypatch.setattr(incremental, "_derive", stale)
    else:
        monkeypatch.setattr(IncrementalPlan, "_reindex", lambda *a: None)
    with pytest.raises(AssertionError):
        for seed in range(1, 9):
            for shape in ("mixed", "sparse"):
                run(shape, seed)


def test_a_vm_added_rebuilds_a_few_entries_only() -> None:
    doc = copy(SHAPES["mixed"])
    topo = build_topology(doc)
    cloud = Cloud(doc, random.Random(0))
    node = "c0"
    cloud.plugged[node], cloud.tunnels[node] = {}, {}
    cloud.follow(topo)
    inc = IncrementalPlan(topo, node, cloud.ports(topo, node))
    net = next(iter(inc._d.local_nets))
    doc["vms"]["x1"] = {"node": "c1", "network": net, "ip": cloud._free_ip(net),
                        "mac": "fa:16:3e:00:00:99"}
    new = build_topology(doc)
    delta = inc.update(new, cloud.ports(new, node), Change(vms=frozenset({"x1"})))
    assert not delta.full and delta.entries == 1
    assert [f.hint.name for f in delta.added.values()] == ["x1"] and not delta.removed
