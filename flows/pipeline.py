"""The integration bridge's pipeline, declared once.

Every table this project uses is listed here with its number, name, the fields its flows may
match, the fields they may write and the tables they may go to. This module is data only:
`flows/check.py` checks each planned flow against it, so a flow that matches or writes an
undeclared field, lacks a prerequisite, or jumps to an undeclared table is a programming
error caught by the unit tests. `docs/pipeline.md` documents each table; a test keeps the
two in step.

Names: `<datapath>_<in|out>_<stage>`, as OVN names its stages. The datapath is `phy` (the
node's own ports and tunnels, before any logical datapath), `ls` (a network: a logical
switch) or `lr` (a router); `in` is the packet entering that datapath, `out` leaving it.

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
    match: frozenset[str]  # the fields its flows may match
    sets: frozenset[str]  # the fields its flows may write (set_field, move; ip_ttl: TTL)
    next: frozenset[str]  # the tables its flows may go to (goto_table, ct's table=)


def _t(number: int, name: str, summary: str, match: str, sets: str, nxt: str) -> Table:
    return Table(number, name, summary, frozenset(match.split()), frozenset(sets.split()),
                 frozenset(nxt.split()))


# answering an ARP request where it came from (`planner._arp_reply`)
_ARP_REPLY = "eth_dst eth_src arp_op arp_sha arp_tha arp_spa arp_tpa"

_TABLES = (
    _t(0, "phy_in_classify",
       "admits packets from local VM ports (port security), tunnels and the provider network",
       match="in_port eth_src eth_type ipv4_src arp_spa arp_sha",
       sets="metadata",
       nxt="lr_in_provider ls_in_gateway phy_in_tunnel"),
    _t(3, "lr_in_provider",
       "from the provider network: answers ARP for the floating IPs hosted here and the "
       "external IPs whose SNAT is active here; sends their traffic to conntrack",
       match="eth_type eth_dst arp_op arp_tpa ipv4_dst",
       sets=f"{_ARP_REPLY} metadata",
       nxt="lr_in_unsnat"),
    _t(5, "phy_in_tunnel",
       "maps a tunnel's VNI to its network; marks the packet as from a tunnel",
       match="tunnel_id",
       sets="metadata reg1",
       nxt="ls_in_gateway ls_in_dst_key"),
    _t(10, "ls_in_gateway",
       "the distributed router answers ARP and ping for its own addresses; packets sent to "
       "a router MAC enter the router",
       match="metadata eth_type eth_dst arp_op arp_tpa ip_proto icmpv4_type ipv4_dst",
       sets=f"{_ARP_REPLY} ipv4_src ipv4_dst ip_ttl icmpv4_type metadata reg2",
       nxt="lr_in_routing ls_in_dst_key"),
    _t(13, "lr_in_unsnat",
       "inbound, after the SNAT zone: replies to connections the router SNATed pass "
       "(un-NATed) to routing; new ones to a floating IP go on to the DNAT zone",
       match="metadata ct_state eth_type ipv4_dst",
       sets="",
       nxt="lr_in_dnat lr_in_routing"),
    _t(15, "lr_in_dnat",
       "inbound, after the DNAT zone: known connections pass; new connections to a "
       "floating IP are DNATed to the VM; anything else is dropped",
       match="metadata ct_state eth_type ipv4_dst",
       sets="",
       nxt="lr_in_routing"),
    _t(20, "lr_in_routing",
       "routes by longest prefix among the router's networks: TTL-1, source MAC rewritten; "
       "the default route of a router with an external gateway leads out",
       match="metadata eth_type ipv4_dst",
       sets="ip_ttl eth_src metadata",
       nxt="lr_out_redirect ls_in_dst_key"),
    _t(22, "lr_out_redirect",
       "leaving the router to the outside: a VM with a floating IP goes to the DNAT zone "
       "here (un-DNAT), any other VM over the overlay to the router's active SNAT node, "
       "where it goes to the SNAT zone",
       match="metadata reg2 eth_type ipv4_src",
       sets="tunnel_id",
       nxt="lr_out_undnat lr_out_snat"),
    _t(23, "lr_out_undnat",
       "outbound, after the DNAT zone: replies of inbound connections pass (un-NATed); "
       "anything else goes on to the SNAT zone",
       match="metadata ct_state eth_type ipv4_src",
       sets="reg3",
       nxt="lr_out_snat lr_out_src_mac"),
    _t(24, "lr_out_snat",
       "after conntrack: replies and known connections pass; new connections are SNATed to "
       "the floating IP (on the VM's node) or the router's external IP (on the SNAT node)",
       match="metadata ct_state eth_type ipv4_src ip_proto ipv4_dst tcp_src tcp_dst udp_src "
             "udp_dst",
       sets="",
       nxt="lr_out_src_mac"),
    _t(26, "lr_out_src_mac",
       "the source MAC on the provider network for the translated source address; TTL-1",
       match="eth_type ipv4_src",
       sets="eth_src ip_ttl",
       nxt="lr_out_delivery"),
    _t(28, "lr_out_delivery",
       "the destination on the provider network: a floating IP of this node (hairpin), of "
       "another node (straight to it), a router's external IP, or else the upstream gateway",
       match="eth_type reg3 ipv4_dst",
       sets="eth_dst in_port metadata",
       nxt="lr_in_unsnat lr_in_dnat"),
    _t(30, "ls_in_dst_key",
       "loads the delivery key (IPv4 destination or ARP target) into reg0",
       match="eth_type",
       sets="reg0",
       nxt="ls_out_remote"),
    _t(40, "ls_out_remote",
       "sends to a VM on another node: one flow per reachable remote VM, one tunnel",
       match="metadata reg0 reg1",
       sets="eth_dst tunnel_id",
       nxt="ls_out_local"),
    _t(45, "ls_out_local",
       "delivers to a VM on this node",
       match="metadata reg0",
       sets="eth_dst",
       nxt=""),
)

# the only backward edges: a ct recirculation from a table to an earlier one
RECIRCULATE_BACK = frozenset({("lr_out_delivery", "lr_in_unsnat"),
                              ("lr_out_delivery", "lr_in_dnat")})

TABLES: dict[str, Table] = {t.name: t for t in _TABLES}
BY_NUMBER: dict[int, Table] = {t.number: t for t in _TABLES}
FIRST_TABLE = "phy_in_classify"
