#!/usr/bin/env python3
"""Operability benchmark of dvr-agent: prints figures, asserts nothing.

    python3 bench/operability.py [--prefix bop] [--restarts 5] [--ovs-restarts 3]
                                 [--ports 9000]

On the built-in lab (compute1, compute2, net1), one UDP datagram every 10 ms from vm1
(compute1) to vm2 (compute2), routed east-west, counted on arrival:

1. agent restarts: the stream across --restarts graceful restarts (`dvr lab restart-agent`)
   and as many crashes (`kill -9`, then started again as systemd's Restart=always would)
   of compute1's agent and of compute2's; datagrams lost (target 0), against the same
   stream without restarts in the same run;
2. OVS restarts: the stream across --ovs-restarts `dvr lab restart-ovs compute2`
   (ovs-vswitchd killed and started with flow-restore-wait=true; the agent puts every flow
   back in one bundle and clears it): the longest silence; against the bare start of
   ovs-vswitchd on the same node in the same run (from its start to its bridges' ports
   numbered, flows not counted). Target: gap <= bare start + 100 ms;
   The agent restarts of 1 also carry a paced TCP transfer vm3 (compute1) -> vm4 (compute2):
   its longest stall (target < 100 ms), against the same transfer without restarts;
   and compute2's own SNAT traffic (vm2 -> the external host) across restart-ovs: its gap;
3. metrics: the time to scrape compute1's /metrics (from inside its node) with the small
   lab, then with a generated cloud loaded (--ports ports, dvr/lab/generate.py, and a VM of
   compute1 on each of its networks) that puts about 10,000 flows on compute1; median of
   20 scrapes each;
4. on the HA lab (tests/lab/topologies/ha.yaml), r1's SNAT stream across --ovs-restarts
   `restart-ovs net1` of its serving node (its BFD sessions stay down until its flows are
   back, so the compute nodes steer r1 to net2 meanwhile), against `kill net1` (the
   failover) in the same run.

Needs root; the lab always goes down at the end.
"""

from __future__ import annotations

import argparse
import itertools
import os
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

from bench.east_west import BenchError, lab, lab_down, last_line, verdict  # noqa: E402
from bench.nb import cloud, plug_internal, wait_agents  # noqa: E402
from dvr import nb  # noqa: E402
from dvr.lab import run  # noqa: E402
from dvr.lab.lab import Lab, _kill_pidfile, _read_pid  # noqa: E402
from flows.model import build_topology  # noqa: E402

INTERVAL = 0.01
PORT = 7300


def row(label: str, value: str, target: str = "", ok: bool | None = None) -> None:
    print(f"  {label:<40}{value}" + (f"   target {target}: {verdict(ok)}" if target else ""))


class Stream:
    """A numbered UDP stream, one datagram every INTERVAL, for `seconds`: by default vm1 ->
    vm2 (routed east-west), or from VM `src` to `ip` received in namespace `sink_ns`."""

    def __init__(self, lb: Lab, seconds: float, src: str = "vm1", ip: str = "10.2.0.12",
                 sink_ns: str | None = None, port: int = PORT):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        py = [sys.executable, "-m", "tests.lab.pkttool"]
        self.sink = subprocess.Popen(
            run.argv(sink_ns or lb.vm_ns("vm2"), [*py, "udp-sink", str(port), "--seconds",
                                                  str(seconds + 2)]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        assert self.sink.stdout is not None
        if self.sink.stdout.readline().strip() != "READY":
            raise BenchError("the UDP sink did not start")
        self.source = subprocess.Popen(
            run.argv(lb.vm_ns(src), [*py, "udp-stream", ip, str(port), "--interval",
                                     str(INTERVAL), "--seconds", str(seconds)]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)

    def finish(self) -> tuple[int, int, float]:
        """Sent, lost, and the longest silence between two arrivals (s)."""
        import json

        out, _ = self.source.communicate(timeout=120)
        sent = json.loads(out.strip().splitlines()[-1])["sent"]
        out, _ = self.sink.communicate(timeout=120)
        got = json.loads(out.strip().splitlines()[-1])
        seqs = {g[0] for g in got}
        times = sorted(g[1] for g in got)
        gap = max((b - a for a, b in itertools.pairwise(times)), default=0.0)
        return sent, sent - len(seqs), gap


class Transfer:
    """A paced TCP transfer vm3 (compute1) -> vm4 (compute2), 1400 bytes every 5 ms for
    `seconds`: the receiver reports the longest wait between two arrivals of data."""

    def __init__(self, lb: Lab, seconds: float, port: int = PORT + 1):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        py = [sys.executable, "-m", "tests.lab.pkttool"]
        self.size = 1400 * int(seconds / 0.005)
        self.server = subprocess.Popen(
            run.argv(lb.vm_ns("vm4"), [*py, "tcp-server", str(port)]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        assert self.server.stdout is not None
        if self.server.stdout.readline().strip() != "READY":
            raise BenchError("the TCP server in vm4 did not start")
        self.client = subprocess.Popen(
            run.argv(lb.vm_ns("vm3"), [*py, "tcp-client", "10.1.0.14", str(port),
                                       str(self.size), "--pace", "0.005"]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)

    def finish(self) -> tuple[bool, float]:
        """Whether every byte arrived, and the longest stall (s)."""
        import json

        self.client.communicate(timeout=180)
        out, _ = self.server.communicate(timeout=60)
        got = json.loads(out.strip().splitlines()[-1])
        return got["bytes"] == self.size, got["max_gap"]


def agent_restarts(lb: Lab, restarts: int) -> dict[str, tuple[int, int, float]]:
    out: dict[str, Any] = {}
    per = 1.5  # s between two restarts
    s = Stream(lb, 2 + 4 * restarts * per)
    tcp = Transfer(lb, 2 + 4 * restarts * per)
    time.sleep(1)
    for _ in range(restarts):
        for node in ("compute1", "compute2"):
            res = lab(lb.prefix, "restart-agent", node)
            if res.returncode != 0:
                raise BenchError(f"restart-agent {node}: {last_line(res)}")
            time.sleep(per / 2)
    for _ in range(restarts):
        for node in ("compute1", "compute2"):
            pid = _read_pid(lb.node_dir(node) / "agent.pid")
            if pid:
                os.kill(pid, signal.SIGKILL)  # a crash
            time.sleep(0.05)
            res = lab(lb.prefix, "restart-agent", node)  # Restart=always brings it back
            if res.returncode != 0:
                raise BenchError(f"start after kill -9 {node}: {last_line(res)}")
            time.sleep(per / 2)
    out["restarts"] = s.finish()
    out["tcp"] = tcp.finish()
    quiet, quiet_tcp = Stream(lb, 4), Transfer(lb, 4)
    out["baseline"] = quiet.finish()
    out["tcp_baseline"] = quiet_tcp.finish()
    return out


def bare_start(lb: Lab, node: str) -> float:
    """ovs-vswitchd killed and started without flow-restore-wait: from its start to every
    interface of its bridges numbered (what any restart must wait for)."""
    _kill_pidfile(lb.node_dir(node) / "ovs-vswitchd.pid", signal.SIGKILL)
    t0 = time.perf_counter()
    lb._start_vswitchd(node)
    lb._vsctl(node, "wait-until", "Interface", "br-phy", "ofport>0")
    lb._vsctl(node, "wait-until", "Interface", "tapvm2", "ofport>0")
    took = time.perf_counter() - t0
    lb._warm_underlay(lb.state()["underlay"], nodes=[node])
    lb.wait_converged(lb.topology(), 60, nodes=[node])
    return took


def ovs_restarts(lb: Lab, count: int) -> tuple[list[float], list[float], list[int],
                                                list[float]]:
    """restart-ovs compute2: the east-west gap to compute2, and the gap of compute2's own
    SNAT traffic (vm2 -> the external host through net1), whose BFD session comes up again
    only a second after the flag is cleared (the agent trusts net1 meanwhile)."""
    gaps, bares, lost, snat = [], [], [], []
    for _ in range(count):
        bares.append(bare_start(lb, "compute2"))
        time.sleep(1)
        s = Stream(lb, 6)
        out = Stream(lb, 6, src="vm2", ip="198.51.100.10", sink_ns=lb.ext_ns, port=PORT + 2)
        time.sleep(1.5)
        res = lab(lb.prefix, "restart-ovs", "compute2")
        if res.returncode != 0:
            raise BenchError(f"restart-ovs: {last_line(res)}")
        _, n_lost, gap = s.finish()
        gaps.append(gap)
        lost.append(n_lost)
        snat.append(out.finish()[2])
    return gaps, bares, lost, snat


def network_node_restarts(prefix: str, count: int) -> dict[str, list[float]]:
    """On the HA lab (tests/lab/topologies/ha.yaml: r1 served by net1, standby net2): r1's
    SNAT stream (vm2 -> the external host) across `restart-ovs net1`, against the same
    stream across `kill net1` (the failover) in the same run: the longest gap, and whether
    net2 took r1 over (a restart shorter than the claim moves nothing for good: the compute
    nodes steer to net2 while net1's sessions are down and back once they are up). After
    each, net1 is brought back and r1 moved back to it when it had moved (`snat-move`)."""
    lb = Lab(prefix)
    out: dict[str, list[float]] = {"restart-ovs": [], "kill": [], "restart-ovs moved": [],
                                   "kill moved": []}
    res = lab(prefix, "up", str(ROOT / "tests" / "lab" / "topologies" / "ha.yaml"))
    if res.returncode != 0:
        raise BenchError(f"the HA lab could not be built: {last_line(res)}")
    for _ in range(count):
        for how in ("restart-ovs", "kill"):
            s = Stream(lb, 5, src="vm2", ip="198.51.100.10", sink_ns=lb.ext_ns)
            time.sleep(1.5)
            res = lab(prefix, how, "net1")
            if res.returncode != 0:
                raise BenchError(f"{how} net1: {last_line(res)}")
            out[how].append(s.finish()[2])
            if how == "kill":
                res = lab(prefix, "start", "net1")
                if res.returncode != 0:
                    raise BenchError(f"start net1: {last_line(res)}")
            out[f"{how} moved"].append(float(_move_back(lb)))
    return out


def _move_back(lb: Lab) -> bool:
    """r1 back on net1 (the operator's failback), once net2 has taken it over; and
    whether it had moved."""
    deadline = time.monotonic() + 30

    def r1() -> dict[str, Any]:
        return lb.status()["snat"]["r1"]

    time.sleep(3)  # a short restart may end before anything moved
    if r1()["chain"][0] == "net1" and r1()["active"] == ["net1"]:
        return False
    while r1()["active"] != ["net2"] or r1()["chain"] != ["net2", "net1"]:
        if time.monotonic() > deadline:
            raise BenchError(f"net2 did not take r1 over: {r1()}")
        time.sleep(0.2)
    db = nb.Northbound(lb.nb_connection())
    try:
        db.snat_move("r1", "net1")
    finally:
        db.close()
    while r1()["active"] != ["net1"]:
        if time.monotonic() > deadline:
            raise BenchError(f"r1 did not move back to net1: {r1()}")
        time.sleep(0.2)
    time.sleep(1)
    return True


def c_mac(i: int) -> str:
    """The MAC of generated VM c{i} of compute1."""
    return f"02:c0:00:00:{i // 256:02x}:{i % 256:02x}"


def scrape_times(lb: Lab, node: str, n: int = 20) -> tuple[float, int]:
    url = lb.status()["nodes"][node]["agent"]["metrics"]
    code = ("import sys, time, urllib.request\n"
            f"ts = []\nfor _ in range({n}):\n"
            "    t = time.perf_counter()\n"
            f"    body = urllib.request.urlopen({url!r}, timeout=10).read()\n"
            "    ts.append(time.perf_counter() - t)\n"
            "ts.sort(); print(ts[len(ts) // 2], len(body))\n")
    res = run.run(lb.node_ns(node), [sys.executable, "-c", code], check=False)
    if res.returncode != 0:
        raise BenchError(f"scraping {url} on {node}: {res.stderr.strip()[-200:]}")
    median, size = res.stdout.split()
    return float(median), int(size)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefix", default="bop")
    ap.add_argument("--restarts", type=int, default=5)
    ap.add_argument("--ovs-restarts", type=int, default=3)
    ap.add_argument("--ports", type=int, default=9000)
    args = ap.parse_args()
    lb = Lab(args.prefix)
    fig: dict[str, Any] = {}
    try:
        res = lab(args.prefix, "up")
        if res.returncode != 0:
            raise BenchError(f"lab could not be built: {last_line(res)}")
        print("1. agent restarts ...", flush=True)
        fig["agents"] = agent_restarts(lb, args.restarts)
        print("2. OVS restarts ...", flush=True)
        fig["ovs"] = ovs_restarts(lb, args.ovs_restarts)
        print("3. metrics ...", flush=True)
        fig["scrape_small"] = scrape_times(lb, "compute1")
        fig["flows_small"] = lb.status()["nodes"]["compute1"]["agent"]["flows"]
        db = nb.Northbound(lb.nb_connection())
        try:
            doc = cloud(db.dump(), args.ports, "compute1", bound=0)
            # a VM of compute1 on every generated network: it plans them all
            hosted = [n for n in doc["networks"] if n.startswith("gn")]
            for i, net in enumerate(hosted):
                doc["vms"][f"c{i}"] = {"node": "compute1", "network": net, "mac": c_mac(i)}
            generation = db.load(build_topology(doc, "<generated>"))
        finally:
            db.close()
        plug_internal(lb, "compute1", [(f"c{i}", c_mac(i)) for i in range(len(hosted))],
                      "bop")
        wait_agents(lb, ["compute1"], generation, 600)
        fig["flows_big"] = lb.status()["nodes"]["compute1"]["agent"]["flows"]
        fig["scrape_big"] = scrape_times(lb, "compute1")
        lab_down(args.prefix)
        print("4. network node OVS restarts (HA lab) ...", flush=True)
        fig["net"] = network_node_restarts(args.prefix, args.ovs_restarts)
    except BenchError as exc:
        print(f"bench/operability.py: {exc}", file=sys.stderr)
        return 1
    finally:
        lab_down(args.prefix)
    print("\n== summary " + "=" * 89)
    sent, lost, gap = fig["agents"]["restarts"]
    b_sent, b_lost, b_gap = fig["agents"]["baseline"]
    row(f"agent restarts ({4 * args.restarts})", f"{lost} of {sent} datagrams lost, longest "
        f"gap {gap * 1000:.0f} ms", "0 lost", lost == 0)
    row("  no restarts (baseline)", f"{b_lost} of {b_sent} lost, longest gap "
        f"{b_gap * 1000:.0f} ms")
    ok, stall = fig["agents"]["tcp"]
    b_ok, b_stall = fig["agents"]["tcp_baseline"]
    row("  TCP vm3 -> vm4 across them", f"longest stall {stall * 1000:.0f} ms"
        + ("" if ok else ", BYTES MISSING"), "< 100 ms", ok and stall < 0.1)
    row("  TCP without restarts (baseline)", f"longest stall {b_stall * 1000:.0f} ms"
        + ("" if b_ok else ", BYTES MISSING"))
    gaps, bares, lost_ovs, snat_gaps = fig["ovs"]
    gap_m, bare_m = statistics.median(gaps), statistics.median(bares)
    row(f"restart-ovs gap ({len(gaps)})", f"median {gap_m * 1000:.0f} ms ("
        + ", ".join(f"{g * 1000:.0f}" for g in gaps) + f"), {sum(lost_ovs)} lost in all",
        "<= bare start + 100 ms", gap_m <= bare_m + 0.1)
    row("  bare ovs-vswitchd start", f"median {bare_m * 1000:.0f} ms ("
        + ", ".join(f"{b * 1000:.0f}" for b in bares) + ")")
    row("  compute2's own SNAT traffic", f"median {statistics.median(snat_gaps) * 1000:.0f} ms ("
        + ", ".join(f"{g * 1000:.0f}" for g in snat_gaps) + "): its network node trusted "
        "until its BFD session is up again")
    net = fig["net"]
    row(f"restart-ovs of r1's SNAT node ({len(net['restart-ovs'])})",
        f"median gap {statistics.median(net['restart-ovs']) * 1000:.0f} ms ("
        + ", ".join(f"{g * 1000:.0f}" for g in net["restart-ovs"]) + f"); r1 taken over by "
        f"net2 in {sum(net['restart-ovs moved']):.0f}")
    row("  kill of that node (the failover)", f"median gap "
        f"{statistics.median(net['kill']) * 1000:.0f} ms ("
        + ", ".join(f"{g * 1000:.0f}" for g in net["kill"]) + f"); taken over in "
        f"{sum(net['kill moved']):.0f}")
    small, size_small = fig["scrape_small"]
    big, size_big = fig["scrape_big"]
    row(f"metrics scrape, {fig['flows_big']} flows", f"median {big * 1000:.2f} ms "
        f"({size_big} bytes)")
    row(f"  with {fig['flows_small']} flows (baseline)", f"median {small * 1000:.2f} ms "
        f"({size_small} bytes); ratio {big / small:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
