#!/usr/bin/env python3
"""The Neutron driver's write of one port event, at size: prints figures, asserts nothing.

    python3 bench/neutron_write.py [--sizes 100,1000,10000,100000] [--samples 30]
                                   [--baseline-samples 10] [--baseline-seconds 60]
                                   [--warmup 10] [--burst 100] [--bursts 3]

No Neutron server and no lab: an ovsdb-server of its own (the northbound schema, in a
temporary directory) is loaded in one transaction with a generated cloud of each of --sizes
ports (dvr/lab/generate.py: 100 ports a network, two networks a router, every tenth port
of a network with a floating IP; every port with Neutron's external_ids and revision
numbers; a spare /16 network for the new ports). Then the driver's writer
(`dvr.neutron.writer.NbWriter`, a new connection per batch as in neutron-server) writes,
after --warmup ports and moves not counted (ovsdb-server is busy for a while after the
load: at 100,000 ports the first few writes take 10 to 60 ms):

1. one port, --samples times: a new port's entry (`port_edit` of a port created and bound:
   a `Put` of its entry, node and network checked), each sample a new port;
2. one floating-IP move, --samples times: the floating IP of a port moved to another port
   of its network, the batch the L3 plugin's FLOATING_IP event makes (the port that lets it
   go, then the one that takes it, each with its revision numbers one up), back and forth;
3. a burst, --bursts times: --burst new ports in one batch (a bulk create's events queued
   together).

Each through the O(change) path the writer takes for ports (`vm_put_change()`: each port
reading its own rows; consecutive ports in one transaction; for the burst also one
transaction a port), then, on the same database in the same run, --baseline-samples times
(fewer at a size once the baseline took --baseline-seconds there, 3 at least; 2 bursts)
through the path it replaced: the batch as one edit of the whole document
(`Northbound.change()`: read, rebuild and validate the whole desired state, write the
difference). The O(change) samples come first: after a whole-document write of 100,000
ports the server is busy for a while too. Median and p95 of the writer's call, from its
connection to the answer. At the end the database is read back: every port written, the
floating IP where the last move put it.
"""

from __future__ import annotations

import argparse
import ipaddress
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dvr import nb  # noqa: E402
from dvr.lab.generate import generate  # noqa: E402
from dvr.neutron import translate as tr  # noqa: E402
from dvr.neutron import writer  # noqa: E402
from dvr.neutron.writer import NbWriter, Put  # noqa: E402
from flows.model import build_topology, to_dict  # noqa: E402
from tests.nbserver import northbound_server  # noqa: E402

REVISIONS = (tr.REVISION, "neutron:fip_revision")


def p95(values: list[float]) -> float:
    """The 95th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[max(0, -(-len(ordered) * 95 // 100) - 1)]


def stats(values: list[float]) -> str:
    ms = [v * 1e3 for v in values]
    return f"median {statistics.median(ms):8.1f} ms   p95 {p95(ms):8.1f} ms   (n={len(ms)})"


def cloud(ports: int) -> dict[str, Any]:
    doc = generate(ports, computes=max(10, ports // 200), networks=max(2, ports // 100),
                   fip_every=10)
    doc["networks"]["spare"] = {"cidr": "172.16.0.0/16"}  # the new ports' (room for all)
    for v in doc["vms"].values():
        ids = {tr.OWNER: "port", tr.REVISION: "1"}
        if "floating_ip" in v:
            ids["neutron:fip_revision"] = "1"
        v["external_ids"] = ids
    return doc


def entry(spec: dict[str, Any], rev: int, fip: str | None) -> dict[str, Any]:
    out = {k: spec[k] for k in ("node", "network", "ip", "mac")}
    ids = {tr.OWNER: "port", tr.REVISION: str(rev)}
    if fip is not None:
        out["floating_ip"] = fip
        ids["neutron:fip_revision"] = str(rev)
    out["external_ids"] = ids
    return out


class Run:
    """The writer on one loaded database, its port events."""

    def __init__(self, remote: str, doc: dict[str, Any]):
        self.writer = NbWriter(lambda: nb.Northbound(remote, timeout=600))
        self.doc = doc
        self.created = 0
        self.rev = 1
        holder = next(n for n, v in doc["vms"].items() if "floating_ip" in v)
        net = doc["vms"][holder]["network"]
        other = next(n for n, v in doc["vms"].items()
                     if v["network"] == net and "floating_ip" not in v)
        self.fip = doc["vms"][holder]["floating_ip"]
        self.pair = [holder, other]  # [holding, taking]
        self.net = "spare"
        self.cidr = ipaddress.IPv4Network(doc["networks"]["spare"]["cidr"])
        self.node = doc["vms"][holder]["node"]

    def timed(self, batch: list[tuple[str, list[Any]]], whole: bool) -> float:
        start = time.perf_counter()
        outcome = self.writer.write(batch, whole=whole)
        took = time.perf_counter() - start
        if outcome != "written":
            raise SystemExit(f"{batch[0][0]}: {outcome}")
        return took

    def port(self, whole: bool) -> float:
        """A new port, bound on the holder's node (on the spare network)."""
        self.created += 1
        name = str(uuid.uuid4())
        spec = {"node": self.node, "network": self.net,
                "ip": str(self.cidr[self.cidr.num_addresses - 2 - self.created]),
                "mac": f"0a:d7:01:{self.created >> 16 & 255:02x}:"
                       f"{self.created >> 8 & 255:02x}:{self.created & 255:02x}"}
        return self.timed([(f"port {name}", [Put("vms", name, entry(spec, 1, None),
                                                 REVISIONS, unplaced=True)])], whole)

    def burst(self, count: int, how: str) -> float:
        """`count` new ports in one batch (a bulk create's events queued together): in
        groups of ports per transaction, one transaction each, or as a whole document."""
        batch = []
        for _ in range(count):
            self.created += 1
            name = str(uuid.uuid4())
            spec = {"node": self.node, "network": self.net,
                    "ip": str(self.cidr[self.cidr.num_addresses - 2 - self.created]),
                    "mac": f"0a:d7:01:{self.created >> 16 & 255:02x}:"
                           f"{self.created >> 8 & 255:02x}:{self.created & 255:02x}"}
            batch.append((f"port {name}", [Put("vms", name, entry(spec, 1, None),
                                               REVISIONS, unplaced=True)]))
        group = writer.GROUP
        writer.GROUP = 1 if how == "one by one" else group
        try:
            return self.timed(batch, how == "whole")
        finally:
            writer.GROUP = group

    def move(self, whole: bool) -> float:
        """The floating IP from the port holding it to the other."""
        self.rev += 1
        holding, taking = self.pair
        vms = self.doc["vms"]
        batch = [(f"floating IP {self.fip} moved", [
            Put("vms", holding, entry(vms[holding], self.rev, None), REVISIONS, unplaced=True),
            Put("vms", taking, entry(vms[taking], self.rev, self.fip), REVISIONS,
                unplaced=True)])]
        took = self.timed(batch, whole)
        self.pair.reverse()
        return took


def bench(size: int, args: argparse.Namespace) -> dict[str, list[float]]:
    doc = cloud(size)
    with tempfile.TemporaryDirectory(prefix="bnw-") as tmp:
        with northbound_server(Path(tmp)) as remote:
            conn = nb.Northbound(remote, timeout=600)
            start = time.perf_counter()
            topo = build_topology(doc)
            conn.load(topo)  # one transaction
            loaded = time.perf_counter() - start
            conn.close()
            print(f"{size:>7} ports: loaded in {loaded:.1f} s", flush=True)
            run = Run(remote, to_dict(topo))  # every address written out
            out: dict[str, list[float]] = {k: [] for k in (
                "port", "port whole", "move", "move whole", "burst", "burst one by one",
                "burst whole")}
            for _ in range(args.warmup):  # the server busy a while after the load: not counted
                run.port(False)
                run.move(False)
            spent = 0.0  # on the baseline
            # O(change) first: after a whole-document write at 100,000 ports the server
            # is busy a while too
            for _ in range(args.samples):
                out["port"].append(run.port(False))
                out["move"].append(run.move(False))
            for i in range(args.baseline_samples):
                if i >= 3 and spent >= args.baseline_seconds:
                    break
                out["port whole"].append(run.port(True))
                out["move whole"].append(run.move(True))
                spent += out["port whole"][-1] + out["move whole"][-1]
            bursts = args.bursts if args.burst else 0
            for how, key in (("grouped", "burst"), ("one by one", "burst one by one")):
                out[key] += [run.burst(args.burst, how) for _ in range(bursts)]
            for i in range(bursts if args.baseline_samples else 0):
                if i >= 2 and spent >= args.baseline_seconds:
                    break
                out["burst whole"].append(run.burst(args.burst, "whole"))
                spent += out["burst whole"][-1]
            conn = nb.Northbound(remote, timeout=600)
            held = conn.dump()["vms"]  # what was written: every port, the floating IP
            conn.close()
            if len(held) != len(run.doc["vms"]) + run.created or \
                    held[run.pair[0]].get("floating_ip") != run.fip:
                raise SystemExit(f"{size} ports: the writes are not all in the database")
            return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100,1000,10000,100000")
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--baseline-samples", type=int, default=10)
    ap.add_argument("--baseline-seconds", type=float, default=60.0,
                    help="at each size, no more baseline samples after that long (3 at least)")
    ap.add_argument("--warmup", type=int, default=10,
                    help="ports and moves written, not counted, before the samples")
    ap.add_argument("--burst", type=int, default=100, help="ports in a burst (0: none)")
    ap.add_argument("--bursts", type=int, default=3)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    start = time.perf_counter()
    results = {size: bench(size, args) for size in sizes}
    print()
    print("the driver's write of one port event (NbWriter.write: connection to answer)")
    for size, out in results.items():
        print(f"{size:>7} ports")
        for what, label in (("port", "one port created"), ("move", "one floating-IP move")):
            new, old = out[what], out[f"{what} whole"]
            print(f"  {label:<24} O(change)        {stats(new)}")
            if old:
                print(f"  {'':<24} whole document   {stats(old)}   "
                      f"x{statistics.median(old) / statistics.median(new):.0f}")
        if out["burst"]:
            label = f"{args.burst} ports in a batch"
            print(f"  {label:<24} O(change)        {stats(out['burst'])}")
            print(f"  {'':<24} one by one       {stats(out['burst one by one'])}")
            if out["burst whole"]:
                print(f"  {'':<24} whole document   {stats(out['burst whole'])}")
    print(f"\n{time.perf_counter() - start:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
