#!/usr/bin/env python3
"""What TLS on the northbound database costs the agents: prints figures, asserts nothing.

    python3 bench/tls.py [--moves 20] [--reps 3] [--ports 10000] [--rounds 2] [--timeout 300]

Two labs of tests/lab/topologies/northsouth.yaml side by side, both up at once: `btls` with
the default (TLS, the agents' connections with the dvr-agent role) and `btcp` with
`--nb-tcp` (plain TCP, no roles): the baseline, measured in the same run. The measurements
alternate between them, round by round, so that the machine's load falls on both alike:

1. change to flows: the floating IP 203.0.113.50 moved --moves times a round between vm1
   (compute1) and vm4 (compute2) by `dvr nb fip-set` in-process (through the lab's unix
   socket, as the lab's tools write), timed to the first flow of it on the new node's
   br-int (bench/nb.py's `ovs-ofctl monitor` watch): the agent's path from its database
   connection (TLS or not) to its flows;
2. agent full sync: compute1's agent restarted --reps times a round, timed from its start
   to its status converged on the generation: the TLS handshake, the monitor's whole reply
   over TLS, the plan and the flows; on the small topology, then with a generated cloud
   of --ports ports loaded into both labs (bench/nb.py's `cloud`: 50 of them bound on
   compute1), where the reply is megabytes.

The target: TLS under 10% more than plain TCP, on each median. Needs root; both labs always
go down at the end, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.east_west import BenchError, lab, lab_down, last_line  # noqa: E402
from bench.nb import (  # noqa: E402
    TOPOLOGY,
    FlowWatch,
    Move,
    Restart,
    TimedNorthbound,
    bench_moves,
    bench_restarts,
    cloud,
    current_generation,
    plug_bound,
    wait_agents,
)
from dvr.lab.lab import Lab  # noqa: E402
from flows.model import build_topology  # noqa: E402

TARGET = 1.10  # TLS over TCP, at most
LABS = (("btcp", "plain TCP", ("--nb-tcp",)), ("btls", "TLS", ()))


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3 if values else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--moves", type=int, default=20, help="moves a round, on each lab")
    p.add_argument("--reps", type=int, default=3, help="agent restarts a round, on each lab")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--ports", type=int, default=10000, help="ports of the big cloud (0: none)")
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args()
    labs: dict[str, Lab] = {}
    watches: dict[str, dict[str, FlowWatch]] = {}
    dbs: dict[str, TimedNorthbound] = {}
    moves: dict[str, list[Move]] = {name: [] for name, _, _ in LABS}
    syncs: dict[tuple[str, str], list[Restart]] = {}
    try:
        for name, what, flags in LABS:
            t0 = time.perf_counter()
            res = lab(name, "up", *flags, str(TOPOLOGY), timeout=args.timeout)
            if res.returncode != 0:
                raise BenchError(f"lab {name} could not be built: {last_line(res)}")
            lb = labs[name] = Lab(name)
            north = lb.status()["northbound"]
            print(f"lab {name} ({what}): up in {time.perf_counter() - t0:.1f} s; agents on "
                  f"{north['agents_connection']} ({north['transport']})")
            dbs[name] = TimedNorthbound(lb.nb_connection())
            watches[name] = {n: FlowWatch(lb, n) for n in ("compute1", "compute2")}
            for w in watches[name].values():
                w.wait_ready()
        sizes = [("small", None)] + ([(f"{args.ports} ports", args.ports)]
                                     if args.ports else [])
        for size, ports in sizes:
            if ports:
                for name, _, _ in LABS:
                    lb, db = labs[name], dbs[name]
                    doc = cloud(db.dump(), ports, "compute1")
                    t0 = time.perf_counter()
                    generation = db.load(build_topology(doc, f"<generated {ports} ports>"))
                    wait_agents(lb, sorted(lb.state()["underlay"]), generation, args.timeout)
                    plug_bound(lb, "compute1")
                    print(f"lab {name}: {ports} ports loaded and converged in "
                          f"{time.perf_counter() - t0:.1f} s")
            for rnd in range(1, args.rounds + 1):
                for name, what, _ in (LABS if rnd % 2 else LABS[::-1]):
                    lb, db = labs[name], dbs[name]
                    if size == "small":
                        print(f"round {rnd}, {what}: {args.moves} floating-IP moves")
                        moves[name] += bench_moves(lb, db, watches[name], args.moves,
                                                   f"{name} r{rnd}")
                    print(f"round {rnd}, {what}, {size}: {args.reps} agent restarts")
                    syncs.setdefault((name, size), []).extend(bench_restarts(
                        lb, "compute1", current_generation(db), args.reps, args.timeout,
                        f"{name} r{rnd}"))

        print()
        print("=== TLS against plain TCP (medians; the same run, the rounds alternated) ===")
        print(f"{'figure':<40} {'plain TCP':>12} {'TLS':>12} {'TLS/TCP':>9}  target")
        rows = [("change to flows (floating IP move)",
                 [m.flows_s for m in moves["btcp"] if m.flows_s is not None],
                 [m.flows_s for m in moves["btls"] if m.flows_s is not None])]
        for size, _ in sizes:
            rows.append((f"agent full sync, {size}",
                         [r.sync_s for r in syncs[("btcp", size)]],
                         [r.sync_s for r in syncs[("btls", size)]]))
        for label, tcp, ssl in rows:
            a, b = median_ms(tcp), median_ms(ssl)
            ratio = b / a if a else float("nan")
            verdict = "met" if ratio <= TARGET else "MISSED"
            print(f"{label:<40} {a:>9.1f} ms {b:>9.1f} ms {ratio:>9.3f}  <{TARGET:.2f}: "
                  f"{verdict} (n={len(tcp)}/{len(ssl)})")
        return 0
    except BenchError as exc:
        print(f"bench/tls.py: {exc}", file=sys.stderr)
        return 1
    finally:
        for ws in watches.values():
            for w in ws.values():
                w.stop()
        for db in dbs.values():
            with contextlib.suppress(Exception):
                db.close()
        for name, _, _ in LABS:
            lab_down(name)


if __name__ == "__main__":
    sys.exit(main())
