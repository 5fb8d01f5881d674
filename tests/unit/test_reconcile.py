"""The agent's flow tables: the diff of desired against installed flows, and what the agent
takes as installed between syncs (pure)."""

from __future__ import annotations

import pytest

from agent.flowtables import Desired, Installed, diff
from agent.ofswitch import InstalledFlow
from flows.model import Topology
from flows.ofp import Flow, Output
from flows.pipeline import TABLES
from flows.planner import assumed_ports, plan


def installed(flows: list[Flow]) -> list[InstalledFlow]:
    return [InstalledFlow(f.cookie, TABLES[f.table].number, f.priority, f.match)
            for f in flows]


@pytest.fixture()
def want(example: Topology) -> list[Flow]:
    """compute1's planned flows in the built-in topology."""
    return sorted(plan(example, "compute1", assumed_ports(example, "compute1")),
                  key=lambda f: f.cookie)


def test_nothing_installed_adds_everything(want: list[Flow]) -> None:
    stale, missing = diff(want, [])
    assert stale == [] and sorted(f.cookie for f in missing) == [f.cookie for f in want]


def test_replaying_a_converged_state_changes_nothing(want: list[Flow]) -> None:
    assert diff(want, installed(want)) == ([], [])


def test_changed_actions_replace_the_flow_and_nothing_else(want: list[Flow]) -> None:
    old = want[0]
    new = Flow(old.table, old.priority, old.match, (Output(99),), old.hint)
    stale, missing = diff([new, *want[1:]], installed(want))
    assert [s.cookie for s in stale] == [old.cookie]
    assert missing == [new]


def test_flows_no_longer_wanted_are_stale_and_duplicates_are_removed(want: list[Flow]) -> None:
    have = installed(want)
    stale, missing = diff(want[1:], [*have, have[1]])
    assert sorted(s.cookie for s in stale) == sorted([want[0].cookie, want[1].cookie])
    assert missing == []



def test_desired_flows_are_keyed_by_cookie(want: list[Flow]) -> None:
    table = Desired([*want, want[0]])
    assert len(table) == len(want) and set(table) == set(want)
    assert diff(table, installed(want)) == ([], [])


def test_installed_flows_are_trusted_only_over_the_connection_read_on(want: list[Flow]) -> None:
    table = Installed()
    assert table.known(1) is None  # never read
    table.read(installed(want), connection=1)
    assert {f.cookie for f in table.known(1) or []} == {f.cookie for f in want}
    assert table.known(2) is None  # a new connection: maybe a restarted switch
    table.forget()
    assert table.known(1) is None


def test_a_committed_bundle_updates_what_is_installed(want: list[Flow]) -> None:
    old = want[0]
    new = Flow(old.table, old.priority, old.match, (Output(99),), old.hint)
    table = Installed()
    table.read(installed(want), connection=3)
    current = table.known(3)
    assert current is not None
    stale, missing = diff([new, *want[1:]], current)
    table.applied(current, stale, missing, connection=3)
    after = table.known(3)
    assert after is not None
    assert {f.cookie for f in after} == {new.cookie} | {f.cookie for f in want[1:]}
    assert diff([new, *want[1:]], after) == ([], [])  # a replay changes nothing
