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
