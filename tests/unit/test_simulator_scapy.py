"""The simulator takes scapy packets as they would leave a VM, and the lab's capture builds
the scapy frame of a traced packet: the two conversions are each other's reverse."""

from __future__ import annotations

import pytest

from dvr.lab.capture import build, from_scapy
from flows.model import Topology
from flows.simulator import Cloud


def test_a_scapy_packet_goes_through_the_simulator(example: Topology) -> None:
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.l2 import Ether

    vm1, vm2 = example.vms["vm1"], example.vms["vm2"]
    gw = example.routers["r1"].interface_on("blue")
    assert gw is not None
    pkt = Ether(src=vm1.mac, dst=gw.mac) / IP(src=str(vm1.ip), dst=str(vm2.ip), ttl=9) / ICMP()
    trace = Cloud.offline(example).send_from_vm("vm1", from_scapy(pkt))
    [end] = trace.ends
    assert end.kind == "delivered" and end.vm == "vm2"
    assert end.packet["ip_ttl"] == 8 and end.packet["eth_dst"] == vm2.mac
    assert trace.tunnels == [("compute1", "compute2")]


@pytest.mark.parametrize("pkt", [
    {"eth_src": "fa:16:3e:00:00:01", "eth_dst": "ff:ff:ff:ff:ff:ff", "eth_type": 0x0806,
     "arp_op": 1, "arp_spa": "10.1.0.11", "arp_tpa": "10.1.0.1",
     "arp_sha": "fa:16:3e:00:00:01", "arp_tha": "00:00:00:00:00:00"},
    {"eth_src": "fa:16:3e:00:00:01", "eth_dst": "fa:16:3e:00:00:02", "eth_type": 0x0800,
     "ipv4_src": "10.1.0.11", "ipv4_dst": "10.2.0.12", "ip_proto": 6, "ip_ttl": 7,
     "tcp_src": 40001, "tcp_dst": 443},
    {"eth_src": "fa:16:3e:00:00:01", "eth_dst": "fa:16:3e:00:00:02", "eth_type": 0x0800,
     "ipv4_src": "10.1.0.11", "ipv4_dst": "198.51.100.10", "ip_proto": 17, "ip_ttl": 64,
     "udp_src": 40000, "udp_dst": 53},
    {"eth_src": "fa:16:3e:00:00:01", "eth_dst": "fa:16:3e:00:00:02", "eth_type": 0x0800,
     "ipv4_src": "10.1.0.11", "ipv4_dst": "10.1.0.1", "ip_proto": 1, "ip_ttl": 3,
     "icmpv4_type": 8, "icmpv4_code": 0},
], ids=["arp", "tcp", "udp", "icmp"])
def test_build_and_from_scapy_are_each_others_reverse(pkt: dict) -> None:
    frame = build(pkt)
    assert from_scapy(frame.__class__(bytes(frame))) == pkt
