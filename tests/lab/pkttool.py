"""Packet tools run inside a lab namespace (`ip netns exec NS python3 -m tests.lab.pkttool`).

- `sniff IFACE --seconds S [--proto icmp|arp|tcp|udp|vxlan] [--host IP]`: prints READY once
  capturing, then one JSON list of the packets seen (headers the tests assert on).
- `arp IFACE TARGET_IP`: sends one ARP request from IFACE's address, prints the reply (JSON)
  or `null`.
- `tcp-server PORT`: accepts one connection, prints {"bytes": N, "sha256": H, "peer": IP,
  "max_gap": S} (the longest wait between two arrivals of data, in seconds).
- `tcp-client IP PORT BYTES [--source IP] [--pace S]`: sends BYTES random bytes (with
  `--pace`, 1400 bytes every S seconds), prints {"bytes": N, "sha256": H}.
- `udp-probe IP PORT [--source IP]`: sends one UDP datagram on a connected socket and
  waits for an answer: prints {"refused": true} when an ICMP port unreachable came back.
- `send IFACE DST_MAC DST_IP [--src IP] [--count N]`: sends N ICMP echo requests in frames
  built by hand (to reach what the kernel would not route), prints {"sent": N}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import threading
import time
from typing import Any

BFD_PORT = 3784  # BFD control packets (RFC 5881), which OVS sends inside its tunnels


def describe(p: Any) -> dict[str, Any]:
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.l2 import ARP, Ether
    from scapy.layers.vxlan import VXLAN

    d: dict[str, Any] = {"eth_src": p[Ether].src, "eth_dst": p[Ether].dst, "len": len(p)}
    if ARP in p:
        a = p[ARP]
        d.update(proto="arp", op=a.op, psrc=a.psrc, pdst=a.pdst, hwsrc=a.hwsrc, hwdst=a.hwdst)
    elif IP in p:
        ip = p[IP]
        d.update(proto="ip", src=ip.src, dst=ip.dst, ttl=ip.ttl)
        if VXLAN in p:
            d.update(proto="vxlan", vni=p[VXLAN].vni)
            inner = p[VXLAN].payload
            if IP in inner:
                d.update(inner_src=inner[IP].src, inner_dst=inner[IP].dst)
            if UDP in inner and inner[UDP].dport == BFD_PORT:
                d["proto"] = "bfd"  # a tunnel's liveness, not traffic
        elif ICMP in p:
            d.update(proto="icmp", icmp_type=p[ICMP].type)
        elif TCP in p:
            d.update(proto="tcp", sport=p[TCP].sport, dport=p[TCP].dport)
        elif UDP in p:
            d.update(proto="udp", sport=p[UDP].sport, dport=p[UDP].dport)
    else:
        d.update(proto=hex(p[Ether].type))
    return d


def cmd_sniff(args: argparse.Namespace) -> int:
    from scapy.all import AsyncSniffer, conf
    from scapy.layers.l2 import Ether

    conf.verb = 0

    def keep(p: Any) -> bool:
        if Ether not in p:
            return False
        d = describe(p)
        if args.proto and d.get("proto") != args.proto:
            return False
        if args.host and args.host not in (d.get("src"), d.get("dst"), d.get("psrc"),
                                           d.get("pdst"), d.get("inner_src"),
                                           d.get("inner_dst")):
            return False
        return True

    started = threading.Event()
    sniffer = AsyncSniffer(iface=args.iface, lfilter=keep, store=True,
                           started_callback=started.set)
    sniffer.start()
    if not started.wait(15):  # the socket is open once scapy calls this back
        print("sniffer did not start", file=sys.stderr, flush=True)
        return 1
    print("READY", flush=True)
    sniffer.join(timeout=args.seconds)
    if sniffer.running:
        sniffer.stop()
    print(json.dumps([describe(p) for p in (sniffer.results or [])]), flush=True)
    return 0


def cmd_arp(args: argparse.Namespace) -> int:
    from scapy.all import conf, get_if_addr, get_if_hwaddr, srp1
    from scapy.layers.l2 import ARP, Ether

    conf.verb = 0
    mac, ip = get_if_hwaddr(args.iface), get_if_addr(args.iface)
    req = Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=1, hwsrc=mac, psrc=ip, hwdst="00:00:00:00:00:00", pdst=args.target)
    reply = srp1(req, iface=args.iface, timeout=args.timeout, verbose=0)
    print(json.dumps(describe(reply) if reply is not None else None), flush=True)
    return 0


def _receive(conn: socket.socket, peer: tuple[str, int], timeout: float) -> dict[str, Any]:
    """Read a connection to its end: what arrived (bytes, sha256), from whom, the longest
    wait between two chunks, and how it ended (`reset`: by a RST)."""
    conn.settimeout(timeout)
    h, n = hashlib.sha256(), 0
    last, max_gap, reset = time.monotonic(), 0.0, False
    while True:
        try:
            chunk = conn.recv(65536)
        except ConnectionResetError:
            reset = True
            break
        now = time.monotonic()
        if not chunk:
            break
        if n:
            max_gap = max(max_gap, now - last)
        last = now
        h.update(chunk)
        n += len(chunk)
    conn.close()
    return {"bytes": n, "sha256": h.hexdigest(), "peer": peer[0], "peer_port": peer[1],
            "max_gap": round(max_gap, 4), "reset": reset}


def cmd_tcp_server(args: argparse.Namespace) -> int:
    """Accept --connections connections on PORT and read each to its end (one JSON line:
    the connection's report, or with several, a list of them)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", args.port))
    srv.listen(64)
    srv.settimeout(args.timeout)
    print("READY", flush=True)
    results: list[dict[str, Any]] = []
    threads = []
    for _ in range(args.connections):
        conn, peer = srv.accept()
        t = threading.Thread(target=lambda c=conn, p=peer: results.append(
            _receive(c, p, args.timeout)))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    out: Any = results[0] if args.connections == 1 else sorted(
        results, key=lambda r: (r["peer"], r["peer_port"]))
    print(json.dumps(out), flush=True)
    return 0


def cmd_tcp_client(args: argparse.Namespace) -> int:
    data = os.urandom(args.bytes)
    deadline = time.monotonic() + args.timeout
    while True:
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.settimeout(args.timeout)
            if args.source or args.sport:
                sock.bind((args.source or "0.0.0.0", args.sport))
            sock.connect((args.ip, args.port))
            break
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    if args.pace:
        for i in range(0, len(data), 1400):
            sock.sendall(data[i:i + 1400])
            time.sleep(args.pace)
    else:
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    sock.close()
    print(json.dumps({"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}),
          flush=True)
    return 0


def cmd_udp_probe(args: argparse.Namespace) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if args.source:
        sock.bind((args.source, 0))
    sock.settimeout(args.timeout)
    sock.connect((args.ip, args.port))
    refused = False
    try:
        sock.send(b"probe")
        sock.recv(100)
    except ConnectionRefusedError:
        refused = True
    except TimeoutError:
        pass
    print(json.dumps({"refused": refused}), flush=True)
    return 0


def cmd_arp_replies(args: argparse.Namespace) -> int:
    """Send one ARP request for TARGET and list every reply seen within --seconds: who
    answers for an address (exactly one node should)."""
    from scapy.all import AsyncSniffer, conf, get_if_addr, get_if_hwaddr, sendp
    from scapy.layers.l2 import ARP, Ether

    conf.verb = 0
    mac, ip = get_if_hwaddr(args.iface), get_if_addr(args.iface)
    started = threading.Event()
    sniffer = AsyncSniffer(iface=args.iface, store=True, started_callback=started.set,
                           lfilter=lambda p: ARP in p and p[ARP].op == 2
                           and p[ARP].psrc == args.target)
    sniffer.start()
    started.wait(10)
    sendp(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=1, hwsrc=mac, psrc=ip, hwdst="00:00:00:00:00:00", pdst=args.target),
        iface=args.iface, verbose=0)
    time.sleep(args.seconds)
    replies = sniffer.stop() or []
    print(json.dumps([describe(r) for r in replies]), flush=True)
    return 0


def cmd_udp_sink(args: argparse.Namespace) -> int:
    """Receive a numbered UDP stream on PORT for --seconds: every datagram's number, arrival
    time (this host's clock) and source address."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", args.port))
    sock.settimeout(0.2)
    print("READY", flush=True)
    got = []
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        try:
            data, peer = sock.recvfrom(2048)
        except TimeoutError:
            continue
        got.append([int(data.split(b" ")[0]), time.time(), peer[0], peer[1]])
    print(json.dumps(got), flush=True)
    return 0


def cmd_udp_stream(args: argparse.Namespace) -> int:
    """Send a numbered UDP datagram to IP:PORT every --interval seconds for --seconds, from
    a fixed source port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", args.sport))
    n = int(args.seconds / args.interval)
    start = time.monotonic()
    for i in range(n):
        try:
            sock.sendto(b"%d stream" % i, (args.ip, args.port))
        except OSError:
            pass  # no route for a moment: the datagram is lost, as on a wire
        delay = start + (i + 1) * args.interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    print(json.dumps({"sent": n}), flush=True)
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    """`ping` COUNT echo requests at INTERVAL; how many were sent and answered."""
    import re
    import subprocess

    out = subprocess.run(["ping", "-q", "-n", "-c", str(args.count), "-i", str(args.interval),
                          "-W", "1", args.ip], capture_output=True, text=True).stdout
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    sent, received = (int(m.group(1)), int(m.group(2))) if m else (args.count, 0)
    print(json.dumps({"sent": sent, "received": received}), flush=True)
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    from scapy.all import conf, get_if_addr, get_if_hwaddr, sendp
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.l2 import Ether

    conf.verb = 0
    frame = Ether(src=get_if_hwaddr(args.iface), dst=args.dst_mac) / IP(
        src=args.src or get_if_addr(args.iface), dst=args.dst) / ICMP(id=0x4242)
    sendp(frame, iface=args.iface, count=args.count, inter=0.05, verbose=0)
    print(json.dumps({"sent": args.count}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pkttool")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sniff")
    s.add_argument("iface")
    s.add_argument("--seconds", type=float, default=3.0)
    s.add_argument("--proto")
    s.add_argument("--host")
    a = sub.add_parser("arp")
    a.add_argument("iface")
    a.add_argument("target")
    a.add_argument("--timeout", type=float, default=2.0)
    ts = sub.add_parser("tcp-server")
    ts.add_argument("port", type=int)
    ts.add_argument("--timeout", type=float, default=20.0)
    ts.add_argument("--connections", type=int, default=1)
    tc = sub.add_parser("tcp-client")
    tc.add_argument("ip")
    tc.add_argument("port", type=int)
    tc.add_argument("bytes", type=int)
    tc.add_argument("--timeout", type=float, default=20.0)
    tc.add_argument("--source")
    tc.add_argument("--sport", type=int, default=0, help="the source port (0: any)")
    tc.add_argument("--pace", type=float)
    sd = sub.add_parser("send")
    sd.add_argument("iface")
    sd.add_argument("dst_mac")
    sd.add_argument("dst")
    sd.add_argument("--src")
    sd.add_argument("--count", type=int, default=3)
    up = sub.add_parser("udp-probe")
    up.add_argument("ip")
    up.add_argument("port", type=int)
    up.add_argument("--source")
    up.add_argument("--timeout", type=float, default=2.0)
    ar = sub.add_parser("arp-replies")
    ar.add_argument("iface")
    ar.add_argument("target")
    ar.add_argument("--seconds", type=float, default=1.0)
    us = sub.add_parser("udp-sink")
    us.add_argument("port", type=int)
    us.add_argument("--seconds", type=float, default=10.0)
    ut = sub.add_parser("udp-stream")
    ut.add_argument("ip")
    ut.add_argument("port", type=int)
    ut.add_argument("--sport", type=int, default=40000)
    ut.add_argument("--interval", type=float, default=0.01)
    ut.add_argument("--seconds", type=float, default=5.0)
    pg = sub.add_parser("ping")
    pg.add_argument("ip")
    pg.add_argument("count", type=int)
    pg.add_argument("interval", type=float)
    args = p.parse_args(argv)
    return {"sniff": cmd_sniff, "arp": cmd_arp, "tcp-server": cmd_tcp_server,
            "tcp-client": cmd_tcp_client, "send": cmd_send, "udp-probe": cmd_udp_probe,
            "arp-replies": cmd_arp_replies, "udp-sink": cmd_udp_sink,
            "udp-stream": cmd_udp_stream, "ping": cmd_ping}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
