"""Behaviour of the planned pipeline, pushed through the offline simulator.

The tests send packets from VMs and assert where they end (which VM, which node), which
tunnels they cross and with which headers they arrive, in the manner of faucet's
FakeOFTable tests; they do not assert on flow text. The flow-count tests check the planner's
scaling promise: a remote VM costs a node one flow, and only when the node can reach it.

Topology `EASTWEST` (three compute nodes and a network node with no VM):

    compute1: vm1, vm8 (blue)  vm3 (red)  vm6 (yellow)  vm9 (iso)
    compute2: vm4 (blue)       vm2 (red)                vm7 (iso)
    compute3: vm5 (green, same IP as vm1)
    r1 joins blue and red; r2 joins green (same CIDR as blue) and yellow; iso is on no router.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
from collections import Counter
from itertools import combinations
from typing import Any

import pytest

from dvr.lab.generate import generate
from flows.check import PipelineError, check_flow
from flows.model import Topology, build_topology, parse_topology
from flows.ofp import (
    ETH_ARP,
    ETH_IP,
    OWNER_COOKIE,
    OWNER_MASK,
    Flow,
    Goto,
    Match,
    Output,
    Purpose,
    SetField,
    purpose_of_cookie,
)
from flows.pipeline import TABLES
from flows.planner import NodePorts, assumed_ports, plan
from flows.simulator import Cloud, Trace, packet

EASTWEST = """
nodes:
  compute1: {role: compute}
  compute2: {role: compute}
  compute3: {role: compute}
  net1: {role: network}
networks:
  blue: {cidr: 10.1.0.0/24}
  red: {cidr: 10.2.0.0/24}
  green: {cidr: 10.1.0.0/24}
  yellow: {cidr: 10.3.0.0/24}
  iso: {cidr: 10.9.0.0/24}
routers:
  r1: {interfaces: [blue, red]}
  r2: {interfaces: [green, yellow]}
vms:
  vm1: {node: compute1, network: blue, ip: 10.1.0.11}
  vm8: {node: compute1, network: blue, ip: 10.1.0.18}
  vm3: {node: compute1, network: red, ip: 10.2.0.13}
  vm6: {node: compute1, network: yellow, ip: 10.3.0.16}
  vm9: {node: compute1, network: iso, ip: 10.9.0.19}
  vm4: {node: compute2, network: blue, ip: 10.1.0.14}
  vm2: {node: compute2, network: red, ip: 10.2.0.12}
  vm7: {node: compute2, network: iso, ip: 10.9.0.17}
  vm5: {node: compute3, network: green, ip: 10.1.0.11}
"""


# --- helpers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def topo() -> Topology:
    return parse_topology(EASTWEST, "eastwest")


@pytest.fixture(scope="module")
def cloud(topo: Topology) -> Cloud:
    return Cloud.offline(topo)


def tables_on(trace: Trace, node: str) -> list[str]:
    return [s.table for s in trace.steps if s.node == node]


# --- switching --------------------------------------------------------------------------


def test_same_network_same_node_is_switched_locally(topo: Topology, cloud: Cloud, sim) -> None:
    trace = sim.ping_vm(topo, cloud, "vm1", "vm8")
    end = sim.delivered_once(trace)
    assert (end.vm, end.node) == ("vm8", "compute1")
    assert trace.tunnels == []
    assert trace.nodes == ["compute1"]
    p = end.packet
    assert p["ip_ttl"] == 64  # switched: no router hop
    assert p["eth_src"] == topo.vms["vm1"].mac
    assert p["eth_dst"] == topo.vms["vm8"].mac
    assert (p["ipv4_src"], p["ipv4_dst"]) == ("10.1.0.11", "10.1.0.18")
    assert "lr_in_routing" not in tables_on(trace, "compute1")


@pytest.mark.parametrize(("src", "dst"), [("vm1", "vm4"), ("vm4", "vm1"), ("vm9", "vm7")])
def test_same_network_across_nodes_crosses_one_tunnel(
    topo: Topology, cloud: Cloud, src: str, dst: str, sim
) -> None:
    s, d = topo.vms[src], topo.vms[dst]
    trace = sim.ping_vm(topo, cloud, src, dst)
    end = sim.delivered_once(trace)
    assert (end.vm, end.node) == (dst, d.node)
    assert trace.tunnels == [(s.node, d.node)]  # straight to the destination node
    assert trace.nodes == [s.node, d.node]
    p = end.packet
    assert p["ip_ttl"] == 64
    assert p["eth_src"] == s.mac
    assert p["eth_dst"] == d.mac
    assert "tunnel_id" not in p
    assert "lr_in_routing" not in tables_on(trace, s.node) + tables_on(trace, d.node)


def test_the_tunnel_carries_the_destination_networks_vni(topo: Topology, cloud: Cloud, sim) -> None:
    trace = sim.ping_vm(topo, cloud, "vm1", "vm4")
    arrival = next(s for s in trace.steps if s.node == "compute2")
    assert arrival.table == "phy_in_classify"
    tunnel_in = next(s for s in trace.steps if s.node == "compute2" and s.table == "phy_in_tunnel")
    assert tunnel_in.flow is not None
    assert tunnel_in.flow.match.get("tunnel_id") == topo.networks["blue"].vni


# --- routing ----------------------------------------------------------------------------


def test_routed_same_node_never_leaves_the_node(topo: Topology, cloud: Cloud, sim) -> None:
    trace = sim.ping_vm(topo, cloud, "vm1", "vm3", ip_ttl=50)
    end = sim.delivered_once(trace)
    assert (end.vm, end.node) == ("vm3", "compute1")
    assert trace.tunnels == []
    assert trace.nodes == ["compute1"]
    p = end.packet
    assert p["ip_ttl"] == 49  # exactly one router hop
    assert p["eth_src"] == sim.router_mac(topo, "red")  # the router's interface on red
    assert p["eth_dst"] == topo.vms["vm3"].mac
    assert (p["ipv4_src"], p["ipv4_dst"]) == ("10.1.0.11", "10.2.0.13")


@pytest.mark.parametrize(("src", "dst"), [
    ("vm1", "vm2"),  # blue on compute1 -> red on compute2
    ("vm2", "vm1"),  # and back
    ("vm6", "vm5"),  # yellow on compute1 -> green on compute3 (r2)
    ("vm5", "vm6"),
])
def test_routed_across_nodes_is_routed_at_the_source(
    topo: Topology, cloud: Cloud, src: str, dst: str, sim
) -> None:
    s, d = topo.vms[src], topo.vms[dst]
    trace = sim.ping_vm(topo, cloud, src, dst, ip_ttl=50)
    end = sim.delivered_once(trace)
    assert (end.vm, end.node) == (dst, d.node)
    assert trace.tunnels == [(s.node, d.node)]
    assert trace.nodes == [s.node, d.node]
    assert "net1" not in trace.nodes
    assert "lr_in_routing" in tables_on(trace, s.node)  # routed where it was sent
    assert "lr_in_routing" not in tables_on(trace, d.node)
    p = end.packet
    assert p["ip_ttl"] == 49
    assert p["eth_src"] == sim.router_mac(topo, d.network)
    assert p["eth_dst"] == d.mac
    assert (p["ipv4_src"], p["ipv4_dst"]) == (str(s.ip), str(d.ip))


def test_overlapping_cidrs_each_router_routes_to_its_own_vm(
    topo: Topology, cloud: Cloud, sim
) -> None:
    """blue (r1) and green (r2) are both 10.1.0.0/24 and vm1, vm5 both hold 10.1.0.11."""
    assert topo.vms["vm1"].ip == topo.vms["vm5"].ip
    via_r1 = cloud.send_from_vm(
        "vm3", sim.icmp_from(topo, "vm3", "10.1.0.11", sim.router_mac(topo, "red")))
    end = sim.delivered_once(via_r1)
    assert (end.vm, end.node) == ("vm1", "compute1")
    assert end.packet["eth_src"] == sim.router_mac(topo, "blue")
    assert end.packet["eth_dst"] == topo.vms["vm1"].mac

    via_r2 = cloud.send_from_vm(
        "vm6", sim.icmp_from(topo, "vm6", "10.1.0.11", sim.router_mac(topo, "yellow")))
    end = sim.delivered_once(via_r2)
    assert (end.vm, end.node) == ("vm5", "compute3")
    assert via_r2.tunnels == [("compute1", "compute3")]
    assert end.packet["eth_src"] == sim.router_mac(topo, "green")
    assert end.packet["eth_dst"] == topo.vms["vm5"].mac


def test_ttl_one_is_not_routed(topo: Topology, cloud: Cloud, sim) -> None:
    sim.dropped_at_source(sim.ping_vm(topo, cloud, "vm1", "vm2", ip_ttl=1), "compute1")
    sim.dropped_at_source(sim.ping_vm(topo, cloud, "vm1", "vm3", ip_ttl=1), "compute1")


def test_ttl_two_is_routed_and_arrives_with_one(topo: Topology, cloud: Cloud, sim) -> None:
    end = sim.delivered_once(sim.ping_vm(topo, cloud, "vm1", "vm2", ip_ttl=2))
    assert end.packet["ip_ttl"] == 1


def test_ttl_one_is_switched_unchanged(topo: Topology, cloud: Cloud, sim) -> None:
    end = sim.delivered_once(sim.ping_vm(topo, cloud, "vm1", "vm4", ip_ttl=1))
    assert (end.vm, end.packet["ip_ttl"]) == ("vm4", 1)


# --- the router's own addresses ---------------------------------------------------------


@pytest.mark.parametrize("src", ["vm1", "vm3", "vm4", "vm5", "vm6"])
def test_arp_for_the_gateway_is_answered_on_the_source_node(
    topo: Topology, cloud: Cloud, src: str, sim
) -> None:
    vm = topo.vms[src]
    gw = sim.gateway(topo, vm.network)
    trace = cloud.send_from_vm(src, sim.arp_request(topo, src, gw))
    end = sim.delivered_once(trace)
    assert (end.vm, end.node) == (src, vm.node)  # back to the requester
    assert trace.tunnels == []
    assert trace.nodes == [vm.node]
    p = end.packet
    mac = sim.router_mac(topo, vm.network)  # green and blue share 10.1.0.1: each its own router
    assert p["eth_type"] == ETH_ARP
    assert p["arp_op"] == 2
    assert (p["arp_spa"], p["arp_sha"]) == (gw, mac)
    assert (p["arp_tpa"], p["arp_tha"]) == (str(vm.ip), vm.mac)
    assert (p["eth_src"], p["eth_dst"]) == (mac, vm.mac)


def test_arp_for_another_networks_gateway_is_not_answered(
    topo: Topology, cloud: Cloud, sim
) -> None:
    arp = sim.arp_request(topo, "vm1", sim.gateway(topo, "red"))
    sim.dropped_at_source(cloud.send_from_vm("vm1", arp), "compute1")


def test_arp_on_a_network_without_router_gets_no_gateway(topo: Topology, cloud: Cloud, sim) -> None:
    sim.dropped_at_source(cloud.send_from_vm("vm9", sim.arp_request(topo, "vm9", "10.9.0.1")),
                      "compute1")


@pytest.mark.parametrize(("src", "dst"), [("vm1", "vm4"), ("vm4", "vm1"), ("vm1", "vm8")])
def test_arp_for_a_vm_goes_to_exactly_that_vm(
    topo: Topology, cloud: Cloud, src: str, dst: str, sim
) -> None:
    s, d = topo.vms[src], topo.vms[dst]
    trace = cloud.send_from_vm(src, sim.arp_request(topo, src, str(d.ip)))
    end = sim.delivered_once(trace)
    assert (end.vm, end.node) == (dst, d.node)
    assert trace.tunnels == ([] if s.node == d.node else [(s.node, d.node)])
    p = end.packet
    assert p["arp_op"] == 1  # the request itself, not a proxy answer
    assert (p["arp_spa"], p["arp_sha"], p["arp_tpa"]) == (str(s.ip), s.mac, str(d.ip))
    assert p["eth_src"] == s.mac
    assert p["eth_dst"] == d.mac  # no broadcast: unicast to the target


def test_arp_reply_between_vms_is_delivered(topo: Topology, cloud: Cloud, sim) -> None:
    vm4, vm1 = topo.vms["vm4"], topo.vms["vm1"]
    reply = packet(arp=True, arp_op=2, eth_src=vm4.mac, eth_dst=vm1.mac, arp_sha=vm4.mac,
                   arp_spa=str(vm4.ip), arp_tha=vm1.mac, arp_tpa=str(vm1.ip))
    trace = cloud.send_from_vm("vm4", reply)
    end = sim.delivered_once(trace)
    assert end.vm == "vm1"
    assert trace.tunnels == [("compute2", "compute1")]


@pytest.mark.parametrize(("src", "target_net"), [
    ("vm1", "blue"),   # its gateway
    ("vm1", "red"),    # the router's other interface
    ("vm2", "blue"),   # from compute2, to the other interface
    ("vm6", "green"),  # r2: 10.1.0.1 again, but r2's
])
def test_ping_to_a_router_address_is_answered_on_the_source_node(
    topo: Topology, cloud: Cloud, src: str, target_net: str, sim
) -> None:
    vm = topo.vms[src]
    target = sim.gateway(topo, target_net)
    mac = sim.router_mac(topo, vm.network)
    trace = cloud.send_from_vm(src, sim.icmp_from(topo, src, target, mac, ip_ttl=7))
    end = sim.delivered_once(trace)
    assert (end.vm, end.node) == (src, vm.node)
    assert trace.tunnels == []
    assert trace.nodes == [vm.node]
    p = end.packet
    assert p["eth_type"] == ETH_IP
    assert p["icmpv4_type"] == 0
    assert (p["ipv4_src"], p["ipv4_dst"]) == (target, str(vm.ip))
    assert (p["eth_src"], p["eth_dst"]) == (mac, vm.mac)
    assert p["ip_ttl"] == 64  # a fresh packet


def test_other_traffic_to_the_router_address_is_dropped(topo: Topology, cloud: Cloud, sim) -> None:
    vm = topo.vms["vm1"]
    tcp = packet(tcp=True, eth_src=vm.mac, eth_dst=sim.router_mac(topo, "blue"),
                 ipv4_src=str(vm.ip), ipv4_dst="10.1.0.1", tcp_src=40000, tcp_dst=22)
    sim.dropped_at_source(cloud.send_from_vm("vm1", tcp), "compute1")


# --- isolation --------------------------------------------------------------------------


@pytest.mark.parametrize(("src", "dst"), [
    ("vm1", "vm7"),  # blue -> iso (no router), across nodes
    ("vm1", "vm9"),  # blue -> iso, same node
    ("vm7", "vm4"),  # iso -> blue, same node
    ("vm9", "vm4"),  # iso -> blue, across nodes
    ("vm3", "vm6"),  # red (r1) -> yellow (r2), same node
    ("vm2", "vm6"),  # red (r1) -> yellow (r2), across nodes
    ("vm6", "vm2"),  # yellow (r2) -> red (r1)
    ("vm4", "vm5"),  # blue -> green: different routers (and the IP is vm1's on blue)
])
def test_networks_that_share_no_router_cannot_reach_each_other(
    topo: Topology, cloud: Cloud, src: str, dst: str, sim
) -> None:
    s, d = topo.vms[src], topo.vms[dst]
    tries = [d.mac, sim.BROADCAST]  # straight to the VM's MAC, as if on the same segment
    if topo.router_of(s.network):
        tries.append(sim.router_mac(topo, s.network))  # through the sender's own router
    tries.append(sim.router_mac(topo, "green" if d.network == "blue" else "blue"))  # any router
    for eth_dst in tries:
        trace = cloud.send_from_vm(src, sim.icmp_from(topo, src, str(d.ip), eth_dst))
        assert all(e.vm != dst for e in trace.delivered), eth_dst
        if d.ip == topo.vms["vm1"].ip and s.network == "blue":
            continue  # 10.1.0.11 on blue is vm1: see the delivery-by-IP test
        sim.dropped_at_source(trace, s.node)
        arp = cloud.send_from_vm(src, sim.arp_request(topo, src, str(d.ip), eth_dst=eth_dst))
        sim.dropped_at_source(arp, s.node)


def test_a_frame_is_delivered_by_its_destination_ip_not_its_mac(
    topo: Topology, cloud: Cloud, sim
) -> None:
    """A documented limit: vm4 (blue) sends to 10.1.0.11 with vm5's MAC (green); the frame is
    delivered on blue to vm1, which holds that address there, rewritten to vm1's MAC."""
    trace = cloud.send_from_vm(
        "vm4", sim.icmp_from(topo, "vm4", "10.1.0.11", topo.vms["vm5"].mac))
    end = sim.delivered_once(trace)
    assert end.vm == "vm1"
    assert end.packet["eth_dst"] == topo.vms["vm1"].mac


@pytest.mark.parametrize("peer", ["compute1", "compute3", "net1"])
def test_a_tunnel_packet_is_never_sent_into_another_tunnel(
    topo: Topology, cloud: Cloud, peer: str, sim
) -> None:
    """Split horizon: compute2 receives from a peer (e.g. one with stale flows) a blue
    packet for vm8, which lives on compute1; compute2 must not forward it to compute1 (nor
    back, nor anywhere): a packet crosses at most one tunnel."""
    vm4, vm8 = topo.vms["vm4"], topo.vms["vm8"]
    in_port = cloud.nodes["compute2"].ports.tunnels[peer]
    pkt = packet(icmp=True, eth_src=vm4.mac, eth_dst=vm8.mac, ipv4_src=str(vm4.ip),
                 ipv4_dst=str(vm8.ip), icmpv4_type=8, tunnel_id=topo.networks["blue"].vni)
    sim.dropped_at_source(cloud.run("compute2", in_port, pkt), "compute2")


def test_a_tunnel_packet_for_a_local_vm_is_delivered(topo: Topology, cloud: Cloud, sim) -> None:
    vm1, vm4 = topo.vms["vm1"], topo.vms["vm4"]
    in_port = cloud.nodes["compute2"].ports.tunnels["compute1"]
    pkt = packet(icmp=True, eth_src=vm1.mac, eth_dst="00:00:00:00:00:01",
                 ipv4_src=str(vm1.ip), ipv4_dst=str(vm4.ip), icmpv4_type=8,
                 tunnel_id=topo.networks["blue"].vni)
    end = sim.delivered_once(cloud.run("compute2", in_port, pkt))
    assert (end.vm, end.packet["eth_dst"]) == ("vm4", vm4.mac)


@pytest.mark.parametrize("network", ["green", "yellow"])
def test_a_tunnel_packet_of_a_network_not_on_the_node_is_dropped(
    topo: Topology, cloud: Cloud, network: str, sim
) -> None:
    """compute2 has no VM on green or yellow: it does not accept their VNIs, even for an
    address (10.1.0.14) that one of its VMs holds on another network."""
    in_port = cloud.nodes["compute2"].ports.tunnels["compute3"]
    pkt = packet(icmp=True, eth_src="fa:16:3e:00:00:01", eth_dst=topo.vms["vm4"].mac,
                 ipv4_src="10.1.0.50", ipv4_dst="10.1.0.14", icmpv4_type=8,
                 tunnel_id=topo.networks[network].vni)
    trace = cloud.run("compute2", in_port, pkt)
    sim.dropped_at_source(trace, "compute2")
    assert trace.steps[-1].table == "phy_in_tunnel"


def test_the_network_node_drops_whatever_a_tunnel_brings(topo: Topology, cloud: Cloud, sim) -> None:
    in_port = cloud.nodes["net1"].ports.tunnels["compute1"]
    for vni in (n.vni for n in topo.networks.values()):
        pkt = packet(icmp=True, eth_src="fa:16:3e:00:00:01", eth_dst=topo.vms["vm4"].mac,
                     ipv4_src="10.1.0.50", ipv4_dst="10.1.0.14", icmpv4_type=8, tunnel_id=vni)
        sim.dropped_at_source(cloud.run("net1", in_port, pkt), "net1")


# --- port security and unknown destinations ---------------------------------------------


def spoofed(topo: Topology, case: str, sim) -> dict:
    """A packet from vm1's port that is not vm1's own, for each way of lying."""
    vm1, vm4 = topo.vms["vm1"], topo.vms["vm4"]
    to_vm8 = dict(eth_dst=topo.vms["vm8"].mac, ipv4_dst="10.1.0.18", icmpv4_type=8)
    cases = {
        "ip": lambda: packet(icmp=True, eth_src=vm1.mac, ipv4_src="10.1.0.99", **to_vm8),
        "ip-of-another-vm": lambda: packet(icmp=True, eth_src=vm1.mac, ipv4_src=str(vm4.ip),
                                           **to_vm8),
        "mac": lambda: packet(icmp=True, eth_src="fa:16:3e:00:00:99", ipv4_src=str(vm1.ip),
                              **to_vm8),
        "mac-of-another-vm": lambda: packet(icmp=True, eth_src=vm4.mac, ipv4_src=str(vm1.ip),
                                            **to_vm8),
        "arp-spa": lambda: sim.arp_request(topo, "vm1", "10.1.0.18", arp_spa="10.1.0.99"),
        "arp-sha": lambda: sim.arp_request(topo, "vm1", "10.1.0.18", arp_sha="fa:16:3e:00:00:99"),
        "arp-eth-src": lambda: sim.arp_request(topo, "vm1", "10.1.0.18",
                                           eth_src="fa:16:3e:00:00:99"),
        "arp-for-gateway": lambda: sim.arp_request(topo, "vm1", "10.1.0.1", arp_spa="10.1.0.99"),
        "ipv6": lambda: {"eth_type": 0x86DD, "eth_src": vm1.mac,
                         "eth_dst": topo.vms["vm8"].mac},
    }
    return cases[case]()


@pytest.mark.parametrize("case", [
    "ip", "ip-of-another-vm", "mac", "mac-of-another-vm", "arp-spa", "arp-sha", "arp-eth-src",
    "arp-for-gateway", "ipv6",
])
def test_port_security_drops_spoofed_packets_at_the_port(
    topo: Topology, cloud: Cloud, case: str, sim
) -> None:
    trace = cloud.send_from_vm("vm1", spoofed(topo, case, sim))
    sim.dropped_at_source(trace, "compute1")
    assert [s.table for s in trace.steps] == ["phy_in_classify"]


def test_the_unspoofed_packets_pass(topo: Topology, cloud: Cloud, sim) -> None:
    """The control for the spoofing test: the same packets with vm1's own addresses."""
    assert sim.delivered_once(sim.ping_vm(topo, cloud, "vm1", "vm8")).vm == "vm8"
    arp = cloud.send_from_vm("vm1", sim.arp_request(topo, "vm1", "10.1.0.18"))
    assert sim.delivered_once(arp).vm == "vm8"


@pytest.mark.parametrize(("dst_ip", "via_router"), [
    ("10.1.0.99", False),  # nobody on blue
    ("10.1.0.99", True),   # routed back onto blue, nobody there
    ("10.2.0.99", True),   # nobody on red
    ("10.9.0.17", True),   # vm7's address, but iso is not on r1
    ("10.3.0.16", True),   # vm6's address, but yellow is on r2
    ("8.8.8.8", True),     # no default route
    ("10.1.0.255", False),  # no broadcast
    ("224.0.0.1", False),  # no multicast
])
def test_unknown_destination_is_dropped_at_the_source(
    topo: Topology, cloud: Cloud, dst_ip: str, via_router: bool, sim
) -> None:
    eth_dst = sim.router_mac(topo, "blue") if via_router else "fa:16:3e:00:00:99"
    sim.dropped_at_source(cloud.send_from_vm("vm1", sim.icmp_from(topo, "vm1", dst_ip, eth_dst)),
                      "compute1")
    arp = cloud.send_from_vm("vm1", sim.arp_request(topo, "vm1", dst_ip))
    sim.dropped_at_source(arp, "compute1")


def test_a_vm_sending_to_itself_gets_nothing_back(topo: Topology, cloud: Cloud, sim) -> None:
    trace = sim.ping_vm(topo, cloud, "vm1", "vm1")
    assert trace.delivered == [] and trace.tunnels == []


# --- a generated cloud: scaling and flow-set properties ----------------------------------

def generated() -> dict[str, Any]:
    """10 compute nodes, each hosting VMs of two of 8 networks, and one network node: r0
    joins n0, n1, n2; r1 joins n3, n4 and n5, which has n0's CIDR; n6 and n7 are on no
    router."""
    return generate(100, computes=10, networks=8, per_router=3, isolated=2, overlapping=1,
                    per_compute=2, external=None, seed=7)


GEN = generated()
GEN_COMPUTES = [n for n, node in GEN["nodes"].items() if node["role"] == "compute"]


def expected_reachable(network: str) -> set[str]:
    """Computed from the generated document's routers, not from the model."""
    for router in GEN["routers"].values():
        if network in router["interfaces"]:
            return set(router["interfaces"])
    return {network}


@pytest.fixture(scope="module")
def gen() -> Topology:
    return build_topology(GEN, "generated")


@pytest.fixture(scope="module")
def gen_plans(gen: Topology) -> dict[str, frozenset[Flow]]:
    return {n: plan(gen, n, assumed_ports(gen, n)) for n in gen.nodes}


def test_generated_topology_has_the_intended_shape(gen: Topology) -> None:
    assert len(gen.vms) == 100
    assert sum(1 for n in gen.nodes.values() if not n.is_network) == 10
    assert all(gen.vms_on(c) for c in GEN_COMPUTES)
    assert all(len({v.network for v in gen.vms_on(c)}) <= 2 for c in GEN_COMPUTES)
    assert gen.vms_on("net1") == []
    assert gen.networks["n5"].cidr == gen.networks["n0"].cidr  # behind r1 and r0
    assert {n: r.name for r in gen.routers.values() for n in (i.network for i in r.interfaces)} == {
        **dict.fromkeys(["n0", "n1", "n2"], "r0"), **dict.fromkeys(["n3", "n4", "n5"], "r1")}


def test_a_remote_vm_costs_one_flow_exactly_when_reachable(
    gen: Topology, gen_plans: dict[str, frozenset[Flow]]
) -> None:
    counts: Counter[int] = Counter()
    for vm in gen.vms.values():
        without = dataclasses.replace(gen, vms={k: v for k, v in gen.vms.items() if k != vm.name})
        for node in gen.nodes:
            if node == vm.node:
                continue
            ports = assumed_ports(gen, node)
            assert assumed_ports(without, node) == ports
            full, less = gen_plans[node], plan(without, node, ports)
            local_nets = {v.network for v in gen.vms_on(node)}
            reachable = set().union(*(expected_reachable(n) for n in local_nets))
            expected = 1 if vm.network in reachable else 0
            assert less <= full, (vm.name, node)
            added = full - less
            assert len(added) == expected, (vm.name, node, vm.network, sorted(local_nets))
            assert all(f.table == "ls_out_remote" for f in added)
            counts[expected] += 1
    assert counts[0] > 50 and counts[1] > 50, counts  # both cases are exercised


def test_remote_flows_per_node_follow_reachability(
    gen: Topology, gen_plans: dict[str, frozenset[Flow]]
) -> None:
    """The same promise, counted: a node's remote delivery flows are one per VM elsewhere on
    a network reachable from its own VMs."""
    counted = 0
    for node in GEN_COMPUTES:
        local_nets = {v.network for v in gen.vms_on(node)}
        reachable = set().union(*(expected_reachable(n) for n in local_nets))
        remote = [v for v in gen.vms.values() if v.node != node and v.network in reachable]
        remote_flows = [f for f in gen_plans[node]
                        if f.table == "ls_out_remote" and f.match.get("reg0") is not None]
        assert len(remote_flows) == len(remote), node
        counted += len(remote)
    assert counted > 0


def defaults(topo: Topology) -> frozenset[Flow]:
    return plan(topo, "net1", NodePorts())


def test_a_node_without_vms_has_only_defaults_and_tunnels(
    gen: Topology, gen_plans: dict[str, frozenset[Flow]]
) -> None:
    flows = gen_plans["net1"]
    ports = assumed_ports(gen, "net1")
    assert ports.vms == {}
    base = defaults(gen)
    assert base <= flows
    extra = flows - base
    assert len(extra) == len(ports.tunnels) == len(gen.nodes) - 1
    tunnel_ports = set(ports.tunnels.values())
    for flow in extra:
        assert flow.table == "phy_in_classify"
        assert set(flow.match.as_dict()) == {"in_port"}
        assert flow.match.get("in_port") in tunnel_ports
        assert flow.actions == (Goto("phy_in_tunnel"),)


def test_the_defaults_do_not_depend_on_the_topology(topo: Topology, gen: Topology) -> None:
    assert defaults(topo) == defaults(gen)
    assert plan(gen, "c0", NodePorts()) == defaults(gen)


def test_planning_is_deterministic(gen: Topology) -> None:
    again = build_topology(generated(), "generated")
    for node in ("c0", "c5", "net1"):
        ports = assumed_ports(gen, node)
        first = plan(gen, node, ports)
        assert plan(gen, node, ports) == first
        assert plan(again, node, assumed_ports(again, node)) == first
        shuffled = NodePorts(dict(reversed(list(ports.vms.items()))),
                             dict(reversed(list(ports.tunnels.items()))))
        assert plan(gen, node, shuffled) == first
        assert sorted(f.cookie for f in plan(again, node, ports)) == sorted(
            f.cookie for f in first)


def all_node_plans(topo: Topology, gen: Topology, gen_plans) -> list[tuple[str, frozenset]]:
    east = [(f"eastwest/{n}", plan(topo, n, assumed_ports(topo, n))) for n in topo.nodes]
    return east + [(f"generated/{n}", f) for n, f in gen_plans.items()]


def test_every_flow_fits_the_declared_pipeline(topo, gen, gen_plans) -> None:
    for node, flows in all_node_plans(topo, gen, gen_plans):
        for flow in flows:
            check_flow(flow)  # raises PipelineError
            assert flow.table in TABLES, node


def test_flow_identities_are_unique(topo, gen, gen_plans) -> None:
    for node, flows in all_node_plans(topo, gen, gen_plans):
        identities = Counter(f.identity for f in flows)
        dupes = [i for i, n in identities.items() if n > 1]
        assert dupes == [], node


def test_cookies_are_unique_and_carry_owner_and_purpose(topo, gen, gen_plans) -> None:
    for node, flows in all_node_plans(topo, gen, gen_plans):
        cookies = Counter(f.cookie for f in flows)
        assert max(cookies.values()) == 1, node
        for flow in flows:
            assert flow.cookie >> 48 == OWNER_COOKIE
            assert flow.cookie & OWNER_MASK == OWNER_COOKIE << 48
            assert flow.cookie < 1 << 64
            assert purpose_of_cookie(flow.cookie) == flow.hint.purpose


def test_a_changed_flow_gets_a_new_cookie() -> None:
    a = Flow("ls_out_local", 100, Match.of(metadata=5, reg0=1),
             (SetField("eth_dst", "fa:16:3e:00:00:01"), Output(1)))
    b = dataclasses.replace(a, actions=(SetField("eth_dst", "fa:16:3e:00:00:01"), Output(2)))
    assert a.identity == b.identity
    assert a.cookie != b.cookie
    assert a.cookie >> 40 == b.cookie >> 40 == (OWNER_COOKIE << 8) | Purpose.DEFAULT


def _overlap(a: Match, b: Match) -> bool:
    """Could one packet match both? (Exact values, and IPv4 prefixes.)"""
    da, db = a.as_dict(), b.as_dict()
    for fld in set(da) & set(db):
        va, vb = da[fld], db[fld]
        if isinstance(va, str) and "." in va:
            if not ipaddress.IPv4Network(va).overlaps(ipaddress.IPv4Network(str(vb))):
                return False
        elif va != vb:
            return False
    return True


def test_no_two_flows_of_one_priority_can_match_the_same_packet(topo, gen, gen_plans) -> None:
    """Otherwise which one wins is up to the switch."""
    for node, flows in all_node_plans(topo, gen, gen_plans):
        groups: dict[tuple[str, int], list[Flow]] = {}
        for f in flows:
            groups.setdefault((f.table, f.priority), []).append(f)
        for (table, prio), group in groups.items():
            for a, b in combinations(group, 2):
                assert not _overlap(a.match, b.match), (node, table, prio, a.to_ofctl(),
                                                        b.to_ofctl())


def test_generated_cloud_connectivity_matrix(gen: Topology, sim) -> None:
    """Every VM pings every other: delivered to exactly that VM iff its network is reachable,
    through at most one tunnel, straight between the two nodes."""
    cloud = Cloud.offline(gen)
    vms = sorted(gen.vms.values(), key=lambda v: v.name)
    rng = random.Random(1)
    pairs = [(s, d) for s in vms for d in vms if s is not d]
    for s, d in rng.sample(pairs, 3000):
        same = s.network == d.network
        routed = not same and d.network in expected_reachable(s.network)
        has_router = len(expected_reachable(s.network)) > 1
        eth_dst = d.mac if same or not has_router else sim.router_mac(gen, s.network)
        trace = cloud.send_from_vm(s.name, sim.icmp_from(gen, s.name, str(d.ip), eth_dst))
        if same or routed:
            end = sim.delivered_once(trace)
            assert end.vm == d.name
            assert end.packet["ip_ttl"] == (63 if routed else 64)
            assert trace.tunnels == ([] if s.node == d.node else [(s.node, d.node)])
        else:
            sim.dropped_at_source(trace, s.node)


# --- the pipeline declaration -----------------------------------------------------------


def test_a_flow_matching_an_undeclared_field_is_refused() -> None:
    with pytest.raises(PipelineError, match="may not match"):
        check_flow(Flow("phy_in_tunnel", 100, Match.of(eth_src="fa:16:3e:00:00:01"), ()))
    with pytest.raises(PipelineError, match="may not match"):
        check_flow(Flow("lr_in_routing", 100, Match.of(reg0=1), ()))


def test_a_flow_in_an_undeclared_table_is_refused() -> None:
    with pytest.raises(PipelineError, match="undeclared table"):
        check_flow(Flow("acl", 100, Match(), ()))


def test_a_flow_going_to_an_undeclared_table_is_refused() -> None:
    with pytest.raises(PipelineError, match="may not go to"):
        check_flow(Flow("phy_in_classify", 100, Match.of(in_port=1), (Goto("acl"),)))


def test_a_flow_going_to_an_undeclared_next_table_is_refused() -> None:
    """ls_out_local exists but phy_in_classify may not jump straight there."""
    with pytest.raises(PipelineError, match="may not go to"):
        check_flow(Flow("phy_in_classify", 100, Match.of(in_port=1), (Goto("ls_out_local"),)))


def test_a_flow_going_backwards_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PipelineError):
        check_flow(Flow("ls_in_dst_key", 100, Match(), (Goto("phy_in_classify"),)))
    # even if the declaration allowed it
    loose = dataclasses.replace(TABLES["ls_in_dst_key"],
                                next=TABLES["ls_in_dst_key"].next | {"ls_in_gateway"})
    monkeypatch.setitem(TABLES, "ls_in_dst_key", loose)
    with pytest.raises(PipelineError, match="forward"):
        check_flow(Flow("ls_in_dst_key", 100, Match(), (Goto("ls_in_gateway"),)))


def test_goto_must_be_the_last_action() -> None:
    with pytest.raises(PipelineError, match="last"):
        check_flow(Flow("ls_out_remote", 0, Match(), (Goto("ls_out_local"), Output(1))))


def test_a_match_without_its_prerequisites_is_refused() -> None:
    with pytest.raises(PipelineError, match="eth_type"):
        check_flow(Flow("phy_in_classify", 100, Match.of(in_port=1, ipv4_src="10.0.0.1"), ()))
    with pytest.raises(PipelineError, match="ip_proto"):
        check_flow(Flow("ls_in_gateway", 100, Match.of(eth_type=ETH_IP, icmpv4_type=8), ()))


def test_a_well_formed_flow_is_accepted() -> None:
    check_flow(Flow("phy_in_classify", 100, Match.of(in_port=1, eth_type=ETH_IP,
                                              ipv4_src="10.0.0.1"), (Goto("ls_in_gateway"),)))
    check_flow(Flow("ls_out_remote", 200, Match.of(reg1=1), (Goto("ls_out_local"),)))
