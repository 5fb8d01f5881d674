#!/usr/bin/env python3
"""North-south benchmark of the dvr dataplane: prints figures, asserts nothing.

    python3 bench/north_south.py [--prefix bnns] [--seconds 5] [--rounds 3] [--moves 10]

On the north-south lab (tests/lab/topologies/northsouth.yaml), built once:
a. wall-clock time of `dvr lab up` until every agent reports converged, for information;
b. TCP throughput (iperf3) from a VM to the external host's "internet" address
   198.51.100.10: through a floating IP (vm1 on compute1, 203.0.113.50) and through
   centralized SNAT (vm4 on compute2, no floating IP, SNATed on net1 to r1's 203.0.113.10),
   against east-west routed across nodes in the same run (vm1 blue on compute1 -> vm2 red
   on compute2), alternated over --rounds rounds: medians and the ratios floating/east-west
   and SNAT/east-west;
c. floating IP move: --moves times, 203.0.113.50 moves between vm1 (compute1) and vm4
   (compute2) with `dvr lab apply`; the external host sends a UDP probe to the floating IP
   every 5 ms and a UDP echo in each VM answers with its name: the time from the start of
   `apply` until the first probe is answered by the VM now holding the address, for each
   move and the median (also: when the lab wrote the new desired state for the agents, when
   `apply` returned, the interruption, the gratuitous ARPs the external host saw).

Needs root; the lab always goes down at the end, also on failure.
Exits non-zero with one line on stderr when the lab cannot be built.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.east_west import (  # noqa: E402
    BenchError,
    dvr_cmd,
    in_ns,
    iperf_once,
    lab,
    lab_down,
    lab_status,
    last_line,
    row,
)
from dvr.lab.lab import PREFIX_RE  # noqa: E402
from flows.model import load_topology  # noqa: E402

TOPOLOGY = ROOT / "tests" / "lab" / "topologies" / "northsouth.yaml"
TARGET_RATIO = 0.9
OVN_REFERENCE = {"floating": 0.84, "snat": 0.92}  # OVN 23.03 on the same kind of lab
TARGET_MOVE_S = 1.0
FIP = "203.0.113.50"
# the floating IP alternates between these two VMs (node in the comment)
MOVERS = ("vm1", "vm4")  # compute1 blue 10.1.0.11, compute2 blue 10.1.0.14
ECHO_PORT = 7007
PROBE_INTERVAL_S = 0.005
PROBE_WARMUP_S = 10.0   # the VM holding the address must answer within this before a move
MOVE_TIMEOUT_S = 15.0   # no answer from the new VM within this: the move counts as failed
OBSERVE_S = 3.0         # watch at least this long after a move (the GARPs at 0, 0.5, 1.5 s)
# (label, client VM, server: a VM or "ext" for the external host's remote_ip)
PATHS = (
    ("floating", "vm1", "ext"),   # compute1 blue 10.1.0.11, floating IP 203.0.113.50
    ("snat", "vm4", "ext"),       # compute2 blue 10.1.0.14, SNAT on net1 as 203.0.113.10
    ("east-west", "vm1", "vm2"),  # compute1 blue 10.1.0.11 -> compute2 red 10.2.0.12
)


# --- helpers run inside namespaces (this module, re-imported by `python3 -c`) ----------------
def helper_argv(ns: str, *args: str) -> list[str]:
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
            "from bench.north_south import helper; sys.exit(helper(sys.argv[1:]))")
    return ["ip", "netns", "exec", ns, sys.executable, "-c", code, *args]


def helper(argv: list[str]) -> int:
    if argv[0] == "echo":
        return udp_echo(argv[1], int(argv[2]))
    if argv[0] == "probe":
        fip, port, source, iface, old_vm, new_vm = argv[1:7]
        return udp_probe(fip, int(port), source, iface, old_vm, new_vm)
    print(f"unknown helper {argv[0]!r}", file=sys.stderr)
    return 2


def udp_echo(name: str, port: int) -> int:
    """In a VM: answer every datagram with `<name> <datagram>`, until killed."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    print("READY", flush=True)
    tag = name.encode() + b" "
    while True:
        data, peer = sock.recvfrom(2048)
        sock.sendto(tag + data, peer)


def parse_arp(frame: bytes) -> tuple[int, str, str, str] | None:
    """(op, sender MAC, sender IP, target IP) of an Ethernet/IPv4 ARP frame."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x06":
        return None
    op = int.from_bytes(frame[20:22], "big")
    sha = ":".join(f"{b:02x}" for b in frame[22:28])
    return op, sha, socket.inet_ntoa(frame[28:32]), socket.inet_ntoa(frame[38:42])


def udp_probe(fip: str, port: int, source: str, iface: str, old_vm: str, new_vm: str) -> int:
    """On the external host: a numbered datagram to `fip` every PROBE_INTERVAL_S, from
    `source`; notes each answer (which VM, when) and the ARP frames of `fip` on `iface`.

    stdout: `READY <t>` once `old_vm` answered, `NEW <t>` at the first answer of `new_vm`,
    and, when stdin closes, one JSON document with every timestamp (time.monotonic(), the
    same clock as the caller's)."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((source, 0))
    udp.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(udp, selectors.EVENT_READ, "udp")
    arp: socket.socket | None = None
    try:  # the ARP frames are a diagnostic: the probe works without them
        arp = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
        arp.bind((iface, 0))
        arp.setblocking(False)
        sel.register(arp, selectors.EVENT_READ, "arp")
    except OSError:
        arp = None
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "stdin")
    sent: list[float] = []
    errors = 0
    replies: list[tuple[int, str, float]] = []
    arps: list[tuple[float, int, str]] = []  # (t, op, sender MAC) with sender IP = fip
    start = time.monotonic()
    ready: float | None = None
    new_seen: float | None = None
    next_send = start
    done = False
    while not done:
        now = time.monotonic()
        if now >= next_send:
            try:
                udp.sendto(str(len(sent)).encode(), (fip, port))
            except OSError:
                errors += 1
            sent.append(now)
            next_send = max(next_send + PROBE_INTERVAL_S, now)
        if ready is None and now - start > PROBE_WARMUP_S:
            print(json.dumps({"error": f"{old_vm} did not answer on {fip} within "
                                       f"{PROBE_WARMUP_S:g} s ({len(replies)} answers)"}))
            return 1
        for key, _ in sel.select(max(0.0, next_send - time.monotonic())):
            if key.data == "udp":
                while True:
                    try:
                        data = udp.recv(2048)
                    except BlockingIOError:
                        break
                    t = time.monotonic()
                    vm, _, seq = data.decode(errors="replace").partition(" ")
                    if not seq.isdigit():
                        continue
                    replies.append((int(seq), vm, t))
                    if ready is None and vm == old_vm:
                        ready = t
                        print(f"READY {t!r}", flush=True)
                    elif ready is not None and new_seen is None and vm == new_vm:
                        new_seen = t
                        print(f"NEW {t!r}", flush=True)
            elif key.data == "arp" and arp is not None:
                while True:
                    try:
                        frame = arp.recv(128)
                    except BlockingIOError:
                        break
                    parsed = parse_arp(frame)
                    if parsed and parsed[2] == fip:
                        arps.append((time.monotonic(), parsed[0], parsed[1]))
            elif not os.read(sys.stdin.fileno(), 4096):
                done = True
    print(json.dumps({"sent": sent, "send_errors": errors, "replies": replies,
                      "arps": arps if arp is not None else None}))
    return 0


class Lines:
    """The stdout of a child process, line by line, read by a thread (no blocking read)."""

    def __init__(self, proc: subprocess.Popen[str]):
        self.proc = proc
        self.q: queue.Queue[str | None] = queue.Queue()
        self.thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self.thread.start()

    def _read(self, stream: IO[str] | None) -> None:
        assert stream is not None
        for line in stream:
            self.q.put(line.rstrip("\n"))
        self.q.put(None)

    def get(self, timeout: float) -> str | None:
        """The next line; None at the end of the output or after `timeout`."""
        try:
            return self.q.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def rest(self, timeout: float = 10.0) -> list[str]:
        self.thread.join(timeout)
        out: list[str] = []
        while True:
            try:
                line = self.q.get_nowait()
            except queue.Empty:
                return out
            if line is not None:
                out.append(line)


def stop(proc: subprocess.Popen[str] | None) -> None:
    """End a child process of this script (never anything else)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- a. the lab -------------------------------------------------------------------------------
def bench_up(prefix: str) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    res = lab(prefix, "up", str(TOPOLOGY))
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise BenchError(f"lab could not be built: {last_line(res)}")
    print(f"  {elapsed:6.2f} s wall clock   ({res.stdout.strip()})")
    st = lab_status(prefix)
    for name, node in st["nodes"].items():
        a = node["agent"]
        print(f"    {name:<10} converged={'yes' if a['converged'] else 'no':<3} "
              f"flows={a['flows']:<4} vms={' '.join(a['vms']) or '-'}")
    for router, s in st["snat"].items():
        print(f"    SNAT {router} {s['external_ip']}: active on {', '.join(s['active']) or '-'}")
    return elapsed, st


# --- b. throughput ----------------------------------------------------------------------------
def describe_vm(st: dict[str, Any], vm: str) -> str:
    v = st["vms"][vm]
    fip = f", floating IP {v['floating_ip']}" if v["floating_ip"] else ""
    return f"{vm} ({v['node']} {v['network']} {v['ip']}{fip})"


def bench_throughput(st: dict[str, Any], seconds: int, rounds: int) -> dict[str, list[float]]:
    vms, ext = st["vms"], st["external"]
    remote = ext["remote_ip"]

    def server(srv: str) -> tuple[str, str]:
        return (ext["namespace"], remote) if srv == "ext" else (vms[srv]["namespace"],
                                                                vms[srv]["ip"])

    snat = st["snat"]["r1"]
    for label, cli, srv in PATHS:
        how = {"floating": "SNAT to its floating IP on its own node",
               "snat": f"SNAT to {snat['external_ip']} on {', '.join(snat['active']) or '?'}",
               "east-west": "routed on compute1, one tunnel"}[label]
        to = f"external host {remote}" if srv == "ext" else describe_vm(st, srv)
        print(f"  {label:<9} {describe_vm(st, cli)} -> {to}: {how}")
    # warm-up: the VMs' and the external host's neighbour entries, conntrack, tunnels
    for label, cli, srv in PATHS:
        res = in_ns(vms[cli]["namespace"], "ping", "-c", "3", "-i", "0.2", "-W", "1",
                    server(srv)[1])
        summary = next((ln for ln in res.stdout.splitlines() if "packet loss" in ln), "")
        print(f"  warm-up ping {label}: {summary.strip() or last_line(res)}")
    results: dict[str, list[float]] = {label: [] for label, _, _ in PATHS}
    for r in range(rounds):
        for label, cli, srv in PATHS:
            srv_ns, srv_ip = server(srv)
            bps = iperf_once(vms[cli]["namespace"], srv_ns, srv_ip, seconds)
            results[label].append(bps)
            print(f"  round {r + 1} {label:<9} {bps / 1e9:7.3f} Gbit/s")
    for label, vals in results.items():
        if vals:
            print(f"  median {label:<9} {statistics.median(vals) / 1e9:7.3f} Gbit/s  "
                  f"(runs: {', '.join(f'{v / 1e9:.3f}' for v in vals)})")
    return results


# --- c. floating IP move ----------------------------------------------------------------------
@dataclass
class Move:
    old: str
    new: str
    written_s: float | None = None      # the lab wrote the new desired state for the agents
    apply_s: float | None = None        # `dvr lab apply` returned
    apply_error: str = ""
    answered_s: float | None = None     # first answer of the new VM received
    asked_s: float | None = None        # ... to the probe sent at
    last_old_s: float | None = None     # last answer of the old VM received
    unanswered: int = 0                 # probes sent after the start with no answer at all
    flaps: int = 0                      # answers of the old VM after the new one answered
    send_errors: int = 0                # probes the external host's kernel refused to send
    arp_watched: bool = True
    garps: dict[str, list[float]] = field(default_factory=dict)   # sender -> times
    replies_arp: dict[str, int] = field(default_factory=dict)     # ARP replies per sender
    error: str = ""


def move_topology(raw: dict[str, Any], holder: str, path: Path) -> None:
    data = json.loads(json.dumps(raw))
    for vm in MOVERS:
        data["vms"][vm].pop("floating_ip", None)
    data["vms"][holder]["floating_ip"] = FIP
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def one_move(prefix: str, st: dict[str, Any], path: Path, old: str, new: str,
             macs: dict[str, str]) -> Move:
    m = Move(old, new)
    ext = st["external"]
    probe = subprocess.Popen(
        helper_argv(ext["namespace"], "probe", FIP, str(ECHO_PORT), ext["remote_ip"], "ext0",
                    old, new),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = Lines(probe)
    apply: subprocess.Popen[str] | None = None
    try:
        line = lines.get(PROBE_WARMUP_S + 10)
        if line is None or not line.startswith("READY"):
            stop(probe)
            why = line or last_line_of(probe)
            m.error = f"probe not ready: {why}"
            return m
        # the clock starts before `apply` is launched; the probe runs throughout
        t0, wall0 = time.monotonic(), time.time()
        apply = subprocess.Popen([*dvr_cmd(), "lab", "--prefix", prefix, "apply", str(path)],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        returned: list[float] = []

        def wait_apply(proc: subprocess.Popen[str]) -> None:
            proc.wait()
            returned.append(time.monotonic())

        waiter = threading.Thread(target=wait_apply, args=(apply,), daemon=True)
        waiter.start()
        new_seen = False
        deadline = t0 + MOVE_TIMEOUT_S
        while time.monotonic() < deadline:
            if new_seen and returned and time.monotonic() >= t0 + OBSERVE_S:
                break
            line = lines.get(0.02)
            if line and line.startswith("NEW"):
                new_seen = True
        waiter.join(timeout=90)
        _, err = apply.communicate(timeout=30)
        if returned:
            m.apply_s = returned[0] - t0
        with contextlib.suppress(OSError):  # the file the agents watch (see dvr/lab/lab.py)
            m.written_s = lab_topology(prefix).stat().st_mtime_ns / 1e9 - wall0
        if apply.returncode != 0:
            m.apply_error = (err.strip().splitlines() or [f"exit {apply.returncode}"])[-1]
        assert probe.stdin is not None
        probe.stdin.close()
        probe.wait(timeout=10)
        rest = [ln for ln in lines.rest() if ln.startswith("{")]
        if not rest:
            m.error = "probe gave no result"
            return m
        analyse(m, json.loads(rest[-1]), t0, macs)
        if m.answered_s is None:
            m.error = f"{new} did not answer within {MOVE_TIMEOUT_S:g} s"
        return m
    finally:
        stop(apply)
        stop(probe)


def lab_topology(prefix: str) -> Path:
    return Path(os.environ.get("DVR_LAB_RUNDIR", "/run")) / f"{prefix}-lab" / "topology.yaml"


def analyse(m: Move, doc: dict[str, Any], t0: float, macs: dict[str, str]) -> None:
    sent: list[float] = doc["sent"]
    replies = sorted(doc["replies"], key=lambda r: r[2])
    new = [(seq, t) for seq, vm, t in replies if vm == m.new and t >= t0]
    if new:
        seq, t = new[0]
        m.answered_s = t - t0
        m.asked_s = sent[seq] - t0
    old = [(seq, t) for seq, vm, t in replies if vm == m.old]
    if old:
        m.last_old_s = old[-1][1] - t0
    if new:
        first_new = new[0][1]
        m.flaps = sum(1 for _, t in old if t > first_new)
        answered = {seq for seq, _, _ in replies}
        m.unanswered = sum(1 for seq, t in enumerate(sent)
                           if t0 <= t < sent[new[0][0]] and seq not in answered)
    m.arp_watched = doc["arps"] is not None
    m.send_errors = doc["send_errors"]
    for t, op, sha in doc["arps"] or []:
        who = macs.get(sha, sha)
        if t < t0:
            continue
        if op == 1:
            m.garps.setdefault(who, []).append(t - t0)
        elif op == 2:
            m.replies_arp[who] = m.replies_arp.get(who, 0) + 1


def start_echo(st: dict[str, Any], vm: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(helper_argv(st["vms"][vm]["namespace"], "echo", vm,
                                        str(ECHO_PORT)),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "READY":  # ends at once if the helper failed
        stop(proc)
        raise BenchError(f"UDP echo in {vm}: {last_line_of(proc)}")
    return proc


def last_line_of(proc: subprocess.Popen[str]) -> str:
    err = proc.stderr.read() if proc.stderr else ""
    return (err.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]


def bench_moves(prefix: str, st: dict[str, Any], moves: int) -> list[Move]:
    raw = yaml.safe_load(TOPOLOGY.read_text())
    topo = load_topology(TOPOLOGY)
    macs = {n.external_mac: name for name, n in topo.nodes.items()}
    holder = next(vm for vm in MOVERS if raw["vms"][vm].get("floating_ip") == FIP)
    node = {vm: st["vms"][vm]["node"] for vm in MOVERS}
    print(f"  {FIP} between {', '.join(describe_vm(st, vm) for vm in MOVERS)}; probe: UDP from "
          f"{st['external']['remote_ip']} every {PROBE_INTERVAL_S * 1e3:g} ms, answered by a "
          f"UDP echo in each VM")
    echoes: list[subprocess.Popen[str]] = []
    out: list[Move] = []
    try:
        echoes = [start_echo(st, vm) for vm in MOVERS]
        with tempfile.TemporaryDirectory(prefix="north_south.") as tmp:
            for i in range(moves):
                new = next(vm for vm in MOVERS if vm != holder)
                path = Path(tmp) / f"move{i + 1:02d}.yaml"
                move_topology(raw, new, path)
                m = one_move(prefix, st, path, holder, new, macs)
                out.append(m)
                head = (f"  move {i + 1:>2}: {m.old} ({node[m.old]}) -> {m.new} "
                        f"({node[m.new]}):")
                print(f"{head} {describe_move(m)}")
                if m.apply_s is None or m.apply_error:
                    break  # the lab is not where the next move expects it
                holder = new
                if m.error:  # a late answer must not count for the next move
                    time.sleep(2)
    finally:
        for proc in echoes:
            stop(proc)
    answered = [m.answered_s for m in out if m.answered_s is not None]
    if answered:
        print(f"  median: {statistics.median(answered):.3f} s over {len(answered)} moves "
              f"answered (of {len(out)})")
    return out


def describe_move(m: Move) -> str:
    if m.error and m.answered_s is None:
        parts = [f"NOT MEASURED: {m.error}"]
    else:
        parts = [f"answered after {m.answered_s:.3f} s (probe sent at {m.asked_s:.3f} s)"]
    if m.written_s is not None:
        parts.append(f"new state written at {m.written_s:.3f} s")
    if m.apply_s is not None:
        parts.append(f"apply returned at {m.apply_s:.2f} s")
    if m.apply_error:
        parts.append(f"apply failed: {m.apply_error}")
    if m.last_old_s is not None:
        parts.append(f"{m.old} last answered at {m.last_old_s:.3f} s")
    if m.answered_s is not None:
        parts.append(f"{m.unanswered} probes unanswered")
    if m.send_errors:
        parts.append(f"{m.send_errors} probes not sent (errors)")
    if m.flaps:
        parts.append(f"{m.flaps} answers from {m.old} AFTER {m.new}")
    for who, ts in sorted(m.garps.items()):
        parts.append(f"GARP from {who} at {', '.join(f'{t:.2f}' for t in ts)} s")
    if not m.garps:
        parts.append("no GARP seen" if m.arp_watched else "ARP not watched")
    for who, n in sorted(m.replies_arp.items()):
        parts.append(f"{n} ARP replies from {who}")
    return "; ".join(parts)


# --- summary ----------------------------------------------------------------------------------
def summary(up_s: float | None, tput: dict[str, list[float]] | None, moves: list[Move] | None,
            errors: list[str]) -> None:
    print("\n== summary " + "=" * 89)
    row("dvr lab up -> converged",
        f"{up_s:.2f} s (northsouth.yaml, once)" if up_s is not None else "not measured")
    ratio_target = f">= {TARGET_RATIO:g}"
    if tput and all(tput.values()):
        gbps = {label: statistics.median(vals) for label, vals in tput.items()}
        row("throughput floating IP", f"median {gbps['floating'] / 1e9:.3f} Gbit/s "
            "(vm1 -> 198.51.100.10)")
        row("throughput SNAT", f"median {gbps['snat'] / 1e9:.3f} Gbit/s (vm4 -> 198.51.100.10)")
        row("throughput east-west",
            f"median {gbps['east-west'] / 1e9:.3f} Gbit/s (vm1 -> vm2)")
        for label, name in (("floating", "floating IP"), ("snat", "SNAT")):
            ew = gbps["east-west"]
            ratio = gbps[label] / ew if ew else float("nan")
            row(f"{name} / east-west",
                f"{ratio:.3f} (OVN 23.03: {OVN_REFERENCE[label]:.2f})", ratio_target,
                ratio >= TARGET_RATIO)
    else:
        row("floating IP / east-west", "not measured", ratio_target)
        row("SNAT / east-west", "not measured", ratio_target)
    move_target = f"< {TARGET_MOVE_S:g} s"
    answered = [m.answered_s for m in moves or [] if m.answered_s is not None]
    if moves and answered:
        med = statistics.median(answered)
        missed = len(moves) - len(answered)
        value = (f"median {med:.3f} s over {len(answered)} moves (max {max(answered):.3f})"
                 + (f", {missed} unanswered" if missed else ""))
        row("floating IP move -> traffic", value, move_target,
            med < TARGET_MOVE_S and not missed)
        agents = [m.answered_s - m.written_s for m in moves
                  if m.answered_s is not None and m.written_s is not None]
        if agents:
            row("  from new state written", f"median {statistics.median(agents):.3f} s "
                "(agents, flows, GARP, first answer)")
        applied = [m.apply_s for m in moves if m.apply_s is not None]
        if applied:
            row("  dvr lab apply returned", f"median {statistics.median(applied):.2f} s "
                "(agents converged)")
    else:
        row("floating IP move -> traffic", "not measured", move_target)
    for e in errors:
        print(f"  not measured: {e}")


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--prefix", default="bnns", help="lab prefix (default: bnns)")
    ap.add_argument("--seconds", type=int, default=5, help="iperf3 duration per run")
    ap.add_argument("--rounds", type=int, default=3, help="iperf3 rounds per path")
    ap.add_argument("--moves", type=int, default=10, help="floating IP moves to time")
    args = ap.parse_args()
    if args.prefix == "dvr":
        print("north_south: error: refusing the default prefix `dvr`; use your own",
              file=sys.stderr)
        return 2
    if not PREFIX_RE.match(args.prefix):
        print(f"north_south: error: invalid prefix {args.prefix!r}: use [a-z][a-z0-9]{{0,7}}",
              file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("north_south: error: the lab needs root", file=sys.stderr)
        return 1

    up_s = tput = moves = None
    errors: list[str] = []
    fatal = None
    print(f"== a. dvr lab up {TOPOLOGY.relative_to(ROOT)} until converged (for information) ==")
    lab_down(args.prefix)  # a leftover from an interrupted run
    try:
        up_s, st = bench_up(args.prefix)
        print(f"\n== b. iperf3 TCP to the external host, {args.seconds} s per run, "
              f"{args.rounds} rounds alternating ==")
        try:
            tput = bench_throughput(st, args.seconds, args.rounds)
        except (BenchError, subprocess.TimeoutExpired) as exc:
            errors.append(f"throughput: {exc}")
            print(f"  error: {exc}")
        print(f"\n== c. floating IP move to traffic, {args.moves} moves ==")
        try:
            moves = bench_moves(args.prefix, st, args.moves)
        except (BenchError, subprocess.TimeoutExpired, OSError) as exc:
            errors.append(f"floating IP move: {exc}")
            print(f"  error: {exc}")
    except BenchError as exc:
        fatal = str(exc)
    except KeyboardInterrupt:
        fatal = "interrupted"
    finally:
        lab_down(args.prefix)
    if fatal:
        print(f"north_south: error: {fatal}", file=sys.stderr)
        return 1
    summary(up_s, tput, moves, errors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
