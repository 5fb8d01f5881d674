#!/usr/bin/env python3
"""Programming-rate benchmark: prints figures, asserts nothing.

    python3 bench/program.py [--prefix bpg] [--sizes 2000,10000,40000] [--reps 3]

How fast a node's whole pipeline goes into its switch (an agent's start, an OVS restart),
against the fastest way OVS itself offers: `ovs-ofctl --bundle add-flows` of the very same
flows on the very same switch, in the same run.

For each size, a generated cloud (dvr/lab/generate.py: that many VMs over 10 compute nodes
and a network node, two networks a router, every tenth VM with a floating IP) is planned for
compute node c0 as if its switch had every port (its VMs, a tunnel to every other node, the
provider patch): about one flow per VM of the cloud plus the node's own. On the one-node lab
(tests/lab/topologies/one-node.yaml) with its agent stopped, the flows are then installed
--reps times each way into the empty br-int, alternating:

- **agent**: `agent.ofswitch.Switch.bundle()`, the agent's own path: every group, then every
  flow, in one atomic bundle, until the switch has committed it; encoding included, from
  nothing as at an agent's start, and again with the encodings the agent keeps (an OVS
  restart under a running agent);
- **ovs-ofctl**: the same groups with `ovs-ofctl add-groups` and the same flows, as text
  written beforehand, with `ovs-ofctl --bundle add-flows`, until the command returns.

Printed: flows per second each way (median), and their ratio (target: the agent at least
0.8 of ovs-ofctl). Both installs are checked by counting the flows on the bridge after them.
Needs root; the lab always goes down at the end.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent import ofencode  # noqa: E402
from agent.ofswitch import Switch  # noqa: E402
from bench.east_west import BenchError, lab, lab_down, last_line, verdict  # noqa: E402
from dvr.lab.generate import generate  # noqa: E402
from dvr.lab.lab import Lab, _kill_pidfile  # noqa: E402
from flows.model import build_topology  # noqa: E402
from flows.ofp import OWNER_COOKIE, Flow, Group, groups_of  # noqa: E402
from flows.planner import NodePorts, plan  # noqa: E402

NODE = "solo"  # the one-node lab's node
OWNED = f"cookie={OWNER_COOKIE << 48:#x}/{0xFFFF << 48:#x}"


def planned(vms: int) -> tuple[list[Flow], list[Group]]:
    """c0's flows and groups for a generated cloud of `vms` VMs."""
    doc = generate(vms, computes=10, network_nodes=1, networks=max(2, vms // 100),
                   fip_every=10)
    topo = build_topology(doc, "<generated>")
    mine = sorted(v.name for v in topo.vms.values() if v.node == "c0")
    peers = sorted(n for n in topo.nodes if n != "c0")
    ports = NodePorts(vms={name: 100 + i for i, name in enumerate(mine)},
                      tunnels={p: 10 + i for i, p in enumerate(peers)}, provider=2,
                      gateway_mac="02:00:00:00:00:01")
    flows = sorted(plan(topo, "c0", ports), key=lambda f: (f.table, -f.priority, f.cookie))
    return flows, sorted(groups_of(flows).values(), key=lambda g: g.group_id)


def ofctl(lb: Lab, *args: str) -> str:
    res = lb._sh(lb.node_ns(NODE), ["ovs-ofctl", "-O", "OpenFlow13", *args], node=NODE,
                 check=False)
    if res.returncode != 0:
        raise BenchError(f"ovs-ofctl {' '.join(args[:2])}: {res.stderr.strip()[-300:]}")
    return res.stdout


def clear(lb: Lab) -> None:
    ofctl(lb, "del-flows", "br-int", OWNED)
    ofctl(lb, "del-groups", "br-int")


def count(lb: Lab) -> int:
    out = ofctl(lb, "dump-flows", "br-int", OWNED)
    return sum(1 for ln in out.splitlines() if "cookie=" in ln)


def forget_encodings() -> None:
    """As a freshly started agent: nothing encoded yet."""
    ofencode.forget()


def by_agent(lb: Lab, flows: list[Flow], groups: list[Group], cold: bool) -> float:
    if cold:
        forget_encodings()
    sw = Switch(f"unix:{lb.node_dir(NODE) / 'br-int.mgmt'}")
    try:
        t0 = time.perf_counter()
        with sw.bundle() as b:
            b.add_groups(groups)
            b.add(flows)
        return time.perf_counter() - t0
    finally:
        sw.close()


def by_ofctl(lb: Lab, flows_file: Path, groups_file: Path, with_groups: bool) -> float:
    t0 = time.perf_counter()
    if with_groups:
        ofctl(lb, "add-groups", "br-int", str(groups_file))
    ofctl(lb, "--bundle", "add-flows", "br-int", str(flows_file))
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefix", default="bpg")
    ap.add_argument("--sizes", default="2000,10000,40000")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    lb = Lab(args.prefix)
    results: list[tuple[int, int, list[float], list[float]]] = []
    try:
        res = lab(args.prefix, "up", str(ROOT / "tests" / "lab" / "topologies" /
                                         "one-node.yaml"))
        if res.returncode != 0:
            raise BenchError(f"lab could not be built: {last_line(res)}")
        _kill_pidfile(lb.node_dir(NODE) / "agent.pid", signal.SIGTERM)
        with tempfile.TemporaryDirectory() as tmp:
            for size in sizes:
                print(f"{size} VMs: planning ...", flush=True)
                flows, groups = planned(size)
                flows_file, groups_file = Path(tmp) / "flows.txt", Path(tmp) / "groups.txt"
                flows_file.write_text("".join(f.to_ofctl() + "\n" for f in flows))
                groups_file.write_text("".join(g.to_ofctl() + "\n" for g in groups))
                agent_times, warm_times, ofctl_times = [], [], []
                for _ in range(args.reps):
                    for way in ("agent", "agent, warm", "ovs-ofctl"):
                        clear(lb)
                        if way == "agent":
                            agent_times.append(by_agent(lb, flows, groups, cold=True))
                        elif way == "agent, warm":
                            warm_times.append(by_agent(lb, flows, groups, cold=False))
                        else:
                            ofctl_times.append(by_ofctl(lb, flows_file, groups_file,
                                                        bool(groups)))
                        got = count(lb)
                        if got != len(flows):
                            raise BenchError(f"{way}: {got} flows on the bridge, "
                                             f"{len(flows)} planned")
                results.append((size, len(flows), agent_times, warm_times, ofctl_times))
                print(f"  {len(flows)} flows, {len(groups)} groups: agent "
                      f"{statistics.median(agent_times):.3f} s (warm "
                      f"{statistics.median(warm_times):.3f} s), ovs-ofctl "
                      f"{statistics.median(ofctl_times):.3f} s", flush=True)
    except BenchError as exc:
        print(f"bench/program.py: {exc}", file=sys.stderr)
        return 1
    finally:
        lab_down(args.prefix)
    print("\n== summary " + "=" * 89)
    for size, n, agent_times, warm_times, ofctl_times in results:
        a, o = n / statistics.median(agent_times), n / statistics.median(ofctl_times)
        w = n / statistics.median(warm_times)
        print(f"  {size:>6} VMs, {n:>6} flows: agent {a:>9,.0f} flows/s, ovs-ofctl "
              f"{o:>9,.0f} flows/s, ratio {a / o:.2f}   target >= 0.8: {verdict(a / o >= 0.8)}")
        print(f"  {'':>6}       {'':>6}        agent with its encodings kept (an OVS restart) "
              f"{w:>9,.0f} flows/s, ratio {w / o:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
