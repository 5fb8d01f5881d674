"""North-south in a real lab: floating IPs on the VM's node, centralized SNAT on the network
node, the external host on the provider segment, real packets both ways."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.lab.harness import (
    ROOT,
    TOPOLOGIES,
    LabHandle,
    echo_requests,
    ext_ping,
    nb_cli,
    running_lab,
)

TOPO = TOPOLOGIES / "northsouth.yaml"
REMOTE = "198.51.100.10"  # the "internet" address of the external host
GATEWAY = "203.0.113.1"
FIP1 = "203.0.113.50"  # vm1 on compute1 (blue, r1)
FIP3 = "203.0.113.51"  # vm3 on compute1 (red, r1)
FIP5 = "203.0.113.52"  # vm5 on compute2 (green, r2)
R1_EXT = "203.0.113.10"
UNUSED = "203.0.113.77"


@pytest.fixture(scope="module")
def lab() -> Iterator[LabHandle]:
    with running_lab(TOPO) as handle:
        yield handle


def raw_topology() -> dict[str, Any]:
    return yaml.safe_load(TOPO.read_text())


def write(tmp_path: Path, data: dict[str, Any], name: str = "topo.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def node_mac(lab: LabHandle, node: str) -> str:
    return lab.topology().nodes[node].external_mac


def installed_cookies(lab: LabHandle) -> dict[str, list[str]]:
    out = {}
    for node in ("compute1", "compute2", "net1"):
        flows = lab.node(node, "ovs-ofctl", "-O", "OpenFlow13", "dump-flows", "br-int")
        out[node] = sorted(part for line in flows.splitlines()
                           for part in line.split(",") if part.strip().startswith("cookie="))
    return out


def test_agents_resolve_the_gateway_mac_by_arp(lab: LabHandle) -> None:
    assert lab.topology().external.gateway_mac is None  # not given: learned on the wire
    link = json.loads(lab.dvr("ext", "--", "ip", "-j", "link", "show", "ext0").stdout)
    nodes = lab.status()["nodes"]
    assert {n: nodes[n]["agent"]["gateway_mac"] for n in nodes} == {
        n: link[0]["address"] for n in nodes}
    assert nodes["net1"]["agent"]["snat"] == ["r1", "r2"]
    # what `status` shows comes from the agents' rows in the northbound database
    assert {n["agent"]["reported_to"] for n in nodes.values()} == {"northbound"}
    from dvr.lab.lab import Lab

    first = Lab(lab.prefix).nb_agents()
    time.sleep(1.5)
    again = Lab(lab.prefix).nb_agents()
    assert all(again[n]["heartbeat"] > first[n]["heartbeat"] for n in nodes)
    assert {n: r["generation"] for n, r in again.items()} == {
        n: lab.status()["generation"] for n in nodes}


# --- inbound to a floating IP -----------------------------------------------------------------
def test_the_lab_contract_checks_the_same_answers_as_on_vms(lab: LabHandle) -> None:
    """tests/lab/contract.sh, the checks vagrant/test.sh runs on the VM lab, through the lab
    contract's verbs only: every check passes here, each answer as this topology plans it."""
    dvr_cmd = f"{sys.executable} -m dvr.cli"
    res = subprocess.run(
        [str(ROOT / "tests/lab/contract.sh"), "--trace", f"{dvr_cmd} trace --prefix {lab.prefix}",
         *dvr_cmd.split(), "lab", "--prefix", lab.prefix],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stdout + res.stderr
    answers = [line for line in res.stdout.splitlines() if line.startswith("answer: ")]
    assert "answer: east-west vm1 -> vm2 (10.2.0.12): replies, ttl 63" in answers
    assert ("answer: SNAT vm2 -> 203.0.113.1: replies, the external host sees "
            f"{R1_EXT} > {GATEWAY}") in answers
    assert ("answer: isolation vm2 (r1) -> vm5 (r2, 10.3.0.15): no reply, vm5 sees nothing"
            in answers)
    # the east-west trace crosses exactly one tunnel, compute1 to compute2
    tunnels = [a for a in answers if a.startswith("answer: trace vm1 icmp, ip.dst=10.2.0.12:")
               and "-> tunnel" in a]
    assert len(tunnels) == 1 and "compute1 => compute2" in tunnels[0], tunnels


def test_external_host_reaches_a_floating_ip_with_its_real_address(lab: LabHandle) -> None:
    with lab.sniff(lab.vm_ns("vm1"), proto="icmp", host=REMOTE) as cap:
        assert ext_ping(lab, FIP1, source=REMOTE)
    requests = echo_requests(cap.packets)
    assert requests, "no echo request reached vm1"
    assert {(p["src"], p["dst"]) for p in requests} == {(REMOTE, "10.1.0.11")}

    got = lab.tcp_transfer("ext", "vm1", FIP1, 256 * 1024, source=REMOTE)
    assert got["peer"] == REMOTE


# --- outbound through a floating IP ---------------------------------------------------------
def test_a_vm_with_a_floating_ip_leaves_from_its_own_node(lab: LabHandle) -> None:
    before = lab.settled_tunnel_packets(("net1",))
    with lab.sniff(f"{lab.prefix}-ext", "ext0", proto="icmp", host=REMOTE) as ext_cap, \
            lab.sniff(lab.node_ns("net1"), "ex0", proto="icmp") as net_cap:
        assert lab.ping("vm1", REMOTE, count=3)
    requests = echo_requests(ext_cap.packets)
    assert requests and {p["src"] for p in requests} == {FIP1}
    assert {p["eth_src"] for p in requests} == {node_mac(lab, "compute1")}
    assert all(p["ttl"] == 63 for p in requests)  # one router hop
    assert net_cap.packets == [], "the floating IP's traffic was seen on net1's uplink"
    assert lab.settled_tunnel_packets(("net1",)) == before, "a tunnel to net1 was used"

    got = lab.tcp_transfer("vm1", "ext", REMOTE, 256 * 1024)
    assert got["peer"] == FIP1


# --- outbound through centralized SNAT ------------------------------------------------------
def test_a_vm_without_a_floating_ip_leaves_through_the_active_snat_node(
        lab: LabHandle) -> None:
    snat = lab.status()["snat"]["r1"]
    assert snat["active"] == ["net1"]
    before = lab.settled_tunnel_packets(("net1", "compute2"))
    with lab.sniff(f"{lab.prefix}-ext", "ext0", proto="icmp", host=REMOTE) as ext_cap, \
            lab.sniff(lab.node_ns("net1"), "ex0", proto="icmp", host=REMOTE) as net_cap:
        assert lab.ping("vm4", REMOTE, count=3)
    requests = echo_requests(ext_cap.packets)
    assert requests and {p["src"] for p in requests} == {R1_EXT}
    assert {p["eth_src"] for p in requests} == {lab.topology().routers["r1"].external_mac}
    assert len(echo_requests(net_cap.packets)) == len(requests), "not sent by net1"
    after = lab.settled_tunnel_packets(("net1", "compute2"))
    # the requests reached net1 through a tunnel, the replies came back to compute2 so
    assert after["net1"] - before["net1"] >= len(requests), "did not cross the overlay"
    assert after["compute2"] - before["compute2"] >= len(requests), "no reply by the overlay"

    got = lab.tcp_transfer("vm4", "ext", REMOTE, 256 * 1024)
    assert got["peer"] == R1_EXT


def test_floating_ip_to_floating_ip_same_node_and_across_nodes(lab: LabHandle) -> None:
    # same node, same router: turns around inside compute1's bridge
    with lab.sniff(lab.vm_ns("vm3"), proto="icmp") as cap:
        assert lab.ping("vm1", FIP3, count=2)
    assert {p["src"] for p in echo_requests(cap.packets)} == {FIP1}
    # across nodes and routers: straight to compute2 on the provider network
    with lab.sniff(lab.vm_ns("vm5"), proto="icmp") as cap5, \
            lab.sniff(f"{lab.prefix}-ext", "ext0", proto="icmp") as ext_cap:
        assert lab.ping("vm1", FIP5, count=2)
    assert {p["src"] for p in echo_requests(cap5.packets)} == {FIP1}
    assert echo_requests(ext_cap.packets) == [], "went through the upstream gateway"
    got = lab.tcp_transfer("vm5", "vm3", FIP3, 128 * 1024)
    assert got["peer"] == FIP5
    # and a VM to its own floating IP: round the bridge and back in
    got = lab.tcp_transfer("vm1", "vm1", FIP1, 64 * 1024)
    assert got["peer"] == FIP1


def test_related_icmp_errors_come_back_through_the_nat(lab: LabHandle) -> None:
    """A UDP datagram to a closed port: the ICMP port unreachable, about a translated
    connection, is translated back (inner header included) and reaches the sender."""
    closed = "9"  # nothing listens there
    for vm in ("vm1", "vm4"):  # through the floating IP, through the SNAT node
        assert lab.pkttool(lab.vm_ns(vm), "udp-probe", REMOTE, closed) == {"refused": True}
    # inbound: the VM's own port unreachable goes back out through the DNAT zone
    assert lab.pkttool(f"{lab.prefix}-ext", "udp-probe", FIP1, closed,
                       "--source", REMOTE) == {"refused": True}


# --- what must not get in -------------------------------------------------------------------
def test_unsolicited_traffic_reaches_no_vm(lab: LabHandle) -> None:
    ext_ns = f"{lab.prefix}-ext"
    topo = lab.topology()
    vms = sorted(topo.vms)
    sniffers = [lab.sniff(lab.vm_ns(vm), proto="icmp", seconds=4) for vm in vms]
    caps = [s.__enter__() for s in sniffers]
    try:
        # a fixed IP, addressed to the MAC of the node that hosts it (the router would)
        lab.pkttool(ext_ns, "send", "ext0", node_mac(lab, "compute1"), "10.1.0.11")
        lab.pkttool(ext_ns, "send", "ext0", "ff:ff:ff:ff:ff:ff", "10.1.0.11")
        # an address of the external network that no VM holds
        assert not ext_ping(lab, UNUSED, count=1, wait=1)
        lab.pkttool(ext_ns, "send", "ext0", node_mac(lab, "compute1"), UNUSED)
        # a router's external IP: only replies to its SNAT may pass
        lab.pkttool(ext_ns, "send", "ext0", topo.routers["r1"].external_mac, R1_EXT)
    finally:
        for s in sniffers:
            s.__exit__(None, None, None)
    for vm, cap in zip(vms, caps, strict=True):
        assert echo_requests(cap.packets) == [], f"unsolicited traffic reached {vm}"


# --- ARP on the provider network ------------------------------------------------------------
def arp_replies(lab: LabHandle, target: str) -> list[dict[str, Any]]:
    ext_ns = f"{lab.prefix}-ext"
    with lab.sniff(ext_ns, "ext0", proto="arp", seconds=2.5) as cap:
        lab.pkttool(ext_ns, "arp", "ext0", target)
    return [p for p in cap.packets if p["op"] == 2 and p["psrc"] == target]


def test_exactly_one_arp_reply_for_a_floating_ip_from_its_node(lab: LabHandle) -> None:
    replies = arp_replies(lab, FIP1)
    assert len(replies) == 1, replies
    assert replies[0]["hwsrc"] == node_mac(lab, "compute1")
    replies = arp_replies(lab, R1_EXT)
    assert [r["hwsrc"] for r in replies] == [lab.topology().routers["r1"].external_mac]
    assert arp_replies(lab, UNUSED) == []


def test_a_moved_floating_ip_is_announced_and_traffic_follows(
        lab: LabHandle, tmp_path: Path) -> None:
    assert ext_ping(lab, FIP1)  # the external host has compute1's MAC for it
    moved = raw_topology()
    del moved["vms"]["vm1"]["floating_ip"]
    moved["vms"]["vm4"]["floating_ip"] = FIP1  # vm4 is on compute2
    path = write(tmp_path, moved)
    new_mac = node_mac(lab, "compute2")
    try:
        with lab.sniff(f"{lab.prefix}-ext", "ext0", proto="arp", seconds=4) as cap:
            lab.dvr("apply", str(path))
            returned = time.monotonic()
            answered = None
            while time.monotonic() - returned < 3:
                if ext_ping(lab, FIP1, count=1, wait=0.1):
                    answered = time.monotonic()
                    break
        garps = [p for p in cap.packets if p["psrc"] == FIP1 and p["pdst"] == FIP1]
        assert garps and {p["hwsrc"] for p in garps} == {new_mac}
        assert answered is not None and answered - returned < 1.0
        neigh = lab.dvr("ext", "--", "ip", "neigh", "show", FIP1).stdout
        assert new_mac in neigh
        # (the external host's own kernel may probe its fresh entry meanwhile: count nodes)
        replies = arp_replies(lab, FIP1)
        assert {r["hwsrc"] for r in replies} == {new_mac}, "the old node still answers"
        with lab.sniff(lab.vm_ns("vm4"), proto="icmp", host=REMOTE) as cap4:
            assert ext_ping(lab, FIP1, source=REMOTE)
        assert {p["dst"] for p in echo_requests(cap4.packets)} == {"10.1.0.14"}
    finally:
        lab.dvr("apply", str(TOPO))
    assert ext_ping(lab, FIP1)


def move_fip1_to_vm4_through_the_database(lab: LabHandle, timeout: float) -> None:
    """`dvr nb fip-set vm4 FIP1` (from vm1 on compute1 to vm4 on compute2), then: every
    agent converges on the new generation, and the external host's traffic reaches vm4."""
    nb_cli(f"unix:{lab.rundir}/nb.sock", "fip-set", "vm4", FIP1)
    deadline = time.monotonic() + timeout
    while not all(n["agent"]["converged"] for n in lab.status()["nodes"].values()):
        assert time.monotonic() < deadline, "the agents did not follow the database"
        time.sleep(0.1)
    with lab.sniff(lab.vm_ns("vm4"), proto="icmp", host=REMOTE) as cap:
        assert ext_ping(lab, FIP1, source=REMOTE)
    assert {p["dst"] for p in echo_requests(cap.packets)} == {"10.1.0.14"}
    assert {r["hwsrc"] for r in arp_replies(lab, FIP1)} == {node_mac(lab, "compute2")}


def test_a_floating_ip_moved_through_the_northbound_database(lab: LabHandle) -> None:
    """`dvr nb fip-set`: the agents watching the database follow, traffic follows."""
    assert ext_ping(lab, FIP1)
    try:
        move_fip1_to_vm4_through_the_database(lab, timeout=3)
        st = lab.status()
        assert st["vms"]["vm4"]["floating_ip"] == FIP1 and st["vms"]["vm1"]["floating_ip"] is None
    finally:
        lab.dvr("apply", str(TOPO))
    assert ext_ping(lab, FIP1)


def test_the_dataplane_outlives_the_northbound_database(lab: LabHandle) -> None:
    """A standalone database killed: agents keep forwarding on their last state; back,
    they resync and follow new changes."""
    lab.dvr("kill-nb")
    try:
        time.sleep(1.5)  # the agents notice and keep retrying meanwhile
        assert ext_ping(lab, FIP1) and lab.ping("vm4", REMOTE) and lab.ping("vm1", "10.2.0.12")
        alive = lab.status()["nodes"]
        assert all(n["agent"]["alive"] and n["agent"]["converged"] for n in alive.values())
    finally:
        lab.dvr("start-nb")
    try:
        move_fip1_to_vm4_through_the_database(lab, timeout=5)
    finally:
        lab.dvr("apply", str(TOPO))
    assert ext_ping(lab, FIP1)


def test_tcp_between_other_vms_never_stalls_while_floating_ips_change(
        lab: LabHandle, tmp_path: Path) -> None:
    """vm1 -> vm2 (routed across nodes) streams while floating IPs of vm3, vm4 and vm5
    are added and removed; the receiver never waits 100 ms for data."""
    base = raw_topology()
    steps = []
    d = copy.deepcopy(base)
    d["vms"]["vm4"]["floating_ip"] = "203.0.113.53"
    steps.append(d)
    d = copy.deepcopy(d)
    del d["vms"]["vm3"]["floating_ip"]
    steps.append(d)
    d = copy.deepcopy(d)
    del d["vms"]["vm5"]["floating_ip"]
    steps.append(d)
    steps.append(base)
    result: dict[str, Any] = {}

    def stream() -> None:
        result.update(lab.tcp_transfer("vm1", "vm2", "10.2.0.12", 1400 * 2000, pace=0.002))

    thread = threading.Thread(target=stream)
    try:
        thread.start()
        time.sleep(0.5)
        for i, data in enumerate(steps):
            lab.dvr("apply", str(write(tmp_path, data, f"step{i}.yaml")))
            time.sleep(0.3)
        thread.join(timeout=90)
    finally:
        lab.dvr("apply", str(TOPO))
    assert result.get("bytes") == 1400 * 2000
    assert result["max_gap"] < 0.1, f"the stream stalled for {result['max_gap']:.3f}s"


@pytest.mark.parametrize("change,key,reason", [
    ({"vm2": "192.0.2.5"}, "vms.vm2.floating_ip", "outside external.cidr"),
    ({"vm2": FIP1}, "vms.vm2.floating_ip", "already the floating IP of vms.vm1"),
    ({"r2": False}, "vms.vm5.floating_ip", "has no external_gateway"),
])
def test_a_bad_floating_ip_is_refused_and_nothing_changes(
        lab: LabHandle, tmp_path: Path, change: dict[str, Any], key: str, reason: str) -> None:
    data = raw_topology()
    for name, value in change.items():
        if name in data["vms"]:
            data["vms"][name]["floating_ip"] = value
        else:  # a router without an external gateway (and so without an external IP)
            data["routers"][name]["external_gateway"] = value
            data["routers"][name].pop("external_ip", None)
    before = (lab.status()["generation"], installed_cookies(lab))
    res = lab.dvr("apply", str(write(tmp_path, data)), check=False)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and reason in lines[0], res.stderr
    assert (lab.status()["generation"], installed_cookies(lab)) == before
    assert ext_ping(lab, FIP1, count=1)
