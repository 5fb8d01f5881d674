"""The agent's two flow tables, as `ovn-controller`'s `ofctrl` keeps them: the flows (and
groups) it wants on the switch (`Desired`, the plan's, flows by cookie, groups by id) and the
flows and groups of ours the switch holds (`Installed`, as read back from it or as the last
committed bundle left them). One reconciliation diffs the two and changes the switch by the
difference, in one bundle: a full one diffs every flow (after reading the switch back); one
after a change of the desired state alone diffs only the flows and groups the incremental
planner touched since the last committed bundle (`diff_touched()`), O(change).

`Installed` is trusted only over the OpenFlow connection it was learned on: a new connection
may be to a restarted switch that lost every flow, so it must be read back first.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from agent.ofswitch import InstalledFlow, installed
from flows.ofp import Flow, Group, groups_of


class Desired:
    """The flows the plan wants on the switch, by cookie (a cookie names a flow's content),
    and the groups they apply, by id."""

    def __init__(self, flows: Iterable[Flow]):
        self.by_cookie: Mapping[int, Flow] = {f.cookie: f for f in flows}
        self.groups: Mapping[int, Group] = groups_of(self.by_cookie.values())

    @classmethod
    def of(cls, by_cookie: Mapping[int, Flow], groups: Mapping[int, Group]) -> Desired:
        """The flows and groups an incremental plan holds (`flows.incremental`), shared,
        not copied: valid until the plan's next update."""
        desired = cls.__new__(cls)
        desired.by_cookie, desired.groups = by_cookie, groups
        return desired

    def __len__(self) -> int:
        return len(self.by_cookie)

    def __iter__(self) -> Iterator[Flow]:
        return iter(self.by_cookie.values())


class Installed:
    """The flows of ours on the switch, as last known, and the connection they are true of."""

    def __init__(self) -> None:
        self._flows: dict[int, InstalledFlow] | None = None
        self._groups: dict[int, Group | None] = {}
        self._connection = 0

    def groups(self, connection: int) -> dict[int, Group | None] | None:
        """The groups of ours installed, if known over this connection (None: read them
        back; a value None: a group of ours that the model cannot read, to replace)."""
        if self._flows is None or self._connection != connection:
            return None
        return dict(self._groups)

    def known(self, connection: int) -> list[InstalledFlow] | None:
        """The flows installed, if known over this connection to the switch (None: read
        them back)."""
        if self._flows is None or self._connection != connection:
            return None
        return list(self._flows.values())

    def by_cookie(self, connection: int) -> dict[int, InstalledFlow] | None:
        """The flows installed by cookie, if known over this connection (not copied: to
        hand back to `changed()`)."""
        if self._flows is None or self._connection != connection:
            return None
        return self._flows

    def read(self, flows: Iterable[InstalledFlow], connection: int,
             groups: dict[int, Group | None] | None = None) -> None:
        """What a dump of the switch over `connection` returned."""
        self._groups = dict(groups or {})
        self._flows = {}
        for f in flows:
            self._flows.setdefault(f.cookie, f)
        self._connection = connection

    def forget(self) -> None:
        """Unknown (a bundle whose outcome is not known yet, or failed)."""
        self._flows = None

    def groups_by_id(self, connection: int) -> Mapping[int, Group | None] | None:
        """The groups of ours installed, if known over this connection (not copied)."""
        if self._flows is None or self._connection != connection:
            return None
        return self._groups

    def applied(self, before: Iterable[InstalledFlow], deleted: Iterable[InstalledFlow],
                added: Iterable[Flow], connection: int,
                groups: dict[int, Group] | None = None) -> None:
        """A committed bundle over `connection` turned `before` into `before - deleted +
        added`, and left `groups`."""
        if groups is not None:
            self._groups = dict(groups)
        gone = {id(f) for f in deleted}
        self._flows = {}
        for f in before:
            if id(f) not in gone:
                self._flows.setdefault(f.cookie, f)
        self._flows.update((f.cookie, installed(f)) for f in added)
        self._connection = connection

    def changed(self, before: dict[int, InstalledFlow], deleted: Iterable[InstalledFlow],
                added: Iterable[Flow], groups: Mapping[int, Group | None],
                connection: int) -> None:
        """A committed bundle over `connection` turned `before` (what `by_cookie()` gave)
        into `before - deleted + added`, and changed these groups (by id; None: deleted):
        `before` changed in place, O(change)."""
        self._flows = before
        for f in deleted:
            self._flows.pop(f.cookie, None)
        self._flows.update((f.cookie, installed(f)) for f in added)
        for gid, group in groups.items():
            if group is None:
                self._groups.pop(gid, None)
            else:
                self._groups[gid] = group
        self._connection = connection

    def __len__(self) -> int:
        return len(self._flows or {})


def diff(desired: Desired | Iterable[Flow], current: Iterable[InstalledFlow]
         ) -> tuple[list[InstalledFlow], list[Flow]]:
    """What to delete and what to add so that the flows we own become `desired`.

    Cookies identify content, so a flow whose actions changed is deleted and re-added (in
    the same bundle). A cookie installed twice keeps one copy."""
    want = desired.by_cookie if isinstance(desired, Desired) else {f.cookie: f for f in desired}
    stale: list[InstalledFlow] = []
    seen: set[int] = set()
    for inst in current:
        if inst.cookie not in want or inst.cookie in seen:
            stale.append(inst)
        seen.add(inst.cookie)
    missing = [f for c, f in want.items() if c not in seen]
    return stale, missing


def diff_groups(desired: dict[int, Group], current: dict[int, Group | None]
                ) -> tuple[list[Group], list[Group], list[int]]:
    """The groups to add, to modify (installed with other buckets) and to delete (ours,
    no longer applied by any desired flow)."""
    add = [g for gid, g in sorted(desired.items()) if gid not in current]
    modify = [g for gid, g in sorted(desired.items()) if gid in current and current[gid] != g]
    delete = sorted(gid for gid in current if gid not in desired)
    return add, modify, delete


def diff_touched(desired: Desired, current: Mapping[int, InstalledFlow], cookies: Iterable[int]
                 ) -> tuple[list[InstalledFlow], list[Flow]]:
    """`diff()` over the flows of these cookies only (those an incremental plan added or
    removed since `current` was true): what to delete and what to add."""
    want, stale, missing = desired.by_cookie, [], []
    for c in cookies:
        inst = current.get(c)
        if c in want:
            if inst is None:
                missing.append(want[c])
        elif inst is not None:
            stale.append(inst)
    return stale, missing


def diff_touched_groups(desired: Mapping[int, Group], current: Mapping[int, Group | None],
                        ids: Iterable[int]) -> tuple[list[Group], list[Group], list[int]]:
    """`diff_groups()` over these group ids only."""
    add, modify, delete = [], [], []
    for gid in sorted(ids):
        want = desired.get(gid)
        if want is None:
            if gid in current:
                delete.append(gid)
        elif gid not in current:
            add.append(want)
        elif current[gid] != want:
            modify.append(want)
    return add, modify, delete
