"""Where the agent reads the desired state from: one small interface, several backends.

From the northbound database, an agent keeps only what its node's plan can depend on
(OVSDB `monitor_cond`, as ovn-controller does): NB_Global, Node, External, Network and
Router in full (small tables), its own Agent row (not every agent's heartbeat), and the
Port rows of `flows.planner.scope()`, expressed over its copy: the ports on this node; on
the networks reachable from theirs (sharing a router) and on the networks of the routers
whose SNAT is active here; and every port with a floating IP when this node NATs (it hosts
a floating IP or a router's SNAT). (Router and node MACs are derived from their own names,
not around the ports' MACs, so a partial copy derives the same ones.)

The condition is recomputed from the copy whenever the copy changes, and the copy is handed
to the agent only once the server has acknowledged the latest condition (the copy then holds
every row that condition selects). At start-up that takes two or three round trips (this
node's ports, then their networks' ports): a restarting agent never plans from a copy still
missing ports, so it removes no flow. A port newly needed (a VM on a network new to this
node, a router interface added) arrives with the next acknowledgement, before the change
that needs it is handed out. A VM bound here that the database puts on another node is
known only if it is in scope anyway (the database has no column for its port id).

The model of the copy is kept row by row (`flows.live`): the IDL notes each row it changes,
and the next `poll()` hands only those to the model (a Port row is one VM checked and made
anew; a Network or Router row re-reads that row's entry of the small tables' document), so
a change costs what it touches; the copy is read whole at start and when it no longer
matches what the model read. `delta()` tells the agent's planner what changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from abc import ABC, abstractmethod
from typing import Any

from flows import northbound
from flows.incremental import Change
from flows.live import LiveTopology
from flows.model import Topology, TopologyError, load_topology
from flows.northbound import split_remotes
from flows.planner import Scope

LOG = logging.getLogger(__name__)
# columns the agent never reads, not copied (a port's fip_key exists for the database's
# index alone: a string a port, 10,000 of them on a node that NATs in a large cloud)
UNUSED_COLUMNS = {"Port": frozenset({"fip_key"})}


class Source(ABC):
    """The desired state of the cloud. `poll()` is cheap and says whether it changed."""

    @abstractmethod
    def poll(self) -> bool:
        """True when `load()` may now return something new."""

    @abstractmethod
    def load(self) -> Topology:
        """The current desired state; raises on an invalid one (the agent keeps the last)."""

    def delta(self) -> Change | None:
        """What changed between the topology the previous successful `load()` returned and
        the one the last returned (None: unknown; the planner compares the two)."""
        return None

    def wait(self, poller: Any) -> bool:
        """Arrange for `poller` (an `ovs.poller.Poller`) to wake when `poll()` may have news.
        False when the source cannot be waited for and must be polled on a timer."""
        return False

    # what the other agents report (a source without any: a topology file)
    report_changes = 0

    def reports(self, fresh_within: float) -> dict[str, dict[str, str]]:
        return {}

    def report_ages(self) -> dict[str, float]:
        return {}

    def bindings(self, router: str, fresh_within: float) -> set[str]:
        return set()

    def connected(self) -> bool | None:
        """Whether the source's database is connected (None: a source without one)."""
        return None


class FileSource(Source):
    """A topology file, re-read when its size, mtime or inode change."""

    def __init__(self, path: str):
        self.path = path
        self._seen: tuple[int, int, int] | None = None

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def poll(self) -> bool:
        return self._stamp() != self._seen

    def load(self) -> Topology:
        stamp = self._stamp()
        topo = load_topology(self.path)
        self._seen = stamp
        return topo


RECONNECT_MIN_MS, RECONNECT_MAX_MS = 100, 1000
# a condition change the server has not acknowledged after this long is logged
COND_WARN_SECONDS = 10.0


def _replica_class() -> type:
    """The `ovs` IDL, counting changes of the desired state (every table but Agent: agents'
    heartbeats do not count)."""
    import ovs.db.idl

    class Replica(ovs.db.idl.Idl):  # type: ignore[misc]
        desired_changes = 0
        report_changes = 0  # changes of Agent rows (a network node hears the others')

        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            # node -> when (this host's monotonic clock) its Agent row last changed: how
            # fresh a report is, whatever the other hosts' clocks say
            self.agent_seen: dict[str, float] = {}
            # the rows of the desired state changed since the model last read them
            self.dirty: set[tuple[str, Any]] = set()

        def notify(self, event: Any, row: Any, updates: Any = None) -> None:
            if row._table.name != "Agent":
                self.desired_changes += 1
                self.dirty.add((row._table.name, row.uuid))
                return
            node = getattr(row, "node", None)
            if not isinstance(node, str):
                return
            if event == ovs.db.idl.ROW_DELETE:
                self.agent_seen.pop(node, None)
            else:
                self.agent_seen[node] = time.monotonic()
            self.report_changes += 1

    return Replica


def spread(remote: str, node: str | None) -> str:
    """The members of a cluster in an order of this node's own (a rotation chosen by its
    name, the same at every restart), so that a cloud's agents spread over the members
    instead of all starting with the first; the IDL moves on to the next when one fails."""
    remotes = split_remotes(remote)
    if node is None or len(remotes) < 2:
        return remote
    k = int.from_bytes(hashlib.sha256(node.encode()).digest()[:4], "big") % len(remotes)
    return ",".join(remotes[k:] + remotes[:k])


class NbSource(Source):
    """The northbound database, through the `ovs` IDL: the server pushes every change (a
    monitor); `poll()` only processes what has arrived. Reconnects by itself, keeping the
    last state meanwhile; reads from any member of a cluster (comma-separated remotes).
    With `node`, keeps only that node's scope (see the module docstring); without, the
    whole database."""

    def __init__(self, remote: str, node: str | None = None):
        warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
        import ovs.db.idl

        helper = ovs.db.idl.SchemaHelper(location=str(northbound.SCHEMA))
        for table, spec in json.loads(northbound.SCHEMA.read_text())["tables"].items():
            if table in northbound.ACCESS_TABLES:  # the servers' remotes and roles
                continue
            unused = UNUSED_COLUMNS.get(table)
            if unused:
                helper.register_columns(table, [c for c in spec["columns"] if c not in unused])
            else:
                helper.register_table(table)
        self.node = node
        self.idl = _replica_class()(spread(remote, node), helper, leader_only=False)
        if node is not None:  # no port before this node's own row is known
            self.idl.cond_change("Port", [False])
            self.idl.cond_change("Agent", [["node", "==", node]])
        # a database back after a restart or a failover is found within a second (the
        # default backoff grows to 8 s); the bindings offer no public call for this
        session = getattr(self.idl, "_session", None)
        if session is not None:
            session.reconnect.set_backoff(RECONNECT_MIN_MS, RECONNECT_MAX_MS)
        self._built = -1  # the copy's `desired_changes` when `_state` was built
        self._state: Topology | TopologyError | None = None
        # the model of the copy, updated row by row (flows.live); the rows' JSON of the
        # small tables and the Port rows' names, by UUID, as the model last read them
        self.live = LiveTopology("northbound")
        self._json: dict[str, dict[Any, dict[str, Any]]] = {}
        self._port_names: dict[Any, str] = {}
        self._infra: dict[str, Any] | None = None  # the small tables' document, as read
        self.rebuilds = 0  # models built from the whole copy (at start, after a refill)
        self.patched = 0  # changes of the small tables read row by row
        self._scope: Scope | None = None
        self._names_changed = True  # Node or Network rows changed since the condition
        # what changed since the last load() (None: unknown), and what that load changed
        self._pending: Change | None = None
        self._delta: Change | None = None
        self._seen = -1  # ... when `load()` last handed it out
        self._pending_since: float | None = None
        self._report: Any = None  # the report transaction in flight (ovs.db.idl.Transaction)
        self.refused = 0  # reports the database refused (RBAC: not this node's row)

    def reconnect(self, why: str) -> None:
        """Drop the connection and make a new one now (the copy is kept meanwhile)."""
        LOG.info("northbound database: reconnecting (%s)", why)
        self.idl.force_reconnect()

    def wait(self, poller: Any) -> bool:
        idl = self.idl
        session = getattr(idl, "_session", None)
        if idl.cond_changed and session is not None and (
                not session.is_connected() or getattr(idl, "_request_id", None) is not None):
            # a new condition that cannot be sent yet (no connection, or an earlier
            # request not answered): the IDL's own wait() would wake at once, again and
            # again; wake when the connection has news instead
            session.wait(poller)
            session.recv_wait(poller)
        else:
            idl.wait(poller)
        return True

    def poll(self) -> bool:
        """True when the copy's desired state changed since `load()` (agents' reports, in
        the same database, do not count) and the copy is complete for its condition."""
        self.idl.run()
        self._report_outcome()
        if not self.idl.has_ever_connected():
            return False
        self._current()
        if not self._in_force():
            return False
        return self.idl.desired_changes != self._seen

    def load(self) -> Topology:
        state = self._current()
        self._seen = self._built
        if isinstance(state, TopologyError):
            raise state
        assert state is not None
        self._delta, self._pending = self._pending, Change()
        return state

    def delta(self) -> Change | None:
        return self._delta

    # --- the copy and its condition ---------------------------------------------------------
    def _current(self) -> Topology | TopologyError | None:
        """The topology the copy holds (built once per change), after asking the server
        for the ports its scope needs."""
        if self.idl.desired_changes == self._built:
            return self._state
        self._built = self.idl.desired_changes
        dirty, self.idl.dirty = self.idl.dirty, set()
        glob = list(self.idl.tables["NB_Global"].rows.values())
        try:
            if not glob or not glob[0].generation:  # (its remotes alone are set: no state)
                raise TopologyError("northbound", [("(database)", "holds no desired state yet")])
            topo = self._model(dirty)
            self._state = _with_digest(topo, glob[0].generation)
            change = self.live.change
            self._pending = (None if self._pending is None or change is None
                             else self._pending | change)
        except TopologyError as exc:  # keep the condition; the agent keeps its last state
            self._state = exc
            return exc
        if self.node is not None:
            sc = self.live.scope(self.node)
            # the condition anew when the scope changed, or the rows it names did
            if sc != self._scope or self._names_changed:
                self._scope, self._names_changed = sc, False
                self.idl.cond_change("Port", self._port_condition(sc))
            # a network node decides on its SNAT claims by what the others see (flows.ha)
            me = self._state.nodes.get(self.node)
            self.idl.cond_change("Agent", [True] if me is not None and me.is_network
                                 else [["node", "==", self.node]])
        return self._state

    def _model(self, dirty: set[tuple[str, Any]]) -> Topology:
        """The copy's model, updated by the rows changed (`dirty`): a Port row changed is
        one VM checked and made anew; a row of the small tables changed builds those anew
        (flows.live). Built from the whole copy at first, and when the copy no longer
        matches what the model read (a refill after a reconnection drops rows unseen)."""
        t = self.idl.tables
        try:
            if self.live.topology is None and not self._json:
                raise _Whole
            vms: dict[str, Any] = {}
            rows: list[tuple[str, Any, Any]] = []  # (table, JSON before, after)
            for table, uuid in dirty:
                if table == "Port":
                    self._port_change(uuid, vms)
                    continue
                before, after = self._row_json(table, uuid)
                if table != "NB_Global":
                    rows.append((table, before, after))
                self._names_changed |= table in ("Node", "Network")
            if len(self._port_names) != len(t["Port"].rows) or any(
                    len(self._json.get(name, {})) != len(t[name].rows)
                    for name in INFRA_TABLES):
                raise _Whole
        except _Whole:
            return self._whole()
        if not rows:
            return self.live.update(vms, None)
        infra = self._patched(rows)
        patched = infra is not None
        self.patched += patched
        self._infra = infra if infra is not None else self._infra_doc()
        try:
            return self.live.update(vms, self._infra)
        except TopologyError:
            if not patched:
                raise
            # refused: once more with the small tables read whole, in their rows' order
            # (the model's own words name the same objects as from the whole copy)
            self._infra = self._infra_doc()
            return self.live.update(None, self._infra)

    def _patched(self, rows: list[tuple[str, Any, Any]]) -> dict[str, Any] | None:
        """The small tables' document with these Network and Router rows' entries read
        again, each by `northbound.document()` of the row and the rows it names (None:
        another table, or a network renamed: read whole)."""
        if self._infra is None:
            return None
        out = dict(self._infra)
        sections: dict[str, dict[str, Any]] = {}
        for table, before, after in rows:
            if table not in ("Network", "Router"):
                return None
            if table == "Network" and before is not None and after is not None \
                    and before["name"] != after["name"]:
                return None  # the routers name it
            section = "networks" if table == "Network" else "routers"
            if section not in sections:
                sections[section] = out[section] = dict(out.get(section) or {})
            entries = sections[section]
            if before is not None:
                entries.pop(before["name"], None)
            if after is None:
                continue
            nodes = [self._json["Node"].get(u) for u in _refs(after, "snat_nodes", "snat_chain")]
            nets = [self._json["Network"].get(u) for u in _refs(after, "interfaces")]
            if None in nodes or None in nets:
                return None
            doc = northbound.document(
                [{"rows": []}, {"rows": nodes}, {"rows": []},
                 {"rows": [after] if table == "Network" else nets},
                 {"rows": [after] if table == "Router" else []}, {"rows": []}], live=True)
            entries[after["name"]] = doc[section][after["name"]]
        return out

    def _whole(self) -> Topology:
        t = self.idl.tables
        self.rebuilds += 1
        self._names_changed = True
        self._json = {name: {u: _row(t[name], r) for u, r in t[name].rows.items()}
                      for name in INFRA_TABLES}
        self._port_names = {u: r.name for u, r in t["Port"].rows.items()}
        doc = document_of(self.idl)
        self._infra = {k: v for k, v in doc.items() if k != "vms"}
        return self.live.load(doc)

    def _row_json(self, table: str, uuid: Any) -> tuple[Any, Any]:
        """The row's JSON, kept for `_infra_doc()`, before and after (None: no row). A row
        renamed: every Port naming it changes, so the whole copy is read again."""
        rows = self._json.setdefault(table, {})
        row = self.idl.tables[table].rows.get(uuid)
        before = rows.pop(uuid, None)
        after = None
        if row is not None:
            after = rows[uuid] = _row(self.idl.tables[table], row)
        if table in ("Node", "Network") and before is not None and (
                after is None or after["name"] != before["name"]):
            named = (self.live.by_node if table == "Node" else self.live.by_net).get(
                before["name"])
            if named or not self.live.valid:  # Port rows read with the old name
                raise _Whole
        return before, after

    def _infra_doc(self) -> dict[str, Any]:
        results = [{"rows": list(self._json.get(name, {}).values())} if name != "Port"
                   else {"rows": []} for name in northbound.DESIRED_TABLES]
        doc = northbound.document(results, live=True)
        doc.pop("vms", None)
        return doc

    def _port_change(self, uuid: Any, vms: dict[str, Any]) -> None:
        """A Port row's VM spec (None: removed) into `vms`, by the same reading as the
        whole copy's (`northbound.document()`, given the row and the two it names)."""
        t = self.idl.tables
        before = self._port_names.pop(uuid, None)
        if before is not None:
            vms.setdefault(before, None)  # gone, unless a row (this one) still has the name
        row = t["Port"].rows.get(uuid)
        if row is None:
            return
        port = _row(t["Port"], row)
        node = t["Node"].rows.get(_uuid(port["node"]))
        net = t["Network"].rows.get(_uuid(port["network"]))
        if node is None or net is None:
            raise _Whole
        doc = northbound.document(
            [{"rows": []}, {"rows": [_row(t["Node"], node)]}, {"rows": []},
             {"rows": [_row(t["Network"], net)]}, {"rows": []}, {"rows": [port]}], live=True)
        vms[row.name] = doc["vms"][row.name]
        self._port_names[uuid] = row.name

    # --- what the other agents report ---------------------------------------------------------
    @property
    def report_changes(self) -> int:
        """Counts changes of the Agent rows held (to know when `reports()` may differ)."""
        return int(self.idl.report_changes)

    def bindings(self, router: str, fresh_within: float) -> set[str]:
        """The translations (`flows.nat.Binding` text) the fresh agents that claim `router`
        publish for it."""
        now = time.monotonic()
        out: set[str] = set()
        for row in self.idl.tables["Agent"].rows.values():
            seen = self.idl.agent_seen.get(row.node)
            if (row.node != self.node and seen is not None and now - seen <= fresh_within
                    and router in row.snat):
                out |= {b for b in row.snat_bindings if b.startswith(f"{router} ")}
        return out

    def report_ages(self) -> dict[str, float]:
        """Seconds since each other agent's row last changed."""
        now = time.monotonic()
        return {n: now - t for n, t in self.idl.agent_seen.items() if n != self.node}

    def connected(self) -> bool | None:
        session = getattr(self.idl, "_session", None)
        return bool(session is not None and session.is_connected())

    def reports(self, fresh_within: float) -> dict[str, dict[str, str]]:
        """Each other agent's BFD sessions (peer -> state), for the agents whose row changed
        (heartbeat) within `fresh_within` seconds of this host's clock; {} while the
        database is out of reach (nothing is known to be fresh)."""
        session = getattr(self.idl, "_session", None)
        if session is None or not session.is_connected():
            return {}
        now = time.monotonic()
        out = {}
        for row in self.idl.tables["Agent"].rows.values():
            seen = self.idl.agent_seen.get(row.node)
            if row.node != self.node and seen is not None and now - seen <= fresh_within:
                out[row.node] = dict(row.bfd)
        return out

    def _port_condition(self, sc: Scope) -> list[Any]:
        """The scope as an OVSDB condition on Port rows (clauses ORed; sorted, so that the
        same scope is the same condition)."""
        t = self.idl.tables
        clauses: list[Any] = [["node", "==", ["uuid", str(r.uuid)]]
                              for r in t["Node"].rows.values() if r.name == sc.node]
        clauses += sorted(["network", "==", ["uuid", str(r.uuid)]]
                          for r in t["Network"].rows.values() if r.name in sc.networks)
        if sc.floating_ips:
            clauses.append(["floating_ip", "!=", ["set", []]])
        return clauses or [False]

    def _in_force(self) -> bool:
        """Every table's latest condition acknowledged by the server, and the copy
        filled for it (not between a reconnection and the server's answer).

        (Not `cond_change()`'s seqno: in the `ovs` bindings (4.0) it asks for one
        acknowledgement more than comes, and `cond_seqno` restarts from 0 when the copy is
        refilled after a reconnection.)"""
        idl = self.idl
        waiting = sorted(t.name for t in idl.tables.values()
                         if t.condition_state.new is not None
                         or t.condition_state.requested is not None)
        monitoring = idl.state == idl.IDL_S_MONITORING
        now = time.monotonic()
        if not (monitoring and waiting):
            self._pending_since = None
        elif self._pending_since is None:
            self._pending_since = now
        elif now - self._pending_since > COND_WARN_SECONDS:  # connected, yet no answer
            LOG.warning("the northbound database has not acknowledged the condition on %s "
                        "for %.0f s", ", ".join(waiting), now - self._pending_since)
            self._pending_since = now
        return monitoring and not waiting

    # --- this agent's report ----------------------------------------------------------------
    def report(self, node: str, status: dict[str, Any]) -> None:
        """Write this agent's row of the Agent table, in a transaction that completes as
        the IDL runs (`poll()` checks its outcome). Skipped while the previous report is
        still on its way; a failed one is logged, and the next report writes it all anew."""
        import ovs.db.idl

        self._report_outcome()
        if self._report is not None or self.idl.txn is not None \
                or not self.idl.has_ever_connected():
            return
        txn = ovs.db.idl.Transaction(self.idl)
        table = self.idl.tables["Agent"]
        row = next((r for r in table.rows.values() if r.node == node), None)
        if row is None:
            row = txn.insert(table)
            row.node = node
        row.version = str(status.get("version", ""))
        row.heartbeat = int(float(status.get("heartbeat", 0)) * 1000)
        row.generation = str(status.get("generation") or "")
        row.converged = bool(status.get("converged"))
        row.flows = int(status.get("flows", 0))
        row.snat = list(status.get("snat", []))
        row.vms = list(status.get("vms", []))
        row.error = [str(status["error"])] if status.get("error") else []
        row.gateway_mac = [status["gateway_mac"]] if status.get("gateway_mac") else []
        row.started = int(float(status.get("started", 0)) * 1000)
        row.bfd = {str(k): str(v) for k, v in (status.get("bfd") or {}).items()}
        row.snat_bindings = list(status.get("snat_bindings") or [])
        row.floating_ips = list(status.get("floating_ips") or [])
        self._report = txn
        self._report_outcome()

    def _report_outcome(self) -> None:
        """Advance the report transaction in flight and check how it ended."""
        import ovs.db.idl

        txn = self._report
        if txn is None:
            return
        status = txn.commit()
        if status == ovs.db.idl.Transaction.INCOMPLETE:
            return
        self._report = None
        if status not in (ovs.db.idl.Transaction.SUCCESS, ovs.db.idl.Transaction.UNCHANGED):
            error = txn.get_error() or "no detail"
            if "permission error" in error or "RBAC" in error:
                self.refused += 1
                LOG.error("report to the northbound database refused (is this node's "
                          "certificate's CN %r?): %s", self.node, error)
                return
            log = LOG.info if status == ovs.db.idl.Transaction.TRY_AGAIN else LOG.warning
            log("report to the northbound database: %s (%s)", status, error)

    def close(self) -> None:
        self.idl.close()


# the tables of the desired state but Port (small ones: read whole when one of them changes)
INFRA_TABLES = tuple(t for t in northbound.DESIRED_TABLES if t != "Port")


class _Whole(Exception):
    """The model must be built from the whole copy."""


def _row(table: Any, r: Any) -> dict[str, Any]:
    """One IDL row in OVSDB's JSON form (a column at its default may be absent)."""
    from ovs.db.data import Datum

    out: dict[str, Any] = {"_uuid": ["uuid", str(r.uuid)]}
    for name, column in table.columns.items():
        datum = r._data.get(name) or Datum.default(column.type)
        out[name] = datum.to_json()
    return out


def _refs(row: dict[str, Any], *columns: str) -> list[Any]:
    """The UUIDs a row's position -> reference map columns name."""
    import uuid

    out = []
    for column in columns:
        value = row.get(column)
        if isinstance(value, list) and value and value[0] == "map":
            out += [uuid.UUID(ref[1]) for _, ref in value[1]]
    return out


def _uuid(ref: Any) -> Any:
    import uuid

    return uuid.UUID(ref[1]) if isinstance(ref, list) and ref and ref[0] == "uuid" else None


def document_of(idl: Any) -> dict[str, Any]:
    """The topology document the IDL's copy of the northbound database holds: its rows in
    OVSDB's JSON form, read by the same `flows.northbound.document()` as a `dvr nb dump`."""
    return northbound.document([
        {"rows": [_row(idl.tables[t], r) for r in idl.tables[t].rows.values()]}
        for t in northbound.DESIRED_TABLES], live=True)


def _with_digest(topo: Topology, digest: str) -> Topology:
    import dataclasses

    return dataclasses.replace(topo, digest=digest)
