"""The flow check: every planned flow against the pipeline's declaration (`pipeline.py`).

The planner builds each flow through `check_flow()`, so a flow that matches a field its table
does not declare, misses a match prerequisite, jumps to an undeclared or earlier table, or puts
a `goto`/`ct` anywhere but last raises `PipelineError`: a programming error, caught by the
unit tests before any switch sees the flow.
"""

from __future__ import annotations

from flows.ofp import CT, Flow, Goto
from flows.pipeline import RECIRCULATE_BACK, TABLES


class PipelineError(ValueError):
    pass


def check_flow(flow: Flow) -> None:
    """Raise PipelineError if `flow` does not fit the declared pipeline. A shape of flow
    (table, matched fields, the protocol values prerequisites look at, actions) found good
    once is not checked again."""
    shape = (flow.table,
             tuple((k, v if k in _PREREQ_VALUES else None) for k, v in flow.match.fields),
             tuple((type(a), getattr(a, "table", None)) for a in flow.actions))
    if shape not in _GOOD_SHAPES:
        _check_flow(flow)  # raises
        _GOOD_SHAPES.add(shape)


_PREREQ_VALUES = frozenset({"eth_type", "ip_proto"})
_GOOD_SHAPES: set[tuple] = set()


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
    for i, action in enumerate(flow.actions):
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
