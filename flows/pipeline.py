"""The integration bridge's pipeline, declared once.

Every table this project uses is listed here with its number, name, the fields its flows may
match and the tables they may go to. This module is data only; `flows/check.py` checks each
planned flow against it, so a flow that matches an undeclared field or jumps to an undeclared
table is a programming error caught by the unit tests. `docs/pipeline.md` documents each
table; a test keeps the two in step.

Registers (what holds between tables):
- metadata: the logical datapath the packet is in: a network's VNI, or a router's key while it
  is being routed.
- reg0: the destination IPv4 address used for delivery (ip.dst, or arp.tpa for ARP).
- reg1: 1 when the packet came in from a tunnel (it may then only be delivered locally).
- reg2: the VNI of the network a routed packet entered its router from.

- reg3: 1 when an outbound packet went through its router's SNAT zone (a hairpin to a
  floating IP of this node then skips the SNAT zone on the way in).

Conntrack: each router NATs in two zones of its own, on every node where it NATs: the SNAT
zone (floating IPs and centralized SNAT outbound) and the DNAT zone (floating IPs inbound).
No packet goes through one zone twice in a row.
A `ct` action recirculates into its `table=`, which must be one the table may go to; only a
`ct` may go backwards (the hairpin of a floating IP to a floating IP of the same node).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Table:
    number: int
    name: str
    summary: str
    match: frozenset[str]
    next: frozenset[str]


def _t(number: int, name: str, summary: str, match: str, nxt: str = "") -> Table:
    return Table(number, name, summary, frozenset(match.split()), frozenset(nxt.split()))


_TABLES = (
    _t(0, "classify",
       "admits packets from local VM ports (port security), tunnels and the provider network",
       "in_port eth_src eth_type ipv4_src arp_spa arp_sha", "ext_in ls_gateway tunnel_in"),
    _t(3, "ext_in",
       "from the provider network: answers ARP for the floating IPs hosted here and the "
       "external IPs whose SNAT is active here; sends their traffic to conntrack",
       "eth_type eth_dst arp_op arp_tpa ipv4_dst", "unsnat"),
    _t(5, "tunnel_in",
       "maps a tunnel's VNI to its network; marks the packet as from a tunnel",
       "tunnel_id", "ls_gateway dst_key"),
    _t(10, "ls_gateway",
       "the distributed router answers ARP and ping for its own addresses; packets sent to "
       "a router MAC enter the router",
       "metadata eth_type eth_dst arp_op arp_tpa ip_proto icmpv4_type ipv4_dst",
       "lr_routing dst_key"),
    _t(13, "unsnat",
       "inbound, after the SNAT zone: replies to connections the router SNATed pass "
       "(un-NATed) to routing; new ones to a floating IP go on to the DNAT zone",
       "metadata ct_state eth_type ipv4_dst", "dnat lr_routing"),
    _t(15, "dnat",
       "inbound, after the DNAT zone: known connections pass; new connections to a "
       "floating IP are DNATed to the VM; anything else is dropped",
       "metadata ct_state eth_type ipv4_dst", "lr_routing"),
    _t(20, "lr_routing",
       "routes by longest prefix among the router's networks: TTL-1, source MAC rewritten; "
       "the default route of a router with an external gateway leads out",
       "metadata eth_type ipv4_dst", "lr_egress dst_key"),
    _t(22, "lr_egress",
       "leaving the router to the outside: a VM with a floating IP goes to the DNAT zone "
       "here (un-DNAT), any other VM over the overlay to the router's active SNAT node, "
       "where it goes to the SNAT zone",
       "metadata reg2 eth_type ipv4_src", "undnat nat_out"),
    _t(23, "undnat",
       "outbound, after the DNAT zone: replies of inbound connections pass (un-NATed); "
       "anything else goes on to the SNAT zone",
       "metadata ct_state eth_type ipv4_src", "nat_out ext_src"),
    _t(24, "nat_out",
       "after conntrack: replies and known connections pass; new connections are SNATed to "
       "the floating IP (on the VM's node) or the router's external IP (on the SNAT node)",
       "metadata ct_state eth_type ipv4_src", "ext_src"),
    _t(26, "ext_src",
       "the source MAC on the provider network for the translated source address; TTL-1",
       "eth_type ipv4_src", "ext_out"),
    _t(28, "ext_out",
       "the destination on the provider network: a floating IP of this node (hairpin), of "
       "another node (straight to it), a router's external IP, or else the upstream gateway",
       "eth_type reg3 ipv4_dst", "unsnat dnat"),
    _t(30, "dst_key",
       "loads the delivery key (IPv4 destination or ARP target) into reg0",
       "eth_type", "remote_out"),
    _t(40, "remote_out",
       "sends to a VM on another node: one flow per reachable remote VM, one tunnel",
       "metadata reg0 reg1", "local_out"),
    _t(45, "local_out",
       "delivers to a VM on this node",
       "metadata reg0", ""),
)

# the only backward edges: a ct recirculation from a table to an earlier one
RECIRCULATE_BACK = frozenset({("ext_out", "unsnat"), ("ext_out", "dnat")})

TABLES: dict[str, Table] = {t.name: t for t in _TABLES}
BY_NUMBER: dict[int, Table] = {t.number: t for t in _TABLES}
FIRST_TABLE = "classify"
