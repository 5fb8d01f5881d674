"""The northbound database as a 3-member RAFT cluster (`dvr lab up --nb-cluster 3`).

The members run in their own namespaces on the underlay; the agents are given all three
over TCP and the `dvr nb` commands all three over unix sockets. The leader is killed
(kill -9) while changes stream in: every change lands exactly once (the database counts
the changes it committed), the agents move to the survivors and follow, the traffic never
stops, and the killed member rejoins with the cluster's state.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dvr import nb
from flows import northbound
from tests.lab.harness import (
    TOPOLOGIES,
    LabHandle,
    dvr,
    echo_requests,
    ext_ping,
    nb_cli,
    running_lab,
)

FIP1, FIP2 = "203.0.113.50", "203.0.113.60"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lab() -> Iterator[LabHandle]:
    with running_lab(TOPOLOGIES / "cluster.yaml", "--nb-cluster", "3") as lab:
        yield lab


def lab_northbound(lab: LabHandle) -> dict[str, Any]:
    return lab.status()["northbound"]


def select(conn: str, table: str) -> list[dict[str, Any]]:
    db = nb.Northbound(conn, timeout=15)
    try:
        return db.transact([{"op": "select", "table": table, "where": []}])[0]["rows"]
    finally:
        db.close()


def counted_changes(conn: str) -> tuple[str, int]:
    """The desired state's generation and how many changes the database committed."""
    row = select(conn, "NB_Global")[0]
    return row["generation"], row["changes"]


def wait_agents_on(conn: str, generation: str, nodes: set[str], timeout: float) -> None:
    """Until every agent reports, in the database, that it converged on `generation`."""
    deadline = time.monotonic() + timeout
    while True:
        rows = {r["node"]: r for r in select(conn, "Agent")}
        behind = {n for n in nodes
                  if rows.get(n, {}).get("generation") != generation
                  or not rows[n]["converged"]}
        if not behind:
            return
        assert time.monotonic() < deadline, f"agents of {sorted(behind)} did not follow"
        time.sleep(0.1)


def member_of(lab: LabHandle, node: str, members: dict[str, Any]) -> str | None:
    """The member the node's agent is connected to (from the node's TCP sockets)."""
    out = lab.node(node, "ss", "-tnH", "state", "established")
    by_ip = {m["address"]: name for name, m in members.items()}
    for line in out.splitlines():
        m = re.search(r"(\d+\.\d+\.\d+\.\d+):6641\s*$", line)
        if m and m.group(1) in by_ip:
            return by_ip[m.group(1)]
    return None


def member_copy(lab: LabHandle, member: str) -> dict[str, Any]:
    """The desired state as this one member holds it (asked directly, leader or not)."""
    db = nb.Northbound(f"unix:{lab.rundir}/{member}/nb.sock", timeout=5)
    try:
        return db.dump()
    finally:
        db.close()


def test_the_cluster_forms_and_the_agents_watch_it(lab: LabHandle) -> None:
    north = lab_northbound(lab)
    assert north["model"] == "clustered"
    assert sorted(m["role"] for m in north["members"].values()) == [
        "follower", "follower", "leader"]
    assert north["agents_connection"].split(",") == [
        f"ssl:{m['address']}:6641" for m in north["members"].values()]
    assert north["transport"] == "ssl" and north["pki"] == str(lab.rundir / "pki")
    # every agent holds a live connection to one member, over the underlay
    for node in ("compute1", "compute2", "net1"):
        assert member_of(lab, node, north["members"]) is not None, node
    # each member holds the same desired state, replicated
    copies = [member_copy(lab, m) for m in north["members"]]
    assert copies[0] == copies[1] == copies[2]
    assert copies[0]["vms"]["vm1"]["floating_ip"] == FIP1
    assert all(n["agent"]["converged"] for n in lab.status()["nodes"].values())
    # `dvr nb --lab PREFIX` finds the members by itself
    assert "vm vm1 on compute1: blue 10.1.0.11" in dvr("nb", "--lab", lab.prefix, "show").stdout
    # a dead member is refused by name; `kill-nb` without one is the leader's
    res = lab.dvr("kill-nb", "nb7", check=False)
    assert res.returncode != 0 and "unknown northbound member 'nb7'" in res.stderr


def test_the_leader_killed_during_a_stream_of_changes(lab: LabHandle) -> None:
    """kill -9 of the leader while `dvr nb` changes stream in: none is lost or applied
    twice, the agents reconnect to the survivors and follow, traffic never stops, and
    the killed member rejoins with the cluster's state."""
    north = lab_northbound(lab)
    conn = north["connection"]
    nodes = {"compute1", "compute2", "net1"}
    _, before = counted_changes(conn)
    commands: list[tuple[str, ...]] = []
    for i in range(1, 13):
        commands.append(("vm-add", f"s{i}", "--node", "compute1" if i % 2 else "compute2",
                         "--network", "red", "--ip", f"10.2.0.{100 + i}"))
        commands.append(("fip-set", "vm4" if i % 2 else "vm1", FIP1))
    done: list[tuple[tuple[str, ...], int, str]] = []

    def stream() -> None:
        for args in commands:
            res = nb_cli(conn, *args, check=False)
            done.append((args, res.returncode, res.stderr.strip()))

    traffic: dict[str, Any] = {}

    def east_west() -> None:  # routed, across nodes, paced over the whole stream
        traffic["tcp"] = lab.tcp_transfer("vm1", "vm2", "10.2.0.12", 1400 * 3000, pace=0.003)

    def north_south() -> None:  # the external host to a floating IP that stays put
        res = lab.dvr("ext", "--", "ping", "-n", "-q", "-i", "0.05", "-c", "200", "-W", "1",
                      FIP2, check=False)
        m = re.search(r"(\d+) received", res.stdout)
        traffic["ping"] = int(m.group(1)) if m else 0

    threads = [threading.Thread(target=f) for f in (east_west, north_south, stream)]
    for t in threads:
        t.start()
    while len(done) < 6 and threads[2].is_alive():
        time.sleep(0.05)
    killed = lab.dvr("kill-nb").stdout.split()[-1]
    killed_at = len(done)
    for t in threads:
        t.join(timeout=120)
    assert killed in north["members"] and killed_at < len(commands)
    assert north["members"][killed]["role"] == "leader"

    # every change was accepted, and the database counted each exactly once
    assert [(args, rc) for args, rc, _ in done] == [(args, 0) for args in commands], done
    generation, after = counted_changes(conn)
    assert after - before == len(commands)
    state = nb.Northbound(conn, timeout=15)
    try:
        doc = state.dump()
    finally:
        state.close()
    assert {f"s{i}" for i in range(1, 13)} <= set(doc["vms"])
    assert doc["vms"]["vm1"].get("floating_ip") == FIP1  # the last move was back to vm1
    assert "floating_ip" not in doc["vms"]["vm4"]

    # the agents reconnected to the survivors and followed the last change
    wait_agents_on(conn, generation, nodes, timeout=15)
    survivors = {m: v for m, v in north["members"].items() if m != killed}
    for node in sorted(nodes):
        assert member_of(lab, node, survivors) is not None, f"{node} is not on a survivor"

    # the traffic never stopped
    assert traffic["tcp"]["max_gap"] < 0.3, traffic
    assert traffic["ping"] >= 196, traffic
    with lab.sniff(lab.vm_ns("vm1"), proto="icmp") as cap:
        assert ext_ping(lab, FIP1)
    assert {p["dst"] for p in echo_requests(cap.packets)} == {"10.1.0.11"}

    # the killed member rejoins and catches up
    lab.dvr("start-nb", killed)
    roles = {m: v["role"] for m, v in lab_northbound(lab)["members"].items()}
    assert roles[killed] in ("follower", "leader") and sorted(roles.values()).count(
        "leader") == 1, roles
    deadline = time.monotonic() + 10
    while member_copy(lab, killed) != doc:
        assert time.monotonic() < deadline, f"{killed} did not catch up"
        time.sleep(0.1)

    # back to the lab's own state: the added ports go again
    for i in range(1, 13):
        nb_cli(conn, "vm-del", f"s{i}")
    generation, _ = counted_changes(conn)
    wait_agents_on(conn, generation, nodes, timeout=15)


def test_agents_move_off_the_member_they_watch(lab: LabHandle) -> None:
    """Agents spread over the members (each node's own order); the member most of them
    watch is killed: they reconnect to the others and follow the next change."""
    north = lab_northbound(lab)
    conn = north["connection"]
    nodes = {"compute1", "compute2", "net1"}
    on = {n: member_of(lab, n, north["members"]) for n in sorted(nodes)}
    assert None not in on.values(), on
    victim = max(set(on.values()), key=lambda m: list(on.values()).count(m))
    lab.dvr("kill-nb", victim)
    try:
        nb_cli(conn, "fip-set", "vm3", FIP1)
        generation, _ = counted_changes(conn)
        wait_agents_on(conn, generation, nodes, timeout=15)
        survivors = {m: v for m, v in north["members"].items() if m != victim}
        for node in sorted(nodes):
            assert member_of(lab, node, survivors) is not None, f"{node} is not on a survivor"
        with lab.sniff(lab.vm_ns("vm3"), proto="icmp") as cap:
            assert ext_ping(lab, FIP1)
        assert {p["dst"] for p in echo_requests(cap.packets)} == {"10.2.0.13"}
    finally:
        lab.dvr("start-nb", victim)
        nb_cli(conn, "fip-set", "vm1", FIP1)


def test_a_change_cut_short_by_the_leader_failing_lands_once(lab: LabHandle) -> None:
    """Changes back to back from one client while the leader dies: one of them is most
    likely in flight; the client finds the new leader, learns from NB_Global alone whether
    it was committed and never writes it twice."""
    north = lab_northbound(lab)
    conn = north["connection"]
    _, before = counted_changes(conn)
    client = nb.Northbound(conn, timeout=15)
    reconnects = []
    original = client._reconnect

    def counting_reconnect() -> None:
        reconnects.append(client.remote)
        original()

    client._reconnect = counting_reconnect  # type: ignore[method-assign]
    names: list[str] = []  # the changes sent: until 20 more once the leader is dead
    landed: list[str] = []
    errors: list[str] = []
    kill_done = threading.Event()

    def writer() -> None:
        after_kill = 0
        for i in range(180):  # blue has room for 180 more addresses from .60
            if kill_done.is_set():
                after_kill += 1
                if after_kill > 20:
                    return
            name = f"c{i}"
            names.append(name)
            try:
                client.vm_add(name, "compute2", "blue", f"10.1.0.{60 + i}")
                landed.append(name)
            except (nb.NbError, northbound.ChangeError) as exc:
                errors.append(f"{name}: {exc}")

    t = threading.Thread(target=writer)
    t.start()
    while len(landed) < 30 and t.is_alive():
        time.sleep(0.005)
    killed = lab.dvr("kill-nb").stdout.split()[-1]
    kill_done.set()
    t.join(timeout=120)
    client.close()
    try:
        assert not errors, errors
        assert landed == names
        assert reconnects, "the writer never noticed the leader go"
        generation, after = counted_changes(conn)
        assert after - before == len(names)
        doc = nb.Northbound(conn, timeout=15).dump()
        assert {n for n in doc["vms"] if n.startswith("c")} == set(names)
    finally:
        lab.dvr("start-nb", killed)
        cleanup = nb.Northbound(conn, timeout=15)
        try:
            cleanup.change(lambda d: {**d, "vms": {n: v for n, v in d["vms"].items()
                                                   if n not in set(names)}})
        finally:
            cleanup.close()
    generation, _ = counted_changes(conn)
    wait_agents_on(conn, generation, {"compute1", "compute2", "net1"}, timeout=15)
    assert all(n["agent"]["converged"] for n in lab.status()["nodes"].values())


def test_the_whole_cluster_down_then_back(lab: LabHandle) -> None:
    """Every member killed: the agents keep forwarding on their last state; the members
    restarted, the cluster re-forms from their files and the agents resync."""
    conn = lab_northbound(lab)["connection"]
    generation, _ = counted_changes(conn)
    for member in ("nb1", "nb2", "nb3"):
        lab.dvr("kill-nb", member)
    assert {m["role"] for m in lab_northbound(lab)["members"].values()} == {"down"}
    assert lab.ping("vm1", "10.2.0.12", count=3)
    assert ext_ping(lab, FIP2)
    lab.dvr("start-nb")
    assert sorted(m["role"] for m in lab_northbound(lab)["members"].values()) == [
        "follower", "follower", "leader"]
    nb_cli(conn, "fip-set", "vm3", FIP1)
    try:
        new, _ = counted_changes(conn)
        assert new != generation
        wait_agents_on(conn, new, {"compute1", "compute2", "net1"}, timeout=15)
        with lab.sniff(lab.vm_ns("vm3"), proto="icmp") as cap:
            assert ext_ping(lab, FIP1)
        assert {p["dst"] for p in echo_requests(cap.packets)} == {"10.2.0.13"}
    finally:
        nb_cli(conn, "fip-set", "vm1", FIP1)


def test_cluster_flags_are_checked(lab: LabHandle) -> None:
    res = lab.dvr("up", "--nb-cluster", "5", check=False)
    assert res.returncode != 0
    assert "runs its northbound database as 3 members" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = dvr("lab", "--prefix", "tz" + lab.prefix[2:], "up", "--nb-cluster", "0",
              check=False)
    assert res.returncode != 0 and "between 1 and 9 members" in res.stderr



# --- TLS and RBAC: who gets in, and what each may write -----------------------------------
# The lab's databases speak TLS by default, with its own PKI; each agent's connection has
# the role dvr-agent (it may write only the Agent row named by its certificate's CN), each
# scheduler's dvr-scheduler (only routers' HA chains); the roleless remote is on the
# members' loopback only. These tests run clients inside the lab's namespaces.

def nbclient(lab: LabHandle, ns: str, remote: str, ops: list[dict[str, Any]] | None = None,
             *flags: str, who: tuple[str, str, str] | None = None) -> dict[str, Any]:
    """One attempt of tests/lab/nbclient.py from namespace `ns` (who: key, cert, CA)."""
    args = [sys.executable, "-m", "tests.lab.nbclient", remote]
    if ops is not None:
        args.append(json.dumps(ops))
    if who is not None:
        args += ["--key", who[0], "--cert", who[1], "--ca", who[2]]
    out = subprocess.run(["ip", "netns", "exec", ns, *args, *flags], capture_output=True,
                         text=True, timeout=30, cwd=REPO, check=True)
    return json.loads(out.stdout)


def refused(reply: dict[str, Any]) -> bool:
    """A transaction refused by RBAC: its (one) operation's error is a permission error."""
    result = reply.get("result") or []
    return (reply["stage"] == "answer" and bool(result)
            and isinstance(result[0], dict) and result[0].get("error") == "permission error")


def all_rows(conn: str) -> dict[str, list[dict[str, Any]]]:
    """Every table but the agents' reports (their heartbeats move), as the database holds it."""
    tables = [*northbound.DESIRED_TABLES, *northbound.ACCESS_TABLES]
    db = nb.Northbound(conn, timeout=15)
    try:
        res = db.transact([{"op": "select", "table": t, "where": []} for t in tables])
    finally:
        db.close()
    return {t: sorted(r["rows"], key=lambda x: x["_uuid"][1])
            for t, r in zip(tables, res, strict=True)}


def agent_row(conn: str, node: str) -> dict[str, Any]:
    return next(r for r in select(conn, "Agent") if r["node"] == node)


def metric(lab: LabHandle, node: str, name: str) -> float:
    """The sum of a metric's samples, from the node's agent's Prometheus endpoint."""
    url = lab.status()["nodes"][node]["agent"]["metrics"]
    text = lab.node(node, sys.executable, "-c",
                    f"import urllib.request; print(urllib.request.urlopen({url!r}).read()"
                    ".decode())")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def test_every_member_refuses_a_client_it_cannot_trust(lab: LabHandle, tmp_path: Path
                                                       ) -> None:
    """No certificate, one of another CA, an expired one: refused at the handshake by
    every member on each of its remotes (agents', schedulers', RAFT's), and logged by it;
    plain TCP to a TLS remote gets no answer; the lab's own certificate is let in."""
    from dvr.lab.pki import Pki

    pki = Pki(lab.rundir / "pki")
    other = Pki(tmp_path / "other")          # another CA, a certificate of the same CN
    other.issue("compute1")
    expired = Pki(tmp_path / "expired")      # the lab's CA, a certificate already expired
    expired.dir.mkdir()
    shutil.copy(pki.cacert, expired.cacert)
    shutil.copy(pki.cakey, expired.cakey)
    expired.issue("compute1", days=-1)
    ns = lab.node_ns("compute1")
    members = lab_northbound(lab)["members"]
    for (name, m), port in itertools.product(members.items(), (6641, 6642, 6643)):
        # the agents', the schedulers' and the members' own (RAFT) remotes
        remote = f"tcp:{m['address']}:{port}"
        log = lab.rundir / name / "nb.log"
        before = log.read_text().count("SSL")
        if port != 6643:  # (RAFT speaks no JSON-RPC to a client)
            assert nbclient(lab, ns, remote, who=pki.files("compute1"))["stage"] == "answer"
        for what, reply in (
                ("no certificate", nbclient(lab, ns, remote, None, "--no-cert",
                                            who=("", "", str(pki.cacert)))),
                ("another CA", nbclient(lab, ns, remote, who=(
                    str(other.key("compute1")), str(other.cert("compute1")),
                    str(pki.cacert)))),
                ("expired", nbclient(lab, ns, remote, who=(
                    str(expired.key("compute1")), str(expired.cert("compute1")),
                    str(pki.cacert))))):
            assert reply["stage"] == "handshake" and reply.get("result") is None, (
                name, what, reply)
        plain = nbclient(lab, ns, remote, None, "--plain")
        assert plain.get("result") is None and plain["stage"] != "connect", (name, plain)
        # the member logged each refused handshake (OpenSSL's reason, the peer's address)
        deadline = time.monotonic() + 5
        while log.read_text().count("SSL") < before + 3:
            assert time.monotonic() < deadline, f"{name} logged no refused handshake"
            time.sleep(0.1)
        # the remote without a role is on the member's loopback only: not on the underlay
        if port == 6641:
            assert nbclient(lab, ns, f"tcp:{m['address']}:6644",
                            who=pki.files("admin"))["stage"] == "connect"
    # ... where operators' tools reach it with the admin certificate
    first = next(iter(members))
    out = subprocess.run(
        ["ip", "netns", "exec", f"{lab.prefix}-{first}", sys.executable, "-m", "dvr.cli",
         "nb", "--db", "ssl:127.0.0.1:6644", "-p", str(pki.key("admin")),
         "-c", str(pki.cert("admin")), "-C", str(pki.cacert), "get-connection"],
        capture_output=True, text=True, timeout=30, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["role=dvr-agent pssl:6641",
                                          "role=dvr-scheduler pssl:6642"], out.stdout


def test_an_agents_certificate_writes_its_own_report_and_nothing_else(lab: LabHandle
                                                                      ) -> None:
    """With compute1's certificate: compute2's report, a new port, a floating IP moved, a
    network deleted, the remotes changed, each refused; the database and the dataplane
    are unchanged. Its own report it may write. The schedulers' role may reorder a
    router's HA chain and nothing else."""
    from dvr.lab.pki import Pki

    pki = Pki(lab.rundir / "pki")
    conn = lab_northbound(lab)["connection"]
    members = lab_northbound(lab)["members"]
    address = next(iter(members.values()))["address"]
    c1 = pki.files("compute1")
    rows = all_rows(conn)
    port = {r["name"]: r for r in rows["Port"]}
    blue = next(r for r in rows["Network"] if r["name"] == "blue")
    forged = {
        "compute2's report": [{"op": "update", "table": "Agent",
                               "where": [["node", "==", "compute2"]],
                               "row": {"converged": False, "error": "forged"}}],
        "a report in compute2's name": [{"op": "insert", "table": "Agent",
                                         "row": {"node": "compute2", "error": "forged"}}],
        "its own report renamed": [{"op": "update", "table": "Agent",
                                    "where": [["node", "==", "compute1"]],
                                    "row": {"node": "compute9"}}],
        "a new port": [{"op": "insert", "table": "Port", "row": {
            "name": "evil", "node": port["vm1"]["node"], "network": blue["_uuid"],
            "ip": "10.1.0.99", "mac": "fa:16:3e:00:00:99"}}],
        "a floating IP moved": [
            {"op": "update", "table": "Port", "where": [["name", "==", "vm1"]],
             "row": {"floating_ip": ["set", []]}},
            {"op": "update", "table": "Port", "where": [["name", "==", "vm3"]],
             "row": {"floating_ip": FIP1}}],
        "a network deleted": [{"op": "delete", "table": "Network",
                               "where": [["name", "==", "blue"]]}],
        "the generation": [{"op": "mutate", "table": "NB_Global", "where": [],
                            "mutations": [["changes", "+=", 1]]}],
        "the remotes": [{"op": "update", "table": "NB_Global", "where": [],
                         "row": {"connections": ["set", []]}}],
        "the roles": [{"op": "delete", "table": "RBAC_Role", "where": []}],
    }
    for what, ops in forged.items():
        reply = nbclient(lab, lab.node_ns("compute1"), f"tcp:{address}:6641", ops, who=c1)
        assert refused(reply), (what, reply)
        assert "compute1" in reply["result"][0]["details"], reply  # who, and what
    assert all_rows(conn) == rows
    assert agent_row(conn, "compute2")["error"] != "forged"
    assert all(r["node"] in ("compute1", "compute2", "net1") for r in select(conn, "Agent"))
    # its own report it may write (the agent writes it anew within a second)
    own = nbclient(lab, lab.node_ns("compute1"), f"tcp:{address}:6641", [
        {"op": "update", "table": "Agent", "where": [["node", "==", "compute1"]],
         "row": {"flows": 1}}], who=c1)
    assert own["stage"] == "answer" and own["result"][0] == {"count": 1}, own

    # the schedulers' remote: a router's chain (written back as it is), nothing else
    r1 = next(r for r in rows["Router"] if r["name"] == "r1")
    net1 = pki.files("net1")
    chain = nbclient(lab, lab.node_ns("net1"), f"tcp:{address}:6642", [
        {"op": "update", "table": "Router", "where": [["name", "==", "r1"]],
         "row": {"snat_chain": r1["snat_chain"]}}], who=net1)
    assert chain["stage"] == "answer" and chain["result"][0] == {"count": 1}, chain
    for ops in ([{"op": "update", "table": "Router", "where": [["name", "==", "r1"]],
                  "row": {"external_ip": "203.0.113.99"}}],
                [{"op": "update", "table": "Agent", "where": [["node", "==", "compute2"]],
                  "row": {"converged": False}}]):
        assert refused(nbclient(lab, lab.node_ns("net1"), f"tcp:{address}:6642", ops,
                                who=net1)), ops
    assert all_rows(conn) == rows

    # the dataplane did not move: the floating IP still lands on vm1, east-west routes
    with lab.sniff(lab.vm_ns("vm1"), proto="icmp") as cap:
        assert ext_ping(lab, FIP1)
    assert {p["dst"] for p in echo_requests(cap.packets)} == {"10.1.0.11"}
    assert lab.ping("vm1", "10.2.0.12")
    assert all(n["agent"]["converged"] for n in lab.status()["nodes"].values())


def test_a_rotated_certificate_is_taken_without_a_loss(lab: LabHandle) -> None:
    """compute1's key and certificate replaced on disk (same CN) while traffic flows: the
    agent reconnects with them, its reports go on, no packet is lost. A certificate of
    another node's name put in its place: its reports are refused, logged and counted, it
    keeps forwarding; its own again, and the reports resume."""
    from dvr.lab.pki import Pki

    pki = Pki(lab.rundir / "pki")
    conn = lab_northbound(lab)["connection"]
    log = lab.rundir / "nodes" / "compute1" / "agent.log"
    serial = lambda: subprocess.run(  # noqa: E731
        ["openssl", "x509", "-in", str(pki.cert("compute1")), "-noout", "-serial"],
        capture_output=True, text=True, check=True).stdout
    reconnects = metric(lab, "compute1", "dvr_agent_northbound_reconnects_total")
    old_serial = serial()
    ping = subprocess.Popen(["ip", "netns", "exec", lab.vm_ns("vm2"), "ping", "-n", "-q",
                             "-i", "0.05", "-c", "100", "-W", "1", "10.1.0.11"],
                            stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    pki.issue("compute1")   # a new key and certificate, the same CN
    assert serial() != old_serial
    deadline = time.monotonic() + 10
    while metric(lab, "compute1", "dvr_agent_northbound_reconnects_total") <= reconnects:
        assert time.monotonic() < deadline, "compute1's agent did not reconnect"
        time.sleep(0.2)
    seen = agent_row(conn, "compute1")["heartbeat"]
    deadline = time.monotonic() + 10
    while agent_row(conn, "compute1")["heartbeat"] <= seen:
        assert time.monotonic() < deadline, "no report after the new certificate"
        time.sleep(0.2)
    out, _ = ping.communicate(timeout=30)
    assert " 0% packet loss" in out, out

    # a certificate of compute2's name in compute1's files: its reports are refused
    saved = {p: p.read_bytes() for p in (pki.key("compute1"), pki.cert("compute1"))}
    refused_before = metric(lab, "compute1", "dvr_agent_northbound_writes_refused_total")
    try:
        for src, dst in ((pki.key("compute2"), pki.key("compute1")),
                         (pki.cert("compute2"), pki.cert("compute1"))):
            tmp = dst.with_suffix(".swap")
            shutil.copy(src, tmp)
            os.replace(tmp, dst)
        deadline = time.monotonic() + 15
        while metric(lab, "compute1",
                     "dvr_agent_northbound_writes_refused_total") <= refused_before:
            assert time.monotonic() < deadline, "no refused report counted"
            time.sleep(0.2)
        assert "report to the northbound database refused" in log.read_text()
        assert lab.status()["nodes"]["compute1"]["agent"]["alive"]
        assert lab.ping("vm2", "10.1.0.11")   # the dataplane goes on
        assert agent_row(conn, "compute2")["node"] == "compute2"
    finally:
        for p, data in saved.items():
            tmp = p.with_suffix(".swap")
            tmp.write_bytes(data)
            os.chmod(tmp, 0o600)
            os.replace(tmp, p)
    seen = agent_row(conn, "compute1")["heartbeat"]
    deadline = time.monotonic() + 15
    while agent_row(conn, "compute1")["heartbeat"] <= seen:
        assert time.monotonic() < deadline, "reports did not resume with its own certificate"
        time.sleep(0.2)
