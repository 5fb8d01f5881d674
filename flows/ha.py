"""SNAT high availability: which node serves a router, decided from what nodes see.

Every router with an external gateway has an HA chain, its `snat_nodes` in order of
preference. All nodes of the chain hold the router's SNAT ready; the data plane decides who
forwards (compute nodes send to the first node of the chain whose tunnel's BFD session is
up; a node serves what it receives only when every node before it is down as it sees them).
What the data plane cannot decide alone is who *speaks* for the router on the provider
network: answers ARP for its external IP and announces it by gratuitous ARP. That is a
claim, made by each node's agent with `claims()`:

a node claims a router when every node before it in the chain is down, and a node is down
when this node's BFD session to it is down *and* no node that this node can reach (its own
session to that node is up) and that reported lately (a fresh heartbeat) still sees it up.

So a node that dies is given up by all; a link that breaks between two network nodes while
the compute nodes still see both does not make the second one claim (the compute nodes
vouch for the first): never two claims for one external IP. Without any report to go by
(the northbound database out of reach), a node decides on its own sessions, as OVN's
gateways do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from flows.model import Topology

UP = "up"


@dataclass(frozen=True)
class View:
    """What one node knows of the others' liveness.

    `bfd`: this node's BFD session state to each peer it has a session with (`up`, `down`,
    `init`, ...); `settled`: the peers whose sessions have had time to come up since the
    agent started (a session not yet settled is never taken as down); `reports`: for each
    other node that reported lately, its own sessions' states."""

    bfd: Mapping[str, str] = field(default_factory=dict)
    settled: frozenset[str] = frozenset()
    reports: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def down(self, me: str, peer: str) -> bool:
        """Is `peer` down, as `me` sees it?"""
        if self.bfd.get(peer) == UP or peer not in self.settled:
            return False
        for witness, seen in self.reports.items():
            if witness in (me, peer) or self.bfd.get(witness) != UP:
                continue
            if seen.get(peer) == UP:
                return False  # reachable from a node I reach: alive, the link to it is cut
        return True


def claims(topo: Topology, node: str, view: View) -> frozenset[str]:
    """The routers `node` speaks for: those of whose HA chain it is the first node not down
    as it sees them."""
    out = set()
    for router in topo.routers.values():
        if not router.external_gateway or node not in router.snat_nodes:
            continue
        before = router.snat_nodes[:router.snat_nodes.index(node)]
        if all(view.down(node, peer) for peer in before):
            out.add(router.name)
    return frozenset(out)


# --- the scheduler's decisions ---------------------------------------------------------------
@dataclass(frozen=True)
class Liveness:
    """What the scheduler knows of the network nodes' agents: those alive (a fresh
    heartbeat), those dead for longer than the agent down time, and who claims what."""

    alive: frozenset[str] = frozenset()
    dead: frozenset[str] = frozenset()  # dead past the agent down time
    claims: Mapping[str, frozenset[str]] = field(default_factory=dict)  # node -> routers
    # node -> its BFD sessions' states, as it reports them
    bfd: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def gave_up(self, node: str, on: str) -> bool:
        """Has `node` given up `on`: `on`'s agent silent, or `node`'s session to it down?"""
        return on not in self.alive or self.bfd.get(node, {}).get(on, UP) != UP


def schedule(topo: Topology, chains: Mapping[str, tuple[str, ...]], live: Liveness
             ) -> dict[str, tuple[str, ...]]:
    """The HA chain each router should have now, from the chains it has (`chains`; a router
    missing there has its `snat_nodes`):

    - the node that took a router over goes first (the one alive node claiming it, when
      every node before it in the chain has been given up by it: silent, or its BFD
      session to them down): failback is never automatic (a node that comes back finds its
      routers served and stays standby), and an operator's move (`dvr nb snat-move`) is not
      undone while the node moved to takes over;
    - a node dead past the agent down time is replaced by a live network node outside the
      chain, the one in the fewest chains (so that a second failure is survived too);
    - standbys (never the first) move from the nodes in most chains to a live node in few,
      so that a node added, or back, takes its share of the standby roles.

    Only routers with an external gateway; a chain keeps its length (the operator's number
    of candidates)."""
    network = [n.name for n in topo.nodes.values() if n.is_network]
    routers = sorted(r.name for r in topo.routers.values() if r.external_gateway)
    out: dict[str, list[str]] = {}
    for name in routers:
        router = topo.routers[name]
        chain = [n for n in chains.get(name, router.snat_nodes) if n in network]
        chain = chain or [n for n in router.snat_nodes if n in network]
        claiming = [n for n in chain if n in live.alive and name in live.claims.get(n, ())]
        # a claim by a node another claimant has given up is the last word of a dead node
        serving = [n for n in claiming
                   if not any(live.gave_up(other, n) for other in claiming if other != n)]
        took_over = len(serving) == 1 and all(
            live.gave_up(serving[0], n) for n in chain[:chain.index(serving[0])])
        if took_over and chain[0] != serving[0]:
            chain.remove(serving[0])
            chain.insert(0, serving[0])
        out[name] = chain

    def load(node: str) -> int:
        return sum(node in c for c in out.values())

    for name in routers:  # replace the long dead
        chain = out[name]
        for i, node in enumerate(chain):
            spare = sorted((n for n in network if n in live.alive and n not in chain),
                           key=lambda n: (load(n), n))
            if node in live.dead and spare:
                chain[i] = spare[0]
    for name in routers:  # even out the standby roles
        chain = out[name]
        for i in range(1, len(chain)):
            spare = sorted((n for n in network if n in live.alive and n not in chain),
                           key=lambda n: (load(n), n))
            if spare and load(spare[0]) + 1 < load(chain[i]):
                chain[i] = spare[0]
    return {name: tuple(chain) for name, chain in out.items()}
