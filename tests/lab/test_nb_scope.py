"""Conditional monitoring in a real lab: each agent keeps of the northbound database only the
ports its node's flows can depend on (`flows.planner.scope`), follows changes that widen
that scope, and a restart removes no flow.

Topology `scope.yaml`: compute1 hosts vm1 alone on an isolated network; compute2 hosts vm2
(blue, floating IP) and vm3 (red), routed by r1; compute3 hosts vm4 (red) and vm5 (green, on
no router); net1 runs r1's SNAT.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.source import NbSource
from dvr import nb
from flows import northbound
from flows.model import Topology, load_topology
from flows.planner import scope
from tests.lab.harness import TOPOLOGIES, LabHandle, ext_ping, nb_cli, running_lab

TOPO = TOPOLOGIES / "scope.yaml"
REMOTE = "198.51.100.10"  # the external host's "internet" address
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def lab() -> Iterator[LabHandle]:
    with running_lab(TOPO) as handle:
        yield handle


# --- helpers ---------------------------------------------------------------------------------


def nb_target(lab: LabHandle) -> str:
    return f"unix:{lab.rundir}/nb.sock"


def desired(lab: LabHandle) -> tuple[Topology, str]:
    """The whole cloud in the lab's database, and its generation."""
    conn = nb.Northbound(nb_target(lab))
    try:
        generation = conn.transact([{"op": "select", "table": "NB_Global", "where": []}]
                                   )[0]["rows"][0]["generation"]
        return conn.topology(), generation
    finally:
        conn.close()


def in_scope(topo: Topology, node: str) -> set[str]:
    sc = scope(topo, node)
    return {name for name, vm in topo.vms.items() if sc.holds(vm)}


def agent_status(lab: LabHandle, node: str) -> dict[str, Any]:
    path = lab.rundir / "nodes" / node / "agent-status.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def wait_known(lab: LabHandle, expected: dict[str, set[str]]) -> None:
    """Until every agent has converged on the database's generation, holding exactly the
    VMs `expected` says (checked against `scope()` of the whole cloud as well)."""
    topo, generation = desired(lab)
    for node, names in expected.items():
        assert in_scope(topo, node) == names, node
    deadline = time.monotonic() + TIMEOUT
    while True:
        st = {n: agent_status(lab, n) for n in expected}
        if all(s.get("generation") == generation and s.get("converged")
               and s.get("known_vms") == len(expected[n]) for n, s in st.items()):
            return
        assert time.monotonic() < deadline, {
            n: (s.get("known_vms"), s.get("generation") == generation, s.get("error"))
            for n, s in st.items()}
        time.sleep(0.1)


def flows(lab: LabHandle, node: str) -> dict[str, float]:
    """The node's flows of ours: cookie -> seconds since it was installed."""
    out = lab.node(node, "ovs-ofctl", "-O", "OpenFlow13", "dump-flows", "br-int")
    return {c: float(d) for c, d in re.findall(r"cookie=(0xd7a5[0-9a-f]+), duration=([\d.]+)s",
                                               out)}


INITIAL = {
    "compute1": {"vm1"},  # iso alone
    "compute2": {"vm2", "vm3", "vm4"},  # blue and red (r1); the only floating IP is vm2's
    "compute3": {"vm2", "vm3", "vm4", "vm5"},  # red, blue through r1, green; NATs nothing
    "net1": {"vm2", "vm3", "vm4"},  # r1's SNAT: blue and red, and every floating IP
}


# --- the tests ---------------------------------------------------------------------------------


def test_each_agent_knows_exactly_its_scope_and_traffic_flows(lab: LabHandle) -> None:
    wait_known(lab, INITIAL)
    assert lab.ping("vm2", "10.2.0.14")  # compute2 -> compute3, routed
    assert lab.ping("vm4", "10.1.0.12")
    assert lab.ping("vm3", "10.2.0.14")  # same network, across nodes
    assert ext_ping(lab, "203.0.113.50", source=REMOTE)  # vm2's floating IP, on compute2
    assert lab.ping("vm4", REMOTE)  # SNAT on net1
    assert not lab.ping("vm1", "10.2.0.13", wait=1)  # iso is routed nowhere


def test_a_router_interface_brings_its_networks_into_scope(lab: LabHandle) -> None:
    """`router-if-add r1 iso`: compute1 learns blue's and red's ports, and vm1 reaches
    them (its default route set, as DHCP would once the subnet has a router)."""
    every = {"vm1", "vm2", "vm3", "vm4"}
    nb_cli(nb_target(lab), "router-if-add", "r1", "iso")
    try:
        wait_known(lab, {"compute1": every, "compute2": every,
                         "compute3": every | {"vm5"}, "net1": every})
        lab.exec("vm1", "ip", "route", "replace", "default", "via", "10.9.0.1", check=True)
        assert lab.ping("vm1", "10.2.0.13")  # compute1 -> compute2
        assert lab.ping("vm1", "10.1.0.12")
        assert lab.ping("vm4", "10.9.0.11")  # compute3 -> compute1
    finally:
        lab.exec("vm1", "ip", "route", "del", "default")
        nb_cli(nb_target(lab), "router-if-del", "r1", "iso")
    wait_known(lab, INITIAL)
    assert not lab.ping("vm1", "10.2.0.13", wait=1)


def test_a_vm_on_a_new_network_brings_its_neighbours(lab: LabHandle, tmp_path: Path) -> None:
    """`vm-add vm6 --node compute1 --network green`: compute1 learns vm5 (green, on
    compute3) from the database; once Nova (the lab) plugs vm6, they talk."""
    nb_cli(nb_target(lab), "vm-add", "vm6", "--node", "compute1", "--network", "green",
           "--ip", "10.3.0.16")
    try:
        wait_known(lab, {**INITIAL, "compute1": {"vm1", "vm5", "vm6"},
                         "compute3": INITIAL["compute3"] | {"vm6"}})
        data = yaml.safe_load(TOPO.read_text())
        data["vms"]["vm6"] = {"node": "compute1", "network": "green", "ip": "10.3.0.16",
                              "mac": desired(lab)[0].vms["vm6"].mac}
        with_vm6 = tmp_path / "with-vm6.yaml"
        with_vm6.write_text(yaml.safe_dump(data, sort_keys=False))
        lab.dvr("apply", str(with_vm6))  # plugs vm6; the database already holds it
        assert lab.ping("vm6", "10.3.0.15")
        assert lab.ping("vm5", "10.3.0.16")
    finally:
        lab.dvr("apply", str(TOPO))
    wait_known(lab, INITIAL)


def test_an_agent_restart_removes_no_flow(lab: LabHandle) -> None:
    """Each agent restarts with an empty copy; it plans only once the copy is complete, so
    every flow keeps counting from its first install."""
    wait_known(lab, INITIAL)
    for node in ("compute2", "compute3", "net1", "compute1"):
        before = flows(lab, node)
        assert before
        lab.dvr("restart-agent", node)
        time.sleep(0.5)  # a sync after the convergence would show here too
        after = flows(lab, node)
        assert set(after) == set(before), node
        assert all(after[c] >= age for c, age in before.items()), node
    wait_known(lab, INITIAL)
    assert lab.ping("vm2", "10.2.0.14") and ext_ping(lab, "203.0.113.50", source=REMOTE)


# --- the source alone, against a database server of its own -----------------------------------


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[Callable[[bool], None]]:
    """A standalone ovsdb-server holding scope.yaml; call it with False to kill it, True to
    start it again on the same file."""
    db, sock = tmp_path / "nb.db", tmp_path / "nb.sock"
    subprocess.run(["ovsdb-tool", "create", str(db), str(northbound.SCHEMA)], check=True)
    proc: list[subprocess.Popen] = []

    def run(up: bool) -> None:
        if not up:
            proc[0].send_signal(signal.SIGKILL)
            proc.pop().wait()
            sock.unlink(missing_ok=True)
            return
        proc.append(subprocess.Popen(
            ["ovsdb-server", str(db), f"--remote=punix:{sock}", f"--unixctl={tmp_path}/ctl",
             "--no-chdir", f"--log-file={tmp_path}/log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)

    run(True)
    conn = nb.Northbound(f"unix:{sock}")
    try:
        conn.load(load_topology(TOPO))
    finally:
        conn.close()
    try:
        yield run
    finally:
        if proc:
            run(False)


def handed_out(src: NbSource, seconds: float) -> list[set[str]]:
    """The VMs of every state the source hands out within `seconds`."""
    out = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if src.poll():
            out.append(set(src.load().vms))
        time.sleep(0.005)
    return out


def test_the_source_hands_out_only_complete_copies(server: Callable[[bool], None],
                                                   tmp_path: Path) -> None:
    """From the start, after a change that widens the scope, and across a database
    restart: every state handed out holds the node's whole scope, and the copy holds no
    other agent's row."""
    target = f"unix:{tmp_path}/nb.sock"
    src = NbSource(f"{target},unix:{tmp_path}/absent.sock", "compute1")
    try:
        assert handed_out(src, 1.0) == [{"vm1"}]
        src.report("compute1", {"version": "test", "heartbeat": time.time()})
        other = nb.Northbound(target)
        try:
            other.transact([{"op": "insert", "table": "Agent", "row": {"node": "compute2"}}])
            other.change(northbound.vm_add("vm6", "compute1", "green", ip="10.3.0.16"))
        finally:
            other.close()
        assert handed_out(src, 1.0) == [{"vm1", "vm5", "vm6"}]  # vm5 with vm6, not after
        assert [r.node for r in src.idl.tables["Agent"].rows.values()] == ["compute1"]
        server(False)
        assert handed_out(src, 0.5) == []
        server(True)
        assert handed_out(src, 2.0) in ([], [{"vm1", "vm5", "vm6"}])  # a refill, same state
        assert set(src.load().vms) == {"vm1", "vm5", "vm6"}
    finally:
        src.close()
