"""SNAT high availability in the planner, the simulator and the claims (pure): HA chains,
compute nodes steering by fast-failover groups, network nodes serving only when the nodes
before them are down, and who speaks for a router's external IP."""

from __future__ import annotations

import dataclasses

import pytest

from flows import ha
from flows.model import Topology, load_topology
from flows.nat import Binding, moved_translations
from flows.ofp import ETH_ARP, GroupAction
from flows.planner import assumed_ports, plan, snat_candidates
from flows.simulator import Cloud, NodePlan, packet

REMOTE = "198.51.100.10"
UP, DOWN = "up", "down"


@pytest.fixture(scope="module")
def topo(topology_path) -> Topology:  # type: ignore[no-untyped-def]
    return load_topology(topology_path("ha"))


def cloud(topo: Topology, claims: dict[str, set[str]] | None = None) -> Cloud:
    """Every node's plan with the ports the topology assumes; `claims`: which routers each
    network node speaks for (default: the first choices)."""
    nodes = {}
    for name in topo.nodes:
        ports = assumed_ports(topo, name)
        if claims is not None and topo.nodes[name].is_network:
            ports = dataclasses.replace(ports, snat=frozenset(claims.get(name, ())))
        nodes[name] = NodePlan(name, ports, plan(topo, name, ports))
    return Cloud(topo, nodes)


def snat_out(topo: Topology, c: Cloud, vm: str, sport: int = 4000):  # type: ignore[no-untyped-def]
    v = topo.vms[vm]
    router = topo.router_of(v.network)
    assert router is not None
    gw = router.interface_on(v.network).mac  # type: ignore[union-attr]
    return c.send_from_vm(vm, packet(udp=True, eth_src=v.mac, eth_dst=gw, ipv4_src=str(v.ip),
                                     ipv4_dst=REMOTE, udp_src=sport, udp_dst=53))


def test_default_chains_spread_the_first_choices(topo: Topology) -> None:
    assert topo.routers["r1"].snat_nodes == ("net1", "net2")
    assert topo.routers["r2"].snat_nodes == ("net2", "net1")
    assert snat_candidates(topo, "net1") == snat_candidates(topo, "net2") == {"r1", "r2"}


def test_compute_nodes_steer_by_a_fast_failover_group_in_chain_order(topo: Topology) -> None:
    ports = assumed_ports(topo, "compute2")
    steering = [a.group for f in plan(topo, "compute2", ports) for a in f.actions
                if isinstance(a, GroupAction) and f.table == "lr_out_redirect"]
    by_router = {g.hint.name: g for g in steering if g.hint}
    for name in ("r1", "r2"):
        chain = topo.routers[name].snat_nodes
        tunnels = [ports.tunnels[n] for n in chain]
        assert [b.watch_port for b in by_router[name].buckets] == tunnels
        assert [b.actions[0].port for b in by_router[name].buckets] == tunnels  # type: ignore[union-attr]


def test_snat_goes_to_the_first_choice_while_it_lives(topo: Topology) -> None:
    c = cloud(topo)
    trace = snat_out(topo, c, "vm2")
    [end] = trace.ends
    assert end.external and end.packet["ipv4_src"] == "203.0.113.10"
    assert trace.tunnels == [("compute2", "net1")]
    trace = snat_out(topo, c, "vm5")  # r2: net2 first
    assert trace.tunnels == [("compute2", "net2")] and trace.ends[0].external


def test_when_the_first_choice_dies_its_standby_serves_with_the_same_address(
        topo: Topology) -> None:
    c = cloud(topo, claims={"net2": {"r1", "r2"}})
    c.down = {"net1"}
    trace = snat_out(topo, c, "vm2")
    [end] = trace.ends
    assert trace.tunnels == [("compute2", "net2")]
    assert end.external and end.node == "net2"
    assert (end.packet["ipv4_src"], end.packet["eth_src"]) == (
        "203.0.113.10", topo.routers["r1"].external_mac)
    # the reply, to the router's external MAC, now reaches net2 and goes back to vm2
    back = c.send_from_external(packet(udp=True, eth_dst=topo.routers["r1"].external_mac,
                                       ipv4_src=REMOTE, ipv4_dst="203.0.113.10",
                                       udp_src=53, udp_dst=4000))
    [end] = back.ends
    assert end.vm == "vm2" and end.packet["ipv4_dst"] == "10.2.0.12"
    assert back.tunnels == [("net2", "compute2")]


def test_a_standby_does_not_serve_while_it_sees_the_first_choice_alive(
        topo: Topology) -> None:
    """compute2 alone lost its tunnel to net1: it sends r1's traffic to net2, which still sees
    net1 and drops it rather than speak for r1 beside net1."""
    c = cloud(topo)
    c.cuts = {frozenset(("compute2", "net1"))}
    trace = snat_out(topo, c, "vm2")
    [end] = trace.ends
    assert trace.tunnels == [("compute2", "net2")]
    assert end.kind == "dropped" and end.node == "net2"
    assert "served here once net1 is down" in end.reason
    # compute1 still reaches net1, which serves r1 as before
    assert snat_out(topo, c, "vm3").ends[0].external


def test_a_restarted_switch_trusts_the_peers_that_were_up_until_their_sessions_are(
        topo: Topology) -> None:
    """compute2's switch restarted: its BFD sessions start again from down and come up a
    second or so after it forwards. Meanwhile its agent trusts the peers that were up before
    (NodePorts.trusted): their buckets watch the provider patch, which is up, instead of
    the tunnel, so vm2's SNAT traffic goes to net1 at once; untrusted, it is dropped at
    compute2 until the sessions are up."""
    def restarted(trusted: set[str]) -> Cloud:
        nodes = {}
        for name in topo.nodes:
            ports = assumed_ports(topo, name)
            if name == "compute2":
                ports = dataclasses.replace(ports, trusted=frozenset(trusted))
            nodes[name] = NodePlan(name, ports, plan(topo, name, ports))
        c = Cloud(topo, nodes)
        c.cuts = {frozenset(("compute2", "net1")), frozenset(("compute2", "net2"))}
        return c

    [end] = snat_out(topo, restarted(set()), "vm2").ends
    assert end.kind == "dropped" and end.node == "compute2"
    trace = snat_out(topo, restarted({"net1", "net2"}), "vm2")
    assert trace.tunnels == [("compute2", "net1")] and trace.ends[0].external
    # net1 alone trusted: r2 (net2 first) goes to net1, the first live bucket of its
    # chain, which sees net2 alive and drops it: never a second speaker
    trace = snat_out(topo, restarted({"net1"}), "vm5")
    assert trace.tunnels == [("compute2", "net1")]
    assert trace.ends[0].kind == "dropped" and trace.ends[0].node == "net1"


def test_a_standby_gives_a_held_translation_its_port_whatever_comes_first(
        topo: Topology) -> None:
    """vm2 and vm4 (both behind r1) from one source port to one remote port: on net1 the
    second, vm4, got port 33334. net2 holds that translation: after net1 dies, vm4's first
    packet through net2 gets 33334 even though it comes before vm2's, and vm2 keeps 33333."""
    held = frozenset({Binding("r1", 6, "10.1.0.14", 33333, REMOTE, 8000, 33334)})
    nodes = {}
    for name in topo.nodes:
        ports = assumed_ports(topo, name)
        if name == "net2":
            ports = dataclasses.replace(ports, snat=frozenset({"r1", "r2"}), held=held)
        nodes[name] = NodePlan(name, ports, plan(topo, name, ports))
    c = Cloud(topo, nodes)
    c.down = {"net1"}

    def tcp_out(vm: str) -> dict:  # type: ignore[type-arg]
        v = topo.vms[vm]
        gw = topo.routers["r1"].interface_on(v.network).mac  # type: ignore[union-attr]
        [end] = c.send_from_vm(vm, packet(tcp=True, eth_src=v.mac, eth_dst=gw,
                                          ipv4_src=str(v.ip), ipv4_dst=REMOTE,
                                          tcp_src=33333, tcp_dst=8000)).ends
        assert end.external and end.node == "net2"
        return end.packet

    assert (tcp_out("vm4")["ipv4_src"], tcp_out("vm4")["tcp_src"]) == ("203.0.113.10", 33334)
    assert tcp_out("vm2")["tcp_src"] == 33333
    assert [f for f in nodes["net2"].flows if f.priority == 60]


def test_only_the_claiming_node_answers_arp_for_the_external_ip(topo: Topology) -> None:
    def answers(node: str, claims: frozenset[str]) -> set[str]:
        ports = dataclasses.replace(assumed_ports(topo, node), snat=claims)
        return {str(f.match.get("arp_tpa")) for f in plan(topo, node, ports)
                if f.table == "lr_in_provider" and f.match.get("eth_type") == ETH_ARP}

    assert answers("net2", frozenset({"r2"})) == {"203.0.113.20"}
    assert answers("net2", frozenset({"r1", "r2"})) == {"203.0.113.10", "203.0.113.20"}
    assert answers("net1", frozenset()) == set()


# --- claims ---------------------------------------------------------------------------------
SETTLED = frozenset({"compute1", "compute2", "net1", "net2"})


def view(bfd: dict[str, str], reports: dict[str, dict[str, str]] | None = None,
         settled: frozenset[str] = SETTLED) -> ha.View:
    return ha.View(bfd, settled, reports or {})


def test_everyone_up_each_first_choice_claims(topo: Topology) -> None:
    all_up = {"compute1": UP, "compute2": UP, "net2": UP}
    assert ha.claims(topo, "net1", view(all_up)) == {"r1"}
    assert ha.claims(topo, "net2", view({**all_up, "net1": UP})) == {"r2"}


def test_a_dead_first_choice_is_given_up_by_everyone(topo: Topology) -> None:
    reports = {"compute1": {"net1": DOWN, "net2": UP}, "compute2": {"net1": DOWN, "net2": UP}}
    bfd = {"compute1": UP, "compute2": UP, "net1": DOWN}
    assert ha.claims(topo, "net2", view(bfd, reports)) == {"r1", "r2"}


def test_while_one_compute_node_still_sees_it_the_standby_waits(topo: Topology) -> None:
    reports = {"compute1": {"net1": DOWN}, "compute2": {"net1": UP}}  # not detected yet
    bfd = {"compute1": UP, "compute2": UP, "net1": DOWN}
    assert ha.claims(topo, "net2", view(bfd, reports)) == {"r2"}


def test_a_cut_between_the_network_nodes_makes_no_second_claim(topo: Topology) -> None:
    """net1 and net2 lost each other; the compute nodes see both and say so."""
    reports = {"compute1": {"net1": UP, "net2": UP}, "compute2": {"net1": UP, "net2": UP}}
    assert ha.claims(topo, "net2", view({"compute1": UP, "compute2": UP, "net1": DOWN},
                                        reports)) == {"r2"}
    assert ha.claims(topo, "net1", view({"compute1": UP, "compute2": UP, "net2": DOWN},
                                        reports)) == {"r1"}


def test_a_witness_counts_only_if_reached(topo: Topology) -> None:
    """A report from a node this one cannot reach (its own session to it is down) vouches
    for nothing: it may be stale or on the other side of a partition."""
    reports = {"compute1": {"net1": UP}}
    bfd = {"compute1": DOWN, "compute2": UP, "net1": DOWN}
    assert ha.claims(topo, "net2", view(bfd, reports)) == {"r1", "r2"}


def test_unsettled_sessions_never_count_as_down(topo: Topology) -> None:
    """Just started, the sessions not up yet: no claim on the strength of them."""
    bfd = {"compute1": "init", "compute2": "init", "net1": DOWN}
    assert ha.claims(topo, "net2", view(bfd, settled=frozenset())) == {"r2"}
    assert ha.claims(topo, "net2", view(bfd)) == {"r1", "r2"}


def test_without_reports_a_node_decides_on_its_own_sessions(topo: Topology) -> None:
    bfd = {"compute1": UP, "compute2": UP, "net1": DOWN}
    assert ha.claims(topo, "net2", view(bfd, {})) == {"r1", "r2"}


# --- the scheduler's decisions -----------------------------------------------------------------
THREE = """
nodes:
  c1: {role: compute}
  net1: {role: network}
  net2: {role: network}
  net3: {role: network}
external: {cidr: 203.0.113.0/24, gateway_ip: 203.0.113.1}
networks:
  n1: {cidr: 10.1.0.0/24}
  n2: {cidr: 10.2.0.0/24}
  n3: {cidr: 10.3.0.0/24}
routers:
  ra: {interfaces: [n1], external_gateway: true, snat_nodes: [net1, net2]}
  rb: {interfaces: [n2], external_gateway: true, snat_nodes: [net2, net1]}
  rc: {interfaces: [n3], external_gateway: true, snat_nodes: [net1, net2]}
"""


@pytest.fixture(scope="module")
def three() -> Topology:
    from flows.model import parse_topology

    return parse_topology(THREE, "three")


ALL = frozenset({"net1", "net2", "net3"})


def test_nothing_changes_while_every_first_choice_serves(three: Topology) -> None:
    live = ha.Liveness(ALL, frozenset(), {"net1": frozenset({"ra", "rc"}),
                                          "net2": frozenset({"rb"})})
    chains = ha.schedule(three, {}, live)
    # the active nodes stay; net3, in no chain, takes standby roles from the busiest
    # nodes (net1 and net2 are in three chains each) until the roles are even
    assert [chains[r][0] for r in ("ra", "rb", "rc")] == ["net1", "net2", "net1"]
    loads = [sum(n in c for c in chains.values()) for n in sorted(ALL)]
    assert max(loads) - min(loads) <= 1 and all(len(c) == 2 for c in chains.values())
    assert ha.schedule(three, chains, live) == chains  # and then it stays


def test_the_node_that_took_over_goes_first_and_a_long_dead_one_is_replaced(
        three: Topology) -> None:
    chains = {"ra": ("net1", "net2"), "rb": ("net2", "net1"), "rc": ("net1", "net2")}
    # net1 just died: net2 serves ra and rc, net1 is not dead long enough to be replaced
    live = ha.Liveness(ALL - {"net1"}, frozenset(),
                       {"net2": frozenset({"ra", "rb", "rc"}), "net3": frozenset()},
                       {"net2": {"net1": "down"}})
    now = ha.schedule(three, chains, live)
    assert now["ra"][0] == now["rb"][0] == now["rc"][0] == "net2"
    assert "net1" in now["ra"] or "net3" in now["ra"]  # net1 stays, or net3 took its place
    # dead past the down time: replaced by net3, so that a second failure is survived
    live = dataclasses.replace(live, dead=frozenset({"net1"}))
    now = ha.schedule(three, now, live)
    assert all(c[0] == "net2" and "net1" not in c and "net3" in c for c in now.values())


def test_the_last_claim_of_a_dead_node_does_not_hold_its_place(three: Topology) -> None:
    """net1 just died: its row still says it claims ra (and its heartbeat is still fresh),
    but net2, which claims ra now, has given net1 up: net2 goes first at once."""
    chains = {"ra": ("net1", "net2")}
    live = ha.Liveness(ALL, frozenset(), {"net1": frozenset({"ra"}), "net2": frozenset({"ra"})},
                       {"net2": {"net1": "down"}, "net1": {"net2": "up"}})
    assert ha.schedule(three, chains, live)["ra"][0] == "net2"


def test_a_node_that_comes_back_stays_standby(three: Topology) -> None:
    chains = {"ra": ("net2", "net1"), "rb": ("net2", "net1"), "rc": ("net2", "net1")}
    live = ha.Liveness(ALL, frozenset(), {"net2": frozenset({"ra", "rb", "rc"}),
                                          "net1": frozenset(), "net3": frozenset()})
    now = ha.schedule(three, chains, live)
    assert all(c[0] == "net2" for c in now.values())


def test_an_operators_move_is_not_undone(three: Topology) -> None:
    """`dvr nb snat-move ra net3`: until net3 claims ra, net1 still does; net1 is alive and
    net3 sees it, so net1 did not take over: the chain stays as the operator put it."""
    chains = {"ra": ("net3", "net1")}
    live = ha.Liveness(ALL, frozenset(), {"net1": frozenset({"ra"})},
                       {"net1": {"net3": "up"}, "net3": {"net1": "up"}})
    assert ha.schedule(three, chains, live)["ra"][0] == "net3"


def test_two_claims_move_nothing(three: Topology) -> None:
    """Two nodes claiming one router is a moment of transition: no reordering on it."""
    chains = {"ra": ("net1", "net2")}
    live = ha.Liveness(ALL, frozenset(), {"net1": frozenset({"ra"}), "net2": frozenset({"ra"})})
    assert ha.schedule(three, chains, live)["ra"][0] == "net1"


# --- translations that must survive -----------------------------------------------------------
DUMP = [
    "tcp,orig=(src=10.2.0.12,dst=198.51.100.10,sport=33333,dport=8000),reply=(src=198.51.100."
    "10,dst=203.0.113.10,sport=8000,dport=33333),zone=49200,protoinfo=(state=ESTABLISHED)",
    "tcp,orig=(src=10.1.0.14,dst=198.51.100.10,sport=33333,dport=8000),reply=(src=198.51.100."
    "10,dst=203.0.113.10,sport=8000,dport=33334),zone=49200,protoinfo=(state=ESTABLISHED)",
    "udp,orig=(src=10.1.0.14,dst=198.51.100.10,sport=5353,dport=53),reply=(src=198.51.100.10,"
    "dst=203.0.113.10,sport=53,dport=1024),zone=49200",
    # a floating IP's connection in the same zone: not the router's SNAT
    "tcp,orig=(src=10.1.0.11,dst=198.51.100.10,sport=1000,dport=80),reply=(src=198.51.100.10,"
    "dst=203.0.113.50,sport=80,dport=1001),zone=49200,protoinfo=(state=ESTABLISHED)",
    "icmp,orig=(src=10.2.0.12,dst=198.51.100.10,id=7,type=8,code=0),reply=(src=198.51.100.10,"
    "dst=203.0.113.10,id=9,type=0,code=0),zone=49200",
    "not a connection",
]


def test_the_translations_that_did_not_keep_their_port_are_published() -> None:
    moved = moved_translations("r1", "203.0.113.10", DUMP)
    assert moved == sorted([
        Binding("r1", 6, "10.1.0.14", 33333, REMOTE, 8000, 33334),
        Binding("r1", 17, "10.1.0.14", 5353, REMOTE, 53, 1024),
        Binding("r1", 1, "10.2.0.12", 7, REMOTE, 7, 9)])
    assert [Binding.parse(str(b)) for b in moved] == moved
    assert Binding.parse("r1 6 nonsense") is None
