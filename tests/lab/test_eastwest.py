"""East-west traffic in a real lab: switching, distributed routing and isolation.

Topology (tests/lab/topologies/eastwest.yaml): compute1 hosts vm1, vm8 (blue), vm3 (red),
vm6 (yellow); compute2 hosts vm4 (blue), vm2 (red), vm5 (green, same IP as vm1), vm7 (iso);
net1 is a network node with no VM. r1 joins blue and red, r2 joins green and yellow.
"""

from __future__ import annotations

import pytest

from tests.lab.harness import LabHandle


@pytest.fixture(scope="module")
def lab(eastwest_lab: LabHandle) -> LabHandle:
    return eastwest_lab


def router_mac(lab: LabHandle, router: str, network: str) -> str:
    itf = lab.topology().routers[router].interface_on(network)
    assert itf is not None
    return itf.mac


def vm_mac(lab: LabHandle, vm: str) -> str:
    return lab.topology().vms[vm].mac


def test_lab_status_reports_every_agent_converged(lab: LabHandle) -> None:
    st = lab.status()
    assert set(st["nodes"]) == {"compute1", "compute2", "net1"}
    for name, node in st["nodes"].items():
        assert node["agent"]["alive"], name
        assert node["agent"]["converged"], (name, node["agent"]["reason"])
        assert node["ovsdb_server"] and node["ovs_vswitchd"]
    assert st["nodes"]["compute1"]["agent"]["vms"] == ["vm1", "vm3", "vm6", "vm8"]
    assert st["vms"]["vm5"]["ip"] == "10.1.0.11"


@pytest.mark.parametrize(("src", "dst", "ip"), [
    ("vm1", "vm8", "10.1.0.18"),  # same network, same node
    ("vm1", "vm4", "10.1.0.14"),  # same network, across nodes
])
def test_switched_icmp_and_tcp(lab: LabHandle, src: str, dst: str, ip: str) -> None:
    with lab.sniff(lab.vm_ns(dst), proto="icmp", host=ip, seconds=2) as cap:
        assert lab.ping(src, ip, count=2)
    requests = [p for p in cap.packets if p["icmp_type"] == 8 and p["dst"] == ip]
    assert requests, cap.packets
    for p in requests:
        assert p["ttl"] == 64  # switched: no router on the path
        assert p["eth_src"] == vm_mac(lab, src)
        assert p["eth_dst"] == vm_mac(lab, dst)
    lab.tcp_transfer(src, dst, ip)


@pytest.mark.parametrize(("src", "dst", "ip", "net"), [
    ("vm1", "vm3", "10.2.0.13", "red"),   # routed, same node
    ("vm1", "vm2", "10.2.0.12", "red"),   # routed, across nodes
    ("vm2", "vm1", "10.1.0.11", "blue"),  # routed, across nodes, the other way
])
def test_routed_icmp_and_tcp_rewrites_headers_once(
    lab: LabHandle, src: str, dst: str, ip: str, net: str
) -> None:
    with lab.sniff(lab.vm_ns(dst), proto="icmp", host=ip, seconds=2) as cap:
        assert lab.ping(src, ip, count=2, ttl=50)
    requests = [p for p in cap.packets if p["icmp_type"] == 8 and p["dst"] == ip]
    assert requests, cap.packets
    for p in requests:
        assert p["ttl"] == 49  # exactly one router hop
        assert p["eth_src"] == router_mac(lab, "r1", net)
        assert p["eth_dst"] == vm_mac(lab, dst)
    lab.tcp_transfer(src, dst, ip)


NODES = ("compute1", "compute2", "net1")


def test_routed_same_node_never_leaves_the_node(lab: LabHandle) -> None:
    before = lab.settled_tunnel_packets(NODES)
    with lab.sniff(lab.ul_ns, iface="n-compute1", seconds=3, proto="vxlan") as underlay:
        assert lab.ping("vm1", "10.2.0.13", count=5)
        lab.tcp_transfer("vm1", "vm3", "10.2.0.13", 256 * 1024)
    assert underlay.packets == []
    assert lab.settled_tunnel_packets(NODES) == before


def test_gateway_arp_is_answered_on_the_vms_own_node(lab: LabHandle) -> None:
    before = lab.settled_tunnel_packets(NODES)
    with lab.sniff(lab.ul_ns, iface="n-compute1", seconds=2, proto="vxlan") as underlay:
        reply = lab.arp("vm1", "10.1.0.1")
    assert reply is not None, "no ARP reply for the gateway"
    assert reply["op"] == 2
    assert reply["psrc"] == "10.1.0.1"
    assert reply["hwsrc"] == router_mac(lab, "r1", "blue")
    assert reply["eth_src"] == router_mac(lab, "r1", "blue")
    assert reply["hwdst"] == vm_mac(lab, "vm1")
    assert lab.settled_tunnel_packets(NODES) == before, "the ARP request left compute1"
    assert underlay.packets == []


def test_ping_router_addresses(lab: LabHandle) -> None:
    assert lab.ping("vm1", "10.1.0.1")
    assert lab.ping("vm1", "10.2.0.1")  # the router's interface on the other network
    assert lab.ping("vm6", "10.3.0.1")


def test_cross_node_routing_uses_one_tunnel_and_skips_the_network_node(
    lab: LabHandle,
) -> None:
    net1_tunnels, net1_flows = lab.tunnel_packets("net1"), lab.flow_packets("net1")
    with (
        lab.sniff(lab.ul_ns, iface="n-net1", seconds=3, proto="vxlan") as to_net1,
        lab.sniff(lab.ul_ns, iface="n-compute2", seconds=3, proto="vxlan") as to_c2,
    ):
        assert lab.ping("vm1", "10.2.0.12", count=3)
        lab.tcp_transfer("vm1", "vm2", "10.2.0.12", 256 * 1024)
    assert to_net1.packets == []
    assert lab.tunnel_packets("net1") == net1_tunnels
    assert lab.flow_packets("net1") == net1_flows
    c1 = lab.status()["nodes"]["compute1"]["tunnel_ip"]
    c2 = lab.status()["nodes"]["compute2"]["tunnel_ip"]
    red_vni = lab.topology().networks["red"].vni
    blue_vni = lab.topology().networks["blue"].vni
    pings = [p for p in to_c2.packets if p.get("inner_dst") == "10.2.0.12"]
    assert pings, "no overlay packet reached compute2"
    for p in to_c2.packets:
        assert {p["src"], p["dst"]} == {c1, c2}  # only between the two computes
    # routed at the source: it crosses the overlay already in the destination network
    assert {p["vni"] for p in pings} == {red_vni}
    replies = [p for p in to_c2.packets if p.get("inner_dst") == "10.1.0.11"]
    assert {p["vni"] for p in replies} == {blue_vni}


def test_networks_without_a_shared_router_are_isolated(lab: LabHandle) -> None:
    with lab.sniff(lab.vm_ns("vm7"), seconds=2) as cap:
        assert not lab.ping("vm1", "10.9.0.17", count=2, wait=1)
        assert not lab.ping("vm4", "10.9.0.17", count=1, wait=1)
    assert [p for p in cap.packets if p.get("src") in ("10.1.0.11", "10.1.0.14")] == []
    # and nothing from the isolated network gets out either
    assert not lab.ping("vm7", "10.1.0.14", count=1, wait=1)


@pytest.mark.parametrize(("src", "src_ip", "reached", "not_reached"), [
    ("vm6", "10.3.0.16", "vm5", "vm1"),  # yellow, behind r2: green's 10.1.0.11
    ("vm3", "10.2.0.13", "vm1", "vm5"),  # red, behind r1: blue's 10.1.0.11
])
def test_overlapping_cidrs_each_router_reaches_its_own_vm(
    lab: LabHandle, src: str, src_ip: str, reached: str, not_reached: str
) -> None:
    # 10.1.0.11 is vm1 behind r1 (blue) and vm5 behind r2 (green)
    with (
        lab.sniff(lab.vm_ns(reached), proto="icmp", host=src_ip, seconds=2) as hit,
        lab.sniff(lab.vm_ns(not_reached), proto="icmp", host=src_ip, seconds=2) as miss,
    ):
        assert lab.ping(src, "10.1.0.11", count=3)
    assert [p for p in hit.packets if p["icmp_type"] == 8]
    assert miss.packets == []


def test_network_node_without_vms_has_only_tunnel_and_default_flows(lab: LabHandle) -> None:
    st = lab.status()["nodes"]
    # net1 hosts no VM: no per-VM, per-network or per-router flow at all
    out = lab.node("net1", "ovs-ofctl", "-O", "OpenFlow13", "dump-flows", "br-int")
    assert "cookie=0xd7a5" in out  # its tunnel and default flows are there
    assert "metadata=" not in out and "reg0=" not in out
    assert st["net1"]["agent"]["flows"] < st["compute1"]["agent"]["flows"]
