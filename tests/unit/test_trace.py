"""`dvr trace`: the packet language and the offline engine, on every kind of path."""

from __future__ import annotations

import json

import pytest

from dvr import cli
from dvr.lab.generate import generate, sample_paths
from dvr.trace.expr import BROADCAST, ExprError, from_external, from_vm, parse
from dvr.trace.offline import offline
from dvr.trace.report import render
from flows.model import build_topology


@pytest.fixture(scope="module")
def topo(topology_doc):
    data = topology_doc("northsouth")
    # an isolated network: its own router, no external gateway
    data["networks"]["grey"] = {"cidr": "10.9.0.0/24"}
    data["routers"]["r9"] = {"interfaces": ["grey"]}
    data["vms"]["vm9"] = {"node": "compute2", "network": "grey", "ip": "10.9.0.19"}
    return build_topology(data, "northsouth+grey")


# --- the language -------------------------------------------------------------------------
def test_examples_of_the_issue_parse(topo) -> None:
    p = from_vm(topo, "vm1", "icmp, ip.dst=10.2.0.12")
    assert (p["ipv4_src"], p["eth_src"], p["icmpv4_type"]) == ("10.1.0.11", topo.vms["vm1"].mac,
                                                               8)
    assert p["eth_dst"] == topo.routers["r1"].interface_on("blue").mac  # off-subnet: router
    p = from_vm(topo, "vm1", "tcp, ip.dst=198.51.100.10, tcp.dport=443")
    assert (p["ip_proto"], p["tcp_dst"], p["tcp_src"]) == (6, 443, 40000)
    p = from_vm(topo, "vm1", "arp, arp.tpa=10.1.0.1")
    assert (p["eth_dst"], p["arp_op"], p["arp_spa"]) == (BROADCAST, 1, "10.1.0.11")
    p = from_vm(topo, "vm1", "udp, ip.dst=203.0.113.50")
    assert (p["ip_proto"], p["udp_dst"]) == (17, 53)
    p = from_vm(topo, "vm1", "ip.dst=10.1.0.14, tcp.dport=22, ip.ttl=2")
    assert (p["ip_proto"], p["eth_dst"], p["ip_ttl"]) == (6, topo.vms["vm4"].mac, 2)


def test_from_the_external_host(topo) -> None:
    p = from_external(topo, "icmp, ip.dst=203.0.113.50")
    assert p["ipv4_src"] == "198.51.100.10"
    assert p["eth_dst"] == topo.nodes["compute1"].external_mac
    p = from_external(topo, "tcp, ip.dst=203.0.113.10")
    assert p["eth_dst"] == topo.routers["r1"].external_mac
    assert from_external(topo, "icmp, ip.dst=203.0.113.99")["eth_dst"] == BROADCAST


@pytest.mark.parametrize("text,bad,reason", [
    ("icmp, ip.dst=10.2.0.300", "ip.dst=10.2.0.300", "not an IPv4 address"),
    ("tcp, udp.dport=3", "udp.dport=3", "does not go with tcp"),
    ("icmp, ip.dts=10.2.0.12", "ip.dts=10.2.0.12", "unknown field 'ip.dts'"),
    ("tcp, ip.dst=10.2.0.12, tcp.dport=65536", "tcp.dport=65536", "does not fit in 16 bits"),
    ("tcp, ip.dst=10.2.0.12, tcp.dport=http", "tcp.dport=http", "not a number"),
    ("icmp, eth.dst=zz:00:00:00:00:00, ip.dst=10.2.0.12", "eth.dst=zz:00:00:00:00:00",
     "not a MAC address"),
    ("icmp, udp, ip.dst=10.2.0.12", "udp", "a second protocol"),
    ("ping, ip.dst=10.2.0.12", "ping", "not a protocol"),
    ("icmp, ip.dst=10.2.0.12, ip.dst=10.2.0.13", "ip.dst=10.2.0.13", "given twice"),
    ("arp, ip.dst=10.2.0.12", "ip.dst=10.2.0.12", "does not go with arp"),
])
def test_a_malformed_expression_points_at_the_bad_item(text: str, bad: str,
                                                       reason: str) -> None:
    with pytest.raises(ExprError) as info:
        parse(text)
    err = info.value
    assert text[err.start:err.end].strip() == bad
    assert reason in str(err) and bad in str(err)
    line, caret = err.pointer().splitlines()
    assert line == text and caret.strip() == "^" * len(bad)
    assert caret.index("^") == text.index(bad)


def test_missing_destination_and_unroutable_sender(topo) -> None:
    with pytest.raises(ExprError, match=r"ip\.dst"):
        from_vm(topo, "vm1", "icmp")
    with pytest.raises(ExprError, match=r"arp\.tpa"):
        from_vm(topo, "vm1", "arp")
    with pytest.raises(KeyError, match="unknown VM"):
        from_vm(topo, "nope", "icmp, ip.dst=10.2.0.12")


# --- the offline engine, one test per kind of path ------------------------------------------
def ends(report):
    return [(o.kind, o.node, o.to) for o in report.outcomes]


def test_same_network_across_nodes(topo) -> None:
    r = offline(topo, "vm1", "icmp, ip.dst=10.1.0.14")
    assert ends(r) == [("delivered", "compute2", "vm4")]
    assert [(c.kind, c.src, c.dst) for c in r.crossings] == [("tunnel", "compute1", "compute2")]
    assert r.outcomes[0].headers["ip.ttl"] == 64  # switched, not routed


def test_routed_same_node_and_across_nodes(topo) -> None:
    r = offline(topo, "vm1", "icmp, ip.dst=10.2.0.13")
    assert ends(r) == [("delivered", "compute1", "vm3")] and r.crossings == []
    assert r.outcomes[0].headers["ip.ttl"] == 63
    r = offline(topo, "vm1", "tcp, ip.dst=10.2.0.12, tcp.dport=22")
    assert ends(r) == [("delivered", "compute2", "vm2")]
    assert r.outcomes[0].headers["eth.src"] == topo.routers["r1"].interface_on("red").mac


def test_floating_ip_in_and_out_and_snat(topo) -> None:
    r = offline(topo, "ext", "tcp, ip.dst=203.0.113.50, tcp.dport=22")
    assert ends(r) == [("delivered", "compute1", "vm1")]
    assert r.outcomes[0].headers["ip.dst"] == "10.1.0.11"
    r = offline(topo, "vm1", "tcp, ip.dst=198.51.100.10, tcp.dport=443")
    assert ends(r) == [("delivered", "compute1", "external host")]
    assert r.outcomes[0].headers["ip.src"] == "203.0.113.50"
    r = offline(topo, "vm4", "udp, ip.dst=198.51.100.10")
    assert ends(r) == [("delivered", "net1", "external host")]
    assert r.outcomes[0].headers["ip.src"] == "203.0.113.10"
    assert [c.kind for c in r.crossings] == ["tunnel", "provider"]


def test_traffic_to_the_gateway_itself(topo) -> None:
    r = offline(topo, "vm1", "arp, arp.tpa=10.1.0.1")
    assert ends(r) == [("delivered", "compute1", "vm1")]
    assert r.outcomes[0].headers["arp.op"] == 2
    r = offline(topo, "vm1", "icmp, ip.dst=10.2.0.1")
    assert ends(r) == [("delivered", "compute1", "vm1")]
    assert r.outcomes[0].headers["icmp.type"] == 0


def test_isolated_and_unknown_destinations_say_why(topo) -> None:
    r = offline(topo, "vm9", "icmp, ip.dst=10.1.0.11")
    assert ends(r) == [("dropped", "compute2", None)]
    assert r.outcomes[0].reason.startswith("isolation: networks grey and blue share no router")
    r = offline(topo, "vm9", "icmp, ip.dst=192.0.2.1")
    assert r.outcomes[0].reason == "no route to 192.0.2.1 on router r9"
    r = offline(topo, "vm1", "icmp, ip.dst=10.1.0.99")
    assert r.outcomes[0].reason == "unknown destination: no VM holds 10.1.0.99 on network blue"


def test_levels(topo) -> None:
    r = offline(topo, "vm1", "icmp, ip.dst=10.2.0.12")
    minimal = render(r, "minimal")
    assert minimal.splitlines() == [
        f"  -> tunnel compute1 => compute2 (VNI {topo.networks['red'].vni})",
        f"delivered to vm2 on compute2: eth.src={topo.routers['r1'].interface_on('red').mac} "
        f"eth.dst={topo.vms['vm2'].mac} ip.src=10.1.0.11 ip.dst=10.2.0.12 ip.ttl=63",
    ]
    summary = render(r)
    assert "20 lr_in_routing: route [router r1]: route 10.2.0.0/24 to red" in summary
    detailed = render(r, "detailed")
    assert "actions=dec_ttl" in detailed and "actions=dec_ttl" not in summary
    doc = json.loads(render(r, "json"))
    assert doc["outcomes"][0]["to"] == "vm2" and doc["hops"][0]["table"] == "phy_in_classify"


@pytest.mark.parametrize("sender,packet", [
    ("vm1", "icmp, ip.dst=10.1.0.14"), ("vm1", "icmp, ip.dst=10.2.0.12"),
    ("vm4", "udp, ip.dst=198.51.100.10"), ("ext", "icmp, ip.dst=203.0.113.50"),
    ("vm1", "icmp, ip.dst=203.0.113.52"), ("vm1", "icmp, ip.dst=203.0.113.51"),
    ("vm4", "icmp, ip.dst=203.0.113.52"), ("vm9", "icmp, ip.dst=10.1.0.11"),
])
def test_planning_only_what_the_packet_meets_changes_nothing(topo, sender, packet) -> None:
    from flows.simulator import Cloud

    focused = offline(topo, sender, packet)
    full = offline(topo, sender, packet, Cloud.offline(topo))
    assert focused.to_dict() == full.to_dict()


def test_focused_planning_on_a_generated_cloud() -> None:
    from flows.simulator import Cloud

    doc = generate(600, computes=12, networks=6, fip_every=10)
    cloud = build_topology(doc)
    full = Cloud.offline(cloud)
    for _, sender, packet in sample_paths(doc):
        full.reset_conntrack()
        assert offline(cloud, sender, packet).to_dict() == offline(
            cloud, sender, packet, full).to_dict(), (sender, packet)


def test_svg_draws_the_numbered_path(topo) -> None:
    import xml.etree.ElementTree as ET

    from dvr.trace.report import svg

    r = offline(topo, "vm4", "udp, ip.dst=198.51.100.10")
    root = ET.fromstring(svg(r))
    texts = [t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "compute2 (br-int)" in texts and "net1 (br-int)" in texts
    assert "external host" in texts
    assert "1. phy_in_classify" in texts and "4. lr_out_redirect" in texts
    crossings = [t for t in texts if "tunnel VNI" in t or "provider to" in t]
    assert crossings == [f"5. tunnel VNI {topo.networks['blue'].vni}",
                         f"14. provider to {r.crossings[1].carried}"]
    assert "delivered to external host on net1" in texts


# --- the command --------------------------------------------------------------------------
def test_cli_offline(capsys, topology_path) -> None:
    ns = topology_path("northsouth")
    assert cli.main(["trace", "--offline", str(ns), "--minimal", "vm1",
                     "icmp, ip.dst=10.2.0.12"]) == 0
    assert "delivered to vm2 on compute2" in capsys.readouterr().out
    assert cli.main(["trace", "--offline", str(ns), "vm1", "icmp, ip.dst=10.2.0.300"]) == 2
    err = capsys.readouterr().err
    assert "ip.dst=10.2.0.300" in err and "^^^" in err
    assert cli.main(["trace", "--offline", str(ns), "vm42", "icmp, ip.dst=10.2.0.12"]) == 2
    assert "unknown VM 'vm42'" in capsys.readouterr().err


def test_offline_trace_on_a_large_cloud(topology_doc, northsouth) -> None:
    data = topology_doc("northsouth")
    data["networks"]["blue"]["cidr"] = "10.1.0.0/20"
    data["networks"]["red"]["cidr"] = "10.2.0.0/20"
    for i in range(2000):
        data["vms"][f"x{i}"] = {"node": "compute1" if i % 2 else "compute2",
                                "network": "blue" if i % 3 else "red"}
    big = build_topology(data)
    r = offline(big, "vm1", "icmp, ip.dst=10.2.0.12")
    assert ends(r) == [("delivered", "compute2", "vm2")]
    assert northsouth.vms["vm2"].ip == big.vms["vm2"].ip
