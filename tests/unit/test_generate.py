"""`dvr.lab.generate`: the generated clouds of the benchmarks and the tests have the shapes its
arguments ask for, and the model accepts them."""

from __future__ import annotations

import ipaddress
from collections import Counter
from typing import Any

import pytest

from dvr.lab.generate import generate, sample_paths
from flows.model import build_topology


def computes_of(doc: dict[str, Any]) -> list[str]:
    return [n for n, node in doc["nodes"].items() if node["role"] == "compute"]


def test_round_robin_spreads_every_network_over_every_compute() -> None:
    doc = generate(48, computes=6, networks=4)  # 4 and 6 share a factor
    pairs = Counter((vm["node"], vm["network"]) for vm in doc["vms"].values())
    assert len(pairs) == 6 * 4 and set(pairs.values()) == {2}
    assert build_topology(doc).vms.keys() == doc["vms"].keys()


def test_a_few_networks_per_compute_drawn_from_the_seed() -> None:
    doc = generate(200, computes=8, networks=10, per_compute=(2, 3), seed=5)
    hosted = {c: {vm["network"] for vm in doc["vms"].values() if vm["node"] == c}
              for c in computes_of(doc)}
    assert all(1 <= len(nets) <= 3 for nets in hosted.values()), hosted
    assert len({n for nets in hosted.values() for n in nets}) > 3
    assert generate(200, computes=8, networks=10, per_compute=(2, 3), seed=5) == doc
    assert generate(200, computes=8, networks=10, per_compute=(2, 3), seed=6) != doc
    build_topology(doc)


def test_routers_gateways_isolated_and_empty_networks() -> None:
    doc = generate(90, network_nodes=2, networks=9, per_router=(4, 2), isolated=3,
                   external_routers=1, snat_nodes=1, empty=("n3", "n8"))
    assert {r: v["interfaces"] for r, v in doc["routers"].items()} == {
        "r0": ["n0", "n1", "n2", "n3"], "r1": ["n4", "n5"]}
    assert doc["routers"]["r0"]["external_gateway"] and len(doc["routers"]["r0"]["snat_nodes"]) == 1
    assert "external_gateway" not in doc["routers"]["r1"]
    assert {vm["network"] for vm in doc["vms"].values()} == {
        "n0", "n1", "n2", "n4", "n5", "n6", "n7"}
    topo = build_topology(doc)
    assert topo.router_of("n8") is None and topo.routers["r0"].external_ip is not None


def test_floating_ips_every_kth_vm_of_a_network_on_some_computes() -> None:
    doc = generate(120, computes=4, networks=4, per_router=2, external_routers=1,
                   fip_every=3, fip_computes=2)
    with_fip = [vm for vm in doc["vms"].values() if "floating_ip" in vm]
    assert with_fip and {vm["network"] for vm in with_fip} == {"n0", "n1"}  # r0's
    assert {vm["node"] for vm in with_fip} <= {"c0", "c1"}
    eligible = [vm for vm in doc["vms"].values()
                if vm["network"] == "n0" and vm["node"] in ("c0", "c1")]
    assert ["floating_ip" in vm for vm in eligible] == [k % 3 == 0 for k in range(len(eligible))]
    assert len(build_topology(doc).floating_ips()) == len(with_fip)


def test_overlapping_networks_keep_addresses_unique() -> None:
    doc = generate(300, networks=6, per_router=3, overlapping=1)
    assert doc["networks"]["n5"]["cidr"] == doc["networks"]["n0"]["cidr"]
    ips = [vm["ip"] for vm in doc["vms"].values()]
    assert len(set(ips)) == len(ips)
    build_topology(doc)
    with pytest.raises(ValueError, match="overlap n0 on router r0"):
        generate(10, networks=4, per_router=4, overlapping=1)


def test_networks_grow_with_their_vms() -> None:
    doc = generate(600, computes=3, networks=2)
    assert {ipaddress.IPv4Network(n["cidr"]).prefixlen for n in doc["networks"].values()} == {23}
    build_topology(doc)


def test_extending_a_document() -> None:
    base = generate(20, computes=2, networks=2, fip_every=2)
    before = repr(base)
    doc = generate(100, computes=3, network_nodes=0, networks=4, fip_every=5,
                   tunnel_ips="198.18.100.1", base=base, prefix="g")
    assert repr(base) == before  # a copy is extended
    assert set(base["vms"]) < set(doc["vms"]) and len(doc["vms"]) == 120
    assert doc["nodes"]["gc2"] == {"role": "compute", "tunnel_ip": "198.18.100.3"}
    old = [ipaddress.IPv4Network(n["cidr"]) for n in base["networks"].values()]
    new = [ipaddress.IPv4Network(n["cidr"]) for k, n in doc["networks"].items()
           if k not in base["networks"]]
    assert len(new) == 4 and not any(a.overlaps(b) for a in new for b in old)
    fips = [vm["floating_ip"] for vm in doc["vms"].values() if "floating_ip" in vm]
    assert len(set(fips)) == len(fips) > len(base["vms"]) // 2
    build_topology(doc)
    with pytest.raises(ValueError, match="already in the document"):
        generate(5, base=base)


def test_sample_paths_name_every_kind() -> None:
    doc = generate(200, computes=5, networks=4, fip_every=10)
    paths = sample_paths(doc)
    assert [label for label, _, _ in paths] == [
        "same network", "routed", "floating IP out", "floating IP in", "SNAT", "FIP to FIP"]
    assert all(sender in doc["vms"] or sender == "ext" for _, sender, _ in paths)
    with pytest.raises(ValueError, match="no VM with a floating IP"):
        sample_paths(generate(20))
