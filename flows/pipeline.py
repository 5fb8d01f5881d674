"""The integration bridge's pipeline, declared once.

Every table this project uses is listed here with its number, name, the fields its flows may
match and the tables they may go to. The planner checks each flow against this declaration, so
a flow that matches an undeclared field or jumps to an undeclared table is a programming error
caught by the unit tests. `docs/pipeline.md` documents each table; a test keeps the two in step.

Registers (what holds between tables):
- metadata: the logical datapath the packet is in: a network's VNI, or a router's key while it
  is being routed.
- reg0: the destination IPv4 address used for delivery (ip.dst, or arp.tpa for ARP).
- reg1: 1 when the packet came in from a tunnel (it may then only be delivered locally).
"""

from __future__ import annotations

from dataclasses import dataclass

from flows.ofp import Flow, Goto


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
       "admits packets from local VM ports (port security) and tunnels",
       "in_port eth_src eth_type ipv4_src arp_spa arp_sha", "ls_gateway tunnel_in"),
    _t(5, "tunnel_in",
       "maps a tunnel's VNI to its network; marks the packet as from a tunnel",
       "tunnel_id", "dst_key"),
    _t(10, "ls_gateway",
       "the distributed router answers ARP and ping for its own addresses; packets sent to "
       "a router MAC enter the router",
       "metadata eth_type eth_dst arp_op arp_tpa ip_proto icmpv4_type ipv4_dst",
       "lr_routing dst_key"),
    _t(20, "lr_routing",
       "routes by longest prefix among the router's networks: TTL-1, source MAC rewritten",
       "metadata eth_type ipv4_dst", "dst_key"),
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

TABLES: dict[str, Table] = {t.name: t for t in _TABLES}
BY_NUMBER: dict[int, Table] = {t.number: t for t in _TABLES}
FIRST_TABLE = "classify"


class PipelineError(ValueError):
    pass


def check_flow(flow: Flow) -> None:
    """Raise PipelineError if `flow` does not fit the declared pipeline."""
    table = TABLES.get(flow.table)
    if table is None:
        raise PipelineError(f"flow in undeclared table {flow.table!r}")
    for fld, _ in flow.match.fields:
        if fld not in table.match:
            raise PipelineError(f"table {table.name} may not match {fld}: {flow.to_ofctl()}")
    missing = flow.match.missing_prereqs()
    if missing:
        raise PipelineError(f"table {table.name}: {'; '.join(missing)}: {flow.to_ofctl()}")
    for i, action in enumerate(flow.actions):
        if isinstance(action, Goto):
            if action.table not in table.next:
                raise PipelineError(f"table {table.name} may not go to {action.table}")
            if TABLES[action.table].number <= table.number:
                raise PipelineError(f"table {table.name} may only go forward")
            if i != len(flow.actions) - 1:
                raise PipelineError(f"goto must be the last action: {flow.to_ofctl()}")
