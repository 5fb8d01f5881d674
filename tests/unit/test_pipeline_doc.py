"""docs/pipeline.md and the pipeline declaration (flows/pipeline.py) stay in step.

Every declared table has a section headed exactly `## Table N: name`, and every such section
is a declared table: adding, renaming or renumbering a table on either side alone fails here.
Each section's `**Declared:**` line says what the declaration says the table may match, set
and go to.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flows.pipeline import BY_NUMBER, FIRST_TABLE, RECIRCULATE_BACK, TABLES

DOC = Path(__file__).resolve().parents[2] / "docs" / "pipeline.md"
HEADING = re.compile(r"^## Table (\d+): (\S+)\s*$")


def documented_tables() -> list[tuple[int, str]]:
    out = []
    for line in DOC.read_text().splitlines():
        m = HEADING.match(line)
        if m:
            out.append((int(m.group(1)), m.group(2)))
    return out


def test_every_declared_table_is_documented_and_nothing_else() -> None:
    documented = documented_tables()
    declared = {(t.number, t.name) for t in TABLES.values()}
    assert set(documented) == declared


def test_each_table_is_documented_once_and_in_pipeline_order() -> None:
    documented = documented_tables()
    assert len(documented) == len(set(documented))
    assert documented == sorted(documented)


DECLARED = re.compile(r"^\*\*Declared:\*\* matches (.*); sets (.*); goes to (.*)\.$")


def _names(text: str) -> frozenset[str]:
    return frozenset() if text == "nothing" else frozenset(re.findall(r"`([^`]+)`", text))


def test_each_section_says_what_its_table_may_match_set_and_go_to() -> None:
    found: dict[str, tuple[frozenset[str], ...]] = {}
    table = None
    for line in DOC.read_text().splitlines():
        m = HEADING.match(line)
        if m:
            table = m.group(2)
        m = DECLARED.match(line)
        if m:
            assert table is not None and table not in found, f"stray Declared line: {line}"
            found[table] = tuple(_names(g) for g in m.groups())
    assert found == {t.name: (t.match, t.sets, t.next) for t in TABLES.values()}


def test_table_headings_use_the_exact_format() -> None:
    """A heading that almost matches (wrong level, no colon, extra words) is a mistake."""
    for line in DOC.read_text().splitlines():
        if re.match(r"^#+\s*Table\b", line):
            assert HEADING.match(line), f"malformed table heading: {line!r}"


def test_declaration_is_consistent() -> None:
    assert FIRST_TABLE in TABLES
    assert len(BY_NUMBER) == len(TABLES), "two tables share a number"
    for table in TABLES.values():
        assert BY_NUMBER[table.number] is table
        assert 0 <= table.number <= 254


@pytest.mark.parametrize("name", sorted(TABLES))
def test_every_next_table_exists_and_is_further_down(name: str) -> None:
    table = TABLES[name]
    for nxt in table.next:
        assert nxt in TABLES, f"{name} may go to undeclared table {nxt}"
        if (name, nxt) in RECIRCULATE_BACK:
            continue
        assert TABLES[nxt].number > table.number, f"{name} -> {nxt} goes backwards"


def test_only_conntrack_may_go_back() -> None:
    """A goto backwards is refused even where a ct recirculation may go back."""
    from flows.check import PipelineError, check_flow
    from flows.ofp import CT, Flow, Goto, Match

    for name, nxt in RECIRCULATE_BACK:
        check_flow(Flow(name, 1, Match(), (CT(1, nxt),)))
        with pytest.raises(PipelineError, match="forward"):
            check_flow(Flow(name, 1, Match(), (Goto(nxt),)))


def test_every_table_is_reachable_from_the_first() -> None:
    seen = {FIRST_TABLE}
    todo = [FIRST_TABLE]
    while todo:
        for nxt in TABLES[todo.pop()].next:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(TABLES)
