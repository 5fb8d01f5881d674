"""The driver's writer: Neutron's changes into the northbound database, in the order Neutron
made them. No Neutron import (the driver hands it edits; the unit tests and
`bench/neutron_write.py` drive it against a real ovsdb-server).

An edit is a `Put` (an entry of the document put whole, or removed, refused when older
than the one held) or, for what depends on the document (the external network), a plain
function of it. What is queued is written in order. The ports' entries (a port's event, a
floating IP moved between two) in O(change): the northbound's `vm_put_change()`, reading
the rows of its port only, consecutive ports in one guarded transaction
(`Northbound.apply_all()`), one by one (`Northbound.apply()`) when one of them refuses. The
other entries (networks, subnets, routers, the external network: rare events), those
between two ports' entries together, as an edit of the whole document
(`Northbound.change()`: read, validated and diffed whole).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dvr import nb
from dvr.neutron import translate as tr
from flows import northbound
from flows.model import TopologyError

LOG = logging.getLogger(__name__)

GROUP = 100  # ports' puts at most in one transaction

Edit = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Put:
    """Put `entry` at `section`.`name` (None: remove it), refusing it (logged, nothing
    changed) when one of its `revisions` is older than the held entry's. With `unplaced`
    (ports): an entry whose network the document does not hold, or whose node is not a
    compute node there, counts as None (a port dvr does not serve). Callable on a document
    (the whole-document path); `command()` is the same put in O(change) (ports only)."""
    section: str
    name: str
    entry: dict[str, Any] | None
    revisions: tuple[str, ...] = (tr.REVISION,)
    unplaced: bool = False

    def __call__(self, doc: dict[str, Any]) -> None:
        entry = self.entry
        if self.unplaced and entry is not None and not placed(doc, entry):
            entry = None
        try:
            tr.put(doc, self.section, self.name, entry, self.revisions)
        except tr.Stale as exc:
            LOG.warning("dvr: stale update refused: %s", exc)

    @property
    def is_port(self) -> bool:
        return self.section == "vms"

    def command(self) -> Callable[[dict[str, Any]], northbound.Command]:
        assert self.is_port, self
        return northbound.vm_put_change(self.name, self.entry, self.revisions,
                                        unplaced=self.unplaced)


def placed(doc: dict[str, Any], entry: dict[str, Any]) -> bool:
    """A port's entry on a network of the document, on one of its compute nodes."""
    node = (doc.get("nodes") or {}).get(entry.get("node"))
    return (entry.get("network") in (doc.get("networks") or {})
            and node is not None and node.get("role") == "compute")


def ports_only(batch: list[tuple[str, list[Edit]]]) -> bool:
    """A batch made of ports' puts only (written in O(change))."""
    edits = [e for _, edits in batch for e in edits]
    return bool(edits) and all(isinstance(e, Put) and e.is_port for e in edits)


class NbWriter:
    """Applies edits of the desired state to the northbound database in the order Neutron
    made them. The request that made an edit does not wait for the database: a thread
    writes what is queued, in order: ports' entries in O(change) (consecutive ones in one
    transaction), the other entries between them in one transaction of the whole document
    (a burst of events costs one write), and a batch of those the northbound rules refuse
    entry by entry, so that only the offending one is left out. A write that cannot reach
    the database marks the writer `dirty`: the status thread repairs everything once the
    database answers.

    `connect()` opens a connection to the northbound database (the driver's: from its
    configuration)."""

    def __init__(self, connect: Callable[[], nb.Northbound]) -> None:
        self.connect = connect
        self.dirty = False
        self.cond = threading.Condition()
        # (what, edits), or (what, job): a job (the repair) runs alone, after what came before
        self.pending: list[tuple[str, Any]] = []
        self.busy = False
        self.thread: threading.Thread | None = None

    def apply(self, what: str, edits: list[Edit]) -> None:
        with self.cond:
            self.pending.append((what, edits))
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="dvr-writer",
                                               daemon=True)
                self.thread.start()
            self.cond.notify_all()

    def run_alone(self, what: str, job: Callable[[], None]) -> None:
        """Run `job` in the writer, after every edit queued before it and before any queued
        after it (the repair: a snapshot of Neutron is never older than what it overwrites)."""
        self.apply(what, job)  # type: ignore[arg-type]

    def flush(self, timeout: float = 30.0) -> bool:
        """Until everything queued is written (or given up); False on timeout."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.pending or self.busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.pending:
                    self.cond.wait()
                jobs = [i for i, (_, e) in enumerate(self.pending) if callable(e)]
                cut = jobs[0] if jobs else len(self.pending)
                batch, job = self.pending[:cut], self.pending[cut] if jobs else None
                self.pending = self.pending[cut + 1 if jobs else cut:]
                self.busy = True
            try:
                if batch:
                    self.write(batch)
                if job is not None:
                    job[1]()
            except Exception:  # never let the writer die
                LOG.exception("dvr: writing to the northbound database failed")
                self.dirty = True
            finally:
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()

    def write(self, batch: list[tuple[str, list[Edit]]], whole: bool = False) -> str:
        """Write a batch now (in the calling thread): "written", "refused" (the rules
        refused some of it: logged) or "lost" (the database unreachable: `dirty`). With
        `whole`, ports too as one edit of the whole document (the path they had: the
        benchmark's baseline)."""
        if not whole:
            runs: list[list[tuple[str, list[Edit]]]] = []
            for entry in batch:  # the ports' entries apart from the others, in order
                if runs and ports_only(runs[-1]) == ports_only([entry]):
                    runs[-1].append(entry)
                else:
                    runs.append([entry])
            if len(runs) > 1:
                outcomes = []
                for run in runs:
                    outcomes.append(self.write(run))
                    if outcomes[-1] == "lost":  # the repair writes the rest
                        return "lost"
                return "refused" if "refused" in outcomes else "written"
            if ports_only(batch):
                return self._write_ports(batch)
        outcome = self._change(batch)
        if outcome == "refused" and len(batch) > 1:  # entry by entry
            for one in batch:
                self.write([one], whole)
        return outcome

    def _write_ports(self, batch: list[tuple[str, list[Edit]]]) -> str:
        """The ports' puts in order, in O(change): as many as follow each other with
        different ports (up to GROUP) in one transaction under one generation guard
        (`Northbound.apply_all()`); when one of them refuses (or is stale), or the
        database's indexes refuse them together, those one by one, each its own guarded
        transaction. One refused alone (logged, nothing of it written) before others: the
        rest of the batch, from it, goes as one edit of the whole document, as a batch did
        before, so that puts which only hold together (a floating IP moved from one port
        to another, the second put queued first) are written; refused too, the others in
        O(change) again."""
        conn = self._open(batch)
        if conn is None:
            return "lost"
        flat = [(i, j, what, put) for i, (what, edits) in enumerate(batch)
                for j, put in enumerate(edits) if isinstance(put, Put)]
        refused = False
        try:
            k = 0
            while k < len(flat):
                end, names = k, set()
                while end < len(flat) and end - k < GROUP:
                    if flat[end][3].name in names:
                        break
                    names.add(flat[end][3].name)
                    end += 1
                if end - k > 1:
                    outcome = self._put_all(conn, [(w, p) for _, _, w, p in flat[k:end]])
                    if outcome == "lost":
                        return outcome
                    if outcome == "written":
                        k = end
                        continue
                for m in range(k, end):  # one by one
                    i, j, what, put = flat[m]
                    outcome = self._put(conn, what, put)
                    if outcome == "lost":
                        return outcome
                    refused = refused or outcome == "refused"
                    if outcome == "refused" and m + 1 < len(flat):
                        break
                else:
                    k = end
                    continue
                break
            else:
                return "refused" if refused else "written"
        finally:
            conn.close()
        edits = batch[i][1]
        outcome = self._change([(what, edits[j:]), *batch[i + 1:]])
        after = [(w, e) for w, e in [(what, edits[j + 1:]), *batch[i + 1:]] if e]
        if outcome == "refused" and after:
            return "lost" if self._write_ports(after) == "lost" else "refused"
        return outcome

    def _put_all(self, conn: nb.Northbound, puts: list[tuple[str, Put]]) -> str:
        """Several ports' puts in one transaction: "written", "lost", or "split" (to be
        written one by one: one of them refused or was stale, or they collide)."""
        try:
            conn.apply_all([put.command() for _, put in puts])
            LOG.debug("dvr: %d ports written in one transaction (%s, ...)", len(puts),
                      puts[0][0])
            return "written"
        except (northbound.ChangeError, TopologyError, nb.NbRefused):
            return "split"
        except nb.NbError as exc:
            self.dirty = True
            LOG.warning("dvr: %s and %d more not written (%s); the repair will write them",
                        puts[0][0], len(puts) - 1, exc)
            return "lost"

    def _put(self, conn: nb.Northbound, what: str, put: Put) -> str:
        return self._outcome(f"{what} (vms.{put.name})", lambda: conn.apply(put.command()),
                             stale_is_written=True)

    def _outcome(self, what: str, write: Callable[[], Any],
                 stale_is_written: bool = False) -> str:
        """Run one write; what came of it ("written", "refused", "lost"), logged. A write
        that cannot reach the database marks the writer dirty (the repair writes it)."""
        try:
            write()
        except northbound.Stale as exc:
            if not stale_is_written:
                LOG.error("dvr: %s not written: %s", what, exc)
                return "refused"
            LOG.warning("dvr: stale update refused: %s", exc)
            return "written"  # nothing to write
        except TopologyError as exc:
            LOG.error("dvr: %s refused by the northbound rules, nothing written: %s",
                      what, exc)
            return "refused"
        except northbound.ChangeError as exc:
            LOG.error("dvr: %s not written: %s", what, exc)
            return "refused"
        except nb.NbError as exc:
            self.dirty = True
            LOG.warning("dvr: %s not written (%s); the repair will write it", what, exc)
            return "lost"
        LOG.debug("dvr: %s written", what)
        return "written"

    def _open(self, batch: list[tuple[str, list[Edit]]]) -> nb.Northbound | None:
        try:
            return self.connect()
        except nb.NbError as exc:
            self.dirty = True
            LOG.warning("dvr: %s not written, the northbound database is unreachable "
                        "(%s); the repair will write it on reconnection", _what(batch), exc)
            return None

    def _change(self, batch: list[tuple[str, list[Edit]]]) -> str:
        what = _what(batch)

        def edit(doc: dict[str, Any] | None) -> dict[str, Any]:
            if not doc:
                raise nb.ChangeError("the northbound database holds no nodes yet")
            for _, edits in batch:
                for e in edits:
                    e(doc)
            return doc

        conn = self._open(batch)
        if conn is None:
            return "lost"
        try:
            return self._outcome(what, lambda: conn.change(edit, effective=False))
        finally:
            conn.close()


def _what(batch: list[tuple[str, list[Edit]]]) -> str:
    return batch[0][0] if len(batch) == 1 else f"{len(batch)} changes ({batch[0][0]}, ...)"
