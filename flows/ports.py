"""What is plugged into a node's integration bridge, read from its OVSDB `Interface` rows.

The one reading of a node's ports, shared by the agent (from its IDL copy) and the live
tracer (from `ovs-vsctl`): a VM's interface carries `external_ids:iface-id` (its port's id,
as Nova/os-vif set it), a tunnel to a peer node `external_ids:dvr-peer` (the agent creates
it), the patch to the provider bridge is named `patch-dvr-ext`. `node_ports()` turns what is
plugged into the planner's `NodePorts` for one topology.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flows.model import Topology
from flows.planner import NodePorts

IFACE_ID = "iface-id"  # external_ids key of a VM's interface: its port's id
PEER_KEY = "dvr-peer"  # external_ids key of a tunnel port: the peer node
# the patch pair between the integration bridge and the provider (external) bridge
PROVIDER_PATCH = "patch-dvr-ext"  # on the integration bridge
PROVIDER_PEER = "patch-dvr-int"  # on the provider bridge


@dataclass(frozen=True)
class Interface:
    """One OVSDB Interface row, as much of it as matters here."""

    name: str
    ofport: int  # 0 or -1 while OVS has not given it a port (yet)
    external_ids: Mapping[str, str] = field(default_factory=dict)
    type: str = ""
    options: Mapping[str, str] = field(default_factory=dict)
    bfd: Mapping[str, str] = field(default_factory=dict)  # the BFD configuration
    bfd_status: Mapping[str, str] = field(default_factory=dict)  # as ovs-vswitchd reports it


@dataclass(frozen=True)
class Plugged:
    """What is plugged into the integration bridge, by OpenFlow port number."""

    ports: Mapping[str, int]  # iface-id -> ofport
    tunnels: Mapping[str, int]  # peer node -> ofport
    tunnel_config: Mapping[str, tuple[str, str]]  # peer node -> (type, remote_ip)
    provider: int | None = None  # the patch port to the provider bridge
    names: Mapping[str, str] = field(default_factory=dict)  # iface-id -> interface name
    tunnel_bfd: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # its config
    bfd: Mapping[str, str] = field(default_factory=dict)  # peer -> BFD state (up, down, ...)


def plugged(interfaces: Iterable[Interface]) -> Plugged:
    """Read the interfaces of the integration bridge (a tunnel is known with its
    configuration even before it has a port number)."""
    ports: dict[str, int] = {}
    names: dict[str, str] = {}
    tunnels: dict[str, int] = {}
    config: dict[str, tuple[str, str]] = {}
    tunnel_bfd: dict[str, Mapping[str, str]] = {}
    bfd: dict[str, str] = {}
    provider = None
    for iface in interfaces:
        ready = iface.ofport > 0
        if iface.name == PROVIDER_PATCH:
            provider = iface.ofport if ready else None
            continue
        peer = iface.external_ids.get(PEER_KEY)
        if peer:
            config[peer] = (iface.type, iface.options.get("remote_ip", ""))
            tunnel_bfd[peer] = dict(iface.bfd)
            if iface.bfd.get("enable") == "true":
                bfd[peer] = iface.bfd_status.get("state", "unknown")
            if ready:
                tunnels[peer] = iface.ofport
            continue
        iface_id = iface.external_ids.get(IFACE_ID)
        if iface_id and ready:
            ports[iface_id] = iface.ofport
            names[iface_id] = iface.name
    return Plugged(ports, tunnels, config, provider, names, tunnel_bfd, bfd)


def node_ports(topo: Topology, node: str, have: Plugged, gateway_mac: str | None,
               snat: frozenset[str]) -> NodePorts:
    """The planner's view of `node`: its VMs (ports whose id is a VM's of `topo`), its
    tunnels to the other nodes of `topo` that have a tunnel endpoint, the provider patch
    when the topology has an external network, the upstream gateway's MAC and the routers
    whose SNAT is active here."""
    vms = {}
    for iface_id, ofport in have.ports.items():
        vm = topo.vm_by_port(iface_id)
        if vm is not None:
            vms[vm.name] = ofport
    tunnels = {peer: ofport for peer, ofport in have.tunnels.items()
               if peer != node and peer in topo.nodes and topo.nodes[peer].tunnel_ip is not None}
    ext = topo.external is not None
    return NodePorts(vms, tunnels, provider=have.provider if ext else None,
                     gateway_mac=gateway_mac if ext else None, snat=snat)


def bfd_config(interval_ms: int) -> dict[str, str]:
    """The BFD settings of a tunnel that needs them (`interval_ms` 0: BFD off): a session
    detects a dead peer after three intervals without a packet from it."""
    if interval_ms <= 0:
        return {}
    ms = str(interval_ms)
    return {"enable": "true", "min_tx": ms, "min_rx": ms}


def needs_bfd(topo: Topology, node: str, peer: str) -> bool:
    """BFD runs on the tunnels with a network node at one end at least: compute nodes steer
    SNAT by it, network nodes decide by it whether to serve (compute to compute needs none)."""
    a, b = topo.nodes.get(node), topo.nodes.get(peer)
    return bool(a and b and (a.is_network or b.is_network))
