"""Real packets for `dvr trace --verify`, run inside a lab namespace with scapy:

    python3 -m dvr.lab.capture sniff IFACE SECONDS MARK   # prints READY, then a JSON list
    python3 -m dvr.lab.capture send IFACE < packet.json    # the packet as the trace's dict

A traced IPv4 packet carries a unique IP identification (`MARK`), which no router on its
way changes, so every capture keeps only that packet: on a VM's or the external host's
interface its headers, on an underlay interface the VXLAN frames that carry it (with their
VNI). ARP is recognised by its target and sender addresses (`MARK` is then `arp:SPA:TPA`).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

from flows.ofp import ETH_ARP, ETH_IP


def _describe(p: Any) -> dict[str, Any]:
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.l2 import ARP, Ether
    from scapy.layers.vxlan import VXLAN

    out: dict[str, Any] = {}
    if VXLAN in p:
        out["vni"] = p[VXLAN].vni
        out["outer_src"], out["outer_dst"] = p[IP].src, p[IP].dst
        p = p[VXLAN].payload
    if Ether not in p:
        return out
    out.update({"eth.src": p[Ether].src, "eth.dst": p[Ether].dst})
    if ARP in p:
        a = p[ARP]
        out.update({"arp.op": a.op, "arp.spa": a.psrc, "arp.tpa": a.pdst, "arp.sha": a.hwsrc})
    elif IP in p:
        ip = p[IP]
        out.update({"ip.src": ip.src, "ip.dst": ip.dst, "ip.ttl": ip.ttl, "ip.id": ip.id})
        for layer, name in ((TCP, "tcp"), (UDP, "udp")):
            if layer in p and not (layer is UDP and VXLAN in p):
                out[f"{name}.sport"], out[f"{name}.dport"] = p[layer].sport, p[layer].dport
        if ICMP in p:
            out["icmp.type"] = p[ICMP].type
    return out


def _matches(d: dict[str, Any], mark: str) -> bool:
    if mark.startswith("arp:"):
        _, spa, tpa = mark.split(":")
        return {d.get("arp.spa"), d.get("arp.tpa")} == {spa, tpa}
    return str(d.get("ip.id")) == mark


def sniff(iface: str, seconds: float, mark: str) -> int:
    from scapy.all import AsyncSniffer, conf

    conf.verb = 0
    seen: list[dict[str, Any]] = []

    def keep(p: Any) -> bool:
        d = _describe(p)
        if d and _matches(d, mark):
            d["time"] = time.time()
            seen.append(d)
        return False

    started = threading.Event()
    sniffer = AsyncSniffer(iface=iface, lfilter=keep, store=False,
                           started_callback=started.set)
    sniffer.start()
    if not started.wait(15):  # the socket is open once scapy calls this back
        print(f"cannot capture on {iface}", file=sys.stderr, flush=True)
        return 1
    print("READY", flush=True)
    sniffer.join(timeout=seconds)
    if sniffer.running:
        sniffer.stop()
    print(json.dumps(seen), flush=True)
    return 0


def build(pkt: dict[str, Any]) -> Any:
    """A scapy frame from the trace's packet dict (OXM-named fields)."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.l2 import ARP, Ether

    eth = Ether(src=pkt["eth_src"], dst=pkt["eth_dst"])
    if pkt.get("eth_type") == ETH_ARP:
        return eth / ARP(op=pkt.get("arp_op", 1), hwsrc=pkt["arp_sha"], psrc=pkt["arp_spa"],
                         hwdst=pkt.get("arp_tha", "00:00:00:00:00:00"), pdst=pkt["arp_tpa"])
    ip = IP(src=pkt["ipv4_src"], dst=pkt["ipv4_dst"], ttl=pkt.get("ip_ttl", 64),
            id=pkt.get("ip_id", 1))
    proto = pkt.get("ip_proto")
    if proto == 6:
        l4: Any = TCP(sport=pkt.get("tcp_src", 40000), dport=pkt.get("tcp_dst", 80), flags="S")
    elif proto == 17:
        l4 = UDP(sport=pkt.get("udp_src", 40000), dport=pkt.get("udp_dst", 53)) / b"dvr-trace"
    else:
        # a fresh echo identifier each time, as each ping process has one: conntrack takes
        # an echo request repeated with an identifier and sequence already answered for
        # invalid
        l4 = ICMP(type=pkt.get("icmpv4_type", 8), code=pkt.get("icmpv4_code", 0),
                  id=pkt.get("icmp_id", pkt.get("ip_id", 1)))
    return eth / ip / l4


def from_scapy(p: Any) -> dict[str, Any]:
    """The simulator's packet (OXM-named fields) of a scapy frame (Ether / ARP or IP with
    ICMP, TCP or UDP): the reverse of `build()`."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.l2 import ARP, Ether

    pkt: dict[str, Any] = {"eth_src": p[Ether].src.lower(), "eth_dst": p[Ether].dst.lower()}
    if ARP in p:
        a = p[ARP]
        pkt.update(eth_type=ETH_ARP, arp_op=a.op, arp_spa=a.psrc, arp_tpa=a.pdst,
                   arp_sha=a.hwsrc.lower(), arp_tha=a.hwdst.lower())
    elif IP in p:
        ip = p[IP]
        pkt.update(eth_type=ETH_IP, ipv4_src=ip.src, ipv4_dst=ip.dst, ip_proto=ip.proto,
                   ip_ttl=ip.ttl)
        if ICMP in p:
            pkt.update(icmpv4_type=p[ICMP].type, icmpv4_code=p[ICMP].code)
        elif TCP in p:
            pkt.update(tcp_src=p[TCP].sport, tcp_dst=p[TCP].dport)
        elif UDP in p:
            pkt.update(udp_src=p[UDP].sport, udp_dst=p[UDP].dport)
    else:
        pkt["eth_type"] = p[Ether].type
    return pkt


def send(iface: str) -> int:
    from scapy.all import conf, sendp

    conf.verb = 0
    sendp(build(json.loads(sys.stdin.read())), iface=iface, verbose=0)
    print(json.dumps({"sent": 1}), flush=True)
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["sniff"] and len(argv) == 4:
        return sniff(argv[1], float(argv[2]), argv[3])
    if argv[:1] == ["send"] and len(argv) == 2:
        return send(argv[1])
    print("usage: python3 -m dvr.lab.capture sniff IFACE SECONDS MARK | send IFACE",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
