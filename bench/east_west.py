#!/usr/bin/env python3
"""East-west benchmark of the dvr dataplane: prints figures, asserts nothing.

    python3 bench/east_west.py [--prefix bnch] [--seconds 5] [--runs 3] [--rounds 3]

a. wall-clock time of `dvr lab up` (built-in topology) until every agent reports converged,
   over --runs up/down cycles: each value and the median;
b. TCP throughput (iperf3) between VMs on two compute nodes, routed east-west
   (vm1 blue on compute1 -> vm2 red on compute2) and bridged on the same network
   (vm1 -> vm4 blue on compute2), alternated over --rounds rounds, medians and their ratio;
c. planner cost on generated topologies (dvr/lab/generate.py: 10, 100, 1,000 VMs over 10
   compute nodes and one network node, 9 networks on 2 routers or none), pure Python:
   plan() time per node, flows per node, and the number of flows one remote VM costs a
   node (reachable network: expect +1; unreachable: +0).

Needs root for a and b (the lab); the lab always goes down at the end, also on failure.
Exits non-zero with one line on stderr when the lab cannot be built.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dvr.lab.generate import generate  # noqa: E402
from flows.model import Topology, build_topology  # noqa: E402
from flows.planner import assumed_ports, plan  # noqa: E402

TARGET_UP_S = 3.0
TARGET_RATIO = 0.97
TARGET_REMOTE_COST = 1
IPERF_PORT = 5201
# (label, client VM, server VM): routed crosses the distributed router, bridged does not
PAIRS = (
    ("routed", "vm1", "vm2"),   # compute1 blue 10.1.0.11 -> compute2 red 10.2.0.12
    ("bridged", "vm1", "vm4"),  # compute1 blue 10.1.0.11 -> compute2 blue 10.1.0.14
)


class BenchError(Exception):
    """A step of the benchmark failed; one line for the operator."""


# --- the lab through its CLI ------------------------------------------------------------------
def dvr_cmd() -> list[str]:
    """The `dvr` console script of this interpreter (no pyenv shim in the measured time)."""
    here = Path(sys.executable).parent / "dvr"
    if here.exists():
        return [str(here)]
    found = shutil.which("dvr")
    return [found] if found else [sys.executable, "-m", "dvr.cli"]


def lab(prefix: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*dvr_cmd(), "lab", "--prefix", prefix, *args], text=True,
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout)


def last_line(res: subprocess.CompletedProcess[str]) -> str:
    lines = (res.stderr or "").strip().splitlines() or (res.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit status {res.returncode}"


def lab_up(prefix: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    res = lab(prefix, "up")
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise BenchError(f"lab could not be built: {last_line(res)}")
    return elapsed, res.stdout.strip()


def lab_down(prefix: str) -> None:
    res = lab(prefix, "down")
    if res.returncode != 0:
        print(f"  warning: `dvr lab --prefix {prefix} down` failed: {last_line(res)}",
              file=sys.stderr)


def lab_status(prefix: str) -> dict[str, Any]:
    res = lab(prefix, "status", "--json")
    if res.returncode != 0:
        raise BenchError(f"lab status failed: {last_line(res)}")
    return json.loads(res.stdout)


def in_ns(ns: str, *cmd: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], text=True, capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def bench_up(prefix: str, runs: int) -> tuple[list[float], dict[str, Any]]:
    """`runs` up/down cycles; the last lab stays up for the throughput part."""
    times = []
    for i in range(runs):
        elapsed, said = lab_up(prefix)
        times.append(elapsed)
        print(f"  run {i + 1}: {elapsed:6.2f} s wall clock   ({said})")
        if i < runs - 1:
            lab_down(prefix)
    st = lab_status(prefix)
    print(f"  median: {statistics.median(times):.2f} s over {runs} runs")
    for name, node in st["nodes"].items():
        a = node["agent"]
        print(f"    {name:<10} converged={'yes' if a['converged'] else 'no':<3} "
              f"flows={a['flows']:<4} vms={' '.join(a['vms']) or '-'}")
    return times, st


# --- throughput -------------------------------------------------------------------------------
def wait_listening(ns: str, port: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = in_ns(ns, "ss", "-Hltn", f"sport = :{port}")
        if res.returncode == 0 and res.stdout.strip():
            return True
        time.sleep(0.05)
    return False


def iperf_once(client_ns: str, server_ns: str, server_ip: str, seconds: int) -> float:
    """One iperf3 TCP run; returns end.sum_received.bits_per_second."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-p", str(IPERF_PORT)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        if not wait_listening(server_ns, IPERF_PORT):
            raise BenchError(f"iperf3 server in {server_ns} is not listening")
        why = ""
        for attempt in range(5):
            res = in_ns(client_ns, "iperf3", "-c", server_ip, "-p", str(IPERF_PORT),
                        "-t", str(seconds), "--json", timeout=seconds + 30)
            try:
                doc = json.loads(res.stdout)
            except ValueError:
                doc = {"error": last_line(res)}
            if "error" not in doc:
                return float(doc["end"]["sum_received"]["bits_per_second"])
            why = doc["error"]
            if server.poll() is not None:  # the one-off server is gone: nothing to retry
                break
            time.sleep(0.2 * (attempt + 1))
        raise BenchError(f"iperf3 {client_ns} -> {server_ip}: {why}")
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def bench_throughput(st: dict[str, Any], seconds: int, rounds: int) -> dict[str, list[float]]:
    vms = st["vms"]
    for label, cli, srv in PAIRS:
        print(f"  {label:<8} {cli} ({vms[cli]['node']} {vms[cli]['network']} {vms[cli]['ip']})"
              f" -> {srv} ({vms[srv]['node']} {vms[srv]['network']} {vms[srv]['ip']})")
    # warm-up: neighbour entries in the VMs and the tunnel endpoints' ARP in OVS
    for label, cli, srv in PAIRS:
        res = in_ns(vms[cli]["namespace"], "ping", "-c", "3", "-i", "0.2", "-W", "1",
                    vms[srv]["ip"])
        summary = next((ln for ln in res.stdout.splitlines() if "packet loss" in ln), "")
        print(f"  warm-up ping {label}: {summary.strip() or last_line(res)}")
    results: dict[str, list[float]] = {label: [] for label, _, _ in PAIRS}
    for r in range(rounds):
        for label, cli, srv in PAIRS:
            bps = iperf_once(vms[cli]["namespace"], vms[srv]["namespace"], vms[srv]["ip"],
                             seconds)
            results[label].append(bps)
            print(f"  round {r + 1} {label:<8} {bps / 1e9:7.3f} Gbit/s")
    for label, vals in results.items():
        print(f"  median {label:<8} {statistics.median(vals) / 1e9:7.3f} Gbit/s  "
              f"(runs: {', '.join(f'{v / 1e9:.3f}' for v in vals)})")
    return results


# --- planner ----------------------------------------------------------------------------------
# r0 joins n0-n3 (external gateway), r1 n4 and n5; n6, n7 and n8 are on no router. Two
# networks hold no generated VM: the remote-VM cost probes use them
SHAPE: dict[str, Any] = dict(computes=10, networks=9, per_router=(4, 2), isolated=3,
                             external_routers=1, empty=("n3", "n8"))
SPARE_ROUTED = "n3"    # on r0: reachable from every node with a VM on r0's networks
SPARE_ISOLATED = "n8"  # on no router: reachable only from nodes with a VM on it
PROBED = "c0"          # the node whose flows the probes count


def time_plan(topo: Topology, node: str, reps: int) -> tuple[float, int]:
    ports = assumed_ports(topo, node)
    samples = []
    flows = 0
    for _ in range(reps):
        t0 = time.perf_counter()
        flows = len(plan(topo, node, ports))
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), flows


def remote_cost(data: dict[str, Any], node: str) -> dict[str, tuple[int, int, int]]:
    """Flows of `node` with one more VM on another node minus without it, per kind of
    network: (delta, flows added, flows removed)."""
    base = build_topology(data, "<bench>")
    before = plan(base, node, assumed_ports(base, node))
    other = next(c for c, n in data["nodes"].items() if n["role"] == "compute" and c != node)
    local_net = next(vm["network"] for vm in data["vms"].values() if vm["node"] == node)
    probes = {
        f"same network as a local VM ({local_net})": local_net,
        f"routed network, no local VM ({SPARE_ROUTED} on r0)": SPARE_ROUTED,
        f"unreachable network ({SPARE_ISOLATED}, on no router)": SPARE_ISOLATED,
    }
    out = {}
    for what, net in probes.items():
        d = json.loads(json.dumps(data))
        d["vms"]["probe"] = {"node": other, "network": net}  # its IP allocated by the model
        topo = build_topology(d, "<bench+probe>")
        after = plan(topo, node, assumed_ports(topo, node))
        out[what] = (len(after) - len(before), len(after - before), len(before - after))
    return out


def bench_planner(sizes: list[int]) -> dict[int, dict[str, Any]]:
    figures: dict[int, dict[str, Any]] = {}
    per_node: dict[int, dict[str, tuple[float, int]]] = {}
    for n in sizes:
        data = generate(n, **SHAPE)
        t0 = time.perf_counter()
        topo = build_topology(data, f"<generated {n} VMs>")
        build_s = time.perf_counter() - t0
        reps = 9 if n <= 100 else 5
        per_node[n] = {node: time_plan(topo, node, reps) for node in sorted(topo.nodes)}
        times = [t for t, _ in per_node[n].values()]
        flows = [f for _, f in per_node[n].values()]
        cost = remote_cost(data, PROBED)
        figures[n] = {"build_s": build_s, "times": times, "flows": flows, "cost": cost,
                      "nets": len(topo.networks), "routers": len(topo.routers),
                      "nodes": len(topo.nodes)}
    sizes_hdr = "".join(f"{f'{n} VMs: ms / flows':>24}" for n in sizes)
    print(f"  {'node':<10}{sizes_hdr}")
    for node in sorted(per_node[sizes[0]], key=lambda s: (len(s), s)):
        cells = "".join(f"{per_node[n][node][0] * 1e3:>15.2f} / {per_node[n][node][1]:>6}"
                        for n in sizes)
        print(f"  {node:<10}{cells}")
    for n in sizes:
        f = figures[n]
        print(f"  {n} VMs ({f['nodes']} nodes, {f['nets']} networks, {f['routers']} routers; "
              f"model built in {f['build_s'] * 1e3:.1f} ms): plan() median per node "
              f"{statistics.median(f['times']) * 1e3:.2f} ms (max {max(f['times']) * 1e3:.2f}"
              f" ms); flows per node min/median/max {min(f['flows'])}/"
              f"{statistics.median(f['flows']):g}/{max(f['flows'])}")
        for what, (delta, added, removed) in f["cost"].items():
            print(f"    cost of one remote VM on {PROBED}, {what}: {delta:+d} flows "
                  f"(+{added} -{removed})")
    return figures


# --- summary ----------------------------------------------------------------------------------
def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "MISSED")


def row(label: str, value: str, target: str = "", ok: bool | None = None) -> None:
    tail = f"target {target}: {verdict(ok)}" if target else ""
    print(f"  {label:<28}{value:<46}{tail}")


def summary(up_times: list[float] | None, tput: dict[str, list[float]] | None,
            planner: dict[int, dict[str, Any]] | None, errors: list[str]) -> None:
    print("\n== summary " + "=" * 89)
    up_target = f"< {TARGET_UP_S:g} s"
    if up_times:
        med = statistics.median(up_times)
        row("dvr lab up -> converged",
            f"median {med:.2f} s ({', '.join(f'{t:.2f}' for t in up_times)})",
            up_target, med < TARGET_UP_S)
    else:
        row("dvr lab up -> converged", "not measured", up_target)
    ratio_target = f">= {TARGET_RATIO}"
    if tput and all(tput.values()):
        r = statistics.median(tput["routed"])
        b = statistics.median(tput["bridged"])
        ratio = r / b if b else float("nan")
        row("throughput routed", f"median {r / 1e9:.3f} Gbit/s (vm1 -> vm2)")
        row("throughput bridged", f"median {b / 1e9:.3f} Gbit/s (vm1 -> vm4)")
        row("routed / bridged", f"{ratio:.3f}", ratio_target, ratio >= TARGET_RATIO)
    else:
        row("routed / bridged", "not measured", ratio_target)
    if planner:
        for n, f in planner.items():
            row(f"plan(), {n} VMs",
                f"median {statistics.median(f['times']) * 1e3:.2f} ms/node, flows/node "
                f"{min(f['flows'])}/{statistics.median(f['flows']):g}/{max(f['flows'])}")
        reach = [d for f in planner.values() for w, (d, _, _) in f["cost"].items()
                 if not w.startswith("unreachable")]
        unreach = [d for f in planner.values() for w, (d, _, _) in f["cost"].items()
                   if w.startswith("unreachable")]
        row("remote VM, reachable net", f"{', '.join(f'{d:+d}' for d in reach)} flows",
            f"<= {TARGET_REMOTE_COST}", max(reach) <= TARGET_REMOTE_COST)
        row("remote VM, unreachable net", f"{', '.join(f'{d:+d}' for d in unreach)} flows",
            "0", all(d == 0 for d in unreach))
        print(f"  (plan() flows/node as min/median/max; remote VM deltas on {PROBED} for "
              f"{', '.join(str(n) for n in planner)} VMs, reachable = same network, then a "
              "routed network without a local VM)")
    for e in errors:
        print(f"  not measured: {e}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefix", default="bnch", help="lab prefix (default: bnch)")
    ap.add_argument("--seconds", type=int, default=5, help="iperf3 duration per run")
    ap.add_argument("--runs", type=int, default=3, help="up/down cycles to time")
    ap.add_argument("--rounds", type=int, default=3, help="iperf3 rounds per path")
    ap.add_argument("--sizes", default="10,100,1000", help="VM counts for the planner")
    ap.add_argument("--planner-only", action="store_true", help="skip the lab (a and b)")
    args = ap.parse_args()
    if args.prefix == "dvr":
        print("east_west: error: refusing the default prefix `dvr`; use your own",
              file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    up_times = tput = planner = None
    errors: list[str] = []
    fatal = None
    if not args.planner_only:
        if os.geteuid() != 0:
            print("east_west: error: the lab needs root (or use --planner-only)",
                  file=sys.stderr)
            return 1
        print(f"== a. dvr lab up (built-in topology) until converged, {args.runs} runs ==")
        lab_down(args.prefix)  # a leftover from an interrupted run
        try:
            up_times, st = bench_up(args.prefix, args.runs)
            print(f"\n== b. iperf3 TCP, {args.seconds} s per run, {args.rounds} rounds "
                  "alternating ==")
            try:
                tput = bench_throughput(st, args.seconds, args.rounds)
            except (BenchError, subprocess.TimeoutExpired) as exc:
                errors.append(f"throughput: {exc}")
                print(f"  error: {exc}")
        except BenchError as exc:
            fatal = str(exc)
        except KeyboardInterrupt:
            fatal = "interrupted"
        finally:
            lab_down(args.prefix)
        if fatal:
            print(f"east_west: error: {fatal}", file=sys.stderr)
            return 1

    print(f"\n== c. planner on generated topologies ({', '.join(map(str, sizes))} VMs, "
          "10 compute + 1 network node), no lab ==")
    planner = bench_planner(sizes)
    summary(up_times, tput, planner, errors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
