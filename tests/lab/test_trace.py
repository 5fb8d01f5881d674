"""`dvr trace` against a running lab: the live engine agrees with the plan on every kind of
path, and names the node and table where a broken switch parts from it."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from dvr.lab.lab import Lab
from dvr.trace import report as tracing
from dvr.trace.live import LiveTracer
from dvr.trace.offline import offline
from tests.lab.harness import TOPOLOGIES, LabHandle, dvr, running_lab

PATHS = [  # (sender, packet, outcome (kind, node, to))
    ("vm1", "icmp, ip.dst=10.1.0.14", ("delivered", "compute2", "vm4")),  # same network
    ("vm1", "icmp, ip.dst=10.2.0.13", ("delivered", "compute1", "vm3")),  # routed, one node
    ("vm1", "tcp, ip.dst=10.2.0.12, tcp.dport=22", ("delivered", "compute2", "vm2")),
    ("ext", "tcp, ip.dst=203.0.113.50, tcp.dport=22", ("delivered", "compute1", "vm1")),
    ("vm1", "tcp, ip.dst=198.51.100.10, tcp.dport=443",
     ("delivered", "compute1", "external host")),  # floating IP out
    ("vm4", "udp, ip.dst=198.51.100.10", ("delivered", "net1", "external host")),  # SNAT
    ("vm1", "arp, arp.tpa=10.1.0.1", ("delivered", "compute1", "vm1")),  # the gateway
    ("vm1", "icmp, ip.dst=10.2.0.1", ("delivered", "compute1", "vm1")),
    ("vm1", "icmp, ip.dst=203.0.113.52", ("delivered", "compute2", "vm5")),  # FIP to FIP
    ("vm9", "icmp, ip.dst=10.1.0.11", ("dropped", "compute2", None)),  # isolated
    ("vm1", "icmp, ip.dst=10.1.0.99", ("dropped", "compute1", None)),  # unknown
]


@pytest.fixture(scope="module")
def lab() -> Iterator[LabHandle]:
    with running_lab(TOPOLOGIES / "trace.yaml") as handle:
        yield handle


def shape(report: tracing.Report) -> tuple:
    """What every engine must agree on: crossings, outcomes and their IP headers."""
    return (
        [(c.kind, c.src, c.dst) for c in report.crossings],
        sorted((o.kind, o.node, o.to or "", o.headers.get("ip.src"), o.headers.get("ip.dst"),
                o.headers.get("ip.ttl")) for o in report.outcomes),
    )


@pytest.mark.parametrize("sender,packet,outcome", PATHS,
                         ids=[f"{s}:{p}" for s, p, _ in PATHS])
def test_live_offline_and_a_real_packet_agree(lab: LabHandle, sender: str, packet: str,
                                              outcome: tuple) -> None:
    tracer = LiveTracer(Lab(lab.prefix))
    live = tracer.trace_and_compare(sender, packet)
    assert live.divergence is None, live.divergence
    assert tracer.verify(live) == []
    assert [(o.kind, o.node, o.to) for o in live.outcomes] == [outcome]
    planned = offline(with_gateway(lab), sender, packet)
    assert shape(live) == shape(planned)
    # the same tables, node by node, changing the same headers the same way
    assert changes(live) == changes(planned)


def with_gateway(lab: LabHandle) -> Any:
    """The lab's topology with the external host's real MAC as the gateway's (the agents
    learn it by ARP; the offline engine would assume one)."""
    topo = lab.topology()
    link = json.loads(lab.dvr("ext", "--", "ip", "-j", "link", "show", "ext0").stdout)
    ext = dataclasses.replace(topo.external, gateway_mac=link[0]["address"])
    return dataclasses.replace(topo, external=ext)


def changes(report: tracing.Report) -> list[tuple[str, str, list[str]]]:
    return [(h.node, h.table, [c for c in h.changes if not c.startswith("ct(")])
            for h in report.hops if h.bridge == "br-int"]


def test_drops_say_why_live(lab: LabHandle) -> None:
    tracer = LiveTracer(Lab(lab.prefix))
    isolated = tracer.trace("vm9", "icmp, ip.dst=10.1.0.11").outcomes[0].reason
    assert isolated.startswith("isolation: networks grey and blue share no router")
    unknown = tracer.trace("vm1", "icmp, ip.dst=10.1.0.99").outcomes[0].reason
    assert unknown == "unknown destination: no VM holds 10.1.0.99 on network blue"


def test_a_reply_of_a_tracked_connection_is_followed_through_its_nat(lab: LabHandle) -> None:
    """ofproto/trace cannot apply an existing connection's NAT: such a packet is emulated
    over the installed flows and the switches' real connection tables."""
    reply = "udp, ip.src=198.51.100.10, ip.dst=203.0.113.10, udp.sport=53, udp.dport=40123"
    before = LiveTracer(Lab(lab.prefix)).trace_and_compare("ext", reply)
    assert before.engine == "live"
    assert [(o.kind, o.node) for o in before.outcomes] == [("dropped", "net1")]
    assert before.outcomes[0].reason.startswith("unsolicited traffic to a router's external IP")
    # vm4 (no floating IP) opens the connection through r1's SNAT on net1
    res = lab.exec("vm4", "python3", "-c", "import socket; s = socket.socket(socket.AF_INET, "
                   "socket.SOCK_DGRAM); s.bind(('0.0.0.0', 40123)); "
                   "s.sendto(b'x', ('198.51.100.10', 53))")
    assert res.returncode == 0, res.stderr
    tracer = LiveTracer(Lab(lab.prefix))
    after = tracer.trace_and_compare("ext", reply)
    assert after.engine.startswith("live: an established connection")
    assert after.divergence is None, after.divergence
    assert [(o.kind, o.node, o.to) for o in after.outcomes] == [("delivered", "compute2", "vm4")]
    assert after.outcomes[0].headers["ip.dst"] == "10.1.0.14"
    assert [(c.kind, c.src, c.dst) for c in after.crossings] == [
        ("provider", "ext", "net1"), ("tunnel", "net1", "compute2")]
    assert tracer.verify(after) == []


def test_a_broken_node_is_named_with_its_table(lab: LabHandle) -> None:
    topo = lab.topology()
    pidfile = lab.rundir / "nodes" / "compute1" / "agent.pid"
    pid = int(pidfile.read_text())
    os.kill(pid, signal.SIGSTOP)  # so that it does not repair the flow at once
    try:
        red = topo.networks["red"].vni
        lab.node("compute1", "ovs-ofctl", "-O", "OpenFlow13", "del-flows", "--strict", "br-int",
                 f"table=40,priority=100,reg0=0xa02000c,metadata={red:#x}")
        out = _trace_cli(lab, "vm1", "icmp, ip.dst=10.2.0.12")
        assert "dropped on compute1" in out
        assert ("DIFFERS FROM THE PLAN at compute1, table ls_out_remote: the plan has "
                "delivery_remote [vm vm2]") in out
        offline = _trace_cli(lab, "--offline", "vm1", "icmp, ip.dst=10.2.0.12")
        assert "delivered to vm2 on compute2" in offline
    finally:
        os.kill(pid, signal.SIGCONT)
        lab.dvr("restart-agent", "compute1")
    assert "DIFFERS" not in _trace_cli(lab, "vm1", "icmp, ip.dst=10.2.0.12")


def test_verify_reports_what_the_real_packet_did_differently(lab: LabHandle) -> None:
    """A prediction made before a flow disappears: the real packet does not follow it."""
    tracer = LiveTracer(Lab(lab.prefix))
    report = tracer.trace("vm1", "icmp, ip.dst=10.2.0.12")
    pid = int((lab.rundir / "nodes" / "compute1" / "agent.pid").read_text())
    os.kill(pid, signal.SIGSTOP)
    try:
        red = lab.topology().networks["red"].vni
        lab.node("compute1", "ovs-ofctl", "-O", "OpenFlow13", "del-flows", "--strict", "br-int",
                 f"table=40,priority=100,reg0=0xa02000c,metadata={red:#x}")
        problems = tracer.verify(report)
    finally:
        os.kill(pid, signal.SIGCONT)
        lab.dvr("restart-agent", "compute1")
    assert "predicted a tunnel compute1 => compute2" in problems[0]
    assert "predicted delivery to vm2 on compute2: nothing arrived" in problems


def _trace_cli(lab: LabHandle, *args: str) -> str:
    return dvr("trace", "--prefix", lab.prefix, *args).stdout


def test_bad_input_is_refused_with_one_clear_line(lab: LabHandle) -> None:
    res = dvr("trace", "--prefix", lab.prefix, "vm42", "icmp, ip.dst=10.2.0.12", check=False)
    assert res.returncode != 0 and "unknown VM 'vm42'" in res.stderr
    res = dvr("trace", "--prefix", lab.prefix, "vm1", "icmp, ip.dst=10.2.0", check=False)
    assert res.returncode != 0
    assert "'ip.dst=10.2.0'" in res.stderr and "^" in res.stderr
    res = dvr("trace", "--prefix", "nolab", "vm1", "icmp, ip.dst=10.2.0.12", check=False)
    assert res.returncode != 0 and "is not up" in res.stderr
