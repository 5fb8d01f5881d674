"""The packet language of `dvr trace`: a short expression, completed from the sender.

    icmp, ip.dst=10.2.0.12
    tcp, ip.dst=198.51.100.10, tcp.dport=443
    arp, arp.tpa=10.1.0.1
    udp, ip.dst=203.0.113.50, udp.dport=53, ip.ttl=2

Items are separated by commas: a protocol (`icmp`, `tcp`, `udp`, `arp`, or `ip` for bare
IPv4) and `field=value` pairs. What the expression leaves out is filled in as the sender would
send it: a VM's own MAC and IP, TTL 64, the destination MAC of the VM that holds the address
on the same network or the router's MAC for any other destination; from the external host,
the upstream gateway's MAC, the `remote_ip` as source and the MAC that answers for the
destination on the provider network. A mistake raises `ExprError`, which says which item is
wrong and shows where it is.

The result is the simulator's packet (a dict keyed by OXM field names) plus `ip_ttl`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from flows.model import Topology
from flows.ofp import ETH_ARP, ETH_IP, PROTO_ICMP, PROTO_TCP, PROTO_UDP
from flows.planner import ASSUMED_GATEWAY_MAC, snat_node

BROADCAST = "ff:ff:ff:ff:ff:ff"
ZERO_MAC = "00:00:00:00:00:00"
DEFAULT_SPORT = 40000
DEFAULT_DPORT = {"tcp": 80, "udp": 53}
PROTOCOLS = ("icmp", "tcp", "udp", "arp", "ip")
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}\Z")

# field -> (OXM name, kind, the protocol it belongs to or "" for any)
FIELDS: dict[str, tuple[str, str, str]] = {
    "eth.src": ("eth_src", "mac", ""),
    "eth.dst": ("eth_dst", "mac", ""),
    "ip.src": ("ipv4_src", "ip", "ip"),
    "ip.dst": ("ipv4_dst", "ip", "ip"),
    "ip.ttl": ("ip_ttl", "u8", "ip"),
    "icmp.type": ("icmpv4_type", "u8", "icmp"),
    "icmp.code": ("icmpv4_code", "u8", "icmp"),
    "icmp.id": ("icmp_id", "u16", "icmp"),  # the echo identifier (conntrack keys on it)
    "tcp.sport": ("tcp_src", "u16", "tcp"),
    "tcp.dport": ("tcp_dst", "u16", "tcp"),
    "udp.sport": ("udp_src", "u16", "udp"),
    "udp.dport": ("udp_dst", "u16", "udp"),
    "arp.op": ("arp_op", "u16", "arp"),
    "arp.spa": ("arp_spa", "ip", "arp"),
    "arp.tpa": ("arp_tpa", "ip", "arp"),
    "arp.sha": ("arp_sha", "mac", "arp"),
    "arp.tha": ("arp_tha", "mac", "arp"),
}


class ExprError(ValueError):
    """A malformed expression: the message names the item and points at it."""

    def __init__(self, expr: str, start: int, end: int, reason: str):
        self.expr, self.start, self.end, self.reason = expr, start, end, reason
        item = expr[start:end].strip() or expr
        super().__init__(f"{item!r}: {reason}")

    def pointer(self) -> str:
        """The expression with a caret line under the offending item."""
        lead = len(self.expr[self.start:self.end]) - len(self.expr[self.start:self.end].lstrip())
        width = max(1, len(self.expr[self.start:self.end].strip()))
        return f"{self.expr}\n{' ' * (self.start + lead)}{'^' * width}"


@dataclass(frozen=True)
class Parsed:
    """What the expression itself says, before defaults."""

    protocol: str
    fields: dict[str, Any]  # OXM name -> value


def parse(expr: str) -> Parsed:
    protocol = ""
    fields: dict[str, Any] = {}
    where: dict[str, tuple[int, int]] = {}
    pos = 0
    for raw in expr.split(","):
        start, end = pos, pos + len(raw)
        pos = end + 1
        item = raw.strip()
        if not item:
            raise ExprError(expr, start, end, "empty item (two commas, or a trailing one)")
        if "=" not in item:
            word = item.lower()
            if word not in PROTOCOLS:
                raise ExprError(expr, start, end, "not a protocol (icmp, tcp, udp, arp, ip) "
                                "nor field=value")
            if protocol and protocol != word:
                raise ExprError(expr, start, end, f"a second protocol (already {protocol})")
            protocol = word
            continue
        name, _, value = item.partition("=")
        name, value = name.strip().lower(), value.strip()
        if name not in FIELDS:
            raise ExprError(expr, start, end, f"unknown field {name!r} (known: "
                            f"{', '.join(FIELDS)})")
        oxm, kind, _ = FIELDS[name]
        if oxm in fields:
            raise ExprError(expr, start, end, f"{name} given twice")
        try:
            fields[oxm] = _value(kind, value)
        except ValueError as exc:
            raise ExprError(expr, start, end, str(exc)) from None
        where[oxm] = (start, end)
    # fields decide the protocol when the expression does not name one, and must agree
    names = {oxm: name for name, (oxm, _, _) in FIELDS.items()}
    for oxm in fields:
        name = names[oxm]
        proto = FIELDS[name][2]
        if proto == "ip" and protocol in ("", "ip", "icmp", "tcp", "udp"):
            protocol = protocol or "ip"
        elif proto in ("icmp", "tcp", "udp") and protocol in ("", "ip", proto):
            protocol = proto
        elif proto == "arp" and protocol in ("", "arp"):
            protocol = "arp"
        elif proto:
            s, e = where[oxm]
            raise ExprError(expr, s, e, f"{name} does not go with {protocol}")
    if not protocol:
        raise ExprError(expr, 0, len(expr), "say what the packet is: icmp, tcp, udp, arp or "
                        "ip, and its destination (ip.dst=... or arp.tpa=...)")
    return Parsed(protocol, fields)


def _value(kind: str, text: str) -> Any:
    if not text:
        raise ValueError("no value")
    if kind == "ip":
        try:
            return str(ipaddress.IPv4Address(text))
        except ValueError:
            raise ValueError(f"{text!r} is not an IPv4 address") from None
    if kind == "mac":
        mac = text.lower()
        if not MAC_RE.match(mac):
            raise ValueError(f"{text!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
        return mac
    bits = {"u8": 8, "u16": 16}[kind]
    try:
        n = int(text, 0)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not 0 <= n < (1 << bits):
        raise ValueError(f"{n} does not fit in {bits} bits")
    return n


def from_vm(topo: Topology, vm_name: str, expr: str) -> dict[str, Any]:
    """The packet `vm_name` sends for `expr`, every header filled in."""
    if vm_name not in topo.vms:
        raise KeyError(f"unknown VM {vm_name!r} (known: {', '.join(sorted(topo.vms))})")
    vm = topo.vms[vm_name]
    p = parse(expr)
    pkt = _base(p)
    net = topo.networks[vm.network]
    router = topo.router_of(vm.network)
    pkt.setdefault("eth_src", vm.mac)
    if p.protocol == "arp":
        _need(p, expr, "arp_tpa", "an ARP packet needs its target: arp.tpa=...")
        pkt.setdefault("eth_dst", BROADCAST)
        pkt.setdefault("arp_sha", vm.mac)
        pkt.setdefault("arp_spa", str(vm.ip))
        return pkt
    _need(p, expr, "ipv4_dst", "an IPv4 packet needs its destination: ip.dst=...")
    pkt.setdefault("ipv4_src", str(vm.ip))
    dst = ipaddress.IPv4Address(pkt["ipv4_dst"])
    if "eth_dst" not in pkt:
        if dst in net.cidr:
            holder = next((v for v in topo.vms.values()
                           if v.network == vm.network and v.ip == dst), None)
            itf = router.interface_on(vm.network) if router else None
            if holder is not None:
                pkt["eth_dst"] = holder.mac
            elif itf is not None and itf.ip == dst:
                pkt["eth_dst"] = itf.mac
            else:
                pkt["eth_dst"] = BROADCAST  # nobody would answer its ARP
        elif router is None:
            raise ExprError(expr, 0, len(expr), f"{vm_name} has no route to {dst}: network "
                            f"{vm.network} is on no router")
        else:
            pkt["eth_dst"] = router.interface_on(vm.network).mac  # type: ignore[union-attr]
    return pkt


def from_external(topo: Topology, expr: str) -> dict[str, Any]:
    """The packet the external host sends for `expr` on the provider network."""
    ext = topo.external
    if ext is None:
        raise KeyError("this topology has no external network")
    p = parse(expr)
    pkt = _base(p)
    pkt.setdefault("eth_src", ext.gateway_mac or ASSUMED_GATEWAY_MAC)
    if p.protocol == "arp":
        _need(p, expr, "arp_tpa", "an ARP packet needs its target: arp.tpa=...")
        pkt.setdefault("eth_dst", BROADCAST)
        pkt.setdefault("arp_sha", pkt["eth_src"])
        pkt.setdefault("arp_spa", str(ext.gateway_ip))
        return pkt
    _need(p, expr, "ipv4_dst", "an IPv4 packet needs its destination: ip.dst=...")
    pkt.setdefault("ipv4_src", str(ext.remote_ip))
    if "eth_dst" not in pkt:
        pkt["eth_dst"] = provider_mac(topo, pkt["ipv4_dst"]) or BROADCAST
    return pkt


def provider_mac(topo: Topology, ip: str) -> str | None:
    """The MAC that answers ARP for `ip` on the provider network, per the topology."""
    addr = ipaddress.IPv4Address(ip)
    vm = topo.floating_ips().get(addr)
    if vm is not None:
        return topo.nodes[vm.node].external_mac
    for r in topo.routers.values():
        if r.external_gateway and r.external_ip == addr and snat_node(r):
            return r.external_mac
    return None


def _base(p: Parsed) -> dict[str, Any]:
    pkt: dict[str, Any] = {}
    if p.protocol == "arp":
        pkt.update(eth_type=ETH_ARP, arp_op=1, arp_tha=ZERO_MAC)
    else:
        pkt.update(eth_type=ETH_IP, ip_ttl=64)
        if p.protocol == "icmp":
            pkt.update(ip_proto=PROTO_ICMP, icmpv4_type=8, icmpv4_code=0)
        elif p.protocol in ("tcp", "udp"):
            pkt["ip_proto"] = PROTO_TCP if p.protocol == "tcp" else PROTO_UDP
            pkt[f"{p.protocol}_src"] = DEFAULT_SPORT
            pkt[f"{p.protocol}_dst"] = DEFAULT_DPORT[p.protocol]
    pkt.update(p.fields)
    return pkt


def _need(p: Parsed, expr: str, oxm: str, reason: str) -> None:
    if oxm not in p.fields:
        raise ExprError(expr, 0, len(expr), reason)
