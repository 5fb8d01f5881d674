"""North-south in the planner, through the simulator: floating IPs, centralized SNAT, the
provider network, conntrack; and the pure helpers around them."""

from __future__ import annotations

import dataclasses

import pytest

from flows.model import Topology, build_topology
from flows.ofp import CT, Purpose
from flows.planner import ASSUMED_GATEWAY_MAC, announcements, assumed_ports, plan
from flows.simulator import Cloud, NodePlan, packet


@pytest.fixture()
def topo(northsouth: Topology) -> Topology:
    return northsouth


@pytest.fixture()
def cloud(topo: Topology) -> Cloud:
    """A fresh cloud each test: its conntrack tables start empty."""
    return Cloud.offline(topo)


def test_floating_ip_outbound_and_its_reply(topo, cloud, sim) -> None:
    end = sim.only(sim.tcp_from_vm(topo, cloud, "vm1", sim.REMOTE, tcp_src=4000, tcp_dst=80))
    assert end.external and end.node == "compute1"
    assert (end.packet["ipv4_src"], end.packet["ip_ttl"]) == ("203.0.113.50", 63)
    assert end.packet["eth_src"] == topo.nodes["compute1"].external_mac
    assert topo.external.gateway_mac is None  # not in the file: the offline stand-in
    assert end.packet["eth_dst"] == ASSUMED_GATEWAY_MAC
    back = sim.tcp_from_ext(cloud, topo.nodes["compute1"].external_mac, "203.0.113.50",
                            tcp_src=80, tcp_dst=4000)
    end = sim.only(back)
    assert (end.vm, end.packet["ipv4_dst"], end.packet["ipv4_src"]) == (
        "vm1", "10.1.0.11", sim.REMOTE)
    assert back.tunnels == []


def test_outside_traffic_goes_to_the_gateway_mac_the_topology_gives(topology_doc, sim) -> None:
    data = topology_doc("northsouth")
    data["external"]["gateway_mac"] = "02:aa:bb:cc:dd:ee"
    topo = build_topology(data)
    trace = sim.tcp_from_vm(topo, Cloud.offline(topo), "vm1", sim.REMOTE, tcp_src=4000,
                            tcp_dst=80)
    end = sim.only(trace)
    assert end.external and end.packet["eth_dst"] == "02:aa:bb:cc:dd:ee"


def test_floating_ip_inbound_new_connection_is_dnatted(topo, cloud, sim) -> None:
    trace = sim.tcp_from_ext(cloud, topo.nodes["compute1"].external_mac, "203.0.113.50",
                             tcp_src=5555, tcp_dst=22)
    end = sim.only(trace)
    assert (end.vm, end.packet["ipv4_src"], end.packet["ipv4_dst"]) == (
        "vm1", sim.REMOTE, "10.1.0.11")
    assert "lr_in_dnat" in [s.table for s in trace.steps]
    reply = sim.only(sim.tcp_from_vm(topo, cloud, "vm1", sim.REMOTE, tcp_src=22, tcp_dst=5555))
    assert reply.external and reply.packet["ipv4_src"] == "203.0.113.50"


def test_one_way_udp_through_nat_keeps_flowing(topo, cloud, sim) -> None:
    """Datagrams that get no answer (a log or telemetry stream): conntrack keeps their
    connection +new, already translated by the zone's lookup. The second and later ones
    pass like the first, in both directions of a floating IP and through the SNAT node."""
    c1, r1 = topo.nodes["compute1"].external_mac, topo.routers["r1"]
    for _ in range(3):
        inbound = sim.only(cloud.send_from_external(packet(
            udp=True, eth_dst=c1, ipv4_src=sim.REMOTE, ipv4_dst="203.0.113.50",
            udp_src=40000, udp_dst=514)))
        assert (inbound.vm, inbound.packet["ipv4_dst"]) == ("vm1", "10.1.0.11")
        v1 = topo.vms["vm1"]
        outbound = sim.only(cloud.send_from_vm("vm1", packet(
            udp=True, eth_src=v1.mac, eth_dst=sim.router_mac(topo, v1.network),
            ipv4_src=str(v1.ip), ipv4_dst=sim.REMOTE, udp_src=40001, udp_dst=514)))
        assert outbound.external and outbound.packet["ipv4_src"] == "203.0.113.50"
        v4 = topo.vms["vm4"]
        snat = cloud.send_from_vm("vm4", packet(
            udp=True, eth_src=v4.mac, eth_dst=sim.router_mac(topo, v4.network),
            ipv4_src=str(v4.ip), ipv4_dst=sim.REMOTE, udp_src=40002, udp_dst=514))
        end = sim.only(snat)
        assert end.external and end.packet["ipv4_src"] == str(r1.external_ip)
    later = [s for s in snat.steps if s.table == "lr_out_snat"]
    assert later and "already SNATed" in later[0].flow.hint.note


def test_centralized_snat_crosses_to_the_active_network_node(topo, cloud, sim) -> None:
    trace = sim.tcp_from_vm(topo, cloud, "vm4", sim.REMOTE, tcp_src=4001, tcp_dst=80)
    end = sim.only(trace)
    r1 = topo.routers["r1"]
    assert trace.tunnels == [("compute2", "net1")]
    assert end.external and end.node == "net1"
    assert (end.packet["ipv4_src"], end.packet["eth_src"]) == (str(r1.external_ip),
                                                               r1.external_mac)
    back = sim.tcp_from_ext(cloud, r1.external_mac, str(r1.external_ip), tcp_src=80, tcp_dst=4001)
    end = sim.only(back)
    assert (end.vm, end.packet["ipv4_dst"]) == ("vm4", "10.1.0.14")
    assert back.tunnels == [("net1", "compute2")]


def test_unsolicited_inbound_is_dropped(topo, cloud, sim) -> None:
    c1 = topo.nodes["compute1"].external_mac
    for mac, dst in ((c1, "10.1.0.11"), (c1, "203.0.113.77"),
                     (topo.routers["r1"].external_mac, "203.0.113.10")):
        trace = sim.tcp_from_ext(cloud, mac, dst, tcp_src=1, tcp_dst=2)
        assert not trace.delivered, (dst, trace.ends)


def test_only_the_vm_node_answers_arp_for_a_floating_ip(topo, cloud) -> None:
    def ask(ip: str) -> list:
        trace = cloud.send_from_external(packet(
            arp=True, eth_dst="ff:ff:ff:ff:ff:ff", arp_spa="203.0.113.1", arp_tpa=ip,
            arp_sha=cloud.gateway_mac, arp_tha="00:00:00:00:00:00"))
        return [e for e in trace.delivered if e.packet.get("arp_op") == 2]

    replies = ask("203.0.113.50")
    assert [(e.node, e.packet["arp_sha"]) for e in replies] == [
        ("compute1", topo.nodes["compute1"].external_mac)]
    replies = ask("203.0.113.10")
    assert [(e.node, e.packet["arp_sha"]) for e in replies] == [
        ("net1", topo.routers["r1"].external_mac)]
    assert ask("203.0.113.77") == []


def test_floating_ip_to_floating_ip_takes_the_shortest_path(topo, cloud, sim) -> None:
    same = sim.tcp_from_vm(topo, cloud, "vm1", "203.0.113.51", tcp_src=7000, tcp_dst=22)
    end = sim.only(same)
    assert (end.vm, end.packet["ipv4_src"], same.provider, same.tunnels) == (
        "vm3", "203.0.113.50", [], [])
    reply = sim.only(sim.tcp_from_vm(topo, cloud, "vm3", "203.0.113.50", tcp_src=22, tcp_dst=7000))
    assert (reply.vm, reply.packet["ipv4_src"], reply.packet["ipv4_dst"]) == (
        "vm1", "203.0.113.51", "10.1.0.11")
    other = sim.tcp_from_vm(topo, cloud, "vm1", "203.0.113.52", tcp_src=7001, tcp_dst=22)
    end = sim.only(other)
    assert (end.vm, other.provider, other.tunnels) == ("vm5", [("compute1", "compute2")], [])
    via_snat = sim.tcp_from_vm(topo, cloud, "vm4", "203.0.113.52", tcp_src=7002, tcp_dst=22)
    end = sim.only(via_snat)
    assert (end.vm, end.packet["ipv4_src"]) == ("vm5", "203.0.113.10")
    assert via_snat.provider == [("net1", "compute2")]


def test_a_vm_reaches_its_own_floating_ip(topo, cloud, sim) -> None:
    end = sim.only(sim.tcp_from_vm(topo, cloud, "vm1", "203.0.113.50", tcp_src=7100, tcp_dst=22))
    assert (end.vm, end.packet["ipv4_src"], end.packet["ipv4_dst"]) == (
        "vm1", "203.0.113.50", "10.1.0.11")
    reply = sim.only(sim.tcp_from_vm(topo, cloud, "vm1", "203.0.113.50", tcp_src=22, tcp_dst=7100))
    assert (reply.vm, reply.packet["ipv4_src"], reply.packet["ipv4_dst"]) == (
        "vm1", "203.0.113.50", "10.1.0.11")


def test_announcements_follow_the_floating_ip(topo, topology_doc) -> None:
    c1, c2 = topo.nodes["compute1"].external_mac, topo.nodes["compute2"].external_mac
    assert announcements(topo, "compute1", assumed_ports(topo, "compute1")) == {
        "203.0.113.50": c1, "203.0.113.51": c1}
    data = topology_doc("northsouth")
    del data["vms"]["vm1"]["floating_ip"]
    data["vms"]["vm4"]["floating_ip"] = "203.0.113.50"
    moved = build_topology(data)
    assert "203.0.113.50" not in announcements(moved, "compute1",
                                               assumed_ports(moved, "compute1"))
    assert announcements(moved, "compute2", assumed_ports(moved, "compute2"))[
        "203.0.113.50"] == c2
    net1 = announcements(topo, "net1", assumed_ports(topo, "net1"))
    assert net1 == {str(r.external_ip): r.external_mac for r in topo.routers.values()}


def test_without_provider_or_gateway_mac_outside_traffic_is_dropped_with_a_reason(
        topo, sim) -> None:
    for change, reason in (({"provider": None}, "no provider network"),
                           ({"gateway_mac": None}, "MAC is not known")):
        plans = {}
        for name in topo.nodes:
            ports = assumed_ports(topo, name)
            if name == "compute1":
                ports = dataclasses.replace(ports, **change)
            plans[name] = NodePlan(name, ports, plan(topo, name, ports))
        cloud = Cloud(topo, plans)
        end = sim.only(sim.tcp_from_vm(topo, cloud, "vm1", sim.REMOTE, tcp_src=1, tcp_dst=2))
        assert end.kind == "dropped" and reason in end.reason


def test_a_node_without_nat_has_no_provider_destination_flows(topo, topology_doc) -> None:
    data = topology_doc("northsouth")
    for vm in data["vms"].values():
        vm.pop("floating_ip", None)
    bare = build_topology(data)
    flows = plan(bare, "compute1", assumed_ports(bare, "compute1"))
    assert not [f for f in flows if f.table == "lr_out_delivery" and f.priority > 0]
    assert not [f for f in flows if any(isinstance(a, CT) for a in f.actions)]
    # a floating IP elsewhere costs a NATing node exactly one flow
    with_fip = plan(topo, "compute1", assumed_ports(topo, "compute1"))
    data["vms"]["vm1"]["floating_ip"] = "203.0.113.50"
    one = build_topology(data)
    base = plan(one, "compute1", assumed_ports(one, "compute1"))
    data["vms"]["vm2"]["floating_ip"] = "203.0.113.60"
    more = plan(build_topology(data), "compute1", assumed_ports(one, "compute1"))
    assert len(more) - len(base) == 1
    assert {f.hint.purpose for f in with_fip} >= {Purpose.FLOATING_IP, Purpose.EXTERNAL}


def test_zones_and_provider_macs_are_distinct(topo) -> None:
    zones = [z for r in topo.routers.values() for z in (r.snat_zone, r.dnat_zone)]
    assert len(set(zones)) == len(zones) and all(0 < z < 65536 for z in zones)
    macs = [n.external_mac for n in topo.nodes.values()]
    macs += [vm.mac for vm in topo.vms.values()]
    macs += [r.external_mac for r in topo.routers.values() if r.external_mac]
    assert len(set(macs)) == len(macs)


def test_gateway_mac_must_be_a_unicast_mac(topology_doc) -> None:
    data = topology_doc("northsouth")
    data["external"]["gateway_mac"] = "01:00:5e:00:00:01"
    with pytest.raises(ValueError, match=r"external\.gateway_mac"):
        build_topology(data)
    data["external"]["gateway_mac"] = "02:AA:bb:cc:dd:ee"
    assert build_topology(data).external.gateway_mac == "02:aa:bb:cc:dd:ee"


def test_gratuitous_arp_frame() -> None:
    from scapy.layers.l2 import ARP, Ether

    from agent.arp import gratuitous_arp, parse_reply

    frame = Ether(gratuitous_arp("203.0.113.50", "fa:16:3e:00:00:01"))
    assert frame.dst == "ff:ff:ff:ff:ff:ff" and frame.src == "fa:16:3e:00:00:01"
    arp = frame[ARP]
    assert (arp.op, arp.psrc, arp.pdst, arp.hwsrc) == (
        1, "203.0.113.50", "203.0.113.50", "fa:16:3e:00:00:01")
    assert parse_reply(bytes(frame)) is None  # a request
    reply = Ether(dst="02:00:00:00:00:02", src="02:00:00:00:00:01") / ARP(
        op=2, hwsrc="02:00:00:00:00:01", psrc="203.0.113.1", hwdst="02:00:00:00:00:02",
        pdst="0.0.0.0")
    assert parse_reply(bytes(reply)) == ("203.0.113.1", "02:00:00:00:00:01")
    assert parse_reply(bytes(reply)[:30]) is None


def test_conntrack_actions_encode_for_openflow(topo) -> None:
    from agent.ofswitch import to_ofp_instructions

    flows = plan(topo, "compute1", assumed_ports(topo, "compute1"))
    with_ct = [f for f in flows if any(isinstance(a, CT) for a in f.actions)]
    assert with_ct, "compute1 NATs floating IPs: some of its flows go through conntrack"
    for flow in with_ct:
        (inst,) = to_ofp_instructions(flow)
        ct = inst.actions[-1]
        want = next(a for a in flow.actions if isinstance(a, CT))
        assert (ct.zone_ofs_nbits, ct.flags & 1) == (want.zone, int(want.commit))
