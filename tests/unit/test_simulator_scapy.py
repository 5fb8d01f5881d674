"""The simulator takes scapy packets as they would leave a VM."""

from __future__ import annotations

from flows.model import load_topology
from tests.unit.paths import EXAMPLE


def test_a_scapy_packet_goes_through_the_simulator() -> None:
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.l2 import Ether

    from flows.simulator import Cloud, from_scapy

    topo = load_topology(EXAMPLE)
    vm1, vm2 = topo.vms["vm1"], topo.vms["vm2"]
    gw = topo.routers["r1"].interface_on("blue")
    assert gw is not None
    pkt = Ether(src=vm1.mac, dst=gw.mac) / IP(src=str(vm1.ip), dst=str(vm2.ip), ttl=9) / ICMP()
    trace = Cloud.offline(topo).send_from_vm("vm1", from_scapy(pkt))
    [end] = trace.ends
    assert end.kind == "delivered" and end.vm == "vm2"
    assert end.packet["ip_ttl"] == 8 and end.packet["eth_dst"] == vm2.mac
    assert trace.tunnels == [("compute1", "compute2")]
