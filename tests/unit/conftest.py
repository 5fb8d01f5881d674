"""Shared fixtures of the unit tests: the built-in and the lab's topologies by name, and `sim`,
the packets a VM or the external host sends through the offline simulator and the checks of
where they end."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.model import Topology, load_topology
from flows.simulator import Cloud, End, Trace, packet

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "dvr" / "examples" / "default.yaml"
LAB_TOPOLOGIES = ROOT / "tests" / "lab" / "topologies"


def topology_file(name: str) -> Path:
    """`example` (the built-in topology) or a lab test topology (`northsouth`, ...)."""
    path = EXAMPLE if name == "example" else LAB_TOPOLOGIES / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no topology {name!r} ({path})")
    return path


def topology_document(name: str) -> dict[str, Any]:
    """A fresh copy of that topology's document, to edit."""
    return yaml.safe_load(topology_file(name).read_text())


@pytest.fixture(scope="session")
def topology_path() -> Callable[[str], Path]:
    """The file of a topology by name: `example` or one of tests/lab/topologies."""
    return topology_file


@pytest.fixture(scope="session")
def topology_doc() -> Callable[[str], dict[str, Any]]:
    """A fresh copy of a topology's document by name, to edit."""
    return topology_document


@pytest.fixture(scope="session")
def example() -> Topology:
    """The built-in example topology (`dvr lab up` without a file)."""
    return load_topology(EXAMPLE)


@pytest.fixture(scope="session")
def northsouth() -> Topology:
    """tests/lab/topologies/northsouth.yaml: floating IPs on both computes, SNAT on net1."""
    return load_topology(topology_file("northsouth"))


class Sim:
    """Packets as a VM or the external host sends them, and checks of where they end."""

    BROADCAST = "ff:ff:ff:ff:ff:ff"
    REMOTE = "198.51.100.10"  # the external host's address beyond the gateway (the default)

    @staticmethod
    def router_mac(topo: Topology, network: str) -> str:
        """The MAC a VM on `network` sends off-subnet traffic to."""
        router = topo.router_of(network)
        assert router is not None, f"{network} is on no router"
        itf = router.interface_on(network)
        assert itf is not None
        return itf.mac

    @staticmethod
    def gateway(topo: Topology, network: str) -> str:
        """The network's gateway address."""
        return str(topo.networks[network].gateway_ip)

    @staticmethod
    def icmp_from(topo: Topology, src: str, dst_ip: str, eth_dst: str, **kw: Any) -> dict:
        """An echo request from VM `src`, with its own addresses."""
        vm = topo.vms[src]
        return packet(icmp=True, eth_src=vm.mac, eth_dst=eth_dst, ipv4_src=str(vm.ip),
                      ipv4_dst=dst_ip, icmpv4_type=8, **kw)

    @staticmethod
    def arp_request(topo: Topology, src: str, target_ip: str, **kw: Any) -> dict:
        """A broadcast ARP request from VM `src` for `target_ip`; `kw` overrides fields."""
        vm = topo.vms[src]
        fields = dict(eth_src=vm.mac, eth_dst=Sim.BROADCAST, arp_sha=vm.mac,
                      arp_spa=str(vm.ip), arp_tha="00:00:00:00:00:00", arp_tpa=target_ip)
        fields.update(kw)
        return packet(arp=True, **fields)

    @staticmethod
    def ping_vm(topo: Topology, cloud: Cloud, src: str, dst: str, **kw: Any) -> Trace:
        """VM `src` pings VM `dst` as a real VM would: straight to the VM's MAC on its own
        network, to its router's MAC otherwise."""
        s, d = topo.vms[src], topo.vms[dst]
        eth_dst = d.mac if s.network == d.network else Sim.router_mac(topo, s.network)
        return cloud.send_from_vm(src, Sim.icmp_from(topo, src, str(d.ip), eth_dst, **kw))

    @staticmethod
    def tcp_from_vm(topo: Topology, cloud: Cloud, vm: str, dst_ip: str, **kw: Any) -> Trace:
        """A TCP segment from VM `vm` to `dst_ip` through its router."""
        v = topo.vms[vm]
        return cloud.send_from_vm(vm, packet(
            tcp=True, eth_src=v.mac, eth_dst=Sim.router_mac(topo, v.network),
            ipv4_src=str(v.ip), ipv4_dst=dst_ip, **kw))

    @staticmethod
    def tcp_from_ext(cloud: Cloud, mac: str, dst_ip: str, **kw: Any) -> Trace:
        """A TCP segment from the external host's REMOTE address to `mac` on the provider
        network."""
        return cloud.send_from_external(packet(tcp=True, eth_dst=mac, ipv4_src=Sim.REMOTE,
                                               ipv4_dst=dst_ip, **kw))

    @staticmethod
    def only(trace: Trace) -> End:
        """The trace's one end."""
        assert len(trace.ends) == 1, trace.ends
        return trace.ends[0]

    @staticmethod
    def delivered_once(trace: Trace) -> End:
        """The trace's one end, a delivery."""
        end = Sim.only(trace)
        assert end.kind == "delivered", (end.reason, trace.steps)
        return end

    @staticmethod
    def dropped_at_source(trace: Trace, node: str) -> End:
        """The trace's one end, a drop on `node`: nothing delivered, no tunnel crossed."""
        assert trace.delivered == [], trace.delivered
        assert trace.tunnels == []
        assert trace.nodes == [node]
        end = Sim.only(trace)
        assert end.kind == "dropped", end
        return end


@pytest.fixture(scope="session")
def sim() -> type[Sim]:
    """Packet builders and end checks for the offline simulator."""
    return Sim
