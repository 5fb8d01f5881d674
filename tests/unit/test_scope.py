"""`scope(topology, node)`: the VMs a node's plan can depend on, which is all an agent keeps
of a big cloud (conditional monitoring of the northbound database).

Exactness both ways, on every node of the built-in topologies and of generated clouds with
routers (with and without external gateways), floating IPs, several SNAT nodes and isolated
networks: a topology holding only the VMs in scope plans the same flows as the whole cloud,
and every VM in scope changes the plan when it is missing. The agent computes the scope on
its own partial copy; starting from no VM at all, a few rounds reach the same scope.
"""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from dvr.lab.generate import generate
from flows.model import Topology, TopologyError, _mac_for, build_topology, load_topology, to_dict
from flows.ofp import Flow
from flows.planner import Scope, announcements, assumed_ports, plan, scope, snat_routers

SEEDS = (1, 2, 3, 4)


def generated(seed: int) -> Topology:
    """12 computes and 3 network nodes; 24 networks: 16 in pairs on 8 routers (6 with an
    external gateway, SNAT on different network nodes), 4 on one router without, 4 on
    no router. Each compute hosts VMs of 2 or 3 networks; only 4 computes host floating
    IPs, so the other computes NAT nothing."""
    doc = generate(400, computes=12, network_nodes=3, networks=24, per_router=[2] * 8 + [4],
                   isolated=4, external_routers=6, snat_nodes=(1, 2), per_compute=(2, 3),
                   fip_every=3, fip_computes=4, seed=seed)
    # what the northbound database holds: every allocated value written out
    return build_topology(to_dict(build_topology(doc, f"gen{seed}")), f"gen{seed}")


def restricted(topo: Topology, sc: Scope) -> Topology:
    """The topology an agent builds from a copy holding only the VMs in `sc`."""
    doc = to_dict(topo)
    doc["vms"] = {k: v for k, v in doc["vms"].items() if sc.holds(topo.vms[k])}
    return build_topology(doc, f"{topo.source}, scoped to {sc.node}")


@pytest.fixture(scope="module", params=["example", "northsouth", *(f"gen{s}" for s in SEEDS)])
def topo(request: pytest.FixtureRequest, topology_path) -> Topology:
    name = request.param
    if name.startswith("gen"):
        return generated(int(name[3:]))
    return build_topology(to_dict(load_topology(topology_path(name))), name)


def node_plan(topo: Topology, node: str) -> frozenset[Flow]:
    return plan(topo, node, assumed_ports(topo, node))


# --- exact: the VMs in scope are enough ------------------------------------------------------


def test_a_node_plans_the_same_flows_from_its_scope_alone(topo: Topology) -> None:
    for node in topo.nodes:
        sc = scope(topo, node)
        part = restricted(topo, sc)
        ports = assumed_ports(topo, node)
        assert assumed_ports(part, node) == ports
        assert plan(part, node, ports) == plan(topo, node, ports), node
        assert announcements(part, node, ports) == announcements(topo, node, ports)
        # the agent computes the scope over its copy: the copy asks for nothing more
        assert scope(part, node) == sc, node


def test_the_scope_follows_the_plan_s_rules(example: Topology, northsouth: Topology) -> None:
    """On the built-in topology, by hand: computes see the routed pair; the network node
    (SNAT of r1, no VM) sees r1's networks and would see every floating IP; a compute
    without a floating IP NATs nothing."""
    topo = example
    assert scope(topo, "compute1").networks == {"blue", "red"}
    assert scope(topo, "net1").networks == {"blue", "red"}
    assert scope(topo, "net1").floating_ips  # SNAT here: lr_out_delivery to every floating IP
    assert not scope(topo, "compute1").floating_ips  # no floating IP in this cloud
    ns = northsouth
    assert scope(ns, "compute1").networks == {"blue", "red"}  # not green (r2)
    assert scope(ns, "compute1").floating_ips  # vm1 and vm3 have floating IPs
    assert {v.name for v in ns.vms.values() if scope(ns, "compute1").holds(v)} == {
        "vm1", "vm2", "vm3", "vm4", "vm5"}  # vm5 (green) for its floating IP


# --- exact: every VM in scope is needed ------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS[:1])
def test_every_vm_in_scope_changes_the_plan_when_missing(seed: int) -> None:
    topo = generated(seed)
    for node in topo.nodes:
        sc = scope(topo, node)
        part = restricted(topo, sc)
        full = node_plan(part, node)
        for name in part.vms:
            less = dataclasses.replace(part, vms={k: v for k, v in part.vms.items() if k != name})
            assert node_plan(less, node) != full, (node, name)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_big_cloud_s_scopes_are_smaller(seed: int) -> None:
    topo = generated(seed)
    sizes = {n: len(restricted(topo, scope(topo, n)).vms) for n in topo.nodes}
    computes = [n for n, node in topo.nodes.items() if not node.is_network]
    quiet = [n for n in computes if not scope(topo, n).floating_ips]
    assert quiet, "some computes NAT nothing"
    assert all(sizes[n] < len(topo.vms) for n in quiet)
    assert sum(sizes[n] for n in quiet) / len(quiet) < 0.6 * len(topo.vms), sizes


def test_dropping_a_rule_breaks_exactness() -> None:
    """Each rule of the scope is needed on some node: without it, some plan changes."""
    topo = generated(SEEDS[0])

    def own(node: str) -> frozenset[str]:
        return frozenset(v.network for v in topo.vms_on(node))

    def snat(node: str) -> frozenset[str]:
        return frozenset(i.network for r in snat_routers(topo, node)
                         for i in topo.routers[r].interfaces)

    weaker = {
        "routed networks": lambda sc: dataclasses.replace(
            sc, networks=own(sc.node) | snat(sc.node)),
        "SNAT networks": lambda sc: dataclasses.replace(
            sc, networks=frozenset(topo.reachable_networks(own(sc.node)))),
        "floating IPs": lambda sc: dataclasses.replace(sc, floating_ips=False),
    }
    for rule, weaken in weaker.items():
        broken = [n for n in topo.nodes if node_plan(
            restricted(topo, weaken(scope(topo, n))), n) != node_plan(topo, n)]
        assert broken, f"no plan needs the rule {rule!r}"


# --- router and node MACs: from their own names, never around the VMs' ----------------------

COLLIDING = """
nodes:
  compute1: {role: compute}
  compute2: {role: compute}
  net1: {role: network}
external: {cidr: 203.0.113.0/24, gateway_ip: 203.0.113.1}
networks:
  blue: {cidr: 10.1.0.0/24}
  red: {cidr: 10.2.0.0/24}
  iso: {cidr: 10.9.0.0/24}
routers:
  r1: {interfaces: [blue, red], external_gateway: true}
vms:
  vm1: {node: compute1, network: blue}
  vm2: {node: compute1, network: red}
  vm9: {node: compute2, network: iso, mac: "%s"}
"""


def test_a_vm_may_not_take_a_router_s_or_a_node_s_mac() -> None:
    """Were a VM's MAC to push a router's MAC to its next choice, an agent without that VM
    in its copy (vm9 is out of compute1's scope) would route with another MAC than its
    peers: the MAC is refused instead, naming its holder."""
    rif = _mac_for("rif:r1:blue", set())
    with pytest.raises(TopologyError, match=f"vms.vm9.mac: {rif} is router r1's MAC on blue"):
        build_topology(yaml.safe_load(COLLIDING % rif), "colliding")
    taken = {rif, _mac_for("rif:r1:red", {rif})}
    gw = _mac_for("rgw:r1", taken)
    with pytest.raises(TopologyError, match="is router r1's external MAC"):
        build_topology(yaml.safe_load(COLLIDING % gw), "colliding")


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_router_and_node_macs_do_not_depend_on_the_vms(seed: int) -> None:
    topo = generated(seed)
    bare = build_topology({**to_dict(topo), "vms": {}}, "bare")
    assert bare.routers == topo.routers
    assert {n: v.external_mac for n, v in bare.nodes.items()} == {
        n: v.external_mac for n, v in topo.nodes.items()}


# --- the agent's rounds: from no VM at all to its scope --------------------------------------


def rounds(topo: Topology, node: str) -> tuple[set[str], int]:
    """What the agent's copy converges to, and in how many condition changes: it starts
    with no VM, and asks each time for the VMs its copy's scope holds."""
    held: set[str] = set()
    whole = to_dict(topo)
    for n in range(1, 10):
        doc = {**whole, "vms": {k: v for k, v in whole["vms"].items() if k in held}}
        sc = scope(build_topology(doc, "copy"), node)
        wanted = {k for k, v in topo.vms.items() if sc.holds(v)}
        if wanted == held:
            return held, n
        held = wanted
    raise AssertionError(f"{node}: the scope does not settle")


def test_the_agent_s_rounds_reach_the_scope(topo: Topology) -> None:
    for node in topo.nodes:
        held, n = rounds(topo, node)
        assert held == {k for k, v in topo.vms.items() if scope(topo, node).holds(v)}
        assert n <= 3, (node, n)  # own VMs, then their networks' (then a check)
