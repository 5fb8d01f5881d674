"""The offline engine of `dvr trace`: the packet pushed through the planned flows of every
node (`flows.simulator`). It needs only a topology, so it is a design-time tool as much as a
debugging one; the live engine also uses it to say what the switches should have done.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from dvr.trace import expr
from dvr.trace.report import Crossing, Hop, Outcome, Report, headers
from flows.model import Topology
from flows.pipeline import TABLES
from flows.simulator import Cloud, End, Trace


def offline(topo: Topology, sender: str, packet_expr: str, cloud: Cloud | None = None
            ) -> Report:
    """Trace with the simulator over the planned flows of every node. `sender` is a VM or
    "ext" (the external host)."""
    pkt = (expr.from_external(topo, packet_expr) if sender == "ext"
           else expr.from_vm(topo, sender, packet_expr))
    if cloud is None:  # plan only what this packet can meet: fast on a large cloud
        cloud = Cloud.offline(topo, only=focus(topo, pkt))
    trace = (cloud.send_from_external(pkt) if sender == "ext"
             else cloud.send_from_vm(sender, pkt))
    return report_of(topo, "offline", sender, pkt, trace)


def focus(topo: Topology, pkt: dict[str, Any]) -> frozenset[str]:
    """The addresses that decide which flows a packet can meet: its source, its
    destination, and the fixed IP behind the destination when it is a floating IP."""
    dst = pkt.get("ipv4_dst") or pkt.get("arp_tpa")
    src = pkt.get("ipv4_src") or pkt.get("arp_spa")
    out = {str(dst), str(src)}
    vm = topo.floating_ips().get(ipaddress.IPv4Address(dst)) if dst else None
    if vm is not None:
        out.add(str(vm.ip))
    return frozenset(out)


def report_of(topo: Topology, engine: str, sender: str, pkt: dict[str, Any], trace: Trace
              ) -> Report:
    hops = []
    for step in trace.steps:
        table = TABLES[step.table]
        hops.append(Hop(
            node=step.node, bridge="br-int", table=step.table, table_number=table.number,
            priority=step.flow.priority if step.flow else None,
            flow=step.flow.to_ofctl() if step.flow else "(no flow: table miss, dropped)",
            source=str(step.flow.hint) if step.flow else "", changes=list(step.changes),
            cookie=step.flow.cookie if step.flow else 0))
    crossings = [Crossing(i - 1, kind, src, dst, carried, _endpoints(topo, kind, src, dst))
                 for i, kind, src, dst, carried in trace.crossings]
    outcomes = [_outcome(topo, sender, pkt, trace, end) for end in trace.ends]
    return Report(engine, sender, headers(pkt), hops, crossings, outcomes)


def _endpoints(topo: Topology, kind: str, src: str, dst: str) -> str:
    if kind != "tunnel":
        return ""
    a, b = topo.nodes[src].tunnel_ip, topo.nodes[dst].tunnel_ip
    return f"{a} -> {b}" if a and b else ""


def _outcome(topo: Topology, sender: str, pkt: dict[str, Any], trace: Trace, end: End
             ) -> Outcome:
    if end.kind == "delivered":
        to = end.vm if end.vm else "external host"
        return Outcome("delivered", end.node, to, "", headers(end.packet))
    return Outcome("dropped", end.node, None, explain_drop(topo, sender, pkt, end),
                   headers(end.packet))



def explain_drop(topo: Topology, sender: str, pkt: dict[str, Any], end: End) -> str:
    """A drop, in words: the flow's own reason, made specific where the model knows more
    (no route on which router, which networks are isolated from each other)."""
    reason = end.reason.removeprefix("drop: ")
    dst = pkt.get("ipv4_dst") or pkt.get("arp_tpa")
    vm = topo.vms.get(sender)
    if vm is None or dst is None:
        return reason
    addr = ipaddress.IPv4Address(dst)
    holder = next((v for v in topo.vms.values() if v.ip == addr and v.network != vm.network
                   and topo.networks[v.network].cidr != topo.networks[vm.network].cidr),
                  None)
    router = topo.router_of(vm.network)
    if holder is not None and holder.network not in topo.reachable_networks([vm.network]):
        return (f"isolation: networks {vm.network} and {holder.network} share no router "
                f"({reason})")
    if reason.startswith("no route") and router is not None:
        return f"no route to {dst} on router {router.name}"
    if reason == "unknown destination" or reason.startswith("table ls_in_dst_key"):
        owner = next((v for v in topo.vms.values() if v.ip == addr
                      and v.network in topo.reachable_networks([vm.network])), None)
        if owner is not None:
            return (f"unknown destination: {dst} is {owner.name}'s, but no flow on "
                    f"{end.node} delivers it")
        net = next((n for n in topo.reachable_networks([vm.network])
                    if addr in topo.networks[n].cidr), vm.network)
        return f"unknown destination: no VM holds {dst} on network {net}"
    return reason


