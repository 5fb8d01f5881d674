#!/usr/bin/env python3
"""Benchmark of `dvr trace`: prints figures, asserts nothing.

    python3 bench/trace.py [--prefix bntr] [--reps 5] [--no-lab]

a. offline: one trace per kind of path (same network across nodes, routed across nodes,
   floating IP out and in, centralized SNAT, floating IP to floating IP) on generated clouds
   of 1,000 and 10,000 ports (dvr/lab/generate.py: 100 VMs per network, two networks per
   router, every tenth VM of a network with a floating IP, 100 compute nodes): the median
   time of --reps traces, the topology already loaded (target: under 100 ms at 10,000 ports);
b. live (needs root; skipped with --no-lab): the same kinds of path on the trace lab
   (tests/lab/topologies/trace.yaml), the time of a live trace as the command makes it
   (the check for a tracked connection, ofproto/trace on each node, the comparison with the
   plan) divided by the nodes it crosses (target: under 1 s per node), and of `--verify` in
   addition.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.east_west import lab, lab_down, last_line, row  # noqa: E402
from dvr.lab.generate import generate, sample_paths  # noqa: E402
from dvr.trace.offline import offline  # noqa: E402
from flows.model import build_topology  # noqa: E402

TARGET_OFFLINE_MS = 100.0
TARGET_LIVE_S_PER_NODE = 1.0
LAB_PATHS = (
    ("same network", "vm1", "icmp, ip.dst=10.1.0.14"),
    ("routed", "vm1", "tcp, ip.dst=10.2.0.12, tcp.dport=22"),
    ("floating IP out", "vm1", "tcp, ip.dst=198.51.100.10, tcp.dport=443"),
    ("floating IP in", "ext", "tcp, ip.dst=203.0.113.50, tcp.dport=22"),
    ("SNAT", "vm4", "udp, ip.dst=198.51.100.10"),
    ("FIP to FIP", "vm1", "icmp, ip.dst=203.0.113.52"),
)


COMPUTES = 100
PER_NETWORK = 100


def cloud(ports: int) -> dict[str, Any]:
    """`ports` VMs, 100 a network, two networks a router with an external gateway, every tenth
    VM of a network with a floating IP, over 100 compute nodes and one network node."""
    return generate(ports, computes=COMPUTES, networks=max(1, ports // PER_NETWORK),
                    fip_every=10)


def bench_offline(sizes: list[int], reps: int) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for size in sizes:
        t0 = time.perf_counter()
        doc = cloud(size)
        topo = build_topology(doc)
        print(f"  {size} ports: topology built in {time.perf_counter() - t0:.2f} s")
        out[size] = {}
        for label, sender, packet in sample_paths(doc):
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                report = offline(topo, sender, packet)
                times.append((time.perf_counter() - t0) * 1000)
            ends = ", ".join(f"{o.kind} {o.to or ''} on {o.node}" for o in report.outcomes)
            out[size][label] = statistics.median(times)
            print(f"    {label:<16} {out[size][label]:7.1f} ms  ({ends})")
    return out


def bench_live(prefix: str, reps: int) -> dict[str, tuple[float, float, int]] | None:
    from dvr.lab.lab import Lab
    from dvr.trace.live import LiveTracer

    res = lab(prefix, "up", str(ROOT / "tests" / "lab" / "topologies" / "trace.yaml"))
    if res.returncode != 0:
        print(f"  lab failed: {last_line(res)}", file=sys.stderr)
        return None
    out: dict[str, tuple[float, float, int]] = {}
    try:
        for label, sender, packet in LAB_PATHS:
            times, verify = [], []
            nodes = 1
            for _ in range(reps):
                tracer = LiveTracer(Lab(prefix))  # a fresh tracer: nothing cached
                t0 = time.perf_counter()
                report = tracer.trace_and_compare(sender, packet)
                times.append(time.perf_counter() - t0)
                nodes = len({h.node for h in report.hops})
                t0 = time.perf_counter()
                problems = tracer.verify(report)
                verify.append(time.perf_counter() - t0)
            out[label] = (statistics.median(times), statistics.median(verify), nodes)
            print(f"    {label:<16} {out[label][0]:.3f} s over {nodes} node(s) = "
                  f"{out[label][0] / nodes:.3f} s/node; --verify +{out[label][1]:.2f} s"
                  f"{'' if not problems else ' (DIFFERENCES: ' + '; '.join(problems) + ')'}")
    finally:
        lab_down(prefix)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prefix", default="bntr")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-lab", action="store_true")
    args = p.parse_args()
    print("== a. offline trace, topology loaded ==")
    off = bench_offline([1000, 10000], args.reps)
    live = None
    if not args.no_lab:
        if os.geteuid() != 0:
            print("live: needs root, skipped")
        else:
            print(f"\n== b. live trace on the trace lab, median of {args.reps} ==")
            live = bench_live(args.prefix, args.reps)
    print("\n== summary " + "=" * 60)
    worst = max(off[10000].values())
    row("offline, 10,000 ports", f"median per path {min(off[10000].values()):.0f}-{worst:.0f} ms",
        f"< {TARGET_OFFLINE_MS:.0f} ms", worst < TARGET_OFFLINE_MS)
    row("offline, 1,000 ports", f"{min(off[1000].values()):.0f}-{max(off[1000].values()):.0f} ms")
    if live:
        per_node = max(t / n for t, _, n in live.values())
        row("live, per node crossed", f"worst {per_node:.3f} s",
            f"< {TARGET_LIVE_S_PER_NODE:.0f} s", per_node < TARGET_LIVE_S_PER_NODE)
        row("--verify, on top", f"median {statistics.median(v for _, v, _ in live.values()):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
