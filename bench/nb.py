#!/usr/bin/env python3
"""Northbound-database benchmark of the dvr control plane: prints figures, asserts nothing.

    python3 bench/nb.py [--prefix bnb] [--moves 20] [--big-moves 20] [--baseline-moves 5]
                        [--burst 200] [--baseline-burst-max 1000] [--reps 3]
                        [--sizes 100,1000,10000,100000] [--failovers 5] [--timeout 300]

On the north-south lab (tests/lab/topologies/northsouth.yaml: compute1, compute2, net1),
built once, with the lab's own northbound ovsdb-server:

1. change to flows: floating IP 203.0.113.50 moves --moves times between vm1 (compute1) and
   vm4 (compute2) by an in-process `Northbound.change(fip_set(...))`, the edit `dvr nb
   fip-set` makes. Timed from just before the call to the first flow of that address added
   on the new node's br-int, as an `ovs-ofctl monitor br-int watch:` already running in that
   node's namespace prints it (each line timestamped as it is read). Median, min and max;
   also the change() call alone (its database round trips and its Python), and when the new
   node's agent reported the new generation converged. Target: under 30 ms (OVN 23.03: 19 ms
   from ovn-nbctl to flows). The same is then measured --big-moves times at each size of 3
   (median and p95, the `dvr nb` call and the agent's share after it: target under 20 ms
   at every size, the largest median at most 1.5 times the smallest). The baseline, in the
   same run: --baseline-moves moves by the whole-document path the O(change) commands
   replaced (`Northbound.change()` of the edit: read, rebuild and validate the whole
   desired state), on the small lab and at each size;
2. load: `Northbound.load()` into the lab's database of generated clouds of --sizes ports
   (dvr/lab/generate.py: 100 ports a network, two networks a router, every tenth port of a
   network with a floating IP: about 100 at 1k, 1,000 at 10k, 10,000 at 100k, the provider
   network widened for them; the lab's own nodes with their real tunnel_ip plus 100 more
   compute nodes that are not in the lab), each loaded over
   the lab's own small topology; against `build_topology()` (validation) of the same
   document alone; and the time until every lab agent reports the new generation converged;
3. agent full sync: compute1's agent is stopped and started the way the lab starts it; the
   time from its start to its status showing converged on the database's generation, at
   each size, against the same on the small topology (median of --reps);
4. agent memory: VmRSS (and VmHWM, the peak) of that freshly synced agent, with 50 of the
   generated ports bound to compute1 (plugged for real: internal ports on its br-int with
   the port's iface-id), and the flows it installed, against the small topology;
5. the same change latency with a clustered northbound database (a second lab, `dvr lab up
   --nb-cluster 3`): --moves moves as in 1 (the cluster's baseline), then --failovers rounds
   of: kill -9 the leader, then at once the same move through every member (the client
   waits for the new leader; agents on the dead member move to a survivor), timed from the
   kill to the flows on the new node; the killed member restarts and rejoins in between;
6. a burst of --burst changes at each size, back to back from one client (VMs added on a
   generated compute and the first generated network, which compute1 hosts, addresses
   allocated; the floating IP moved; VMs removed: 2:1:1), timed to every lab agent
   converged on the last; by the whole-document path too up to --baseline-burst-max ports.

Needs root. The lab always goes down at the end, also on failure; the monitors started here
are stopped. The machine is shared and has 2 cores: figures are noisy.
Exits non-zero with one line on stderr when the lab cannot be built.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.east_west import BenchError, lab, lab_down, last_line, row  # noqa: E402
from dvr import nb  # noqa: E402
from dvr.lab.generate import generate  # noqa: E402
from dvr.lab.lab import PREFIX_RE, Lab, _kill_pidfile, _read_pid  # noqa: E402
from flows import northbound  # noqa: E402
from flows.model import build_topology, port_id_for  # noqa: E402

TOPOLOGY = ROOT / "tests" / "lab" / "topologies" / "northsouth.yaml"
TARGET_CHANGE_MS = 30.0
OVN_REFERENCE_MS = 19.0  # OVN 23.03, ovn-nbctl to flows, same kind of lab
FIP = "203.0.113.50"
MOVERS = (("vm4", "compute2"), ("vm1", "compute1"))  # the first move goes to compute2
AGENT_NODE = "compute1"  # the agent restarted, measured and given the bound ports
BOUND = 50               # generated ports bound (plugged) on AGENT_NODE
BOUND_NETS = 4           # ... on this many generated networks (two routers)
GEN_COMPUTES = 100       # generated compute nodes, not in the lab
PER_NET = 100            # ports per generated network
GEN_TUNNELS = ipaddress.IPv4Address("198.18.100.1")  # their tunnel_ip, from here up
FLOW_TIMEOUT_S = 10.0    # a move whose flows do not show within this counts as failed
SETTLE_S = 0.3           # quiet time between moves (gratuitous ARPs, reports)


# --- the lab's database -----------------------------------------------------------------------
class TimedNorthbound(nb.Northbound):
    """A Northbound that adds up the time its transactions (round trips) take."""

    def __init__(self, target: str, timeout: float = 10.0):
        super().__init__(target, timeout)
        self.rpc_s = 0.0
        self.rpcs = 0

    def transact(self, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        try:
            return super().transact(ops)
        finally:
            self.rpc_s += time.perf_counter() - t0
            self.rpcs += 1

    def timed(self) -> tuple[float, int]:
        """(seconds, transactions) since the last call."""
        out = (self.rpc_s, self.rpcs)
        self.rpc_s, self.rpcs = 0.0, 0
        return out


def current_generation(db: nb.Northbound) -> str:
    rows = db.transact([{"op": "select", "table": "NB_Global", "where": [],
                         "columns": ["generation"]}])[0].get("rows", [])
    return rows[0]["generation"] if rows else ""


# --- processes and agents ---------------------------------------------------------------------
def proc_mem(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, kB (empty when it is gone)."""
    out = {}
    with contextlib.suppress(OSError):
        for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = ln.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def agent_pid(lb: Lab, node: str) -> int | None:
    return _read_pid(lb._procs(node)["agent"])


def agent_ok(lb: Lab, node: str, generation: str, pid: int | None = None) -> bool:
    st = lb.agent_status(node) or {}
    return (st.get("generation") == generation and bool(st.get("converged"))
            and (pid is None or st.get("pid") == pid))


def wait_agents(lb: Lab, nodes: list[str], generation: str, timeout: float,
                t0: float | None = None, poll: float = 0.01) -> dict[str, float]:
    """Seconds from t0 (perf_counter, default now) until each node's agent reported
    `generation` converged in its status file."""
    t0 = time.perf_counter() if t0 is None else t0
    deadline = time.perf_counter() + timeout
    done: dict[str, float] = {}
    while len(done) < len(nodes):
        for n in nodes:
            if n not in done and agent_ok(lb, n, generation):
                done[n] = time.perf_counter() - t0
        if len(done) == len(nodes):
            break
        if time.perf_counter() > deadline:
            late = [n for n in nodes if n not in done]
            why = "; ".join(f"{n}: {(lb.agent_status(n) or {}).get('error') or 'not yet'}"
                            for n in late)
            raise BenchError(f"agents did not converge on {generation} within "
                             f"{timeout:.0f}s ({why})")
        time.sleep(poll)
    return done


class FlowWatch:
    """`ovs-ofctl monitor br-int watch:` in a node's namespace; each line it prints goes
    into a queue with the perf_counter() of the read that brought it. (ovs-ofctl prints
    the initial flows on stdout and every later event on stderr: both are read.)"""

    def __init__(self, lb: Lab, node: str):
        self.node = node
        argv, env = lb.exec_argv("node", node, ["ovs-ofctl", "-O", "OpenFlow13", "monitor",
                                                "br-int", "watch:"])
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True,
                                       name=f"monitor-{node}")
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        tail = b""
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            t = time.perf_counter()
            if not data:
                break
            *whole, tail = (tail + data).split(b"\n")
            for ln in whole:
                self.lines.put((t, ln.decode(errors="replace")))
        self.lines.put((time.perf_counter(), ""))  # EOF

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Until the initial reply has been printed (the monitor is registered)."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            try:
                _, ln = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if "FLOW_MONITOR reply" in ln:
                time.sleep(0.2)  # the rest of the initial reply
                self.drain()
                return
        raise BenchError(f"ovs-ofctl monitor on {self.node} did not start")

    def drain(self) -> int:
        n = 0
        with contextlib.suppress(queue.Empty):
            while True:
                self.lines.get_nowait()
                n += 1
        return n

    def wait_added(self, needle: str, timeout: float) -> float | None:
        """The time of the first ADDED flow whose line contains `needle` (None: none
        within `timeout`)."""
        deadline = time.perf_counter() + timeout
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                return None
            try:
                t, ln = self.lines.get(timeout=left)
            except queue.Empty:
                return None
            if not ln and self.proc.poll() is not None:
                raise BenchError(f"ovs-ofctl monitor on {self.node} exited")
            if "event=ADDED" in ln and needle in ln:
                return t

    def count_added(self, needle: str, since: float, burst: float = 0.1) -> int:
        """How many more ADDED flows containing `needle` were read within `burst` seconds
        after `since` (waits until then)."""
        count = 0
        while True:
            left = since + burst - time.perf_counter()
            try:
                t, ln = self.lines.get(timeout=left) if left > 0 else self.lines.get_nowait()
            except queue.Empty:
                return count
            if t > since + burst:
                return count
            if "event=ADDED" in ln and needle in ln:
                count += 1

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# --- 1. change to flows -----------------------------------------------------------------------
@dataclass
class Move:
    to: str
    change_s: float        # the change() call
    rpc_s: float           # of which in database transactions
    rpcs: int
    flows_s: float | None  # to the first flow of the floating IP on the new node
    flows: int             # flows of the floating IP added in that burst
    reported_s: float | None  # to the new node's agent reporting the generation converged


def fip_move(db: nb.Northbound, vm: str, whole: bool = False) -> str:
    """`dvr nb fip-set VM FIP` in-process: in O(change) (`Northbound.fip_set`), or with
    `whole` by the whole-document path it replaced (`Northbound.change` of the edit: read,
    rebuild and validate everything): the baseline."""
    if whole:
        return db.change(northbound.fip_set(vm, FIP))
    return db.fip_set(vm, FIP)


def one_move(lb: Lab, db: TimedNorthbound, watches: dict[str, FlowWatch], vm: str, node: str,
             timeout: float, t0: float | None = None, whole: bool = False
             ) -> tuple[Move, str, float]:
    """Move the floating IP to `vm` (on `node`): the Move timed from `t0` (default: just
    before the change() call), the new generation, and when change() was called."""
    for w in watches.values():
        w.drain()
    db.timed()
    t_call = time.perf_counter()
    start = t_call if t0 is None else t0
    generation = fip_move(db, vm, whole)
    t1 = time.perf_counter()
    rpc_s, rpcs = db.timed()
    seen = watches[node].wait_added(FIP, timeout)
    reported: float | None = None
    with contextlib.suppress(BenchError):
        reported = wait_agents(lb, [node], generation, timeout, t0=start, poll=0.001)[node]
    count = 0 if seen is None else 1 + watches[node].count_added(FIP, seen)
    return (Move(node, t1 - start, rpc_s, rpcs, None if seen is None else seen - start,
                 count, reported), generation, t_call)


def bench_moves(lb: Lab, db: TimedNorthbound, watches: dict[str, FlowWatch], moves: int,
                label: str, timeout: float = FLOW_TIMEOUT_S, whole: bool = False
                ) -> list[Move]:
    out: list[Move] = []
    nodes = sorted(lb.state()["underlay"])
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)  # the monitor threads take the GIL at once
    try:
        for i in range(moves):
            vm, node = MOVERS[i % 2]
            time.sleep(SETTLE_S)
            m, generation, _ = one_move(lb, db, watches, vm, node, timeout, whole=whole)
            out.append(m)
            flows = f"{m.flows_s * 1e3:8.1f} ms ({m.flows} flows)" if m.flows_s is not None \
                else f"   none within {timeout:.0f} s"
            rep = f"{m.reported_s * 1e3:8.1f} ms" if m.reported_s is not None else "  never"
            print(f"  {label} move {i + 1:>2} to {node:<9} change() {m.change_s * 1e3:7.1f} ms "
                  f"(db {m.rpc_s * 1e3:6.1f} ms, {m.rpcs} txns)  flows {flows}  "
                  f"reported {rep}")
            # every agent on the new generation before the next move
            with contextlib.suppress(BenchError):
                wait_agents(lb, nodes, generation, timeout)
    finally:
        sys.setswitchinterval(old_interval)
    return out


def p95(values: list[float]) -> float:
    """The 95th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[max(0, -(-len(ordered) * 95 // 100) - 1)]


def stats_ms(values: list[float]) -> str:
    if not values:
        return "no value"
    ms = [v * 1e3 for v in values]
    return (f"median {statistics.median(ms):.1f} ms, p95 {p95(ms):.1f} (min {min(ms):.1f}, "
            f"max {max(ms):.1f}, n={len(ms)})")


def print_moves(moves: list[Move], label: str) -> None:
    flows = [m.flows_s for m in moves if m.flows_s is not None]
    failed = sum(1 for m in moves if m.flows_s is None)
    print(f"  {label}: change to flows {stats_ms(flows)}"
          f"{f', {failed} failed' if failed else ''}")
    print(f"  {label}: change() call   {stats_ms([m.change_s for m in moves])}, of which "
          f"database transactions {stats_ms([m.rpc_s for m in moves])}")
    agent = [m.flows_s - m.change_s for m in moves if m.flows_s is not None]
    print(f"  {label}: agent's share (flows - change()) {stats_ms(agent)}")
    rep = [m.reported_s for m in moves if m.reported_s is not None]
    print(f"  {label}: change to agent report {stats_ms(rep)}")


# --- 2. generated clouds ----------------------------------------------------------------------
def cloud(base: dict[str, Any], ports: int, bound_node: str, bound: int = BOUND,
          computes: int = GEN_COMPUTES, per_net: int = PER_NET) -> dict[str, Any]:
    """The lab's own cloud (`base`, as the database holds it: its nodes with their real
    tunnel_ip, its networks, routers and VMs) extended by dvr/lab/generate.py, `ports` ports
    in all: `computes` compute nodes that are not in the lab, networks of `per_net` ports two
    to a router with an external gateway, every tenth port of a network with a floating IP,
    and `bound` ports on the lab's `bound_node` (b0, b1, ...) on the first BOUND_NETS
    generated networks (a hypervisor hosts a few tenants' networks, not every one)."""
    doc: dict[str, Any] = json.loads(json.dumps(base))
    small = ipaddress.IPv4Network(doc["external"]["cidr"])
    room = max(4096, 2 * ports // 10)  # a floating IP every tenth port, and the lab's
    big = small.supernet(new_prefix=min(small.prefixlen, 32 - (room - 1).bit_length()))
    doc["external"]["cidr"] = str(big)
    regular = ports - len(doc["vms"]) - bound
    nets = max(1, -(-regular // per_net))
    doc = generate(regular, computes=computes, network_nodes=0, networks=nets, fip_every=10,
                   tunnel_ips=str(GEN_TUNNELS), base=doc, prefix="g")
    hosted = [f"gn{n}" for n in range(min(nets, BOUND_NETS))]
    for b in range(bound):
        doc["vms"][f"b{b}"] = {"node": bound_node, "network": hosted[b % len(hosted)],
                               "mac": bound_mac(b)}
    return doc


def bound_mac(b: int) -> str:
    """The MAC of bound port b{b}, in the document and on the plugged interface."""
    return f"02:b0:00:00:{b // 256:02x}:{b % 256:02x}"


def plug_internal(lb: Lab, node: str, ports: list[tuple[str, str]], tag: str) -> float:
    """Plug (name, mac) ports into the node's br-int as Nova/os-vif would (internal ports
    here, `<tag>-<name>`), iface-id = the port's id in the model. Returns the seconds it
    took."""
    cmd = ["ovs-vsctl", "--timeout=60"]
    for name, mac in ports:
        cmd += ["--", "--may-exist", "add-port", "br-int", f"{tag}-{name}", "--", "set",
                "Interface", f"{tag}-{name}", "type=internal",
                f"external_ids:iface-id={port_id_for(name)}",
                f"external_ids:attached-mac={mac}", "external_ids:iface-status=active"]
    argv, env = lb.exec_argv("node", node, cmd)
    t0 = time.perf_counter()
    res = subprocess.run(argv, env=env, text=True, capture_output=True,
                         stdin=subprocess.DEVNULL, timeout=120)
    if res.returncode != 0:
        raise BenchError(f"plugging {len(ports)} ports on {node}: {last_line(res)}")
    return time.perf_counter() - t0


def plug_bound(lb: Lab, node: str, bound: int = BOUND) -> float:
    """Plug ports b0.. into the node's br-int (see plug_internal)."""
    return plug_internal(lb, node, [(f"b{b}", bound_mac(b)) for b in range(bound)], "bnb")


@dataclass
class Load:
    ports: int
    nodes: int
    fips: int
    build_s: float
    load_s: float
    load_rpc_s: float
    noop_s: float
    converged_s: dict[str, float] = field(default_factory=dict)
    nb_rss_kb: int = 0


def bench_load(lb: Lab, db: TimedNorthbound, doc: dict[str, Any], timeout: float) -> Load:
    ports = len(doc["vms"])
    fips = sum(1 for v in doc["vms"].values() if v.get("floating_ip"))
    t0 = time.perf_counter()
    topo = build_topology(doc, f"<generated {ports} ports>")
    build_s = time.perf_counter() - t0
    db.timed()
    t0 = time.perf_counter()
    generation = db.load(topo)
    load_s = time.perf_counter() - t0
    rpc_s, _ = db.timed()
    nodes = sorted(lb.state()["underlay"])
    converged = wait_agents(lb, nodes, generation, timeout, t0=t0)
    t1 = time.perf_counter()
    db.load(topo)  # the same again: read, validate, compare, nothing to write
    noop_s = time.perf_counter() - t1
    db.timed()
    nb_pid = _read_pid(lb.dir / "nb.pid")
    nb_rss = proc_mem(nb_pid).get("VmRSS", 0) if nb_pid else 0
    return Load(ports, len(topo.nodes), fips, build_s, load_s, rpc_s, noop_s, converged,
                nb_rss)


# --- 6. a burst of changes ---------------------------------------------------------------------
@dataclass
class Burst:
    ports: int
    whole: bool       # by the whole-document path (the baseline)
    changes: int
    calls_s: float    # the dvr nb calls, back to back
    converged_s: float  # from the first call to every lab agent converged on the last one
    calls: list[float] = field(default_factory=list)


def burst_plan(n: int) -> list[tuple[str, str]]:
    """`n` changes as a tenant makes them: VMs added (on a generated compute, on the first
    generated network, which AGENT_NODE hosts, addresses allocated), floating IP
    203.0.113.50 moved between vm1 and vm4, VMs removed (the oldest added): 2:1:1."""
    out: list[tuple[str, str]] = []
    added: list[str] = []
    for i in range(n):
        k = i % 4
        if k < 2:
            added.append(f"bu{i}")
            out.append(("vm-add", added[-1]))
        elif k == 2:
            out.append(("fip-set", MOVERS[(i // 4) % 2][0]))
        else:
            out.append(("vm-del", added.pop(0)))
    return out


def burst_call(db: nb.Northbound, what: str, name: str, whole: bool) -> str:
    if what == "vm-add":
        return (db.change(northbound.vm_add(name, "gc0", "gn0")) if whole
                else db.vm_add(name, "gc0", "gn0"))
    if what == "vm-del":
        return db.change(northbound.vm_del(name)) if whole else db.vm_del(name)
    return fip_move(db, name, whole)


def bench_burst(lb: Lab, db: nb.Northbound, ports: int, n: int, whole: bool,
                timeout: float) -> Burst:
    """`n` changes back to back from one client (burst_plan), timed to every lab agent
    converged on the last; the VMs still added are removed afterwards (not timed)."""
    nodes = sorted(lb.state()["underlay"])
    plan = burst_plan(n)
    calls: list[float] = []
    t0 = time.perf_counter()
    generation = ""
    for what, name in plan:
        t = time.perf_counter()
        generation = burst_call(db, what, name, whole)
        calls.append(time.perf_counter() - t)
    calls_s = time.perf_counter() - t0
    converged = wait_agents(lb, nodes, generation, timeout, t0=t0)
    out = Burst(ports, whole, n, calls_s, max(converged.values()), calls)
    left = {name for what, name in plan if what == "vm-add"} - {
        name for what, name in plan if what == "vm-del"}
    for name in sorted(left):
        generation = db.vm_del(name)
    wait_agents(lb, nodes, generation, timeout)
    return out


def print_burst(b: Burst) -> None:
    how = "whole-document" if b.whole else "O(change)"
    print(f"  burst of {b.changes} changes at {b.ports} ports, {how}: calls {b.calls_s:.2f} s "
          f"(each {stats_ms(b.calls)}), every agent converged {b.converged_s:.2f} s after "
          f"the first")


# --- 3 and 4. agent restart -------------------------------------------------------------------
@dataclass
class Restart:
    stop_s: float
    started_s: float  # to the new agent's first status (interpreter and imports)
    sync_s: float     # to converged on the database's generation
    rss_kb: int
    hwm_kb: int
    flows: int
    vms: int
    known: int  # ports in the agent's copy of the database (its scope)


def restart_agent(lb: Lab, node: str, generation: str, timeout: float) -> Restart:
    """Stop the node's agent (SIGTERM, as `dvr lab restart-agent` does) and start it the
    way the lab starts it; time its full sync."""
    t0 = time.perf_counter()
    _kill_pidfile(lb._procs(node)["agent"], signal.SIGTERM)
    stop_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    lb._start_agent(node)
    pid = agent_pid(lb, node)
    started: float | None = None
    deadline = t0 + timeout
    while True:
        st = lb.agent_status(node) or {}
        now = time.perf_counter()
        if started is None and st.get("pid") == pid:
            started = now - t0
        if agent_ok(lb, node, generation, pid):
            sync_s = now - t0
            st = lb.agent_status(node) or st  # the converged status (st may be older)
            break
        if now > deadline:
            raise BenchError(f"{node}: the restarted agent did not converge within "
                             f"{timeout:.0f}s ({st.get('error') or 'not yet'})")
        time.sleep(0.005)
    mem = proc_mem(pid) if pid else {}
    return Restart(stop_s, started if started is not None else sync_s, sync_s,
                   mem.get("VmRSS", 0), mem.get("VmHWM", 0), int(st.get("flows", 0)),
                   len(st.get("vms", [])), int(st.get("known_vms", 0)))


def bench_restarts(lb: Lab, node: str, generation: str, reps: int, timeout: float,
                   label: str) -> list[Restart]:
    out = []
    for i in range(reps):
        r = restart_agent(lb, node, generation, timeout)
        out.append(r)
        print(f"  {label} restart {i + 1}: stop {r.stop_s:.2f} s, first status "
              f"{r.started_s:.2f} s, converged {r.sync_s:.2f} s; RSS {r.rss_kb / 1024:.1f} MB "
              f"(peak {r.hwm_kb / 1024:.1f} MB), {r.flows} flows, {r.vms} VMs bound, "
              f"{r.known} ports known")
    return out


def br_int_flows(lb: Lab, node: str) -> int | None:
    argv, env = lb.exec_argv("node", node, ["ovs-ofctl", "-O", "OpenFlow13",
                                            "dump-aggregate", "br-int"])
    res = subprocess.run(argv, env=env, text=True, capture_output=True,
                         stdin=subprocess.DEVNULL, timeout=60)
    for word in res.stdout.split():
        if word.startswith("flow_count="):
            return int(word.split("=", 1)[1])
    return None


# --- 5. leader failover -----------------------------------------------------------------------
@dataclass
class Failover:
    killed: str
    new_leader: str
    move: Move
    agents_moved: int  # agents whose member was the one killed


def members_of_agents(lb: Lab) -> dict[str, str | None]:
    """The member each node's agent holds its northbound connection to (from `ss`)."""
    members = {lb.nb_member_ip(m): m for m in lb.nb_members()}
    out: dict[str, str | None] = {}
    for node in sorted(lb.state()["underlay"]):
        argv, env = lb.exec_argv("node", node, ["ss", "-tnH", "state", "established"])
        res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=10)
        out[node] = next((m for ip, m in members.items() if f"{ip}:6641" in res.stdout), None)
    return out


def bench_failover(lb: Lab, db: TimedNorthbound, watches: dict[str, FlowWatch], rounds: int,
                   timeout: float) -> list[Failover]:
    """Each round: kill -9 the leader, then at once the same floating-IP move as figure 1
    through every member (the client waits for the election); timed from the kill to the
    flows on the new node. The killed member is restarted (it rejoins) between rounds."""
    out: list[Failover] = []
    nodes = sorted(lb.state()["underlay"])
    for i in range(rounds):
        vm, node = MOVERS[i % 2]
        time.sleep(SETTLE_S)
        on = members_of_agents(lb)
        t_kill = time.perf_counter()
        killed = lb.kill_northbound()
        assert killed is not None
        move, generation, t0 = one_move(lb, db, watches, vm, node, timeout, t0=t_kill)
        t1 = t_kill + move.change_s
        leader = lb.nb_leader()
        f = Failover(killed, leader, move, sum(1 for m in on.values() if m == killed))
        out.append(f)
        flows = f"{move.flows_s * 1e3:8.1f} ms" if move.flows_s is not None else "    none"
        print(f"  failover {i + 1}: killed {killed} (agents on it: {f.agents_moved}), "
              f"new leader {leader}; change() returned {move.change_s * 1e3:7.1f} ms after "
              f"the kill ({(t1 - t0) * 1e3:.1f} ms in the call), flows on {node} {flows}")
        with contextlib.suppress(BenchError):
            wait_agents(lb, nodes, generation, timeout)
        lb.start_northbound(killed)
    return out


def run_failover(args: argparse.Namespace, fig: Figures) -> None:
    prefix = f"{args.prefix}c"[:8]
    lb = Lab(prefix)
    lab_down(prefix)
    print(f"\n== 5. change to flows during a northbound leader failover: "
          f"{TOPOLOGY.relative_to(ROOT)}, --nb-cluster 3 (prefix {prefix}) ==")
    res = lab(prefix, "up", "--nb-cluster", "3", str(TOPOLOGY))
    if res.returncode != 0:
        raise BenchError(f"clustered lab could not be built: {last_line(res)}")
    print(f"  {res.stdout.strip()}; members {', '.join(lb.nb_members())}, leader "
          f"{lb.nb_leader()}")
    db = TimedNorthbound(lb.nb_connection(), timeout=30)
    watches = {node: FlowWatch(lb, node) for _, node in MOVERS}
    try:
        for w in watches.values():
            w.wait_ready()
        fig.cluster_moves = bench_moves(lb, db, watches, args.moves, "cluster")
        print_moves(fig.cluster_moves, "cluster, no failure")
        fig.failovers = bench_failover(lb, db, watches, args.failovers, args.timeout)
    finally:
        for w in watches.values():
            w.stop()
        db.close()
        lab_down(prefix)


# --- the run ----------------------------------------------------------------------------------
@dataclass
class Figures:
    up_s: float | None = None
    moves: list[Move] = field(default_factory=list)
    small: list[Restart] = field(default_factory=list)
    plug_s: float | None = None
    loads: dict[int, Load] = field(default_factory=dict)
    restarts: dict[int, list[Restart]] = field(default_factory=dict)
    big_moves: dict[int, list[Move]] = field(default_factory=dict)
    whole_moves: dict[int, list[Move]] = field(default_factory=dict)  # 0: the small lab
    bursts: list[Burst] = field(default_factory=list)
    cluster_moves: list[Move] = field(default_factory=list)
    failovers: list[Failover] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def run(args: argparse.Namespace, fig: Figures) -> None:
    lb = Lab(args.prefix)
    print(f"== lab: {TOPOLOGY.relative_to(ROOT)} (prefix {args.prefix}) ==")
    t0 = time.perf_counter()
    res = lab(args.prefix, "up", str(TOPOLOGY))
    fig.up_s = time.perf_counter() - t0
    if res.returncode != 0:
        raise BenchError(f"lab could not be built: {last_line(res)}")
    print(f"  {res.stdout.strip()} ({fig.up_s:.2f} s wall clock)")
    state = lb.state()
    print(f"  underlay: {', '.join(f'{n} {ip}' for n, ip in sorted(state['underlay'].items()))}")
    nodes = sorted(state["underlay"])
    db = TimedNorthbound(lb.nb_connection())
    watches: dict[str, FlowWatch] = {}
    try:
        base = db.dump()
        small_topo = build_topology(base, "<lab>")
        for _, node in MOVERS:
            watches[node] = FlowWatch(lb, node)
        for w in watches.values():
            w.wait_ready()

        print(f"\n== 1. change to flows: {FIP} between vm1 (compute1) and vm4 (compute2), "
              f"{args.moves} moves ==")
        fig.moves = bench_moves(lb, db, watches, args.moves, "small")
        print_moves(fig.moves, "small")
        if args.baseline_moves:
            print(f"  the same by the whole-document path, {args.baseline_moves} moves:")
            fig.whole_moves[0] = bench_moves(lb, db, watches, args.baseline_moves,
                                             "small, whole", whole=True)
            print_moves(fig.whole_moves[0], "small, whole-document")

        print(f"\n== 3/4. {AGENT_NODE}'s agent restarted on the small topology, "
              f"{args.reps} times ==")
        fig.small = bench_restarts(lb, AGENT_NODE, current_generation(db), args.reps,
                                   args.timeout, "small")
        print(f"  flows on {AGENT_NODE}'s br-int: {br_int_flows(lb, AGENT_NODE)}")

        print(f"\n== plugging {BOUND} ports b0..b{BOUND - 1} into {AGENT_NODE}'s br-int ==")
        fig.plug_s = plug_bound(lb, AGENT_NODE)
        print(f"  {fig.plug_s:.2f} s (one ovs-vsctl transaction; not bound in the small "
              "topology)")

        for i, size in enumerate(args.sizes):
            if i:
                t0 = time.perf_counter()
                gen = db.load(small_topo)
                wait_agents(lb, nodes, gen, args.timeout)
                print(f"\n  (back to the small topology: {time.perf_counter() - t0:.2f} s "
                      "to load and converge)")
            doc = cloud(base, size, AGENT_NODE, bound=min(BOUND, (size - len(base["vms"])) // 2))
            print(f"\n== 2. load {size} ports ({len(doc['nodes'])} nodes, "
                  f"{len(doc['networks'])} networks, {len(doc['routers'])} routers) over the "
                  "small topology ==")
            ld = bench_load(lb, db, doc, args.timeout)
            fig.loads[size] = ld
            conv = ", ".join(f"{n} {s:.2f} s" for n, s in sorted(ld.converged_s.items()))
            print(f"  build_topology {ld.build_s:.3f} s; load() {ld.load_s:.3f} s "
                  f"(of which database transactions {ld.load_rpc_s:.3f} s); "
                  f"the same load() again, nothing to write: {ld.noop_s:.3f} s")
            print(f"  from the start of load() to each agent converged: {conv}")
            print(f"  northbound ovsdb-server RSS {ld.nb_rss_kb / 1024:.1f} MB")
            running = agent_pid(lb, AGENT_NODE)
            mem = proc_mem(running) if running else {}
            print(f"  {AGENT_NODE}'s running agent (small -> {size} incrementally): "
                  f"RSS {mem.get('VmRSS', 0) / 1024:.1f} MB, peak "
                  f"{mem.get('VmHWM', 0) / 1024:.1f} MB")

            print(f"\n== 3/4. {AGENT_NODE}'s agent restarted at {size} ports, "
                  f"{args.reps} times ==")
            fig.restarts[size] = bench_restarts(lb, AGENT_NODE, current_generation(db),
                                                args.reps, args.timeout, f"{size}")
            print(f"  flows on {AGENT_NODE}'s br-int: {br_int_flows(lb, AGENT_NODE)}")

            if args.big_moves:
                print(f"\n== 1. change to flows at {size} ports, {args.big_moves} moves ==")
                fig.big_moves[size] = bench_moves(lb, db, watches, args.big_moves, f"{size}",
                                                  timeout=max(FLOW_TIMEOUT_S, args.timeout))
                print_moves(fig.big_moves[size], f"{size}")
            if args.baseline_moves:
                print(f"\n== 1. the same by the whole-document path at {size} ports, "
                      f"{args.baseline_moves} moves ==")
                fig.whole_moves[size] = bench_moves(
                    lb, db, watches, args.baseline_moves, f"{size} whole",
                    timeout=max(FLOW_TIMEOUT_S, args.timeout), whole=True)
                print_moves(fig.whole_moves[size], f"{size}, whole-document")
            if args.burst:
                print(f"\n== 6. a burst of {args.burst} changes at {size} ports ==")
                fig.bursts.append(bench_burst(lb, db, size, args.burst, False, args.timeout))
                print_burst(fig.bursts[-1])
                if size <= args.baseline_burst_max:
                    fig.bursts.append(bench_burst(lb, db, size, args.burst, True,
                                                  args.timeout))
                    print_burst(fig.bursts[-1])

    finally:
        for w in watches.values():
            w.stop()
        db.close()


def summary(args: argparse.Namespace, fig: Figures) -> None:
    print("\n== summary " + "=" * 89)
    target = f"< {TARGET_CHANGE_MS:g} ms"
    flows = [m.flows_s for m in fig.moves if m.flows_s is not None]
    if flows:
        med = statistics.median(flows) * 1e3
        row("change to flows, small", f"median {med:.1f} ms (min {min(flows) * 1e3:.1f}, max "
            f"{max(flows) * 1e3:.1f}, {len(flows)}/{len(fig.moves)})", target,
            med < TARGET_CHANGE_MS)
        call = statistics.median(m.change_s for m in fig.moves) * 1e3
        rpc = statistics.median(m.rpc_s for m in fig.moves) * 1e3
        share = statistics.median(m.flows_s - m.change_s for m in fig.moves
                                  if m.flows_s is not None) * 1e3
        row("  change() call", f"median {call:.1f} ms (database transactions {rpc:.1f} ms)")
        row("  agent's share", f"median {share:.1f} ms (OVN 23.03: {OVN_REFERENCE_MS:g} ms "
            "in all)")
    else:
        row("change to flows, small", "not measured", target)
    medians: dict[int, float] = {}
    for size in sorted(set(fig.big_moves) | set(fig.whole_moves)):
        for label, moves in (("O(change)", fig.big_moves.get(size, [])),
                             ("whole-document", fig.whole_moves.get(size, []))):
            fl = [m.flows_s for m in moves if m.flows_s is not None]
            if not fl:
                continue
            med = statistics.median(fl) * 1e3
            if label == "O(change)" and size:
                medians[size] = med
            call = [m.change_s for m in moves]
            agent = [m.flows_s - m.change_s for m in moves if m.flows_s is not None]
            row(f"change to flows, {size or 'small'}, {label}",
                f"median {med:.1f} ms, p95 {p95(fl) * 1e3:.1f}; dvr nb median "
                f"{statistics.median(call) * 1e3:.1f} (p95 {p95(call) * 1e3:.1f}), agent "
                f"median {statistics.median(agent) * 1e3:.1f} (p95 {p95(agent) * 1e3:.1f}); "
                f"n={len(fl)}", "< 20 ms" if label == "O(change)" else "",
                med < 20.0 if label == "O(change)" else None)
    if medians:
        flat = max(medians.values()) / min(medians.values())
        row("  flat across sizes", f"largest median {flat:.2f}x the smallest", "<= 1.5x",
            flat <= 1.5)
    for b in fig.bursts:
        row(f"burst of {b.changes}, {b.ports}, {'whole-document' if b.whole else 'O(change)'}",
            f"{b.converged_s:.2f} s to every agent converged (calls {b.calls_s:.2f} s, "
            f"median {statistics.median(b.calls) * 1e3:.1f} ms each)")
    for size, ld in fig.loads.items():
        row(f"load(), {size} ports", f"{ld.load_s:.2f} s; build_topology {ld.build_s:.2f} s "
            f"= {ld.build_s / ld.load_s:.0%}")
        row("  to all agents converged", f"{max(ld.converged_s.values()):.2f} s from load() "
            f"start ({ld.nodes} nodes, {ld.fips} FIPs)")
    if fig.small:
        base = statistics.median(r.sync_s for r in fig.small)
        base_own = statistics.median(r.sync_s - r.started_s for r in fig.small)
        row("agent full sync, small", f"median {base:.2f} s, {base_own:.2f} s after its first "
            "status")
        for size, rs in fig.restarts.items():
            med = statistics.median(r.sync_s for r in rs)
            own = statistics.median(r.sync_s - r.started_s for r in rs)
            row(f"agent full sync, {size}", f"median {med:.2f} s = {med / base:.1f}x small; "
                f"{own:.2f} s after first status = {own / base_own:.1f}x")
        base_rss = statistics.median(r.rss_kb for r in fig.small)
        row("agent RSS, small", f"{base_rss / 1024:.1f} MB, {fig.small[-1].flows} flows, "
            f"{fig.small[-1].vms} VMs bound")
        for size, rs in fig.restarts.items():
            rss = statistics.median(r.rss_kb for r in rs)
            row(f"agent RSS, {size}", f"{rss / 1024:.1f} MB = {rss / base_rss:.1f}x small "
                f"(peak {max(r.hwm_kb for r in rs) / 1024:.0f} MB), {rs[-1].flows} flows, "
                f"{rs[-1].vms} bound, {rs[-1].known} of {size} ports known")
    cl = [m.flows_s for m in fig.cluster_moves if m.flows_s is not None]
    if cl:
        row("change to flows, cluster", stats_ms(cl))
    fo = [f.move.flows_s for f in fig.failovers if f.move.flows_s is not None]
    if fo:
        base = statistics.median(cl) if cl else None
        ratio = f" = {statistics.median(fo) / base:.0f}x without failure" if base else ""
        row("  leader killed first", f"{stats_ms(fo)} from the kill{ratio}")
        row("  change() returned", f"{stats_ms([f.move.change_s for f in fig.failovers])} "
            "from the kill (the election)")
    elif fig.failovers or args.failovers:
        row("  leader killed first", "not measured")
    for e in fig.errors:
        print(f"  not measured: {e}")
    print("  (shared 2-core machine: the agents, ovs-vswitchd and this process compete for "
          "the CPU; figures are noisy)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--prefix", default="bnb", help="lab prefix (default: bnb)")
    ap.add_argument("--moves", type=int, default=20,
                    help="floating-IP moves on the small lab (default 20)")
    ap.add_argument("--big-moves", type=int, default=20,
                    help="floating-IP moves at each generated size (default 20; 0: none)")
    ap.add_argument("--baseline-moves", type=int, default=5,
                    help="the same moves by the whole-document path, the baseline, on the "
                         "small lab and at each size (default 5; 0: none)")
    ap.add_argument("--burst", type=int, default=200,
                    help="changes in a burst at each size (default 200; 0: none)")
    ap.add_argument("--baseline-burst-max", type=int, default=1000,
                    help="the burst also by the whole-document path up to this size "
                         "(default 1000)")
    ap.add_argument("--reps", type=int, default=3, help="agent restarts per size (default 3)")
    ap.add_argument("--sizes", default="100,1000,10000,100000",
                    help="generated cloud sizes in ports (default 100,1000,10000,100000)")
    ap.add_argument("--failovers", type=int, default=5,
                    help="leader failovers on a clustered lab (default 5; 0: no clustered "
                         "lab)")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="seconds to wait for agents to converge (default 300)")
    args = ap.parse_args()
    if not PREFIX_RE.match(args.prefix) or args.prefix == "dvr":
        print("nb: error: give a prefix of your own ([a-z][a-z0-9]{0,7}, not `dvr`)",
              file=sys.stderr)
        return 2
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if any(s < 100 for s in args.sizes):
        print("nb: error: sizes must be at least 100 ports", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("nb: error: the lab needs root", file=sys.stderr)
        return 1
    fig = Figures()
    fatal = None
    lab_down(args.prefix)  # a leftover from an interrupted run
    try:
        run(args, fig)
        lab_down(args.prefix)
        if args.failovers:
            run_failover(args, fig)
    except (BenchError, nb.NbError, subprocess.TimeoutExpired) as exc:
        fatal = str(exc)
        fig.errors.append(fatal)
    except KeyboardInterrupt:
        fatal = "interrupted"
    finally:
        lab_down(args.prefix)
        lab_down(f"{args.prefix}c"[:8])
    summary(args, fig)
    if fatal:
        print(f"nb: error: {fatal}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
