"""The flow check against the pipeline's declaration (`flows/check.py`): what a table may
match, write and go to, and the prerequisites of what a flow matches and writes."""

from __future__ import annotations

import pytest

from flows import ofp
from flows.check import PipelineError, check_flow
from flows.ofp import ETH_ARP, ETH_IP, PROTO_ICMP, Flow, Match
from flows.pipeline import TABLES

IP = Match.of(eth_type=ETH_IP)
ARP = Match.of(eth_type=ETH_ARP)


@pytest.mark.parametrize("flow, refused", [
    # an ARP field written on an IPv4 flow: OVS would refuse the bundle
    (Flow("ls_in_gateway", 100, Match.of(metadata=1, eth_type=ETH_IP),
          (ofp.SetField("arp_op", 2), ofp.Output(1))), "SetField of arp_op needs eth_type=0x806"),
    # the TTL of a packet that may not be IPv4
    (Flow("lr_in_routing", 100, Match.of(metadata=1), (ofp.DecTTL(), ofp.Goto("ls_in_dst_key"))),
     "DecTTL of ip_ttl needs eth_type=0x800"),
    (Flow("ls_in_gateway", 100, ARP, (ofp.SetTTL(64), ofp.Output(1))),
     "SetTTL of ip_ttl needs eth_type=0x800"),
    # a move reads its source: an IPv4 address from a packet that may be ARP
    (Flow("ls_in_dst_key", 100, ARP, (ofp.Move("ipv4_dst", "reg0"), ofp.Goto("ls_out_remote"))),
     "Move of ipv4_dst needs eth_type=0x800"),
    # the ICMP type of a packet not known to be ICMP
    (Flow("ls_in_gateway", 100, Match.of(metadata=1, eth_type=ETH_IP),
          (ofp.SetField("icmpv4_type", 0), ofp.Output(1))),
     "SetField of icmpv4_type needs ip_proto"),
    # a field the table does not declare it writes
    (Flow("ls_out_local", 100, Match.of(metadata=1, reg0=1),
          (ofp.SetField("eth_src", "fa:16:3e:00:00:01"), ofp.Output(1))),
     "ls_out_local may not set eth_src"),
    (Flow("ls_in_dst_key", 100, IP, (ofp.Move("ipv4_dst", "reg1"), ofp.Goto("ls_out_remote"))),
     "ls_in_dst_key may not set reg1"),
    # matches: undeclared field, missing prerequisite
    (Flow("ls_out_local", 100, Match.of(metadata=1, eth_type=ETH_IP), (ofp.Output(1),)),
     "ls_out_local may not match eth_type"),
    (Flow("ls_in_gateway", 100, Match.of(metadata=1, arp_op=1), (ofp.Output(1),)),
     "arp_op needs eth_type=0x806"),
    # where it goes
    (Flow("ls_in_dst_key", 100, IP, (ofp.Goto("lr_in_routing"),)),
     "ls_in_dst_key may not go to lr_in_routing"),
    (Flow("ls_in_gateway", 0, Match(), (ofp.Goto("ls_in_dst_key"), ofp.Output(1))),
     "goto must be the last action"),
])
def test_a_flow_that_does_not_fit_is_refused(flow: Flow, refused: str) -> None:
    with pytest.raises(PipelineError, match=refused):
        check_flow(flow)


@pytest.mark.parametrize("flow", [
    Flow("ls_in_gateway", 100, Match.of(metadata=1, eth_type=ETH_ARP, arp_op=1),
         (ofp.Move("eth_src", "eth_dst"), ofp.SetField("arp_op", 2), ofp.Move("arp_spa", "arp_tpa"),
          ofp.Output(1))),
    Flow("ls_in_gateway", 100, Match.of(metadata=1, eth_type=ETH_IP, ip_proto=PROTO_ICMP),
         (ofp.SetField("icmpv4_type", 0), ofp.SetTTL(64), ofp.Output(1))),
    Flow("lr_in_routing", 120, Match.of(metadata=1, eth_type=ETH_IP, ipv4_dst="10.0.0.0/24"),
         (ofp.DecTTL(), ofp.SetField("eth_src", "fa:16:3e:00:00:01"), ofp.SetField("metadata", 5),
          ofp.Goto("ls_in_dst_key"))),
    Flow("lr_out_delivery", 110, Match.of(eth_type=ETH_IP, reg3=1),
         (ofp.SetField("in_port", 7), ofp.Output(1))),
])
def test_a_flow_that_fits_passes(flow: Flow) -> None:
    check_flow(flow)


def test_the_declared_writes_are_real() -> None:
    """Every table declares writes of fields the model knows (or the TTL)."""
    from flows.ofp import FIELDS

    for table in TABLES.values():
        assert table.sets <= set(FIELDS) | {"ip_ttl"}, table.name


def test_a_shape_found_good_does_not_let_another_read_pass() -> None:
    """The check remembers the shapes of flows it passed: a move of another source into the
    same register, on the same match, is still checked (the planner's ARP delivery key
    passed first)."""
    check_flow(Flow("ls_in_dst_key", 100, ARP, (ofp.Move("arp_tpa", "reg0"),
                                                  ofp.Goto("ls_out_remote"))))
    with pytest.raises(PipelineError, match="Move of ipv4_dst needs eth_type=0x800"):
        check_flow(Flow("ls_in_dst_key", 100, ARP, (ofp.Move("ipv4_dst", "reg0"),
                                                      ofp.Goto("ls_out_remote"))))
