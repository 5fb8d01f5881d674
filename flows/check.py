"""The flow check: every planned flow against the pipeline's declaration (`pipeline.py`).

The planner builds each flow through `check_flow()`, so a flow that matches or writes a field
its table does not declare, matches or writes a field whose prerequisites its match lacks
(`set_field:2->arp_op` on an IPv4 flow, a `dec_ttl` on ARP), jumps to an undeclared or
earlier table, or puts a `goto`/`ct` anywhere but last raises `PipelineError`: a programming
error, caught by the unit tests before any switch sees it (OVS would refuse the whole bundle).
"""

from __future__ import annotations

from flows.ofp import (
    CT,
    ETH_IP,
    PREREQS,
    Action,
    Bucket,
    DecTTL,
    Flow,
    Goto,
    GroupAction,
    Move,
    Output,
    Resubmit,
    SetField,
    SetTTL,
)
from flows.pipeline import RECIRCULATE_BACK, TABLES


class PipelineError(ValueError):
    pass


def check_flow(flow: Flow) -> None:
    """Raise PipelineError if `flow` does not fit the declared pipeline. A shape of flow
    (table, matched fields, the protocol values prerequisites look at, the actions with
    the fields they write and read) found good once is not checked again."""
    shape = (flow.table,
             tuple((k, v if k in _PREREQ_VALUES else None) for k, v in flow.match.fields),
             tuple(_shape(a) for a in flow.actions))
    if shape not in _GOOD_SHAPES:
        _check_flow(flow)  # raises
        _GOOD_SHAPES.add(shape)


_PREREQ_VALUES = frozenset({"eth_type", "ip_proto"})
_GOOD_SHAPES: set[tuple] = set()
# the TTL (dec_ttl, mod_nw_ttl) is an IPv4 header's
TTL_PREREQS = (("eth_type", ETH_IP),)


def _shape(action: Action) -> tuple:
    if isinstance(action, GroupAction):
        return (GroupAction, action.group.kind,
                tuple((b.watch_port is None, tuple(_shape(a) for a in b.actions))
                      for b in action.group.buckets))
    return (type(action), getattr(action, "table", None), *_read(action))


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
        _check_action(table.name, action, have, flow)
        last = i == len(flow.actions) - 1
        if isinstance(action, Goto):
            _check_next(table.name, action.table, "go to", flow)
            if not last:
                raise PipelineError(f"goto must be the last action: {flow.to_ofctl()}")
        if isinstance(action, CT):
            _check_next(table.name, action.table, "recirculate to", flow)
            if not last:
                raise PipelineError(f"ct must be the last action: {flow.to_ofctl()}")
        if isinstance(action, GroupAction):
            if not last:
                raise PipelineError(f"a group must be the last action: {flow.to_ofctl()}")
            _check_group(table.name, action, have, flow)


def _check_action(table: str, action: Action, have: dict, flow: Flow) -> None:
    """What an action writes is declared, and its prerequisites are in the match."""
    for fld in _written(action):
        if fld not in TABLES[table].sets:
            raise PipelineError(f"table {table} may not set {fld}: {flow.to_ofctl()}")
    missing = _missing_for(action, have)
    if missing:
        raise PipelineError(f"table {table}: {'; '.join(missing)}: {flow.to_ofctl()}")


def _check_next(table: str, target: str, how: str, flow: Flow) -> None:
    """`table` may continue in `target`, and only forward (but for the declared ct
    recirculations back)."""
    if target not in TABLES[table].next:
        raise PipelineError(f"table {table} may not {how} {target}")
    back = TABLES[target].number <= TABLES[table].number
    if back and (how != "recirculate to" or (table, target) not in RECIRCULATE_BACK):
        raise PipelineError(f"table {table} may only go forward")


def _check_group(table: str, action: GroupAction, have: dict, flow: Flow) -> None:
    """A fast-failover group: every bucket watches a port (OVS refuses one that does not);
    its actions fit the table (writes declared, prerequisites matched) and continue only
    where it may go."""
    group = action.group
    if group.kind != "ff" or not group.buckets:
        raise PipelineError(f"group {group.group_id}: a fast-failover group with buckets")
    for j, bucket in enumerate(group.buckets):
        if bucket.watch_port is None:
            raise PipelineError(f"group {group.group_id}: bucket {j} watches no port")
        _check_bucket(table, group.group_id, bucket, have, flow)


def _check_bucket(table: str, gid: int, bucket: Bucket, have: dict, flow: Flow) -> None:
    for k, a in enumerate(bucket.actions):
        if not isinstance(a, Output | SetField | Resubmit):
            raise PipelineError(f"group {gid}: a bucket may not {a.to_ofctl()}")
        _check_action(table, a, have, flow)
        if isinstance(a, Resubmit):
            _check_next(table, a.table, "resubmit to", flow)
            if k != len(bucket.actions) - 1:
                raise PipelineError(f"group {gid}: resubmit must be a bucket's last action")
