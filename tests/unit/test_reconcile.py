"""The agent's diff of desired against installed flows (pure)."""

from __future__ import annotations

from agent.main import diff
from agent.ofswitch import InstalledFlow
from flows.model import load_topology
from flows.ofp import Flow, Output
from flows.pipeline import TABLES
from flows.planner import assumed_ports, plan
from tests.unit.paths import EXAMPLE


def installed(flows: list[Flow]) -> list[InstalledFlow]:
    return [InstalledFlow(f.cookie, TABLES[f.table].number, f.priority, f.match)
            for f in flows]


def desired() -> list[Flow]:
    topo = load_topology(EXAMPLE)
    return sorted(plan(topo, "compute1", assumed_ports(topo, "compute1")),
                  key=lambda f: f.cookie)


def test_nothing_installed_adds_everything() -> None:
    want = desired()
    stale, missing = diff(want, [])
    assert stale == [] and sorted(f.cookie for f in missing) == [f.cookie for f in want]


def test_replaying_a_converged_state_changes_nothing() -> None:
    want = desired()
    assert diff(want, installed(want)) == ([], [])


def test_changed_actions_replace_the_flow_and_nothing_else() -> None:
    want = desired()
    old = want[0]
    new = Flow(old.table, old.priority, old.match, (Output(99),), old.hint)
    stale, missing = diff([new, *want[1:]], installed(want))
    assert [s.cookie for s in stale] == [old.cookie]
    assert missing == [new]


def test_flows_no_longer_wanted_are_stale_and_duplicates_are_removed() -> None:
    want = desired()
    have = installed(want)
    stale, missing = diff(want[1:], [*have, have[1]])
    assert sorted(s.cookie for s in stale) == sorted([want[0].cookie, want[1].cookie])
    assert missing == []

