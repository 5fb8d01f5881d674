"""SNAT high availability with real packets (two network nodes, `topologies/ha.yaml`): the
network node serving a router dies and its standby takes over, its external IP unchanged;
nothing else notices; a partition between the network nodes makes no second speaker.

r1 (blue, red) has the chain net1, net2; r2 (green) net2, net1. vm2 and vm4 (compute2) and
vm3 (compute1) reach the outside through r1's SNAT, vm5 (compute2) through r2's; vm1 and vm6
have floating IPs (compute1)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.lab.harness import TOPOLOGIES, LabHandle, running_lab

REMOTE = "198.51.100.10"
R1_EXT, R2_EXT = "203.0.113.10", "203.0.113.20"
INTERVAL = 0.01  # the UDP streams' pace (s)


@pytest.fixture()
def lab() -> Iterator[LabHandle]:
    with running_lab(TOPOLOGIES / "ha.yaml") as lab:
        yield lab


def claims(lab: LabHandle) -> dict[str, list[str]]:
    """Each network node's claimed routers, as its agent reports them."""
    nodes = lab.status()["nodes"]
    return {n: nodes[n]["agent"]["snat"] for n in ("net1", "net2")}


def arp_answers(lab: LabHandle, ip: str) -> list[str]:
    """The MACs that answer one ARP request for `ip` on the provider network."""
    return [r["hwsrc"] for r in lab.pkttool(lab.ns("ext"), "arp-replies", "ext0", ip)]


def wait_for(what: str, predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


class Stream:
    """A numbered UDP stream from a VM to the external host's remote address, every
    INTERVAL, and what arrived (number, arrival time, source address and port)."""

    def __init__(self, lab: LabHandle, vm: str, port: int, seconds: float):
        self.seconds, self.port = seconds, port
        self.sink = lab.background(lab.ns("ext"), "udp-sink", str(port), "--seconds",
                                   str(seconds + 2), ready=True)
        self.source = lab.background(lab.ns(vm), "udp-stream", REMOTE, str(port),
                                     "--interval", str(INTERVAL), "--seconds", str(seconds))
        self.lab = lab

    def finish(self) -> tuple[int, list[list[Any]]]:
        sent = self.lab.result(self.source)["sent"]
        return sent, self.lab.result(self.sink)


def gaps(got: list[list[Any]]) -> tuple[int, float]:
    """Datagrams lost, and the longest silence between two arrivals (s)."""
    seqs = sorted(g[0] for g in got)
    lost = (seqs[-1] - seqs[0] + 1 - len(set(seqs))) if seqs else 0
    times = sorted(g[1] for g in got)
    return lost, max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def test_the_serving_node_dies_and_nothing_else_notices(lab: LabHandle) -> None:
    """vm2's stream through r1 moves from net1 to net2 when net1 is killed, its source
    still r1's external IP; meanwhile r2's SNAT (net2), east-west traffic and a floating
    IP lose nothing."""
    assert claims(lab) == {"net1": ["r1"], "net2": ["r2"]}
    r1 = Stream(lab, "vm2", 7001, seconds=6)
    r2 = Stream(lab, "vm5", 7002, seconds=6)
    count = int(6 / INTERVAL)
    east_west = lab.background(lab.ns("vm3"), "ping", "10.1.0.14", str(count), str(INTERVAL))
    fip = lab.background(lab.ns("ext"), "ping", "203.0.113.50", str(count), str(INTERVAL))
    time.sleep(2)
    killed_at = time.time()
    lab.dvr("kill", "net1")
    sent, got = r1.finish()
    assert got, "nothing of r1's stream arrived"
    after = [g for g in got if g[1] > killed_at]
    assert after, "r1's stream did not resume after net1 died"
    assert {g[2] for g in got} == {R1_EXT}  # the same address throughout
    assert {g[3] for g in got} == {40000}  # and the same source port: one translation
    lost, gap = gaps(got)
    print(f"r1 failover: {lost} of {sent} datagrams lost, longest gap {gap * 1e3:.0f} ms")
    assert gap < 3.0
    sent2, got2 = r2.finish()
    assert gaps(got2)[0] == 0 and len(got2) == sent2, "r2's SNAT on net2 lost datagrams"
    for name, proc in (("east-west", east_west), ("floating IP", fip)):
        res = lab.result(proc)
        assert res["received"] == res["sent"], f"{name} traffic lost packets: {res}"
    wait_for("net2 to claim r1", lambda: claims(lab)["net2"] == ["r1", "r2"])
    assert arp_answers(lab, R1_EXT) == [lab.topology().routers["r1"].external_mac]


def test_established_tcp_connections_survive_the_failover(lab: LabHandle) -> None:
    """TCP connections through r1's SNAT, sending all along, survive net1's death: same
    connection, no reset, every byte. Among them two from the same source port on two VMs
    to the same remote port: on net1 the second got another port, which net2 held ready
    (net1 published it), so that each gets its own port back whatever comes first."""
    port, size, pace = 8100, 700_000, 0.01  # 500 segments of 1400 bytes, ~5 s each
    server = lab.background(lab.ns("ext"), "tcp-server", str(port), "--connections", "4",
                            "--timeout", "40", ready=True)
    clients = []
    for vm, sport in (("vm2", 33333), ("vm4", 33333), ("vm3", 33333), ("vm2", 33340)):
        clients.append(lab.background(lab.ns(vm), "tcp-client", REMOTE, str(port), str(size),
                                      "--sport", str(sport), "--pace", str(pace),
                                      "--timeout", "40"))
        time.sleep(0.2)  # in this order: vm4 and vm3 cannot keep their port
    wait_for("net2 to hold the translations that did not keep their port",
             lambda: lab.node("net2", "ovs-ofctl", "-O", "OpenFlow13", "dump-flows",
                              "br-int", "table=24").count("priority=60") == 2)
    lab.dvr("kill", "net1")
    sent = [lab.result(c) for c in clients]
    got = lab.result(server)
    assert sorted(r["sha256"] for r in got) == sorted(s["sha256"] for s in sent)
    assert not any(r["reset"] for r in got)
    # three from port 33333 to one remote port: two of them translated to other ports
    assert sorted(r["peer_port"] for r in got) == [33333, 33334, 33335, 33340]
    print(f"TCP through the failover: {len(got)} of {len(sent)} connections survived, "
          f"longest stall {max(r['max_gap'] for r in got) * 1e3:.0f} ms")


def test_a_cut_between_the_network_nodes_makes_no_second_speaker(lab: LabHandle) -> None:
    """net1 and net2 lose each other while the compute nodes see both: each keeps its
    router, exactly one answers for each external IP, and both routers' SNAT works."""
    topo = lab.topology()
    lab.dvr("cut", "net1", "net2")
    try:
        wait_for("the cut to show in BFD", lambda: lab.status()["nodes"]["net2"]["agent"]
                 ["bfd"].get("net1") == "down")
        time.sleep(1)  # time for a wrong claim to be made
        assert claims(lab) == {"net1": ["r1"], "net2": ["r2"]}
        assert arp_answers(lab, R1_EXT) == [topo.routers["r1"].external_mac]
        assert arp_answers(lab, R2_EXT) == [topo.routers["r2"].external_mac]
        for vm, port in (("vm2", 7003), ("vm5", 7004)):
            stream = Stream(lab, vm, port, seconds=1)
            sent, got = stream.finish()
            assert len(got) == sent, f"{vm}'s SNAT lost {sent - len(got)} of {sent}"
    finally:
        lab.dvr("heal", "net1", "net2")
    wait_for("the sessions to come back", lambda: lab.status()["nodes"]["net2"]["agent"]
             ["bfd"].get("net1") == "up")
    assert claims(lab) == {"net1": ["r1"], "net2": ["r2"]}
    assert len(arp_answers(lab, R1_EXT)) == 1


def chains(lab: LabHandle) -> dict[str, list[str]]:
    return {r: s["chain"] for r, s in lab.status()["snat"].items()}


def test_the_killed_node_comes_back_without_a_second_interruption(lab: LabHandle) -> None:
    """Failback is never automatic: net1, back, finds r1 served by net2 and stays standby;
    r1's traffic does not move, and still exactly one node answers for each address."""
    lab.dvr("kill", "net1")
    # back at once: not long enough for net1 to count as dead, only for net2 to take over
    wait_for("net2 to serve r1", lambda: claims(lab)["net2"] == ["r1", "r2"], timeout=15)
    stream = Stream(lab, "vm2", 7005, seconds=8)
    time.sleep(1)
    lab.dvr("start", "net1")
    assert chains(lab)["r1"] == ["net2", "net1"]
    sent, got = stream.finish()
    lost, gap = gaps(got)
    print(f"net1 back: {lost} of {sent} lost, longest gap {gap * 1e3:.0f} ms")
    assert len(got) == sent and gap < 0.1, "r1's traffic was disturbed by net1's return"
    assert claims(lab) == {"net1": [], "net2": ["r1", "r2"]}
    topo = lab.topology()
    assert arp_answers(lab, R1_EXT) == [topo.routers["r1"].external_mac]
    assert arp_answers(lab, R2_EXT) == [topo.routers["r2"].external_mac]
    # the operator asks for the failback: r1 moves back to net1, which takes over
    lab.dvr_nb("snat-move", "r1", "net1")
    wait_for("net1 to serve r1 again", lambda: claims(lab) == {"net1": ["r1"],
                                                              "net2": ["r2"]})
    assert arp_answers(lab, R1_EXT) == [topo.routers["r1"].external_mac]


def test_the_serving_nodes_ovs_restarts_and_draws_nothing_before_its_flows_are_back(
        lab: LabHandle) -> None:
    """net1's ovs-vswitchd restarts (as an upgrade restarts it: flow-restore-wait) while
    its agent is down, so that the new switch stays without flows for seconds: net1's BFD
    sessions stay down meanwhile (the switch answers none before the flag is cleared), so
    no node steers r1's traffic to it: r1 moves to net2 once, as when net1 dies, and r2 (on
    net2), east-west and the floating IPs lose nothing. Its agent back, net1 gets its flows,
    clears the flag, its sessions come up, and it stays standby: no second interruption."""
    import os
    import signal

    assert claims(lab) == {"net1": ["r1"], "net2": ["r2"]}
    seconds = 12
    r1 = Stream(lab, "vm2", 7007, seconds=seconds)
    r2 = Stream(lab, "vm5", 7008, seconds=seconds)
    count = int(seconds / INTERVAL)
    east_west = lab.background(lab.ns("vm3"), "ping", "10.1.0.14", str(count), str(INTERVAL))
    fip = lab.background(lab.ns("ext"), "ping", "203.0.113.50", str(count), str(INTERVAL))
    time.sleep(1.5)
    os.kill(lab.status()["nodes"]["net1"]["agent"]["pid"], signal.SIGKILL)
    restarted_at = time.time()
    lab.dvr("restart-ovs", "net1")
    other = lab.node("net1", "ovs-vsctl", "get", "Open_vSwitch", ".", "other_config")
    assert 'flow-restore-wait="true"' in other, other
    wait_for("net2 to serve r1", lambda: claims(lab)["net2"] == ["r1", "r2"], timeout=8)
    until = time.monotonic() + 2  # no session to the switch without flows comes up
    while time.monotonic() < until:  # (bounded in time: a loaded machine answers slowly)
        nodes = lab.status()["nodes"]
        for node in ("compute1", "compute2", "net2"):
            assert nodes[node]["agent"]["bfd"]["net1"] != "up", (node, nodes[node]["agent"])
        time.sleep(0.1)
    lab.dvr("restart-agent", "net1")  # what Restart=always does
    back_at = time.time()
    wait_for("net1's sessions up", lambda: all(
        n["agent"]["bfd"].get("net1") == "up"
        for name, n in lab.status()["nodes"].items() if name != "net1"))
    assert "flow-restore-wait" not in lab.node("net1", "ovs-vsctl", "get", "Open_vSwitch",
                                                ".", "other_config")
    sent, got = r1.finish()
    lost, gap = gaps(got)
    print(f"r1 across net1's OVS restart: {lost} of {sent} lost, longest gap "
          f"{gap * 1e3:.0f} ms")
    assert {g[2] for g in got} == {R1_EXT}
    assert gap < 3.0
    # one interruption only: from net1's return on, every datagram arrived
    later = sorted(g[0] for g in got if g[1] > back_at)
    assert later and later[-1] - later[0] + 1 == len(later), "r1 interrupted again"
    assert min(g[1] for g in got if g[1] > restarted_at) - restarted_at < 3.0
    sent2, got2 = r2.finish()
    assert len({g[0] for g in got2}) == sent2, "r2's SNAT on net2 lost datagrams"
    for name, proc in (("east-west", east_west), ("floating IP", fip)):
        res = lab.result(proc)
        assert res["received"] == res["sent"], f"{name} traffic lost packets: {res}"
    assert claims(lab) == {"net1": [], "net2": ["r1", "r2"]}
    assert chains(lab)["r1"] == ["net2", "net1"]


def test_the_acting_scheduler_dies_and_another_takes_its_place(lab: LabHandle) -> None:
    holder = [n for n, s in lab.status()["schedulers"].items() if s["has_lock"]]
    assert len(holder) == 1, lab.status()["schedulers"]
    pid = lab.status()["schedulers"][holder[0]]["pid"]
    lab.node(holder[0], "kill", "-9", str(pid))
    wait_for("another scheduler to hold the lock", lambda: [
        n for n, s in lab.status()["schedulers"].items() if s["has_lock"]] == [
        n for n in ("net1", "net2") if n != holder[0]], timeout=15)
    # and it acts: the routers of the node of the dead scheduler move to the other one
    lab.dvr("kill", holder[0])
    other = "net2" if holder[0] == "net1" else "net1"
    wait_for(f"every chain to start with {other}",
             lambda: {c[0] for c in chains(lab).values()} == {other}, timeout=15)


def test_killing_a_compute_node_disturbs_no_other(lab: LabHandle) -> None:
    """compute1 dies: traffic between VMs of compute2 and compute2's SNAT lose nothing."""
    count = int(4 / INTERVAL)
    local = lab.background(lab.ns("vm2"), "ping", "10.1.0.14", str(count), str(INTERVAL))
    stream = Stream(lab, "vm5", 7006, seconds=4)
    time.sleep(1)
    lab.dvr("kill", "compute1")
    sent, got = stream.finish()
    assert len(got) == sent, f"r2's SNAT lost {sent - len(got)} of {sent}"
    res = lab.result(local)
    assert res["received"] == res["sent"], res


def test_two_successive_kills_are_survived() -> None:
    """Three network nodes; r1 has two candidates. net1 dies: net2 serves r1 and, once net1
    has been dead past the agent down time, the scheduler gives r1 a new standby, net3;
    then net2 dies: net3 serves r1 (and r2)."""
    with running_lab(TOPOLOGIES / "ha3.yaml") as lab:
        assert chains(lab)["r1"] == ["net1", "net2"]
        lab.dvr("kill", "net1")
        wait_for("r1 to get net3 as its standby", lambda: chains(lab)["r1"] ==
                 ["net2", "net3"], timeout=20)
        stream = Stream(lab, "vm2", 7007, seconds=5)
        time.sleep(1.5)
        killed_at = time.time()
        lab.dvr("kill", "net2")
        sent, got = stream.finish()
        after = [g for g in got if g[1] > killed_at + 0.5]
        assert after and {g[2] for g in got} == {R1_EXT}, "r1's SNAT did not survive net2"
        lost, gap = gaps(got)
        print(f"second failover: {lost} of {sent} lost, longest gap {gap * 1e3:.0f} ms")
        wait_for("net3 to claim both routers", lambda: lab.status()["nodes"]["net3"]["agent"]
                 ["snat"] == ["r1", "r2"])
