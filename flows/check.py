"""The flow check: every planned flow against the pipeline's declaration (`pipeline.py`).

The planner builds each flow through `check_flow()`, so a flow that matches or writes a field
its table does not declare, matches or writes a field whose prerequisites its match lacks
(`set_field:2->arp_op` on an IPv4 flow, a `dec_ttl` on ARP), jumps to an undeclared or
earlier table, or puts a `goto`/`ct` anywhere but last raises `PipelineError`: a programming
error, caught by the unit tests before any switch sees it (OVS would refuse the whole bundle).
"""

from __future__ import annotations

from flows.ofp import CT, ETH_IP, PREREQS, Action, DecTTL, Flow, Goto, Move, SetField, SetTTL
from flows.pipeline import RECIRCULATE_BACK, TABLES


class PipelineError(ValueError):
    pass


def check_flow(flow: Flow) -> None:
    """Raise PipelineError if `flow` does not fit the declared pipeline. A shape of flow
    (table, matched fields, the protocol values prerequisites look at, the actions with
    the fields they write and read) found good once is not checked again."""
    shape = (flow.table,
             tuple((k, v if k in _PREREQ_VALUES else None) for k, v in flow.match.fields),
             tuple((type(a), getattr(a, "table", None), *_read(a)) for a in flow.actions))
    if shape not in _GOOD_SHAPES:
        _check_flow(flow)  # raises
        _GOOD_SHAPES.add(shape)


_PREREQ_VALUES = frozenset({"eth_type", "ip_proto"})
_GOOD_SHAPES: set[tuple] = set()
# the TTL (dec_ttl, mod_nw_ttl) is an IPv4 header's
TTL_PREREQS = (("eth_type", ETH_IP),)


def _written(action: Action) -> tuple[str, ...]:
    """The fields an action writes, as the declaration names them."""
    if isinstance(action, SetField):
        return (action.field,)
    if isinstance(action, Move):
        return (action.dst,)
    if isinstance(action, DecTTL | SetTTL):
        return ("ip_ttl",)
    return ()


def _read(action: Action) -> tuple[str, ...]:
    """The fields whose prerequisites an action needs in the match: the fields it writes,
    and the source of a move (OpenFlow checks them against the match at flow-mod time)."""
    return _written(action) + ((action.src,) if isinstance(action, Move) else ())


def _missing_for(action: Action, have: dict) -> list[str]:
    out = []
    for fld in _read(action):
        for pre, val in TTL_PREREQS if fld == "ip_ttl" else PREREQS.get(fld, ()):
            if have.get(pre) != val:
                out.append(f"{type(action).__name__} of {fld} needs {pre}={val:#x}")
    return out


def _check_flow(flow: Flow) -> None:
    table = TABLES.get(flow.table)
    if table is None:
        raise PipelineError(f"flow in undeclared table {flow.table!r}")
    for fld, _ in flow.match.fields:
        if fld not in table.match:
            raise PipelineError(f"table {table.name} may not match {fld}: {flow.to_ofctl()}")
    missing = flow.match.missing_prereqs()
    if missing:
        raise PipelineError(f"table {table.name}: {'; '.join(missing)}: {flow.to_ofctl()}")
    have = flow.match.as_dict()
    for i, action in enumerate(flow.actions):
        for fld in _written(action):
            if fld not in table.sets:
                raise PipelineError(f"table {table.name} may not set {fld}: {flow.to_ofctl()}")
        missing = _missing_for(action, have)
        if missing:
            raise PipelineError(f"table {table.name}: {'; '.join(missing)}: "
                                f"{flow.to_ofctl()}")
        if isinstance(action, Goto):
            if action.table not in table.next:
                raise PipelineError(f"table {table.name} may not go to {action.table}")
            if TABLES[action.table].number <= table.number:
                raise PipelineError(f"table {table.name} may only go forward")
            if i != len(flow.actions) - 1:
                raise PipelineError(f"goto must be the last action: {flow.to_ofctl()}")
        if isinstance(action, CT):
            if action.table not in table.next:
                raise PipelineError(f"table {table.name} may not recirculate to {action.table}")
            back = TABLES[action.table].number <= table.number
            if back and (table.name, action.table) not in RECIRCULATE_BACK:
                raise PipelineError(f"table {table.name} may only go forward")
            if i != len(flow.actions) - 1:
                raise PipelineError(f"ct must be the last action: {flow.to_ofctl()}")
