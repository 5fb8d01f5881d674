"""The OpenFlow module against a real ovs-vswitchd: bundles are all or nothing, replays are
idempotent, and only flows with our cookie are seen."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.flowtables import diff
from agent.ofswitch import InstalledFlow, OpenFlowError, Switch
from flows.model import load_topology
from flows.ofp import ETH_IP, Flow, Hint, Match, Output, Purpose, SetField, groups_of
from flows.planner import assumed_ports, plan
from tests.lab.harness import EXAMPLE, LabHandle, running_lab

ONE_NODE = Path(__file__).parent / "topologies" / "one-node.yaml"


@pytest.fixture(scope="module")
def switch() -> Iterator[tuple[LabHandle, Switch]]:
    with running_lab(ONE_NODE) as lab:
        # a bridge of its own, so that the node's agent (which owns br-int) stays out of it
        lab.node("solo", "ovs-vsctl", "add-br", "br-test", "--", "set", "bridge", "br-test",
                 "datapath_type=netdev", "fail_mode=secure")
        sw = Switch(f"unix:{lab.rundir}/nodes/solo/br-test.mgmt")
        try:
            yield lab, sw
        finally:
            sw.close()


def planned() -> frozenset[Flow]:
    topo = load_topology(EXAMPLE)
    return plan(topo, "compute1", assumed_ports(topo, "compute1"))


def cookies(sw: Switch) -> set[int]:
    return {f.cookie for f in sw.dump_owned()}


def apply(sw: Switch, stale: list[InstalledFlow], missing: list[Flow]) -> None:
    """Delete and add in one bundle, with the groups the added flows apply."""
    have = sw.dump_groups()
    with sw.bundle() as bundle:
        bundle.add_groups(g for gid, g in groups_of(missing).items() if gid not in have)
        bundle.delete(stale)
        bundle.add(missing)


def converged(sw: Switch) -> set[int]:
    """Install the plan; the cookies the switch then holds."""
    apply(sw, *diff(planned(), sw.dump_owned()))
    return cookies(sw)


def delivery(reg0: int, port: int) -> Flow:
    return Flow("ls_out_local", 100, Match.of(metadata=7, reg0=reg0), (Output(port),),
                Hint(Purpose.DELIVERY_LOCAL))


def test_apply_then_replay_is_idempotent(switch: tuple[LabHandle, Switch]) -> None:
    _, sw = switch
    want = planned()
    stale, missing = diff(want, sw.dump_owned())
    apply(sw, stale, missing)
    assert cookies(sw) == {f.cookie for f in want}
    assert diff(want, sw.dump_owned()) == ([], [])


def test_invalid_flow_discards_the_whole_bundle(switch: tuple[LabHandle, Switch]) -> None:
    lab, sw = switch
    before = converged(sw)
    good = delivery(1, 5)
    # setting an ARP field on an IPv4 match: OVS refuses it
    bad = Flow("ls_in_dst_key", 100, Match.of(eth_type=ETH_IP),
               (SetField("arp_op", 2), Output(1)), Hint(Purpose.DST_KEY))
    stale = sw.dump_owned()[:3]
    with pytest.raises(OpenFlowError, match="discarded") as refused:
        apply(sw, stale, [good, bad])
    assert f"add cookie={bad.cookie:#x}" in str(refused.value)  # the refused flow is named
    assert cookies(sw) == before  # neither the deletes nor the good add happened
    dump = lab.node("solo", "ovs-ofctl", "-O", "OpenFlow13", "dump-flows", "br-test")
    assert f"{good.cookie:#x}" not in dump


def test_a_bundle_whose_body_fails_changes_nothing(switch: tuple[LabHandle, Switch]) -> None:
    """Messages already sent into the bundle are discarded when the code filling it raises,
    and the connection stays usable."""
    _, sw = switch
    before = converged(sw)
    good = delivery(2, 6)
    with pytest.raises(RuntimeError, match="planning failed"), sw.bundle() as bundle:
        bundle.delete(sw.dump_owned()[:2])
        bundle.add([good])
        raise RuntimeError("planning failed")
    assert cookies(sw) == before
    apply(sw, [], [good])  # the switch takes the next bundle
    assert cookies(sw) == before | {good.cookie}


def test_foreign_flows_are_invisible_and_untouched(switch: tuple[LabHandle, Switch]) -> None:
    lab, sw = switch
    lab.node("solo", "ovs-ofctl", "add-flow", "br-test",
             "cookie=0x42,table=3,priority=5,actions=drop")
    converged(sw)
    owned = sw.dump_owned()
    assert 0x42 not in {f.cookie for f in owned}
    assert len(owned) > 10
    assert sw.count_owned() == len(owned)  # the aggregate count skips the foreign flow too
    apply(sw, owned, [])  # delete everything we own
    assert cookies(sw) == set()
    assert sw.count_owned() == 0
    dump = lab.node("solo", "ovs-ofctl", "-O", "OpenFlow13", "dump-flows", "br-test")
    assert "cookie=0x42," in dump


def test_unreachable_switch_is_a_clear_error(tmp_path: Path) -> None:
    sw = Switch(f"unix:{tmp_path}/nothing.mgmt")
    with pytest.raises(OpenFlowError, match="cannot connect"):
        sw.dump_owned()


def test_flows_read_back_as_planned_are_deleted_by_the_planned_match(
        switch: tuple[LabHandle, Switch]) -> None:
    """Read back with the plan, a flow of a planned cookie carries no parsed match (the
    planned one stands for it): deleting such flows still deletes exactly them."""
    _, sw = switch
    want = planned()
    converged(sw)
    by_cookie = {f.cookie: f for f in want}
    extra = delivery(0x0A0000FE, 9)  # ours, not planned: read back with its own match
    apply(sw, [], [extra])
    read = sw.dump_owned(by_cookie)
    assert {f.cookie for f in read} == set(by_cookie) | {extra.cookie}
    assert all(f.match is None and f.flow is by_cookie[f.cookie]
               for f in read if f.cookie in by_cookie)
    assert next(f for f in read if f.cookie == extra.cookie).match is not None
    victims = [f for f in read if f.cookie in by_cookie][:5] + [
        f for f in read if f.cookie == extra.cookie]
    apply(sw, victims, [])
    assert cookies(sw) == set(by_cookie) - {f.cookie for f in victims}
