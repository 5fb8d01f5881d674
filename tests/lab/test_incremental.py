"""A stream of changes through the northbound database while traffic flows (issue 14): the
agents apply each change as a delta of their plan, and at the end every node holds exactly
the flows of a full plan of the final state, with its real ports.

Topology `northsouth.yaml`: vm3 (compute1) pings vm2 (compute2) on red, vm4 (compute2,
blue) pings vm3 through r1, for the whole stream; meanwhile 200 changes: VMs added on both
computes and on every network, removed again, a floating IP moved among them and vm5, vm1's
floating IP removed and set again. None touches the VMs of the two streams.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import pytest

from dvr import nb
from dvr.lab.lab import Lab
from dvr.trace.live import LiveTracer
from flows import northbound
from flows.ofp import OWNER_COOKIE
from tests.lab.harness import TOPOLOGIES, LabHandle, running_lab

TOPO = TOPOLOGIES / "northsouth.yaml"
CHANGES = 200
NODES = ("compute1", "compute2", "net1")


@pytest.fixture(scope="module")
def lab() -> Iterator[LabHandle]:
    with running_lab(TOPO) as handle:
        yield handle


def converged(lab: LabHandle, generation: str, timeout: float = 20.0) -> None:
    import json

    deadline = time.monotonic() + timeout
    while True:
        st = {}
        for node in NODES:
            try:
                st[node] = json.loads(
                    (lab.rundir / "nodes" / node / "agent-status.json").read_text())
            except (OSError, ValueError):
                st[node] = {}
        if all(s.get("generation") == generation and s.get("converged") for s in st.values()):
            return
        assert time.monotonic() < deadline, {n: (s.get("generation"), s.get("error"))
                                             for n, s in st.items()}
        time.sleep(0.1)


def test_a_stream_of_changes_loses_no_packet_and_ends_on_the_full_plan(lab: LabHandle
                                                                       ) -> None:
    rng = random.Random(14)
    conn = nb.Northbound(f"unix:{lab.rundir}/nb.sock")
    interval, seconds = 0.02, 10.0
    count = int(seconds / interval)
    same = lab.background(lab.ns("vm3"), "ping", "10.2.0.12", str(count), str(interval))
    routed = lab.background(lab.ns("vm4"), "ping", "10.2.0.13", str(count), str(interval))
    try:
        time.sleep(1.0)
        added: list[str] = []
        holders = ["vm5"]  # who holds the moving floating IP
        t0 = time.monotonic()
        generation = ""
        for i in range(CHANGES):
            kind = i % 4
            if kind == 0 or not added:
                name = f"x{i}"
                edit = northbound.vm_add(name, rng.choice(["compute1", "compute2"]),
                                         rng.choice(["blue", "red", "green"]))
                added.append(name)
            elif kind == 1 and len(added) > 3:
                gone = added.pop(rng.randrange(len(added) - 1))
                if gone in holders:
                    holders.remove(gone)
                edit = northbound.vm_del(gone)
            elif kind == 2:
                behind = [v for v in added if v not in holders]
                target = rng.choice(behind) if behind else "vm5"
                edit = northbound.fip_set(target, "203.0.113.60")
                holders[:] = [target]
            else:
                edit = (northbound.fip_del("vm1") if i % 8 == 3
                        else northbound.fip_set("vm1", "203.0.113.50"))
            generation = conn.change(edit)
        spent = time.monotonic() - t0
        print(f"{CHANGES} changes in {spent:.1f} s")
        converged(lab, generation)
    finally:
        conn.close()
    for name, proc in (("same network", same), ("routed", routed)):
        got = lab.result(proc, timeout=seconds + 30)
        assert got["received"] == got["sent"], (name, got, f"{spent:.1f} s of changes")
    tracer = LiveTracer(Lab(lab.prefix))
    for node in NODES:
        want = set(tracer.view(node).flows)
        have = {c for c in tracer.installed(node) if c >> 48 == OWNER_COOKIE}
        assert have == want, (node, len(have - want), len(want - have))
