"""The order in which an agent tries the members of a clustered northbound database."""

from __future__ import annotations

from collections import Counter

from agent.source import spread

MEMBERS = "tcp:198.18.250.1:6641,tcp:198.18.250.2:6641,tcp:198.18.250.3:6641"


def test_each_node_has_its_own_rotation_of_every_member() -> None:
    firsts = Counter()
    for i in range(300):
        order = spread(MEMBERS, f"hv{i}").split(",")
        assert sorted(order) == sorted(MEMBERS.split(","))
        i0 = MEMBERS.split(",").index(order[0])
        assert order == (MEMBERS.split(",") * 2)[i0:i0 + 3]  # a rotation: the same ring
        assert spread(MEMBERS, f"hv{i}") == ",".join(order)  # the same at every restart
        firsts[order[0]] += 1
    assert len(firsts) == 3 and min(firsts.values()) > 60, firsts  # spread over all three


def test_one_remote_or_no_node_is_left_alone() -> None:
    assert spread("unix:/run/nb.sock", "compute1") == "unix:/run/nb.sock"
    assert spread(MEMBERS, None) == MEMBERS
