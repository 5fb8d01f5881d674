"""plan(topology, node, ports): the desired OpenFlow state of one node's integration bridge.

Pure: no I/O, no clock. The same inputs always give the same frozenset of flows. What the
node needs is derived from what is bound on it (`ports.vms`, learned from OVSDB by the agent),
not from where the topology says VMs should be:

- a network is *local* when a VM of it is bound here; it is *reachable* when it is local or
  shares a router with a local network;
- a VM on another node costs this node exactly one flow, and only when its network is
  reachable from here;
- a node with no bound VM installs only its tunnel classification and the table defaults;
- floating IPs are NATed on the node where their VM is bound, and only that node answers ARP
  for them on the provider network (with its own MAC);
- a router's SNAT for VMs without a floating IP is ready on every node of its HA chain
  (`snat_nodes`): each routes for the router's networks and reaches all of their VMs;
  compute nodes send to the first node of the chain whose tunnel is alive (a fast-failover
  group, BFD), and only the node that claimed the router (`NodePorts.snat`) answers ARP
  for its external IP.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flows.check import check_flow
from flows.model import VM, Network, Router, Topology
from flows.nat import Binding
from flows.ofp import (
    CT,
    CT_DNAT,
    CT_EST,
    CT_INV,
    CT_NEW,
    CT_REL,
    CT_SNAT,
    CT_TRK,
    ETH_ARP,
    ETH_IP,
    IN_PORT,
    NAT,
    PROTO_ICMP,
    PROTO_TCP,
    Action,
    Bucket,
    DecTTL,
    Flow,
    Goto,
    Group,
    GroupAction,
    Hint,
    Match,
    Move,
    Output,
    Purpose,
    Resubmit,
    SetField,
    SetTTL,
    ct_state,
    group_id,
)

# offline port numbers: VMs from 1, the provider patch and tunnels above any VM count
PROVIDER_PORT = 60000  # OVS port numbers are 16 bits (up to 0xfeff)
TUNNEL_PORT_BASE = 60001
ASSUMED_GATEWAY_MAC = "02:00:00:00:00:01"  # offline stand-in for an unresolved gateway
ARP_REQUEST, ARP_REPLY = 1, 2
ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY = 8, 0
REPLY_TTL = 64


@dataclass(frozen=True)
class NodePorts:
    """What the node's switch has: local VM ports and tunnels, by OpenFlow port number."""

    vms: Mapping[str, int] = field(default_factory=dict)  # VM name -> ofport
    tunnels: Mapping[str, int] = field(default_factory=dict)  # peer node -> ofport
    provider: int | None = None  # the patch port to the provider (external) bridge
    gateway_mac: str | None = None  # the upstream gateway's MAC, when known
    # routers whose SNAT this node has claimed: it answers ARP for their external IPs
    snat: frozenset[str] = frozenset()
    # translations of the routers it stands by for that did not keep their port, as the
    # serving node publishes them (flows.nat): held ready, so that a failover keeps them
    held: frozenset[Binding] = frozenset()
    # peers whose tunnel counts as up although its BFD session is not up (yet): this switch
    # has just restarted, so its sessions start again from down, and these were up before
    # (the agent trusts them for a few seconds, until their sessions are up again)
    trusted: frozenset[str] = frozenset()


def snat_node(router: Router) -> str | None:
    """A router's first choice for its centralized SNAT: the head of its `snat_nodes` (its
    HA chain: the order of preference). Where its SNAT runs at a given moment depends on
    which nodes are alive (see `snat_candidates`)."""
    return router.snat_nodes[0] if router.snat_nodes else None


def snat_candidates(topo: Topology, node: str) -> frozenset[str]:
    """The routers whose SNAT this node holds ready, active or standby: those whose HA
    chain (`snat_nodes`) includes it."""
    return frozenset(r.name for r in topo.routers.values()
                     if r.external_gateway and node in r.snat_nodes)


def snat_routers(topo: Topology, node: str) -> frozenset[str]:
    """The routers whose first choice this node is: the SNAT it claims while every node is
    alive (the assumption of offline planning)."""
    return frozenset(r.name for r in topo.routers.values()
                     if r.external_gateway and snat_node(r) == node)


def assumed_ports(topo: Topology, node: str) -> NodePorts:
    """Port numbers for planning offline: the VMs the topology puts on `node`, and a tunnel
    to every other node. Live planning uses what OVSDB reports instead."""
    vms = {vm.name: 1 + i for i, vm in enumerate(sorted(topo.vms_on(node), key=lambda v: v.name))}
    tunnels = {
        n.name: TUNNEL_PORT_BASE + n.index for n in topo.nodes.values() if n.name != node
    }
    ext = topo.external
    return NodePorts(vms, tunnels, provider=PROVIDER_PORT if ext else None,
                     gateway_mac=(ext.gateway_mac or ASSUMED_GATEWAY_MAC) if ext else None,
                     snat=snat_routers(topo, node))


def announcements(topo: Topology, node: str, ports: NodePorts) -> dict[str, str]:
    """The addresses this node answers ARP for on the provider network, with their MAC:
    floating IPs of VMs bound here, and the external IPs of routers whose SNAT is here.
    When one appears, the agent announces it with a gratuitous ARP."""
    if ports.provider is None or topo.external is None:
        return {}
    mac = topo.nodes[node].external_mac
    out = {str(topo.vms[v].floating_ip): mac for v in ports.vms
           if v in topo.vms and topo.vms[v].floating_ip}
    for name in ports.snat:
        r = topo.routers.get(name)
        if r and r.external_gateway and r.external_mac:
            out[str(r.external_ip)] = r.external_mac
    return out


def _flow(
    table: str, priority: int, match: Match, actions: list[Action], hint: Hint
) -> Flow:
    flow = Flow(table, priority, match, tuple(actions), hint)
    check_flow(flow)
    return flow


def plan(topo: Topology, node: str, ports: NodePorts,
         only: frozenset[str] | None = None) -> frozenset[Flow]:
    """The node's flows. `only` (for tracing one packet from or to these addresses): plan
    what such a packet can meet: the local VMs of their networks (with their routers) and
    the flows for one remote address only for these addresses."""
    flows: list[Flow] = []
    local = {name: topo.vms[name] for name in ports.vms if name in topo.vms}
    if only is not None:  # a packet from or to these addresses meets only their networks
        nets = {v.network for a in only
                for v in topo.vms_by_ip.get(ipaddress.IPv4Address(a), [])}
        local = {name: vm for name, vm in local.items() if vm.network in nets}
    local_nets = {vm.network for vm in local.values()}
    # every router whose SNAT this node holds ready (claimed or not: a standby is ready)
    snat = {name: topo.routers[name] for name in sorted(snat_candidates(topo, node))}
    reachable = topo.reachable_networks(local_nets)
    for router in snat.values():
        reachable.update(i.network for i in router.interfaces)

    flows += _defaults(ports)
    for peer, ofport in sorted(ports.tunnels.items()):
        flows.append(_tunnel(peer, ofport))
    for net_name in sorted(local_nets):
        flows.append(_local_network(topo.networks[net_name]))
    for name, vm in sorted(local.items()):
        flows += _local_vm(topo.networks[vm.network], vm, ports.vms[name])
    routers = {r.name: r for r in (topo.router_of(n) for n in local_nets) if r}
    for router in routers.values():
        flows += _router(topo, node, router, local_nets, ports)
    for router in snat.values():
        if router.name not in routers:
            flows += _router(topo, node, router, set(), ports)
        flows += _snat(topo, node, router, local_nets, ports)
    if topo.external is not None and ports.provider is not None:
        flows += _provider(topo, node, ports, local, routers, snat, only)
    elif topo.external is not None:
        # a floating IP must not quietly fall back to the SNAT node's address
        for vm in sorted(local.values(), key=lambda v: v.name):
            router = topo.router_of(vm.network)
            if vm.floating_ip and router and router.external_gateway:
                flows.append(_no_provider(vm, router))
    if only is None:
        remote: Iterable[VM] = topo.vms.values()
    else:
        remote = [v for a in only for v in topo.vms_by_ip.get(ipaddress.IPv4Address(a), [])]
    for vm in sorted(remote, key=lambda v: v.name):
        if vm.name in local or vm.network not in reachable:
            continue
        tunnel = ports.tunnels.get(vm.node)
        if tunnel is None:
            continue
        flows.append(_remote_vm(topo.networks[vm.network], vm, tunnel))
    return frozenset(flows)


# --- the builders, one model object each (flows.incremental keys its plan by them) ----------

def _tunnel(peer: str, ofport: int) -> Flow:
    return _flow(
        "phy_in_classify", 100, Match.of(in_port=ofport), [Goto("phy_in_tunnel")],
        Hint(Purpose.TUNNEL, "node", peer, f"arrived through the tunnel from {peer}"),
    )


def _local_network(net: Network) -> Flow:
    """A network with a VM bound here: its VNI arriving from a tunnel."""
    return _flow(
        "phy_in_tunnel", 100, Match.of(tunnel_id=net.vni),
        [SetField("metadata", net.vni), SetField("reg1", 1), Goto("ls_in_dst_key")],
        Hint(Purpose.TUNNEL, "network", net.name, f"VNI {net.vni} is network {net.name}"),
    )


def _no_provider(vm: VM, router: Router) -> Flow:
    """A floating IP bound on a node without a provider network: dropped, never SNATed."""
    return _flow(
        "lr_out_redirect", 100,
        Match.of(metadata=router.key, eth_type=ETH_IP, ipv4_src=str(vm.ip)), [],
        Hint(Purpose.FLOATING_IP, "vm", vm.name,
             f"drop: no provider network on this node for {vm.floating_ip}"))


def _remote_vm(net: Network, vm: VM, tunnel: int) -> Flow:
    """A VM on another node, on a network reachable from here: one flow."""
    return _flow(
        "ls_out_remote", 100, Match.of(metadata=net.vni, reg0=int(vm.ip)),
        [SetField("eth_dst", vm.mac), SetField("tunnel_id", net.vni), Output(tunnel)],
        Hint(Purpose.DELIVERY_REMOTE, "vm", vm.name, f"to {vm.name} on {vm.node}"),
    )


def _defaults(ports: NodePorts) -> list[Flow]:
    def miss(table: str, actions: list[Action], note: str) -> Flow:
        return _flow(table, 0, Match(), actions, Hint(Purpose.DEFAULT, note=note))

    if ports.provider is None:
        to_gateway = miss("lr_out_delivery", [], "drop: this node has no provider network")
    elif ports.gateway_mac is None:
        to_gateway = miss("lr_out_delivery", [],
                          "drop: the upstream gateway's MAC is not known yet")
    else:
        to_gateway = _flow(
            "lr_out_delivery", 0, Match(),
            [SetField("eth_dst", ports.gateway_mac), Output(ports.provider)],
            Hint(Purpose.EXTERNAL, note="to the upstream gateway"))
    return [
        miss("lr_in_provider", [], "drop: not for an address hosted on this node"),
        miss("lr_in_unsnat", [], "drop: unsolicited traffic to a router's external IP, or invalid"),
        miss("lr_in_dnat", [], "drop: unsolicited, and not to a floating IP hosted here"),
        miss("lr_out_undnat", [], "drop: conntrack refused it (invalid)"),
        miss("lr_out_redirect", [], "drop: no route"),
        miss("lr_out_snat", [], "drop: conntrack refused it (invalid)"),
        miss("lr_out_src_mac", [], "drop: no external address for this source"),
        to_gateway,
        miss("phy_in_tunnel", [], "drop: unknown VNI"),
        miss("ls_in_gateway", [Goto("ls_in_dst_key")], "not for the router: switch it"),
        miss("lr_in_routing", [], "drop: no route"),
        _flow("ls_in_dst_key", 100, Match.of(eth_type=ETH_IP),
              [Move("ipv4_dst", "reg0"), Goto("ls_out_remote")],
              Hint(Purpose.DST_KEY, note="deliver IPv4 by ip.dst")),
        _flow("ls_in_dst_key", 100, Match.of(eth_type=ETH_ARP),
              [Move("arp_tpa", "reg0"), Goto("ls_out_remote")],
              Hint(Purpose.DST_KEY, note="deliver ARP by arp.tpa")),
        miss("ls_in_dst_key", [], "drop: neither IPv4 nor ARP"),
        _flow("ls_out_remote", 200, Match.of(reg1=1), [Goto("ls_out_local")],
              Hint(Purpose.DEFAULT, note="from a tunnel: deliver locally only")),
        miss("ls_out_remote", [Goto("ls_out_local")], "not on another node"),
        miss("ls_out_local", [], "drop: unknown destination"),
    ]


def _local_vm(net: Network, vm: VM, ofport: int) -> list[Flow]:
    hint = Hint(Purpose.PORT_SECURITY, "vm", vm.name)
    admit: list[Action] = [SetField("metadata", net.vni), Goto("ls_in_gateway")]
    return [
        _flow("phy_in_classify", 100,
              Match.of(in_port=ofport, eth_src=vm.mac, eth_type=ETH_IP, ipv4_src=str(vm.ip)),
              admit, hint),
        _flow("phy_in_classify", 100,
              Match.of(in_port=ofport, eth_src=vm.mac, eth_type=ETH_ARP,
                       arp_spa=str(vm.ip), arp_sha=vm.mac),
              admit, hint),
        _flow("phy_in_classify", 50, Match.of(in_port=ofport), [],
              Hint(Purpose.PORT_SECURITY, "vm", vm.name,
                   f"drop: port security, not from {vm.mac} {vm.ip}")),
        _flow("ls_out_local", 100, Match.of(metadata=net.vni, reg0=int(vm.ip)),
              [SetField("eth_dst", vm.mac), Output(ofport)],
              Hint(Purpose.DELIVERY_LOCAL, "vm", vm.name, f"to {vm.name}")),
    ]


def _router(topo: Topology, node: str, router: Router, local_nets: set[str],
            ports: NodePorts) -> list[Flow]:
    """The router's distributed part on this node: every interface is served on every node
    that has a VM on one of the router's networks, so routing happens at the source."""
    out: list[Flow] = []
    for itf in router.interfaces:
        net = topo.networks[itf.network]
        if itf.network in local_nets:
            # ARP for the gateway is answered here and never leaves the node
            out.append(_flow(
                "ls_in_gateway", 100,
                Match.of(metadata=net.vni, eth_type=ETH_ARP, arp_op=ARP_REQUEST,
                         arp_tpa=str(itf.ip)),
                _arp_reply(itf.mac, str(itf.ip)),
                Hint(Purpose.GATEWAY, "router", router.name,
                     f"ARP reply: {itf.ip} is at {itf.mac}"),
            ))
            # ping to any of the router's addresses, from this network
            for target in router.interfaces:
                out.append(_flow(
                    "ls_in_gateway", 100,
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
            out.append(_enter_router(router, net, itf.mac))
            out.append(_flow(
                "ls_in_gateway", 80, Match.of(metadata=net.vni, eth_dst=itf.mac), [],
                Hint(Purpose.GATEWAY, "router", router.name,
                     "drop: the router takes only IPv4 and ARP for its address"),
            ))
            if router.external_gateway and node not in router.snat_nodes:
                # the default route of a VM without a floating IP: to the router's SNAT,
                # over the overlay in its own network's VNI, still addressed to the router,
                # to the first node of its HA chain whose tunnel is alive (BFD)
                group = _steering(router, ports)
                chain = ", ".join(router.snat_nodes)
                out.append(_flow(
                    "lr_out_redirect", 50, Match.of(metadata=router.key, reg2=net.vni),
                    [SetField("tunnel_id", net.vni), GroupAction(group)] if group else [],
                    Hint(Purpose.SNAT, "router", router.name,
                         f"from {net.name} to SNAT on the first live of {chain}" if group else
                         f"drop: no tunnel to any SNAT node of {router.name} ({chain})"),
                ))
        out.append(_flow(
            "lr_in_routing", 100 + net.cidr.prefixlen,
            Match.of(metadata=router.key, eth_type=ETH_IP, ipv4_dst=str(net.cidr)),
            [DecTTL(), SetField("eth_src", itf.mac), SetField("metadata", net.vni),
             Goto("ls_in_dst_key")],
            Hint(Purpose.ROUTE, "router", router.name, f"route {net.cidr} to {net.name}"),
        ))
    if router.external_gateway:
        out.append(_flow(
            "lr_in_routing", 100, Match.of(metadata=router.key, eth_type=ETH_IP),
            [Goto("lr_out_redirect")],
            Hint(Purpose.ROUTE, "router", router.name, "default route: to the outside"),
        ))
    return out


def _enter_router(router: Router, net: Network, mac: str) -> Flow:
    return _flow(
        "ls_in_gateway", 90, Match.of(metadata=net.vni, eth_type=ETH_IP, eth_dst=mac),
        [SetField("metadata", router.key), SetField("reg2", net.vni), Goto("lr_in_routing")],
        Hint(Purpose.GATEWAY, "router", router.name,
             f"enter router {router.name} from {net.name}"),
    )


def _arp_reply(mac: str, ip: str) -> list[Action]:
    """Turn an ARP request for `ip` into the reply `ip is at mac`, back where it came from."""
    return [Move("eth_src", "eth_dst"), SetField("eth_src", mac),
            SetField("arp_op", ARP_REPLY), Move("arp_sha", "arp_tha"),
            SetField("arp_sha", mac), Move("arp_spa", "arp_tpa"),
            SetField("arp_spa", ip), Output(IN_PORT)]


def _conntrack_states(router: Router, dnat: bool) -> list[Flow]:
    """Packets of known connections pass after conntrack, already translated. `lr_in_dnat`: the
    router also DNATs here (floating IPs), so outbound packets see the DNAT zone first."""
    out = []
    for bit, name in ((CT_EST, "established"), (CT_REL, "related")):
        state = ct_state(on=CT_TRK | bit, off=CT_INV)
        m = Match.of(metadata=router.key, ct_state=state)
        hint = Hint(Purpose.SNAT, "router", router.name, f"{name}: already translated")
        out.append(_flow("lr_in_unsnat", 100, m, [Goto("lr_in_routing")], hint))
        out.append(_flow("lr_out_snat", 100, m, [Goto("lr_out_src_mac")], hint))
        if dnat:
            out.append(_flow("lr_in_dnat", 100, m, [Goto("lr_in_routing")], hint))
            out.append(_flow("lr_out_undnat", 100, m, [Goto("lr_out_src_mac")], hint))
    # a connection not answered yet (one-way UDP): its later packets are still +new, but the
    # zone's lookup has translated them already; they pass as well (not translated twice)
    for table, bit, goto, name in (("lr_out_snat", CT_SNAT, "lr_out_src_mac", "SNATed"),
                                   ("lr_in_dnat", CT_DNAT, "lr_in_routing", "DNATed")):
        if table == "lr_in_dnat" and not dnat:
            continue
        out.append(_flow(
            table, 100,
            Match.of(metadata=router.key, ct_state=ct_state(on=CT_TRK | CT_NEW | bit,
                                                            off=CT_INV)),
            [Goto(goto)], Hint(Purpose.SNAT if bit == CT_SNAT else Purpose.FLOATING_IP,
                               "router", router.name,
                               f"not answered yet, already {name}")))
    if dnat:
        out.append(_flow(
            "lr_out_undnat", 50,
            Match.of(metadata=router.key, ct_state=ct_state(on=CT_TRK | CT_NEW, off=CT_INV),
                     eth_type=ETH_IP),
            [SetField("reg3", 1), CT(router.snat_zone, "lr_out_snat", nat=NAT())],
            Hint(Purpose.FLOATING_IP, "router", router.name,
                 "not a reply to an inbound connection: on to the SNAT zone")))
    return out


def _provider_address(ip: str, mac: str, router: Router, hint: Hint) -> list[Flow]:
    """An address this node owns on the provider network for `router` (a floating IP, or
    the router's external IP): ARP for it answered with `mac`, traffic to it into the
    router's SNAT zone, traffic from it sent with `mac` (one router hop)."""
    return [
        _flow("lr_in_provider", 100, Match.of(eth_type=ETH_ARP, arp_op=ARP_REQUEST, arp_tpa=ip),
              _arp_reply(mac, ip),
              Hint(hint.purpose, hint.kind, hint.name, f"ARP reply: {ip} is at {mac}")),
        _flow("lr_in_provider", 100, Match.of(eth_type=ETH_IP, eth_dst=mac, ipv4_dst=ip),
              [SetField("metadata", router.key), CT(router.snat_zone, "lr_in_unsnat", nat=NAT())],
              hint),
        _flow("lr_out_src_mac", 100, Match.of(eth_type=ETH_IP, ipv4_src=ip),
              [SetField("eth_src", mac), DecTTL(), Goto("lr_out_delivery")], hint),
    ]


def _floating_ip(topo: Topology, node: str, vm: VM, router: Router) -> list[Flow]:
    """DNAT in and SNAT out for a floating IP whose VM is bound on this node."""
    fip, fixed = str(vm.floating_ip), str(vm.ip)
    mac = topo.nodes[node].external_mac
    hint = Hint(Purpose.FLOATING_IP, "vm", vm.name, f"floating IP {fip} of {vm.name}")
    new = ct_state(on=CT_TRK | CT_NEW, off=CT_INV)
    return [
        *_provider_address(fip, mac, router, hint),
        _flow("lr_in_unsnat", 90,
              Match.of(metadata=router.key, ct_state=new, eth_type=ETH_IP, ipv4_dst=fip),
              [CT(router.dnat_zone, "lr_in_dnat", nat=NAT())],
              Hint(Purpose.FLOATING_IP, "vm", vm.name, f"new, to {fip}: to the DNAT zone")),
        _flow("lr_in_dnat", 90,
              Match.of(metadata=router.key, ct_state=new, eth_type=ETH_IP, ipv4_dst=fip),
              [CT(router.dnat_zone, "lr_in_routing", commit=True, nat=NAT("dst", fixed))],
              Hint(Purpose.FLOATING_IP, "vm", vm.name, f"DNAT {fip} to {fixed}")),
        _flow("lr_out_redirect", 100,
              Match.of(metadata=router.key, eth_type=ETH_IP, ipv4_src=fixed),
              [CT(router.dnat_zone, "lr_out_undnat", nat=NAT())], hint),
        _flow("lr_out_snat", 90,
              Match.of(metadata=router.key, ct_state=new, eth_type=ETH_IP, ipv4_src=fixed),
              [CT(router.snat_zone, "lr_out_src_mac", commit=True, nat=NAT("src", fip))],
              Hint(Purpose.FLOATING_IP, "vm", vm.name, f"SNAT {fixed} to {fip}")),
    ]


def _steering(router: Router, ports: NodePorts) -> Group | None:
    """A compute node's way to a router's SNAT: a fast-failover group over the tunnels to
    the nodes of its HA chain, in order; the switch uses the first whose BFD session is up
    (None: no tunnel to any of them)."""
    buckets = tuple(Bucket((Output(t),), watch_port=_watch(c, t, ports))
                    for c in router.snat_nodes if (t := ports.tunnels.get(c)) is not None)
    if not buckets:
        return None
    return Group(group_id(router.snat_zone), buckets,
                 hint=Hint(Purpose.SNAT, "router", router.name,
                           f"to the first live of {', '.join(router.snat_nodes)}"))


def _watch(peer: str, tunnel: int, ports: NodePorts) -> int:
    """The port a fast-failover bucket for `peer` watches: its tunnel, whose BFD session
    says whether the peer is up; for a trusted peer (NodePorts.trusted), the provider
    patch, which is always up, so that the bucket counts as live until the session is."""
    return ports.provider if peer in ports.trusted and ports.provider is not None else tunnel


def _gate(router: Router, node: str, ports: NodePorts) -> list[Action]:
    """On a node of a router's HA chain, SNAT traffic arriving from a tunnel: served here
    when every node before this one in the chain is down as this node sees them (their
    tunnels' BFD), dropped otherwise, so that a compute node that alone lost the active
    node does not make a second node speak for the router. The first of the chain always
    serves. (OVS wants every bucket of a fast-failover group to watch a port: the last one
    watches the patch to the provider bridge, the way out of the SNAT.)"""
    earlier = router.snat_nodes[:router.snat_nodes.index(node)]
    watched = [_watch(c, t, ports) for c in earlier if (t := ports.tunnels.get(c)) is not None]
    if not watched:
        return [Goto("ls_in_gateway")]
    buckets = [Bucket((), watch_port=t) for t in watched]
    if ports.provider is not None:
        buckets.append(Bucket((Resubmit("ls_in_gateway"),), watch_port=ports.provider))
    verb = "is" if len(earlier) == 1 else "are"
    return [GroupAction(Group(
        group_id(router.snat_zone), tuple(buckets),
        hint=Hint(Purpose.SNAT, "router", router.name,
                  f"served here once {', '.join(earlier)} {verb} down")))]


def _snat(topo: Topology, node: str, router: Router, local_nets: set[str], ports: NodePorts
          ) -> list[Flow]:
    """Centralized SNAT of a router, on every node of its HA chain, active or standby alike
    (a takeover installs nothing): traffic of VMs without a floating IP arrives over the
    overlay addressed to the router, leaves with the router's external IP; the replies are
    routed back to the VMs' nodes. Only the node that has claimed the router (`ports.snat`)
    answers ARP for the external IP."""
    ext_ip, mac = str(router.external_ip), str(router.external_mac)
    out: list[Flow] = []
    gate = _gate(router, node, ports)
    for itf in router.interfaces:
        net = topo.networks[itf.network]
        if itf.network not in local_nets:
            out.append(_flow(
                "phy_in_tunnel", 100, Match.of(tunnel_id=net.vni),
                [SetField("metadata", net.vni), SetField("reg1", 1), *gate],
                Hint(Purpose.SNAT, "router", router.name,
                     f"VNI {net.vni}: {net.name}, to router {router.name}'s SNAT"),
            ))
            out.append(_enter_router(router, net, itf.mac))
    hint = Hint(Purpose.SNAT, "router", router.name, f"SNAT of {router.name} to {ext_ip}")
    new = ct_state(on=CT_TRK | CT_NEW, off=CT_INV)
    for b in sorted(b for b in ports.held if b.router == router.name and b.proto != 1):
        l4 = "tcp" if b.proto == PROTO_TCP else "udp"
        out.append(_flow(
            "lr_out_snat", 60,
            Match.of(metadata=router.key, ct_state=new, eth_type=ETH_IP, ip_proto=b.proto,
                     ipv4_src=b.src, ipv4_dst=b.dst, **{f"{l4}_src": b.sport,
                                                         f"{l4}_dst": b.dport}),
            [CT(router.snat_zone, "lr_out_src_mac", commit=True,
                nat=NAT("src", ext_ip, b.xport))],
            Hint(Purpose.SNAT, "router", router.name,
                 f"SNAT to {ext_ip}:{b.xport}, as the serving node does")))
    out += [
        _flow("lr_out_redirect", 50, Match.of(metadata=router.key, eth_type=ETH_IP),
              [CT(router.snat_zone, "lr_out_snat", nat=NAT())], hint),
        _flow("lr_out_snat", 50, Match.of(metadata=router.key, ct_state=new, eth_type=ETH_IP),
              [CT(router.snat_zone, "lr_out_src_mac", commit=True, nat=NAT("src", ext_ip))],
              Hint(Purpose.SNAT, "router", router.name, f"SNAT to {ext_ip}")),
    ]
    address = _provider_address(ext_ip, mac, router, hint)
    if router.name not in ports.snat:  # a standby: silent on the provider network
        address = [f for f in address if f.match.get("eth_type") != ETH_ARP]
    return out + address


def _provider(topo: Topology, node: str, ports: NodePorts, local: Mapping[str, VM],
              routers: Mapping[str, Router], snat: Mapping[str, Router],
              only: frozenset[str] | None = None) -> list[Flow]:
    """The provider network side: what comes in from it, and where NATed traffic goes."""
    assert ports.provider is not None
    out = [_provider_in(ports.provider)]
    fip_vms = [vm for _, vm in sorted(local.items())
               if vm.floating_ip and (r := topo.router_of(vm.network)) and r.external_gateway]
    natting = {r.name: r for r in snat.values()}
    dnatting: set[str] = set()
    for vm in fip_vms:
        router = routers[topo.router_of(vm.network).name]  # type: ignore[union-attr]
        natting[router.name] = router
        dnatting.add(router.name)
        out += _floating_ip(topo, node, vm, router)
    for router in natting.values():
        out += _conntrack_states(router, router.name in dnatting)
    if not natting:
        return out  # nothing leaves this node to the provider network
    # where translated traffic goes on the provider network
    for fip, vm in sorted(topo.floating_ips().items()):
        if only is not None and vm.name not in local and str(fip) not in only:
            continue
        router = topo.router_of(vm.network)
        if router is None or not router.external_gateway:
            continue
        out += _fip_delivery(vm, router, vm.name in local,
                             topo.nodes[vm.node].external_mac, ports.provider)
    for router in topo.routers.values():
        if only is not None and str(router.external_ip) not in only:
            continue
        if router.external_gateway and router.name not in snat and snat_node(router):
            out.append(_external_delivery(router, ports.provider))
    return out


def _provider_in(provider: int) -> Flow:
    return _flow("phy_in_classify", 100, Match.of(in_port=provider), [Goto("lr_in_provider")],
                 Hint(Purpose.EXTERNAL, note="arrived from the provider network"))


def _fip_delivery(vm: VM, router: Router, local: bool, node_mac: str, provider: int
                  ) -> list[Flow]:
    """Where traffic NATed here goes for a floating IP of the cloud: hairpinned when its
    VM is bound here (`local`), else straight to its node's MAC (`node_mac`)."""
    fip = vm.floating_ip
    out: list[Flow] = []
    if local:
        # after the SNAT zone on the way out, the way in starts at the DNAT zone
        out.append(_flow(
            "lr_out_delivery", 110, Match.of(eth_type=ETH_IP, reg3=1, ipv4_dst=str(fip)),
            [SetField("in_port", provider), SetField("metadata", router.key),
             CT(router.dnat_zone, "lr_in_dnat", nat=NAT())],
            Hint(Purpose.EXTERNAL, "vm", vm.name,
                 f"hairpin to floating IP {fip} of {vm.name}, on this node")))
        # (as if from the provider port: the VM's own floating IP may lead back to it)
        actions: list[Action] = [SetField("in_port", provider),
                                 SetField("metadata", router.key),
                                 CT(router.snat_zone, "lr_in_unsnat", nat=NAT())]
        note = f"hairpin to floating IP {fip} of {vm.name}, on this node"
    else:
        actions = [SetField("eth_dst", node_mac), Output(provider)]
        note = f"to floating IP {fip} of {vm.name}, straight to {vm.node}"
    out.append(_flow("lr_out_delivery", 100, Match.of(eth_type=ETH_IP, ipv4_dst=str(fip)),
                     actions, Hint(Purpose.EXTERNAL, "vm", vm.name, note)))
    return out


def _external_delivery(router: Router, provider: int) -> Flow:
    """To a router's external IP, SNATed on another node."""
    return _flow(
        "lr_out_delivery", 100, Match.of(eth_type=ETH_IP, ipv4_dst=str(router.external_ip)),
        [SetField("eth_dst", str(router.external_mac)), Output(provider)],
        Hint(Purpose.EXTERNAL, "router", router.name,
             f"to {router.name}'s external IP on {snat_node(router)}"))


# --- scope: which VMs a node's plan can depend on ---------------------------------------------

@dataclass(frozen=True)
class Scope:
    """The VMs (ports) a node's plan reads, as three rules over the cloud's VMs: those the
    topology puts on `node`, those on `networks`, and those with a floating IP when
    `floating_ips`. Nodes, networks, routers and the
    external network are not restricted: `plan()` is the same on a topology holding only
    the VMs in scope as on the whole cloud (for the VMs bound here being those the topology
    puts here)."""

    node: str
    networks: frozenset[str] = frozenset()
    floating_ips: bool = False

    def holds(self, vm: VM) -> bool:
        return (vm.node == self.node or vm.network in self.networks
                or (self.floating_ips and vm.floating_ip is not None))


def scope(topo: Topology, node: str) -> Scope:
    """What `plan(topo, node, ports)` can depend on:

    - the node's own VMs;
    - every VM on a network reachable from theirs (sharing a router with one), and on the
      networks of the routers whose SNAT is held here (`snat_candidates`): their remote
      delivery flows;
    - every VM with a floating IP, when the node NATs for the provider network (it hosts a
      floating IP, or a router's SNAT): the `lr_out_delivery` flows that send traffic for a
      floating IP straight to its node.

    (Router and node MACs come from their own names, never from the VMs': a copy holding
    only some VMs derives the same ones.)

    Computed on a topology holding only these VMs, it gives the same scope again (the
    agent computes it over its partial copy of the northbound database)."""
    local = [vm for vm in topo.vms.values() if vm.node == node]
    snat = snat_candidates(topo, node)
    networks = topo.reachable_networks({vm.network for vm in local})
    for name in snat:
        networks.update(i.network for i in topo.routers[name].interfaces)
    natting = topo.external is not None and (
        bool(snat) or any(vm.floating_ip is not None for vm in local))
    return Scope(node, frozenset(networks), natting)
