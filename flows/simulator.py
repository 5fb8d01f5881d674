"""The offline simulator: push a packet through planned flows, node to node.

It interprets this project's flow model with OpenFlow's semantics (highest priority match
wins, goto moves forward, output to the input port is dropped, tunnels carry the tunnel id to
the peer's tunnel port with registers cleared) so that tests and `dvr trace --offline` can
assert where a packet goes and with which headers, without a switch.

Conntrack is modelled per node and zone, as OVS does it: a `ct` looks the packet up (an
original-direction or reply-direction match is established, anything else new), `nat`
applies a committed connection's translation, `commit` records a new connection with its
NAT; then the packet is recirculated. The tables persist across sends on one `Cloud`, so
a request and its reply can be followed in turn (`reset_conntrack()` forgets them). ICMP
errors (related) are not modelled.

The provider network is one L2 segment: a frame sent out of a node's provider port goes to
the node (or the external host, `gateway_mac`) that owns its destination MAC; a broadcast
from the external host reaches every node.
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from flows.model import Topology
from flows.ofp import (
    CT,
    CT_DNAT,
    CT_EST,
    CT_NEW,
    CT_RPL,
    CT_SNAT,
    CT_TRK,
    ETH_ARP,
    ETH_IP,
    FIELDS,
    IN_PORT,
    Bucket,
    DecTTL,
    Flow,
    Goto,
    Group,
    GroupAction,
    Move,
    Output,
    Resubmit,
    SetField,
    SetTTL,
    value_matches,
)
from flows.pipeline import FIRST_TABLE
from flows.planner import ASSUMED_GATEWAY_MAC, NodePorts, assumed_ports, plan

MAX_STEPS = 256
BROADCAST = "ff:ff:ff:ff:ff:ff"
Packet = dict[str, Any]
Tuple5 = tuple[Any, Any, Any, Any, Any]


@dataclass
class Conn:
    orig: Tuple5  # as first seen
    xlat: Tuple5  # the original direction after NAT
    # a reply has been seen: until then, later packets of the original direction are still
    # +new (as OVS's conntrack has it for UDP and other connectionless protocols)
    replied: bool = True


def _tuple(pkt: Packet) -> Tuple5:
    proto = pkt.get("ip_proto")
    if proto == 6:
        ports = (pkt.get("tcp_src"), pkt.get("tcp_dst"))
    elif proto == 17:
        ports = (pkt.get("udp_src"), pkt.get("udp_dst"))
    else:  # ICMP echo: its identifier, when the packet says (conntrack keys on it)
        ports = (pkt.get("icmp_id"), pkt.get("icmp_id"))
    return (pkt.get("ipv4_src"), pkt.get("ipv4_dst"), proto, *ports)


def _reverse(t: Tuple5) -> Tuple5:
    return (t[1], t[0], t[2], t[4], t[3])


@dataclass
class NodePlan:
    name: str
    ports: NodePorts
    flows: frozenset[Flow]
    _tables: dict[str, list[Flow]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for flow in self.flows:
            self._tables.setdefault(flow.table, []).append(flow)
        for flows in self._tables.values():
            flows.sort(key=lambda f: -f.priority)

    def lookup(self, table: str, pkt: Packet) -> Flow | None:
        for flow in self._tables.get(table, ()):
            if all(value_matches(k, v, pkt.get(k)) for k, v in flow.match.fields):
                return flow
        return None

    def port_owner(self, ofport: int) -> tuple[PortKind, str] | None:
        for vm, p in self.ports.vms.items():
            if p == ofport:
                return ("vm", vm)
        for node, p in self.ports.tunnels.items():
            if p == ofport:
                return ("tunnel", node)
        if ofport == self.ports.provider:
            return ("provider", "")
        return None


class _Plans(dict):  # type: ignore[type-arg]
    """Node plans made on first use."""

    def __init__(self, topo: Topology, make: Any):
        super().__init__()
        self._topo, self._make = topo, make
        self._ports: dict[str, NodePorts] = {}

    def __missing__(self, name: str) -> NodePlan:
        if name not in self._topo.nodes:
            raise KeyError(name)
        self[name] = self._make(name)
        return self[name]

    def ports(self, name: str) -> NodePorts:
        if name in self:
            return self[name].ports
        if name not in self._ports:
            self._ports[name] = assumed_ports(self._topo, name)
        return self._ports[name]

    def values(self):  # type: ignore[no-untyped-def]
        return [self[n] for n in self._topo.nodes]

    def items(self):  # type: ignore[no-untyped-def]
        return [(n, self[n]) for n in self._topo.nodes]


@dataclass
class Step:
    node: str
    table: str
    flow: Flow | None
    changes: list[str]


EndKind = Literal["delivered", "dropped"]
CrossingKind = Literal["tunnel", "provider"]  # through a tunnel, or on the provider network
PortKind = Literal["vm", "tunnel", "provider"]


@dataclass
class End:
    """Where one copy of the packet ended."""

    kind: EndKind
    node: str
    packet: Packet
    vm: str | None = None  # delivered to this VM, or (None) to the external host
    reason: str = ""

    @property
    def external(self) -> bool:
        return self.kind == "delivered" and self.vm is None


@dataclass
class Trace:
    steps: list[Step]
    ends: list[End]
    tunnels: list[tuple[str, str]]  # (from node, to node) crossings, in order
    provider: list[tuple[str, str]] = field(default_factory=list)  # (from, to) on the
    # provider network; "ext" is the external host
    # every crossing in order, placed among the steps: (number of steps before it, kind
    # "tunnel" or "provider", from, to, what it carried: the VNI or the destination MAC)
    crossings: list[tuple[int, CrossingKind, str, str, str]] = field(default_factory=list)

    @property
    def delivered(self) -> list[End]:
        return [e for e in self.ends if e.kind == "delivered"]

    @property
    def nodes(self) -> list[str]:
        out: list[str] = []
        for s in self.steps:
            if not out or out[-1] != s.node:
                out.append(s.node)
        return out


class Cloud:
    """The planned flows of every node of a topology."""

    def __init__(self, topo: Topology, nodes: Mapping[str, NodePlan]):
        self.topo = topo
        self.nodes = nodes if isinstance(nodes, _Plans) else dict(nodes)
        self.conntrack: dict[tuple[str, int], list[Conn]] = {}
        ext = topo.external
        self.gateway_mac = (ext.gateway_mac or ASSUMED_GATEWAY_MAC) if ext else None
        # failures: dead nodes, and cut links between two nodes (their tunnels' BFD down)
        self.down: set[str] = set()
        self.cuts: set[frozenset[str]] = set()

    def live(self, node: str, port: int | None) -> bool:
        """Is `port` of `node` live, as a fast-failover group watching it sees it? A tunnel
        is live while its peer is alive and the link to it is not cut."""
        if port is None:
            return True
        owner = self.nodes[node].port_owner(port)
        if owner is None or owner[0] != "tunnel":
            return owner is not None
        peer = owner[1]
        return peer not in self.down and frozenset((node, peer)) not in self.cuts

    def reset_conntrack(self) -> None:
        self.conntrack.clear()

    def provider_owner(self, mac: str) -> str | None:
        """The node whose provider port owns `mac` (its own, or a router's external MAC
        whose SNAT it runs), or "ext" for the external host's."""
        if mac == self.gateway_mac:
            return "ext"
        for name in self.topo.nodes:
            ports = self.ports(name)
            if ports.provider is None:
                continue
            if self.topo.nodes[name].external_mac == mac:
                return name
            for r in ports.snat:
                if r in self.topo.routers and self.topo.routers[r].external_mac == mac:
                    return name
        return None

    def send_from_external(self, pkt: Packet) -> Trace:
        """The external host sends `pkt` on the provider network."""
        trace = Trace([], [], [])
        pkt = dict(pkt)
        pkt.setdefault("eth_src", self.gateway_mac)
        self._on_provider(trace, "ext", pkt)
        return trace

    def _on_provider(self, trace: Trace, sender: str, wire: Packet) -> None:
        dst = str(wire.get("eth_dst", "")).lower()
        if dst == BROADCAST:
            targets = [n for n in self.topo.nodes
                       if self.ports(n).provider is not None and n != sender]
            if sender != "ext":
                targets.append("ext")
        else:
            owner = self.provider_owner(dst)
            if owner is None or owner == sender:
                trace.ends.append(End("dropped", sender, wire,
                                      reason=f"no host with MAC {dst} on the provider network"))
                return
            targets = [owner]
        for target in targets:
            trace.provider.append((sender, target))
            trace.crossings.append((len(trace.steps), "provider", sender, target,
                                    str(wire.get("eth_dst"))))
            if target == "ext":
                trace.ends.append(End("delivered", sender, dict(wire)))
                continue
            pkt = dict(wire)
            pkt["in_port"] = self.nodes[target].ports.provider
            self._pipeline(trace, target, pkt, FIRST_TABLE)

    @classmethod
    def offline(cls, topo: Topology, only: frozenset[str] | None = None) -> Cloud:
        """Every node's plan, with assumed ports, each made when a packet first reaches
        the node. `only`: see `plan()` (for tracing a packet to these addresses)."""
        def make(name: str) -> NodePlan:
            ports = assumed_ports(topo, name)
            return NodePlan(name, ports, plan(topo, name, ports, only))

        return cls(topo, _Plans(topo, make))

    def ports(self, node: str) -> NodePorts:
        if isinstance(self.nodes, _Plans):
            return self.nodes.ports(node)
        return self.nodes[node].ports

    def vm_port(self, vm: str) -> tuple[str, int]:
        guess = self.topo.vms[vm].node if vm in self.topo.vms else None
        for name in ([guess] if guess else []) + list(self.topo.nodes):
            ports = self.ports(name)
            if vm in ports.vms:
                return name, ports.vms[vm]
        raise KeyError(f"VM {vm} is bound on no node")

    def send_from_vm(self, vm: str, pkt: Packet) -> Trace:
        node, port = self.vm_port(vm)
        return self.run(node, port, pkt)

    def run(self, node: str, in_port: int, pkt: Packet) -> Trace:
        trace = Trace([], [], [])
        pkt = dict(pkt)
        pkt["in_port"] = in_port
        self._pipeline(trace, node, pkt, FIRST_TABLE)
        return trace

    def _pipeline(self, trace: Trace, node: str, pkt: Packet, table: str) -> None:
        plan_ = self.nodes[node]
        while True:
            if len(trace.steps) > MAX_STEPS:
                trace.ends.append(End("dropped", node, pkt, reason="loop: too many steps"))
                return
            flow = plan_.lookup(table, pkt)
            if flow is None:
                trace.steps.append(Step(node, table, None, []))
                trace.ends.append(End("dropped", node, pkt, reason=f"table {table}: no flow"))
                return
            step = Step(node, table, flow, [])
            trace.steps.append(step)
            goto: str | None = None
            actions: list[Any] = list(flow.actions)
            output = False
            while actions:
                action = actions.pop(0)
                if isinstance(action, GroupAction):
                    bucket = self._bucket(node, step, action.group)
                    if bucket is None or not bucket.actions:
                        why = "no live bucket" if bucket is None else "its live bucket drops"
                        note = action.group.hint.note if action.group.hint else ""
                        trace.ends.append(End("dropped", node, pkt,
                                              reason=f"group {action.group.group_id} "
                                                     f"({note}): {why}"))
                        return
                    actions = list(bucket.actions) + actions
                    continue
                if isinstance(action, Resubmit):
                    goto = action.table
                    continue
                if isinstance(action, SetField):
                    _set(pkt, step, action.field, action.value)
                elif isinstance(action, Move):
                    _set(pkt, step, action.dst, _convert(pkt.get(action.src), action.src,
                                                         action.dst))
                elif isinstance(action, DecTTL):
                    ttl = int(pkt.get("ip_ttl", 64))
                    if ttl <= 1:
                        trace.ends.append(End("dropped", node, pkt, reason="TTL exceeded"))
                        return
                    _set(pkt, step, "ip_ttl", ttl - 1)
                elif isinstance(action, SetTTL):
                    _set(pkt, step, "ip_ttl", action.ttl)
                elif isinstance(action, Output):
                    output = True
                    self._output(trace, node, copy.deepcopy(pkt), action.port)
                elif isinstance(action, Goto):
                    goto = action.table
                elif isinstance(action, CT):
                    self._conntrack(node, pkt, step, action)
                    goto = action.table
            if goto is None:
                if not output:
                    trace.ends.append(End("dropped", node, pkt, reason=flow.hint.note or
                                          f"table {table}: drop"))
                return
            table = goto

    def _bucket(self, node: str, step: Step, group: Group) -> Bucket | None:
        """The bucket a fast-failover group applies: its first live one."""
        for i, bucket in enumerate(group.buckets):
            if self.live(node, bucket.watch_port):
                owner = (self.nodes[node].port_owner(bucket.watch_port)
                         if bucket.watch_port is not None else None)
                step.changes.append(bucket_note(group.group_id, i, owner))
                return bucket
        return None

    def _conntrack(self, node: str, pkt: Packet, step: Step, ct: CT) -> None:
        conns = self.conntrack.setdefault((node, ct.zone), [])
        key = _tuple(pkt)
        found: Conn | None = None
        reply = False
        for conn in conns:
            if conn.orig == key:
                found = conn
            elif _reverse(conn.xlat) == key:
                found, reply = conn, True
            if found:
                break
        if found is None and ct.commit:
            xlat = list(key)
            if ct.nat is not None and ct.nat.kind == "src":
                xlat[0] = ct.nat.ip
                if ct.nat.port is not None and key[2] in (6, 17):
                    xlat[3] = ct.nat.port
            elif ct.nat is not None and ct.nat.kind == "dst":
                xlat[1] = ct.nat.ip
            found = Conn(key, tuple(xlat), replied=False)  # type: ignore[arg-type]
            conns.append(found)
            state = CT_TRK | CT_NEW
        elif found is None:
            state = CT_TRK | CT_NEW
        else:
            if reply:
                found.replied = True
            if found.replied or found.orig[2] == 6:  # TCP: the handshake is not modelled
                state = CT_TRK | CT_EST | (CT_RPL if reply else 0)
            else:
                state = CT_TRK | CT_NEW
        if found is not None and ct.nat is not None:
            want = _reverse(found.orig) if reply else found.xlat
            # what the translation changes on this packet, as ct_state tells it
            state |= (CT_SNAT if want[0] != pkt.get("ipv4_src") else 0) | (
                CT_DNAT if want[1] != pkt.get("ipv4_dst") else 0)
            _set(pkt, step, "ipv4_src", want[0])
            _set(pkt, step, "ipv4_dst", want[1])
            l4 = {6: "tcp", 17: "udp"}.get(key[2])
            if l4 is not None and f"{l4}_src" in pkt:
                _set(pkt, step, f"{l4}_src", want[3])
                _set(pkt, step, f"{l4}_dst", want[4])
        pkt["ct_state"] = state
        step.changes.append(f"ct(zone={ct.zone}): {'+'.join(_state_names(state))}")

    def _output(self, trace: Trace, node: str, pkt: Packet, port: int) -> None:
        plan_ = self.nodes[node]
        if port == IN_PORT:
            port = pkt["in_port"]
        elif port == pkt["in_port"]:
            trace.ends.append(End("dropped", node, pkt, reason="output to the input port"))
            return
        owner = plan_.port_owner(port)
        wire = {k: v for k, v in pkt.items()
                if not k.startswith("reg") and k not in ("metadata", "in_port", "ct_state")}
        if owner is not None and owner[0] == "provider":
            wire.pop("tunnel_id", None)
            self._on_provider(trace, node, wire)
            return
        if owner is None:
            trace.ends.append(End("dropped", node, wire, reason=f"output to unknown port {port}"))
        elif owner[0] == "vm":
            wire.pop("tunnel_id", None)
            trace.ends.append(End("delivered", node, wire, vm=owner[1]))
        else:
            peer = owner[1]
            trace.tunnels.append((node, peer))
            trace.crossings.append((len(trace.steps), "tunnel", node, peer,
                                    str(wire.get("tunnel_id"))))
            back = self.nodes[peer].ports.tunnels.get(node)
            if back is None:
                trace.ends.append(End("dropped", peer, wire, reason=f"{peer} has no tunnel "
                                      f"from {node}"))
                return
            wire["in_port"] = back
            self._pipeline(trace, peer, wire, FIRST_TABLE)


def bucket_note(group_id: int, index: int, owner: tuple[str, str] | None) -> str:
    """How a trace says which bucket of a fast-failover group was used (`owner`: what the
    bucket's watched port is, as `NodePlan.port_owner` says)."""
    what = {"tunnel": "the tunnel to ", "provider": "the provider network", "vm": "VM "}
    watched = f", watching {what[owner[0]]}{owner[1]}" if owner else ""
    return f"group {group_id}: bucket {index}{watched}"


def _state_names(state: int) -> list[str]:
    from flows.ofp import CT_STATE_NAMES

    return [name for bit, name in sorted(CT_STATE_NAMES.items()) if state & bit]


def _set(pkt: Packet, step: Step, fld: str, value: Any) -> None:
    old = pkt.get(fld)
    pkt[fld] = value
    if old != value and not fld.startswith("reg") and fld not in ("metadata", "ct_state",
                                                                  "in_port"):
        step.changes.append(f"{fld}: {old} -> {value}")


def _convert(value: Any, src: str, dst: str) -> Any:
    skind = "ttl" if src == "ip_ttl" else FIELDS[src][0]
    dkind = FIELDS[dst][0]
    if value is None:
        return None
    if skind == dkind:
        return value
    if skind == "ip" and dkind == "int":
        return int(ipaddress.IPv4Address(str(value)))
    if skind == "int" and dkind == "ip":
        return str(ipaddress.IPv4Address(int(value)))
    raise ValueError(f"cannot move {src} to {dst}")


def packet(**kw: Any) -> Packet:
    """A packet dict from keyword fields; `icmp`, `tcp`, `udp` and `arp` set their types."""
    pkt: Packet = {}
    if kw.pop("arp", False):
        pkt.update(eth_type=ETH_ARP, arp_op=1)
    for proto, num in (("icmp", 1), ("tcp", 6), ("udp", 17)):
        if kw.pop(proto, False):
            pkt.update(eth_type=ETH_IP, ip_proto=num, ip_ttl=64)
    if "eth_type" not in pkt and any(k.startswith("ipv4") for k in kw):
        pkt.update(eth_type=ETH_IP, ip_ttl=64)
    pkt.update(kw)
    return pkt


__all__ = ["Cloud", "End", "NodePlan", "Step", "Trace", "bucket_note", "packet"]
