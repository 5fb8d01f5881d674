"""plan(topology, node, ports): the desired OpenFlow state of one node's integration bridge.

Pure: no I/O, no clock. The same inputs always give the same frozenset of flows. What the
node needs is derived from what is bound on it (`ports.vms`, learned from OVSDB by the agent),
not from where the topology says VMs should be:

- a network is *local* when a VM of it is bound here; it is *reachable* when it is local or
  shares a router with a local network;
- a VM on another node costs this node exactly one flow, and only when its network is
  reachable from here;
- a node with no bound VM installs only its tunnel classification and the table defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from dvr.model import VM, Network, Router, Topology
from flows.ofp import (
    ETH_ARP,
    ETH_IP,
    IN_PORT,
    PROTO_ICMP,
    Action,
    DecTTL,
    Flow,
    Goto,
    Hint,
    Match,
    Move,
    Output,
    Purpose,
    SetField,
    SetTTL,
)
from flows.pipeline import check_flow

ARP_REQUEST, ARP_REPLY = 1, 2
ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY = 8, 0
REPLY_TTL = 64


@dataclass(frozen=True)
class NodePorts:
    """What the node's switch has: local VM ports and tunnels, by OpenFlow port number."""

    vms: Mapping[str, int] = field(default_factory=dict)  # VM name -> ofport
    tunnels: Mapping[str, int] = field(default_factory=dict)  # peer node -> ofport


def assumed_ports(topo: Topology, node: str) -> NodePorts:
    """Port numbers for planning offline: the VMs the topology puts on `node`, and a tunnel
    to every other node. Live planning uses what OVSDB reports instead."""
    vms = {vm.name: 1 + i for i, vm in enumerate(sorted(topo.vms_on(node), key=lambda v: v.name))}
    tunnels = {
        n.name: 1000 + n.index for n in topo.nodes.values() if n.name != node
    }
    return NodePorts(vms, tunnels)


def _flow(
    table: str, priority: int, match: Match, actions: list[Action], hint: Hint
) -> Flow:
    flow = Flow(table, priority, match, tuple(actions), hint)
    check_flow(flow)
    return flow


def plan(topo: Topology, node: str, ports: NodePorts) -> frozenset[Flow]:
    flows: list[Flow] = []
    local = {name: topo.vms[name] for name in ports.vms if name in topo.vms}
    local_nets = {vm.network for vm in local.values()}
    reachable = topo.reachable_networks(local_nets)

    flows += _defaults()
    for peer, ofport in sorted(ports.tunnels.items()):
        flows.append(_flow(
            "classify", 100, Match.of(in_port=ofport), [Goto("tunnel_in")],
            Hint(Purpose.TUNNEL, "node", peer, f"arrived through the tunnel from {peer}"),
        ))
    for net_name in sorted(local_nets):
        net = topo.networks[net_name]
        flows.append(_flow(
            "tunnel_in", 100, Match.of(tunnel_id=net.vni),
            [SetField("metadata", net.vni), SetField("reg1", 1), Goto("dst_key")],
            Hint(Purpose.TUNNEL, "network", net.name, f"VNI {net.vni} is network {net.name}"),
        ))
    for name, vm in sorted(local.items()):
        flows += _local_vm(topo.networks[vm.network], vm, ports.vms[name])
    routers = {r.name: r for r in (topo.router_of(n) for n in local_nets) if r}
    for router in routers.values():
        flows += _router(topo, router, local_nets)
    for vm in sorted(topo.vms.values(), key=lambda v: v.name):
        if vm.name in local or vm.network not in reachable:
            continue
        tunnel = ports.tunnels.get(vm.node)
        if tunnel is None:
            continue
        net = topo.networks[vm.network]
        flows.append(_flow(
            "remote_out", 100, Match.of(metadata=net.vni, reg0=int(vm.ip)),
            [SetField("eth_dst", vm.mac), SetField("tunnel_id", net.vni), Output(tunnel)],
            Hint(Purpose.DELIVERY_REMOTE, "vm", vm.name, f"to {vm.name} on {vm.node}"),
        ))
    return frozenset(flows)


def _defaults() -> list[Flow]:
    def miss(table: str, actions: list[Action], note: str) -> Flow:
        return _flow(table, 0, Match(), actions, Hint(Purpose.DEFAULT, note=note))

    return [
        miss("tunnel_in", [], "drop: unknown VNI"),
        miss("ls_gateway", [Goto("dst_key")], "not for the router: switch it"),
        miss("lr_routing", [], "drop: no route"),
        _flow("dst_key", 100, Match.of(eth_type=ETH_IP),
              [Move("ipv4_dst", "reg0"), Goto("remote_out")],
              Hint(Purpose.DST_KEY, note="deliver IPv4 by ip.dst")),
        _flow("dst_key", 100, Match.of(eth_type=ETH_ARP),
              [Move("arp_tpa", "reg0"), Goto("remote_out")],
              Hint(Purpose.DST_KEY, note="deliver ARP by arp.tpa")),
        miss("dst_key", [], "drop: neither IPv4 nor ARP"),
        _flow("remote_out", 200, Match.of(reg1=1), [Goto("local_out")],
              Hint(Purpose.DEFAULT, note="from a tunnel: deliver locally only")),
        miss("remote_out", [Goto("local_out")], "not on another node"),
        miss("local_out", [], "drop: unknown destination"),
    ]


def _local_vm(net: Network, vm: VM, ofport: int) -> list[Flow]:
    hint = Hint(Purpose.PORT_SECURITY, "vm", vm.name)
    admit: list[Action] = [SetField("metadata", net.vni), Goto("ls_gateway")]
    return [
        _flow("classify", 100,
              Match.of(in_port=ofport, eth_src=vm.mac, eth_type=ETH_IP, ipv4_src=str(vm.ip)),
              admit, hint),
        _flow("classify", 100,
              Match.of(in_port=ofport, eth_src=vm.mac, eth_type=ETH_ARP,
                       arp_spa=str(vm.ip), arp_sha=vm.mac),
              admit, hint),
        _flow("classify", 50, Match.of(in_port=ofport), [],
              Hint(Purpose.PORT_SECURITY, "vm", vm.name,
                   f"drop: port security, not from {vm.mac} {vm.ip}")),
        _flow("local_out", 100, Match.of(metadata=net.vni, reg0=int(vm.ip)),
              [SetField("eth_dst", vm.mac), Output(ofport)],
              Hint(Purpose.DELIVERY_LOCAL, "vm", vm.name, f"to {vm.name}")),
    ]


def _router(topo: Topology, router: Router, local_nets: set[str]) -> list[Flow]:
    """The router's distributed part on this node: every interface is served on every node
    that has a VM on one of the router's networks, so routing happens at the source."""
    out: list[Flow] = []
    for itf in router.interfaces:
        net = topo.networks[itf.network]
        if itf.network in local_nets:
            # ARP for the gateway is answered here and never leaves the node
            out.append(_flow(
                "ls_gateway", 100,
                Match.of(metadata=net.vni, eth_type=ETH_ARP, arp_op=ARP_REQUEST,
                         arp_tpa=str(itf.ip)),
                [Move("eth_src", "eth_dst"), SetField("eth_src", itf.mac),
                 SetField("arp_op", ARP_REPLY), Move("arp_sha", "arp_tha"),
                 SetField("arp_sha", itf.mac), Move("arp_spa", "arp_tpa"),
                 SetField("arp_spa", str(itf.ip)), Output(IN_PORT)],
                Hint(Purpose.GATEWAY, "router", router.name,
                     f"ARP reply: {itf.ip} is at {itf.mac}"),
            ))
            # ping to any of the router's addresses, from this network
            for target in router.interfaces:
                out.append(_flow(
                    "ls_gateway", 100,
                    Match.of(metadata=net.vni, eth_type=ETH_IP, eth_dst=itf.mac,
                             ip_proto=PROTO_ICMP, icmpv4_type=ICMP_ECHO_REQUEST,
                             ipv4_dst=str(target.ip)),
                    [Move("eth_src", "eth_dst"), SetField("eth_src", itf.mac),
                     Move("ipv4_src", "ipv4_dst"), SetField("ipv4_src", str(target.ip)),
                     SetTTL(REPLY_TTL), SetField("icmpv4_type", ICMP_ECHO_REPLY),
                     Output(IN_PORT)],
                    Hint(Purpose.GATEWAY, "router", router.name,
                         f"echo reply from {target.ip}"),
                ))
            out.append(_flow(
                "ls_gateway", 90, Match.of(metadata=net.vni, eth_type=ETH_IP, eth_dst=itf.mac),
                [SetField("metadata", router.key), Goto("lr_routing")],
                Hint(Purpose.GATEWAY, "router", router.name,
                     f"enter router {router.name} from {net.name}"),
            ))
            out.append(_flow(
                "ls_gateway", 80, Match.of(metadata=net.vni, eth_dst=itf.mac), [],
                Hint(Purpose.GATEWAY, "router", router.name,
                     "drop: the router takes only IPv4 and ARP for its address"),
            ))
        out.append(_flow(
            "lr_routing", 100 + net.cidr.prefixlen,
            Match.of(metadata=router.key, eth_type=ETH_IP, ipv4_dst=str(net.cidr)),
            [DecTTL(), SetField("eth_src", itf.mac), SetField("metadata", net.vni),
             Goto("dst_key")],
            Hint(Purpose.ROUTE, "router", router.name, f"route {net.cidr} to {net.name}"),
        ))
    return out
