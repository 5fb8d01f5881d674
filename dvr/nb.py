"""`dvr nb`: the client of the northbound database, over OVSDB's JSON-RPC (`dvr/jsonrpc.py`).

What it sends is computed by `flows.northbound` (the rows of a topology, the operations of a
change); here: connecting (to the leader of a cluster), transactions and their errors, and
`change()`, which applies an edit of the desired state exactly once even across a leader's
failover. `load` validates first and replaces the whole desired state in one transaction (a
refused topology writes nothing); `dump` reads it back as a topology document.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from dvr import jsonrpc
from flows.model import Topology, build_topology, to_dict
from flows.northbound import (
    DB,
    GLOBAL_SELECT,
    ChangeError,
    Command,
    Refusal,
    Remote,
    Write,
    access_ops,
    diff_ops,
    document,
    dump_ops,
    fip_del_change,
    fip_set_change,
    fresh_generation,
    generation_of,
    router_if_change,
    split_remotes,
    uuids_of,
    vm_add_change,
    vm_del_change,
)


class NbError(Exception):
    """The database could not be reached or refused a transaction."""


MAX_FAILOVERS = 5  # connections lost in one change before giving up


class NbLost(NbError):
    """The connection, or the leader, was lost: a transaction's outcome is unknown."""


class NbConflict(NbError):
    """A transaction's guard failed: the desired state changed since it was read."""


class NbRefused(NbError):
    """The database refused a transaction at commit (an index would hold a value twice,
    a reference would dangle): `refusal` holds its error and details."""

    def __init__(self, message: str, refusal: Refusal):
        super().__init__(message)
        self.refusal = refusal


# OVSDB error tags (RFC 7047 names an error by its "error" member) that mean the server let
# the transaction go without an outcome: "canceled" (the JSON-RPC error of a transaction the
# server dropped), "cluster error" (RAFT: not leader, lost leadership, ...)
LOST_TAGS = frozenset({"canceled", "cluster error"})
GUARD_FAILED = "timed out"  # a `wait` operation whose condition does not hold (RFC 7047)


def _tag(error: Any) -> str:
    """The tag of an OVSDB or JSON-RPC error: a string, or an object's "error" member."""
    if isinstance(error, dict):
        return str(error.get("error", ""))
    return str(error)


def _open(remote: str, timeout: float) -> jsonrpc.Connection:
    try:
        return jsonrpc.Connection(remote, timeout)
    except jsonrpc.RpcError as exc:
        raise NbError(f"cannot connect to the northbound database at {remote}: "
                      f"{exc}") from None


def _cluster_role(conn: jsonrpc.Connection) -> str:
    """What this server is for the northbound database: standalone, leader, follower,
    or not (yet) a connected member, from its _Server database."""
    try:
        result, error = conn.call("transact", ["_Server", {
            "op": "select", "table": "Database", "where": [["name", "==", DB]],
            "columns": ["model", "leader", "connected"]}], timeout=5)
    except jsonrpc.RpcError:
        return "unreachable"
    if error or not result or not result[0].get("rows"):
        return "unreachable"
    row = result[0]["rows"][0]
    if row["model"] != "clustered":
        return "standalone"
    if not row["connected"]:
        return "disconnected from the cluster"
    return "leader" if row["leader"] else "follower"


def member_role(remote: str, timeout: float = 1.0) -> str:
    """The role of the database server at `remote` (leader, follower, standalone, ...)."""
    try:
        conn = _open(remote, timeout)
    except NbError:
        return "unreachable"
    try:
        return _cluster_role(conn)
    finally:
        conn.close()


def _guarded(generation: str | None, ops: list[dict[str, Any]], fresh: str
             ) -> list[dict[str, Any]]:
    """A change's operations guarded by the generation read, setting a fresh one."""
    return [{"op": "wait", "table": "NB_Global", "where": [], "columns": ["generation"],
             "until": "==", "timeout": 0, "rows": [{"generation": generation}]},
            *ops,
            {"op": "update", "table": "NB_Global", "where": [], "row": {"generation": fresh}},
            {"op": "mutate", "table": "NB_Global", "where": [],
             "mutations": [["changes", "+=", 1]]}]


class Northbound:
    """A connection to the northbound database: one remote (unix:PATH or tcp:HOST:PORT) or
    the members of a cluster, comma-separated. With several, it talks to the cluster's
    leader (a follower's copy may lag behind), finds the new leader after a failover, and
    `change()` makes sure a change the failover interrupted is applied exactly once."""

    def __init__(self, target: str, timeout: float = 10.0):
        self.target = target
        self.remotes = split_remotes(target)
        if not self.remotes:
            raise NbError("no northbound database given")
        self.timeout = timeout
        self.remote = ""
        self.conn: jsonrpc.Connection | None = None
        self._first: list[dict[str, Any]] = []  # the first read's results (apply())
        self._connect()

    def _connect(self) -> None:
        """Connect to the database; with several remotes, to the leader, waiting for one
        to be elected (until the timeout)."""
        deadline = time.monotonic() + self.timeout
        while True:
            why = []
            for remote in self.remotes:
                left = max(0.05, deadline - time.monotonic())
                try:
                    conn = _open(remote, left if len(self.remotes) == 1 else min(left, 1.0))
                except NbError as exc:
                    why.append(str(exc))
                    continue
                if len(self.remotes) == 1:
                    self.conn, self.remote = conn, remote
                    return
                role = _cluster_role(conn)
                if role == "leader" or role == "standalone":
                    self.conn, self.remote = conn, remote
                    return
                conn.close()
                why.append(f"{remote}: {role}")
            if len(self.remotes) == 1 or time.monotonic() >= deadline:
                raise NbError("; ".join(why) if len(why) == 1 else
                              f"no northbound database leader among {self.target} "
                              f"({'; '.join(why)})")
            time.sleep(0.05)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    def transact(self, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.conn is None:
            raise NbLost(f"{self.target}: not connected")
        try:
            results, error = self.conn.call("transact", [DB, *ops])
        except jsonrpc.RpcError as exc:
            raise NbLost(f"{self.remote}: {exc}") from None
        if error:
            if _tag(error) in LOST_TAGS:
                raise NbLost(f"{self.remote}: {error}")
            raise NbError(f"{self.remote}: {error}")
        for op, res in zip(ops, results, strict=False):
            if isinstance(res, dict) and res.get("error"):
                what = (f"{op['op']} {op.get('table', '')}: {res['error']}: "
                        f"{res.get('details', '')}".rstrip(": "))
                if op["op"] == "wait" and res["error"] == GUARD_FAILED:
                    raise NbConflict(what)
                if _tag(res) in LOST_TAGS:
                    raise NbLost(f"{self.remote}: {what}")
                raise NbError(what)
        if len(results) > len(ops) and results[-1] and results[-1].get("error"):
            err = f"{results[-1]['error']}: {results[-1].get('details', '')}"
            if _tag(results[-1]) in LOST_TAGS:
                raise NbLost(f"{self.remote}: {err}")
            raise NbRefused(f"transaction refused: {err}",
                            Refusal(str(results[-1]["error"]),
                                    str(results[-1].get("details", ""))))
        return results

    def _reconnect(self) -> None:
        self.close()
        self.conn = None
        self._connect()

    def load(self, topo: Topology) -> str:
        """Replace the desired state with `topo`, changing only the rows that differ, in
        one transaction. Returns the new generation: the hash of the whole document
        (`generation_of`), also when only the generation differs (after changes made in
        O(change), which give fresh ones), so that a loaded document always has the same."""
        doc = to_dict(topo)
        # a Topology is valid already
        return self.change(lambda _: doc, validate=False, relabel=True)

    def change(self, edit: Any, retries: int = 5, validate: bool = True,
               effective: bool = True, relabel: bool = False) -> str:
        """Read the desired state, `edit` its document, validate the result (a
        TopologyError writes nothing), write the difference in one transaction guarded by
        the generation read; a concurrent change makes it start over. What is written is
        the effective topology (every allocated value written out), or with `effective`
        False the edited document as it is, once valid (a writer that gives every value
        itself and leaves the SNAT candidates to the registered network nodes).

        A transaction whose answer is lost (the leader died) may or may not have been
        committed: the state is read again from the new leader, and the change counts as
        done when it shows the generation that transaction was writing; it is never
        written twice."""
        expected: str | None = None  # what a transaction sent but unconfirmed would make
        conflicts = failovers = 0
        while True:
            try:
                results = self.transact(dump_ops())
                uuids, generation = uuids_of(results)
                if expected is not None and generation == expected:
                    return expected
                old = document(results) if generation is not None else None
                new = edit(json.loads(json.dumps(old)))  # a copy (plain JSON data)
                if validate:
                    built = to_dict(build_topology(new, "<change>"))
                    new = built if effective else new
                if old is not None and new == old and (
                        not relabel or generation == generation_of(new)):
                    return generation or ""
                expected = generation_of(new)
                self.transact(diff_ops(old, new, uuids, generation))
                return expected
            except NbLost:
                failovers += 1
                if failovers > MAX_FAILOVERS:
                    raise
                self._reconnect()  # the leader, or an NbError when none comes
            except NbConflict:
                conflicts += 1  # somebody else changed it meanwhile: read again
                if conflicts >= retries:
                    raise NbError("the desired state kept changing under this change; "
                                  "try again") from None

    # --- the daily changes, in O(change) ---------------------------------------------------
    def vm_add(self, name: str, node: str, network: str, ip: str | None = None,
               mac: str | None = None, floating_ip: str | None = None) -> str:
        """Add a VM's port (addresses left out allocated as a whole document would);
        returns the new generation."""
        return self.apply(vm_add_change(name, node, network, ip, mac, floating_ip))

    def vm_del(self, name: str) -> str:
        return self.apply(vm_del_change(name))

    def fip_set(self, vm: str, floating_ip: str) -> str:
        """Associate `floating_ip` with `vm`, moving it from the VM that holds it, if any."""
        return self.apply(fip_set_change(vm, floating_ip))

    def fip_del(self, vm: str) -> str:
        return self.apply(fip_del_change(vm))

    def router_if(self, router: str, network: str, add: bool) -> str:
        return self.apply(router_if_change(router, network, add))

    def _drive(self, command: Any) -> Any:
        """Run a command of `flows.northbound` to its end: each read it yields in one
        transaction; returns what it returns (the first read's results are kept in
        `self._first`)."""
        try:
            reads = next(command)
        except StopIteration as stop:
            return stop.value
        first = True
        while True:
            results = self.transact(reads)
            if first:
                self._first, first = results, False
            try:
                reads = command.send(results)
            except StopIteration as stop:
                return stop.value

    def apply(self, command: Any, retries: int = 5) -> str:
        """Apply a change in O(change): `command(hints)` (see `flows.northbound`) reads the
        rows it concerns, beginning with NB_Global, and returns its write; that goes in one
        transaction guarded by the generation read, setting a fresh one. A change refused at
        commit writes nothing: the command names the key (or, when what it allocated was
        taken, starts over with that learnt: `hints`, valid at the generation read); a
        concurrent change makes it start over.

        Exactly once, as `change()`: when a write's answer is lost, NB_Global alone is read
        from the new leader, and the change counts as done when it shows the generation
        that write was setting."""
        expected: str | None = None
        conflicts = failovers = 0
        hints: dict[str, Any] = {}
        while True:
            try:
                if expected is not None:  # did the lost write commit?
                    rows = self.transact([GLOBAL_SELECT])[0].get("rows", [])
                    if rows and rows[0]["generation"] == expected:
                        return expected
                    expected = None
                gen: Command = command(hints)
                write: Write | None = self._drive(gen)
                rows = self._first[0].get("rows", [])
                generation = rows[0]["generation"] if rows else None
                if hints.get("generation", generation) != generation:
                    hints.clear()  # learnt at another generation: start over without them
                    continue
                if write is None:
                    return generation or ""
                while write is not None:
                    fresh = fresh_generation()
                    ops = _guarded(generation, write.ops, fresh)
                    expected = fresh
                    try:
                        self.transact(ops)
                        return fresh
                    except NbRefused as exc:
                        expected = None
                        if write.refused is None:
                            raise
                        hints["generation"] = generation
                        # raises (refused), or learnt: another write, or start over
                        write = self._drive(write.refused(exc.refusal, hints))
            except NbLost:
                failovers += 1
                if failovers > MAX_FAILOVERS:
                    raise
                self._reconnect()
            except NbConflict:
                expected = None
                hints.clear()
                conflicts += 1
                if conflicts >= retries:
                    raise NbError("the desired state kept changing under this change; "
                                  "try again") from None

    def apply_all(self, commands: list[Any], retries: int = 5) -> str:
        """Several changes of `apply()` in one transaction under one generation guard: each
        command reads as there (all at one generation), their writes go together, setting
        one fresh generation; returns it. All or nothing: a command that refuses raises
        its error, and a write refused at commit raises NbRefused (which change it
        concerns, each alone says: `apply()` them one by one); a concurrent change makes
        them all start over. Exactly once across a failover, as `apply()`."""
        expected: str | None = None
        conflicts = failovers = 0
        while True:
            try:
                if expected is not None:  # did the lost write commit?
                    rows = self.transact([GLOBAL_SELECT])[0].get("rows", [])
                    if rows and rows[0]["generation"] == expected:
                        return expected
                    expected = None
                generation: str | None = None
                ops: list[dict[str, Any]] = []
                for i, command in enumerate(commands):
                    write: Write | None = self._drive(command({}))
                    rows = self._first[0].get("rows", [])
                    read = rows[0]["generation"] if rows else None
                    if i and read != generation:
                        raise NbConflict("the desired state changed between the reads")
                    generation = read
                    if write is not None:
                        ops += write.ops
                if not ops:
                    return generation or ""
                expected = fresh_generation()
                self.transact(_guarded(generation, ops, expected))
                return expected
            except NbLost:
                failovers += 1
                if failovers > MAX_FAILOVERS:
                    raise
                self._reconnect()
            except NbConflict:
                expected = None
                conflicts += 1
                if conflicts >= retries:
                    raise NbError("the desired state kept changing under this change; "
                                  "try again") from None

    def snat_move(self, router: str, node: str) -> tuple[str, ...]:
        """Put `node` first in `router`'s HA chain: the operator's failback (or move), which
        the scheduler never makes by itself. Returns the new chain."""
        nodes, routers = self.transact([
            {"op": "select", "table": "Node", "where": [], "columns": ["_uuid", "name", "role"]},
            {"op": "select", "table": "Router", "where": [["name", "==", router]],
             "columns": ["_uuid", "external_gateway", "snat_nodes", "snat_chain"]}])
        by_uuid = {n["_uuid"][1]: n["name"] for n in nodes["rows"]}
        by_name = {n["name"]: n for n in nodes["rows"]}
        if not routers["rows"] or not routers["rows"][0]["external_gateway"]:
            raise ChangeError(f"routers.{router}: no such router with an external gateway")
        if node not in by_name or by_name[node]["role"] != "network":
            raise ChangeError(f"nodes.{node}: no such network node")
        r = routers["rows"][0]
        order = lambda col: [by_uuid[u] for _, u in sorted(  # noqa: E731
            (int(k), v[1]) for k, v in r[col][1]) if u in by_uuid]
        chain = order("snat_chain") or order("snat_nodes")
        length = max(len(chain), 1)
        chain = ([node] + [n for n in chain if n != node])[:length]
        self.transact([{"op": "update", "table": "Router", "where": [["name", "==", router]],
                        "row": {"snat_chain": ["map", [[i, ["uuid", by_name[n]["_uuid"][1]]]
                                                       for i, n in enumerate(chain)]]}}])
        return tuple(chain)

    def set_connections(self, remotes: list[Remote]) -> None:
        """Make the servers' remotes `remotes` (each member listens on them: the targets
        are the cluster's, so give no member's address but a management one all share)
        and the project's RBAC roles what `flows.northbound.roles()` says, in one
        transaction."""
        glob, existing = self.transact([
            {"op": "select", "table": "NB_Global", "where": [], "columns": ["_uuid"]},
            {"op": "select", "table": "RBAC_Role", "where": [],
             "columns": ["_uuid", "name", "permissions"]}])
        self.transact(access_ops(remotes, existing["rows"], bool(glob["rows"])))

    def connections(self) -> list[Remote]:
        """The servers' remotes, as set (NB_Global.connections)."""
        glob, conns = self.transact([
            {"op": "select", "table": "NB_Global", "where": [], "columns": ["connections"]},
            {"op": "select", "table": "Connection", "where": []}])
        if not glob["rows"]:
            return []
        refs = {u for _, u in _set_items(glob["rows"][0]["connections"])}
        out = []
        for c in conns["rows"]:
            if c["_uuid"][1] in refs:
                probe = c["inactivity_probe"]
                out.append(Remote(c["target"], c["role"], c["read_only"],
                                  probe if isinstance(probe, int) else None))
        return sorted(out, key=lambda r: r.target)

    def dump(self, live: bool = False) -> dict[str, Any]:
        """The desired state as a topology document (with `live`, the routers' HA chains as
        the scheduler keeps them: see `flows.northbound.document`)."""
        return document(self.transact(dump_ops()), live=live)

    def topology(self, source: str = "<northbound>", live: bool = False) -> Topology:
        """The desired state as a model; its digest is the database's generation (what
        the agents report when they have converged on it)."""
        results = self.transact(dump_ops())
        _, generation = uuids_of(results)
        return dataclasses.replace(build_topology(document(results, live=live), source),
                                   digest=generation or "")


def _set_items(value: Any) -> list[Any]:
    """The members of an OVSDB set in its JSON form (one member alone, or ["set", [...]])."""
    if isinstance(value, list) and value and value[0] == "set":
        return list(value[1])
    return [value] if value not in (None, []) else []
