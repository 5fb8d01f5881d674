"""The topology an agent keeps up to date object by object (flows.live) against
`build_topology()` of the same document, over random sequences of changes (every allocated
value written out, as the northbound database holds them): the same model after every
change, the same refusals (a refused change leaves the last model), a change that names at
least what differs, unchanged VMs kept as they were, and the same scope as the planner's."""

from __future__ import annotations

import random

import pytest

from flows.incremental import Change
from flows.live import Layered, LiveTopology
from flows.model import Topology, TopologyError, build_topology
from flows.planner import scope
from tests.unit.changes import Cloud, copy, edits, shapes

SHAPES = shapes()


def covers(change: Change | None, old: Topology, new: Topology) -> bool:
    if change is None:
        return True
    real = Change.between(old, new)
    return (real.vms <= change.vms and real.networks <= change.networks
            and real.routers <= change.routers and (change.nodes or not real.nodes)
            and (change.external or not real.external))


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_live_model_is_the_whole_build_after_every_change(shape: str, seed: int) -> None:
    run(shape, seed)


def test_a_document_the_model_allocates_in_is_built_whole_and_the_same() -> None:
    """VMs added without their address or MAC (not as the northbound database holds
    them): the model's own allocation, every time."""
    live = run("mixed", 4, effective=False)
    assert live.paths.get("whole", 0) > 50


def run(shape: str, seed: int, effective: bool = True) -> LiveTopology:
    rng = random.Random(seed)
    cloud = Cloud(copy(SHAPES[shape]), rng, effective=effective)
    live = LiveTopology(shape)
    topo = live.load(copy(cloud.doc))
    assert topo == build_topology(cloud.doc, shape)
    refused = incremental = 0
    valid = copy(cloud.doc)
    for i in range(150):
        before = copy(cloud.doc)
        step = cloud.mutate()
        try:
            want: Topology | None = build_topology(cloud.doc, shape)
        except TopologyError:
            want = None
        vms, infra = edits(before, cloud.doc)
        last = live.topology
        try:
            got = live.update({n: copy(s) if s else None for n, s in vms.items()}, infra)
        except TopologyError:
            assert want is None, f"step {i} ({step}): refused, yet valid"
            assert live.topology is last  # the last valid model stays
            refused += 1
            if rng.random() < 0.7:  # mostly undone, back to the last valid document
                vms, infra = edits(cloud.doc, valid)
                cloud.doc = copy(valid)
                got = live.update({n: copy(s) if s else None for n, s in vms.items()}, infra)
                assert got == build_topology(valid, shape)
            continue
        valid = copy(cloud.doc)
        assert want is not None, f"step {i} ({step}): accepted, yet refused by the model"
        assert got == want, f"step {i} ({step})"
        assert last is not None and covers(live.change, last, got), f"step {i} ({step})"
        if live.change is not None and not live.change.nodes:
            incremental += 1
            # the VMs not changed are the previous objects
            assert all(got.vms[n] is last.vms[n] for n in got.vms
                       if n in last.vms and n not in live.change.vms)
        for node in sorted(got.nodes)[:6]:
            assert live.scope(node) == scope(got, node), f"step {i} ({step}): {node}"
    assert refused > 5 and incremental > 50
    if effective:
        assert live.builds < 1 + 2 * refused  # a whole build only for what was refused
        # every way an update can go was taken
        assert {"vms", "networks", "interfaces", "small tables"} <= live.paths.keys(), \
            live.paths
    return live


def test_a_vm_changed_is_checked_alone() -> None:
    doc = copy(SHAPES["mixed"])
    live = LiveTopology()
    topo = live.load(doc)
    vm = next(iter(doc["vms"]))
    spec = dict(doc["vms"][vm], mac="fa:16:3e:aa:bb:cc")
    new = live.update({vm: spec})
    assert live.change == Change(vms=frozenset({vm}))
    assert new.vms[vm].mac == "fa:16:3e:aa:bb:cc"
    assert new.networks is topo.networks and new.routers is topo.routers
    other = next(n for n in doc["vms"] if n != vm)
    with pytest.raises(TopologyError, match="already used"):  # the model's own words
        live.update({other: dict(doc["vms"][other], mac="fa:16:3e:aa:bb:cc")})
    assert live.topology is new


def test_the_layered_mapping_is_the_dict_it_stands_for() -> None:
    """Entries set and removed a few at a time, merged into a new base now and then: always
    the same mapping as a dict changed the same way, and the earlier versions unchanged."""
    rng = random.Random(3)
    want = {f"k{i}": i for i in range(50)}
    have = Layered(dict(want))
    versions: list[tuple[Layered, dict]] = []
    for step in range(400):
        updates = {f"k{rng.randrange(120)}": (None if rng.random() < 0.4 else step)
                   for _ in range(rng.randint(1, 3))}
        have = have.changed(updates)
        for k, v in updates.items():
            if v is None:
                want.pop(k, None)
            else:
                want[k] = v
        assert have == want and len(have) == len(want) and sorted(have) == sorted(want)
        assert all(have.get(k) == want.get(k) and (k in have) == (k in want)
                   for k in (f"k{i}" for i in range(120)))
        if step % 50 == 0:
            versions.append((have, dict(want)))
    assert all(v == w for v, w in versions)  # immutable: earlier versions as they were
