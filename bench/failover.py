#!/usr/bin/env python3
"""SNAT high-availability benchmark of the dvr dataplane: prints figures, asserts nothing.

    python3 bench/failover.py [--prefix bnfo] [--kills 10] [--intervals 100,30]
                              [--connections 20] [--seconds 5] [--rounds 3]

a. For each BFD interval, on tests/lab/topologies/ha.yaml (two network nodes; r1 and r2 on
   different ones): --kills times, the network node serving r1 is killed (`dvr lab kill`)
   under a UDP stream every 10 ms from vm2 (r1's SNAT) to the external host's remote
   address, and brought back (`dvr lab start`; it returns as a standby) before the next
   kill. Printed: the longest silence of the stream (the failover gap) and its median and
   max over the kills, beside the BFD detection time (3 intervals), the time from the kill
   to the standby's claim (ARP and gratuitous ARP for r1's address), and what the traffic
   that must not notice lost meanwhile: r2's SNAT (its stream, on the other node), east-
   west (a ping every 10 ms vm3 -> vm4) and a floating IP (the external host pings vm1's).
b. At each interval: --connections TCP connections through r1's SNAT (vm2, vm3 and vm4,
   paced, two pairs sharing a source port) while r1's node is killed: how many survive
   (every byte, no reset) and the longest stall (TCP's own retransmission timer, 200 ms at
   least and doubled each time, adds to the failover gap).
c. On tests/lab/topologies/ha3.yaml (three network nodes; r1's chain net1, net2): the time
   from net1's death to r1 having a new standby (net3), as the scheduler decides.
d. On the ha lab: TCP throughput through r1's SNAT, through a floating IP and east-west
   routed, alternated (bench/north_south.py's measure): the SNAT/east-west ratio.

Needs root; every lab goes down at the end, also on failure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.east_west import BenchError, lab, lab_down, lab_status, last_line, row  # noqa: E402
from bench.north_south import bench_throughput  # noqa: E402
from dvr.lab.lab import PREFIX_RE, Lab  # noqa: E402

HA = ROOT / "tests" / "lab" / "topologies" / "ha.yaml"
HA3 = ROOT / "tests" / "lab" / "topologies" / "ha3.yaml"
REMOTE = "198.51.100.10"
INTERVAL = 0.01  # the streams' and pings' pace (s)
TARGET_GAP_MS = {100: 300, 30: 120}
OVN_REFERENCE = "OVN 23.03 on this kind of lab: ~790 ms at 100 ms BFD, 2.6-3.0 s at its defaults"
TARGET_STALL_MS = 300


def pkttool(ns: str, *args: str) -> subprocess.Popen[str]:
    """The lab tests' packet tool, run inside `ns` (a tool, not an import)."""
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m",
                             "tests.lab.pkttool", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def ready(proc: subprocess.Popen[str]) -> subprocess.Popen[str]:
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "READY":
        raise BenchError(f"a helper did not start: {proc.stderr.read() if proc.stderr else ''}")
    return proc


def result(proc: subprocess.Popen[str], timeout: float = 90) -> Any:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0 or not out.strip():
        raise BenchError(f"a helper failed: {(err or '').strip()[-300:]}")
    return json.loads(out.strip().splitlines()[-1])


def longest_silence(got: list[list[Any]]) -> tuple[int, float]:
    """Datagrams lost, and the longest time between two arrivals (s)."""
    seqs = sorted({g[0] for g in got})
    lost = seqs[-1] - seqs[0] + 1 - len(seqs) if seqs else 0
    times = sorted(g[1] for g in got)
    return lost, max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def agent_snat(lb: Lab, node: str) -> list[str]:
    try:
        return json.loads((lb.node_dir(node) / "agent-status.json").read_text())["snat"]
    except (OSError, ValueError, KeyError):
        return []


def serving(lb: Lab, router: str) -> str | None:
    found = [n for n in ("net1", "net2") if router in agent_snat(lb, n)]
    return found[0] if len(found) == 1 else None


def wait(what: str, predicate: Any, timeout: float = 20.0) -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise BenchError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - t0


def must(res: subprocess.CompletedProcess[str], what: str) -> None:
    if res.returncode != 0:
        raise BenchError(f"{what}: {last_line(res)}")


# --- a. kills under traffic -------------------------------------------------------------------
def one_kill(prefix: str, lb: Lab, port: int) -> dict[str, Any]:
    victim = serving(lb, "r1")
    other = serving(lb, "r2")
    if victim is None or other is None or victim == other:
        raise BenchError(f"r1 and r2 are not served by one node each ({victim}, {other})")
    seconds, count = 4.0, int(4.0 / INTERVAL)
    sinks = {r: ready(pkttool(lb.ext_ns, "udp-sink", str(port + i), "--seconds",
                              str(seconds + 2))) for i, r in enumerate(("r1", "r2"))}
    streams = {r: pkttool(lb.vm_ns(vm), "udp-stream", REMOTE, str(port + i), "--interval",
                          str(INTERVAL), "--seconds", str(seconds))
               for i, (r, vm) in enumerate((("r1", "vm2"), ("r2", "vm5")))}
    east_west = pkttool(lb.vm_ns("vm3"), "ping", "10.1.0.14", str(count), str(INTERVAL))
    fip = pkttool(lb.ext_ns, "ping", "203.0.113.50", str(count), str(INTERVAL))
    time.sleep(1.5)
    must(lab(prefix, "kill", victim), f"kill {victim}")
    wait(f"{other} to claim r1", lambda: "r1" in agent_snat(lb, other))
    claimed_at = time.time()
    sent = {r: result(s)["sent"] for r, s in streams.items()}
    got = {r: result(s) for r, s in sinks.items()}
    lost, gap = longest_silence(got["r1"])
    # the node died after the last datagram before the silence: the claim came so long after
    times = sorted(g[1] for g in got["r1"])
    died = next((a for a, b in itertools.pairwise(times) if b - a == gap), claimed_at)
    claim_s = claimed_at - died
    other_lost = sent["r2"] - len(got["r2"])
    ew, fp = result(east_west), result(fip)
    must(lab(prefix, "start", victim, timeout=120), f"start {victim}")
    # the next kill takes the other node: r2 moves to the node back (an operator's move)
    must(lab_nb(prefix, "snat-move", "r2", victim), "snat-move r2")
    try:
        wait("r2 to move", lambda: serving(lb, "r2") == victim and serving(lb, "r1") == other)
    except BenchError:
        raise BenchError(f"r2 did not move to {victim} (claims: net1 {agent_snat(lb, 'net1')}"
                         f", net2 {agent_snat(lb, 'net2')})") from None
    return {"victim": victim, "gap": gap, "lost": lost, "sent": sent["r1"],
            "claim": claim_s, "r2_lost": other_lost,
            "east_west_lost": ew["sent"] - ew["received"],
            "fip_lost": fp["sent"] - fp["received"]}


def lab_nb(prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    from bench.east_west import dvr_cmd

    return subprocess.run([*dvr_cmd(), "nb", "--lab", prefix, *args], text=True,
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=60)


def bench_kills(prefix: str, interval: int, kills: int) -> list[dict[str, Any]]:
    lab_down(prefix)
    must(lab(prefix, "up", "--bfd-interval", str(interval), str(HA)), "lab up")
    lb = Lab(prefix)
    out = []
    try:
        for k in range(kills):
            m = one_kill(prefix, lb, 7100 + 10 * k)
            out.append(m)
            print(f"  kill {k + 1:>2} {m['victim']}: gap {m['gap'] * 1e3:6.0f} ms, "
                  f"{m['lost']:>3} of {m['sent']} lost; claimed after "
                  f"{m['claim'] * 1e3:5.0f} ms; lost elsewhere: r2 SNAT {m['r2_lost']}, "
                  f"east-west {m['east_west_lost']}, floating IP {m['fip_lost']}")
    finally:
        lab_down(prefix)
    return out


# --- b. TCP connections through a kill --------------------------------------------------------
def bench_tcp(prefix: str, interval: int, connections: int) -> dict[str, Any]:
    lab_down(prefix)
    must(lab(prefix, "up", "--bfd-interval", str(interval), str(HA)), "lab up")
    lb = Lab(prefix)
    try:
        port, size = 8200, 700_000
        server = ready(pkttool(lb.ext_ns, "tcp-server", str(port), "--connections",
                               str(connections), "--timeout", "60"))
        # two pairs share a source port; the rest take their own
        plan = [("vm2", 33333), ("vm4", 33333), ("vm3", 34444), ("vm2", 34444)]
        vms = ("vm2", "vm3", "vm4")
        plan += [(vms[i % 3], 40000 + i) for i in range(connections - len(plan))]
        clients = []
        for vm, sport in plan[:connections]:
            clients.append(pkttool(lb.vm_ns(vm), "tcp-client", REMOTE, str(port), str(size),
                                   "--sport", str(sport), "--pace", str(INTERVAL),
                                   "--timeout", "60"))
            time.sleep(0.05)
        time.sleep(1.5)
        victim = serving(lb, "r1")
        must(lab(prefix, "kill", victim or "net1"), "kill")
        sent = []
        for c in clients:
            try:
                sent.append(result(c))
            except BenchError:
                sent.append(None)
        got = result(server, timeout=120)
        hashes = {s["sha256"] for s in sent if s}
        survived = [r for r in got if r["sha256"] in hashes and not r["reset"]
                    and r["bytes"] == size]
        stall = max((r["max_gap"] for r in survived), default=0.0)
        print(f"  {len(survived)} of {connections} connections survived (two pairs from one "
              f"source port); longest stall {stall * 1e3:.0f} ms")
        return {"survived": len(survived), "of": connections, "stall": stall}
    finally:
        lab_down(prefix)


# --- c. a new standby -------------------------------------------------------------------------
def bench_standby(prefix: str) -> float:
    lab_down(prefix)
    must(lab(prefix, "up", str(HA3)), "lab up")
    lb = Lab(prefix)
    try:
        chain = lambda: lb.topology(live=True).routers["r1"].snat_nodes  # noqa: E731
        if chain() != ("net1", "net2"):
            raise BenchError(f"r1's chain is {chain()}, not net1, net2")
        t0 = time.monotonic()
        must(lab(prefix, "kill", "net1"), "kill net1")
        took = wait("r1 to get net3 as its standby", lambda: chain() == ("net2", "net3"), 30)
        print(f"  r1: chain net2, net3 {took:.2f} s after net1's death (agent down time "
              f"3 s in the lab); failover itself at once, by BFD")
        return time.monotonic() - t0
    finally:
        lab_down(prefix)


# --- d. throughput ----------------------------------------------------------------------------
def bench_ratio(prefix: str, seconds: int, rounds: int) -> dict[str, list[float]]:
    lab_down(prefix)
    must(lab(prefix, "up", str(HA)), "lab up")
    try:
        return bench_throughput(lab_status(prefix), seconds, rounds)
    finally:
        lab_down(prefix)


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--prefix", default="bnfo", help="lab prefix (default: bnfo)")
    ap.add_argument("--kills", type=int, default=10, help="kills per BFD interval")
    ap.add_argument("--intervals", default="100,30", help="BFD intervals (ms) to measure")
    ap.add_argument("--connections", type=int, default=20, help="TCP connections")
    ap.add_argument("--seconds", type=int, default=5, help="iperf3 duration per run")
    ap.add_argument("--rounds", type=int, default=3, help="iperf3 rounds per path")
    args = ap.parse_args()
    if args.prefix == "dvr" or not PREFIX_RE.match(args.prefix):
        print(f"failover: error: use a prefix of your own, not {args.prefix!r}",
              file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("failover: error: the lab needs root", file=sys.stderr)
        return 1
    intervals = [int(i) for i in args.intervals.split(",")]
    kills: dict[int, list[dict[str, Any]]] = {}
    tcp: dict[int, dict[str, Any]] = {}
    standby = ratio = None
    try:
        for interval in intervals:
            print(f"\n== a. {args.kills} kills of r1's node at {interval} ms BFD ==")
            kills[interval] = bench_kills(args.prefix, interval, args.kills)
        for interval in intervals:
            print(f"\n== b. {args.connections} TCP connections through a kill, "
                  f"{interval} ms BFD ==")
            tcp[interval] = bench_tcp(args.prefix, interval, args.connections)
        print("\n== c. time to a new standby (three network nodes) ==")
        standby = bench_standby(args.prefix)
        print(f"\n== d. throughput, {args.seconds} s per run, {args.rounds} rounds ==")
        ratio = bench_ratio(args.prefix, args.seconds, args.rounds)
    except (BenchError, subprocess.TimeoutExpired) as exc:
        print(f"failover: error: {exc}", file=sys.stderr)
        lab_down(args.prefix)
        return 1
    except KeyboardInterrupt:
        lab_down(args.prefix)
        return 130
    print("\n== summary ==")
    for interval, ms in kills.items():
        gaps = [m["gap"] * 1e3 for m in ms]
        claims = [m["claim"] * 1e3 for m in ms]
        target = TARGET_GAP_MS.get(interval)
        row(f"failover gap, {interval} ms BFD", f"median {statistics.median(gaps):.0f} ms, "
            f"max {max(gaps):.0f} ms (detection {3 * interval} ms)",
            f"median < {target} ms" if target else "",
            statistics.median(gaps) < target if target else None)
        row("  claim (ARP) after death", f"median {statistics.median(claims):.0f} ms, "
            f"max {max(claims):.0f} ms")
        elsewhere = sum(m["r2_lost"] + m["east_west_lost"] + m["fip_lost"] for m in ms)
        row("  lost by other traffic", f"{elsewhere} packets over {len(ms)} kills "
            f"(r2 SNAT, east-west, floating IP)", "0", elsewhere == 0)
    print(f"  ({OVN_REFERENCE})")
    for interval, t in tcp.items():
        row(f"TCP survived, {interval} ms BFD", f"{t['survived']} of {t['of']}", f"{t['of']}",
            t["survived"] == t["of"])
        row("  longest stall", f"{t['stall'] * 1e3:.0f} ms", f"< {TARGET_STALL_MS} ms",
            t["stall"] * 1e3 < TARGET_STALL_MS)
    if standby is not None:
        row("new standby after a death", f"{standby:.2f} s (agent down time 3 s)")
    if ratio and ratio.get("snat") and ratio.get("east-west"):
        r = statistics.median(ratio["snat"]) / statistics.median(ratio["east-west"])
        row("SNAT / east-west throughput", f"{r:.3f}", ">= 0.90", r >= 0.9)
    return 0


if __name__ == "__main__":
    sys.exit(main())
