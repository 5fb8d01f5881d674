"""Every flow the planner produces for the example and test topologies goes through the
OpenFlow 1.3 encoder the agent's bundles use (`agent.ofencode`, which must write byte for
byte what os-ken's `agent.ofswitch.flow_mod` writes, and `group_mod` for the groups it
applies), is parsed back by os-ken's decoder and read back into the flow model: it must be
the very flow that was planned (table, priority, cookie, match, actions, and each group's
buckets). An encoding mistake (a field os-ken does not know, a mask lost, a wrong Nicira
action, a table number off) fails here, without a lab."""

from __future__ import annotations

import dataclasses
import ipaddress
import struct
from pathlib import Path
from typing import Any

import pytest
from os_ken.ofproto import ofproto_parser, ofproto_protocol
from os_ken.ofproto import ofproto_v1_3 as ofp
from os_ken.ofproto import ofproto_v1_3_parser as parser

from agent import ofencode
from agent.ofswitch import NAT_FLAGS, flow_mod, group_mod
from flows.model import Topology, load_topology
from flows.nat import Binding
from flows.ofp import (
    CT,
    FIELDS,
    NAT,
    Action,
    Bucket,
    DecTTL,
    Flow,
    Goto,
    Group,
    GroupAction,
    Match,
    Move,
    Output,
    Resubmit,
    SetField,
    SetTTL,
    groups_of,
)
from flows.pipeline import BY_NUMBER
from flows.planner import NodePorts, assumed_ports, plan

ROOT = Path(__file__).resolve().parents[2]
TOPOLOGIES = sorted([*(ROOT / "dvr" / "examples").glob("*.yaml"),
                     *(ROOT / "tests" / "lab" / "topologies").glob("*.yaml")])
DP = ofproto_protocol.ProtocolDesc(ofp.OFP_VERSION)
NAT_KINDS = {v: k for k, v in NAT_FLAGS.items()}


def _wire(msg: Any) -> Any:
    """`msg` serialized as it goes to the switch, and parsed back by os-ken."""
    msg.set_xid(1)
    msg.serialize()
    version, msg_type, length, xid = ofproto_parser.header(msg.buf)
    return ofproto_parser.msg(DP, version, msg_type, length, xid, bytes(msg.buf))


def decode_group(group: Group) -> Group:
    """`group` encoded as the agent sends it, its buckets parsed back by os-ken (which has
    no parser for a whole group-mod: a message only controllers send)."""
    mod = group_mod(DP, group)
    mod.set_xid(1)
    mod.serialize()
    buf = bytes(mod.buf)
    command, kind, gid = struct.unpack_from("!HBxI", buf, ofp.OFP_HEADER_SIZE)
    assert (command, kind) == (ofp.OFPGC_ADD, ofp.OFPGT_FF)
    buckets, offset = [], ofp.OFP_GROUP_MOD_SIZE
    while offset < len(buf):
        b = parser.OFPBucket.parser(buf, offset)
        offset += b.len
        assert b.watch_group == ofp.OFPG_ANY
        actions = tuple(_action(a, {}) for a in b.actions)
        buckets.append(Bucket(actions, None if b.watch_port == ofp.OFPP_ANY else b.watch_port))
    return Group(gid, tuple(buckets), "ff")


def fast_wire(flow: Flow) -> Any:
    """`flow` as the agent's bundles carry it (agent.ofencode), parsed back by os-ken; its
    bytes must be the very bytes os-ken's own encoder writes."""
    ours = ofencode.flow_mod(flow, 1)
    reference = flow_mod(DP, flow)
    reference.set_xid(1)
    reference.serialize()
    assert ours == bytes(reference.buf), (
        f"{flow.to_ofctl()}: the fast encoding differs from os-ken's:\n"
        f"  {ours.hex()}\n  {bytes(reference.buf).hex()}")
    bundled = parser.ONFBundleAddMsg(DP, 9, ofp.ONF_BF_ATOMIC | ofp.ONF_BF_ORDERED,
                                     reference, [])
    bundled.set_xid(1)
    bundled.serialize()
    assert ofencode.bundle_add(9, ofp.ONF_BF_ATOMIC | ofp.ONF_BF_ORDERED, ours, 1) == bytes(
        bundled.buf), f"{flow.to_ofctl()}: its bundle-add message differs from os-ken's"
    version, msg_type, length, xid = ofproto_parser.header(ours)
    return ofproto_parser.msg(DP, version, msg_type, length, xid, ours)


def decode(flow: Flow) -> Flow:
    """`flow` encoded as the agent sends it, decoded by os-ken, read back into the model."""
    back = fast_wire(flow)
    assert isinstance(back, parser.OFPFlowMod) and back.command == ofp.OFPFC_ADD
    groups = groups_of([flow])
    actions: list[Action] = []
    for inst in back.instructions:
        if isinstance(inst, parser.OFPInstructionGotoTable):
            actions.append(Goto(BY_NUMBER[inst.table_id].name))
        else:
            assert inst.type == ofp.OFPIT_APPLY_ACTIONS, inst
            actions += [_action(a, groups) for a in inst.actions]
    out = Flow(BY_NUMBER[back.table_id].name, back.priority, _match(back.match),
               tuple(actions), flow.hint)
    assert back.cookie == out.cookie, "the cookie sent is not the flow's"
    return out


def _match(m: Any) -> Match:
    fields: dict[str, Any] = {}
    for name, value in m._fields2:
        assert name in FIELDS, f"the switch would match {name}, which the model does not know"
        if FIELDS[name][0] == "ip" and isinstance(value, tuple):
            addr, mask = value
            value = str(ipaddress.IPv4Network(f"{addr}/{mask}"))
        fields[name] = value
    return Match.of(**fields)


def _action(a: Any, groups: dict[int, Group]) -> Action:
    if isinstance(a, parser.OFPActionGroup):
        assert a.group_id in groups, "a group the flow does not define"
        return GroupAction(decode_group(groups[a.group_id]))
    if isinstance(a, parser.NXActionResubmitTable):
        assert a.in_port == 0xFFF8  # the packet's own in_port (OFPP_IN_PORT in 16 bits)
        return Resubmit(BY_NUMBER[a.table_id].name)
    if isinstance(a, parser.OFPActionOutput):
        return Output(a.port)
    if isinstance(a, parser.OFPActionSetField):
        return SetField(a.key, a.value)
    if isinstance(a, parser.NXActionRegLoad):
        assert a.ofs_nbits == (0 << 6) | (FIELDS[a.dst][1] - 1), "a partial load"
        return SetField(a.dst, a.value)
    if isinstance(a, parser.NXActionRegMove):
        assert (a.src_ofs, a.dst_ofs) == (0, 0)
        move = Move(a.src_field, a.dst_field)
        assert a.n_bits == move.n_bits, "a partial move"
        return move
    if isinstance(a, parser.OFPActionDecNwTtl):
        return DecTTL()
    if isinstance(a, parser.OFPActionSetNwTtl):
        return SetTTL(a.nw_ttl)
    if isinstance(a, parser.NXActionCT):
        assert a.zone_src == "" and a.alg == 0 and a.flags in (0, 1)
        nat = None
        if a.actions:
            (n,) = a.actions
            assert isinstance(n, parser.NXActionNAT)
            assert n.range_ipv4_min == n.range_ipv4_max, "a range of addresses"
            assert n.range_proto_min == n.range_proto_max, "a range of ports"
            nat = NAT(NAT_KINDS[n.flags], n.range_ipv4_min or "", n.range_proto_min)
        return CT(a.zone_ofs_nbits, BY_NUMBER[a.recirc_table].name, commit=bool(a.flags),
                  nat=nat)
    raise AssertionError(f"the planner's actions do not decode to {a!r}")


def held(topo: Topology) -> frozenset[Binding]:
    """A translation of each router with an external gateway, TCP and UDP, as a serving node
    would publish them (a standby plans a flow for each)."""
    out = set()
    for r in topo.routers.values():
        if r.external_gateway and r.interfaces:
            src = str(topo.networks[r.interfaces[0].network].cidr.network_address + 10)
            out |= {Binding(r.name, 6, src, 33333, "198.51.100.10", 443, 33334),
                    Binding(r.name, 17, src, 5353, "198.51.100.10", 53, 5354)}
    return frozenset(out)


def node_plans(topo: Topology) -> list[tuple[str, frozenset[Flow]]]:
    """Every node's plan, with the ports the topology assumes, and as a node knows them
    before it has resolved the upstream gateway and without a provider bridge."""
    out = []
    for node in topo.nodes:
        ports = assumed_ports(topo, node)
        for label, variant in (("", ports),
                               (" (gateway unknown)", dataclasses.replace(ports,
                                                                          gateway_mac=None)),
                               (" (no provider)", NodePorts(ports.vms, ports.tunnels,
                                                            snat=ports.snat)),
                               (" (translations held)", dataclasses.replace(
                                   ports, snat=frozenset(), held=held(topo)))):
            out.append((node + label, plan(topo, node, variant)))
    return out


@pytest.mark.parametrize("path", TOPOLOGIES, ids=lambda p: p.name)
def test_every_planned_flow_encodes_and_decodes_to_itself(path: Path) -> None:
    topo = load_topology(path)
    count = 0
    for node, flows in node_plans(topo):
        for flow in sorted(flows, key=lambda f: f.cookie):
            back = decode(flow)
            assert back == flow and back.cookie == flow.cookie, (
                f"{path.name} {node}: planned {flow.to_ofctl()}, encoded {back.to_ofctl()}")
            count += 1
    assert count > 20 * len(topo.nodes)  # every node plans its defaults at least


def test_the_encoder_check_can_fail() -> None:
    """A flow whose action os-ken encodes differently from the model is caught: a move of
    a field into a narrower one, which the model refuses, and a changed output port."""
    flow = Flow("ls_out_local", 100, Match.of(metadata=7, reg0=1), (Output(5),))
    assert decode(flow) == flow
    other = Flow("ls_out_local", 100, Match.of(metadata=7, reg0=1), (Output(6),))
    assert decode(other) != flow
    with pytest.raises(ValueError, match="widths differ"):
        Move("eth_src", "reg0")
