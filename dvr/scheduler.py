"""`dvr scheduler`: keeps the routers' HA chains in the northbound database (`Router.snat_chain`)
as the network nodes live and die (the decisions: `flows.ha.schedule`).

One runs per network node (or beside each database member); exactly one acts at a time: the
one holding the database's lock `dvr_scheduler` (OVSDB `lock`; the server gives it to
another when its holder's session dies). It watches the Node, Router and Agent tables (not
the ports) through the `ovs` IDL; an agent is alive while its row keeps changing (its
heartbeat, by this host's clock) and dead past `agent_down_time` without a change. It writes
only `Router.snat_chain`, never the operator's desired state.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import time
import warnings
from typing import Any

from flows import ha, northbound
from flows.model import Topology, TopologyError, build_topology

LOG = logging.getLogger(__name__)
LOCK = "dvr_scheduler"
TABLES = ("NB_Global", "Node", "External", "Network", "Router", "Agent")
EMPTY_PORTS = {"rows": []}


class Scheduler:
    def __init__(self, remote: str, agent_down_time: float = 5.0,
                 status_file: str | None = None):
        warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
        import ovs.db.idl

        helper = ovs.db.idl.SchemaHelper(location=str(northbound.SCHEMA))
        for table in TABLES:
            helper.register_table(table)
        self.idl = ovs.db.idl.Idl(remote, helper, leader_only=True)
        self.idl.set_lock(LOCK)
        session = getattr(self.idl, "_session", None)
        if session is not None:
            session.reconnect.set_backoff(100, 1000)
        self.down_time = agent_down_time
        self.status_file = status_file
        self.seen: dict[str, tuple[Any, float]] = {}  # node -> (heartbeat, when it changed)
        self.started = time.monotonic()
        self.running = True
        self.txn: Any = None
        self.written_at = -1  # the IDL's change seqno when the last chains were committed
        self.decisions = 0
        self.had_lock = False
        self._stop_r, self._stop_w = os.pipe()

    def stop(self, *_: Any) -> None:
        self.running = False
        os.write(self._stop_w, b"!")

    # --- what the database says -----------------------------------------------------------
    def _topology(self) -> Topology | None:
        import ovs.db.idl  # noqa: F401  (the IDL's rows as JSON: as the agents read them)
        from ovs.db.data import Datum

        def rows(table: str) -> dict[str, Any]:
            t = self.idl.tables[table]
            out = []
            for r in t.rows.values():
                row: dict[str, Any] = {"_uuid": ["uuid", str(r.uuid)]}
                for name, column in t.columns.items():
                    datum = r._data.get(name) or Datum.default(column.type)
                    row[name] = datum.to_json()
                out.append(row)
            return {"rows": out}

        results = [rows(t) for t in northbound.DESIRED_TABLES[:-1]] + [EMPTY_PORTS]
        if not results[0]["rows"]:
            return None
        try:
            return build_topology(northbound.document(results), "northbound")
        except TopologyError as exc:
            LOG.warning("the desired state does not validate: %s", exc)
            return None

    def _liveness(self, now: float) -> ha.Liveness:
        alive, dead, claims, bfd = set(), set(), {}, {}
        for row in self.idl.tables["Agent"].rows.values():
            beat = row.heartbeat
            last = self.seen.get(row.node)
            if last is None or last[0] != beat:
                self.seen[row.node] = (beat, now)
            changed = self.seen[row.node][1]
            # a row first seen at start has an unknown age: give it one down time
            if now - changed <= self.down_time:
                alive.add(row.node)
                claims[row.node] = frozenset(row.snat)
                bfd[row.node] = dict(row.bfd)
            elif now - max(changed, self.started) > self.down_time:
                dead.add(row.node)
        return ha.Liveness(frozenset(alive), frozenset(dead), claims, bfd)

    def _chains(self) -> dict[str, tuple[str, ...]]:
        names = {str(r.uuid): r.name for r in self.idl.tables["Node"].rows.values()}
        out = {}
        for r in self.idl.tables["Router"].rows.values():
            chain = [names.get(str(u.uuid)) for _, u in sorted(r.snat_chain.items())]
            if chain and all(chain):
                out[r.name] = tuple(chain)  # type: ignore[arg-type]
        return out

    # --- acting ---------------------------------------------------------------------------
    def step(self) -> None:
        """One look at the database; with the lock, write the chains that should change."""
        import ovs.db.idl

        self.idl.run()
        if bool(self.idl.has_lock) != self.had_lock:
            self.had_lock = bool(self.idl.has_lock)
            LOG.info("%s the lock %s: %s", "holding" if self.had_lock else "lost", LOCK,
                     "acting" if self.had_lock else "standing by")
        now = time.monotonic()
        live = self._liveness(now)
        if self.txn is not None:
            status = self.txn.commit()
            if status == ovs.db.idl.Transaction.INCOMPLETE:
                return
            if status in (ovs.db.idl.Transaction.SUCCESS, ovs.db.idl.Transaction.UNCHANGED):
                self.written_at = self.idl.change_seqno
            else:
                LOG.warning("chains not written: %s (%s)", status,
                            self.txn.get_error() or "no detail")
            self.txn = None
        if self.idl.change_seqno == self.written_at:
            return  # until the copy shows what was written
        if not self.idl.has_lock or self.idl.txn is not None:
            return
        topo = self._topology()
        if topo is None:
            return
        have = self._chains()
        want = ha.schedule(topo, have, live)
        changes = {r: c for r, c in want.items()
                   if c != have.get(r, topo.routers[r].snat_nodes) or r not in have}
        if not changes:
            return
        nodes = {r.name: r for r in self.idl.tables["Node"].rows.values()}
        txn = ovs.db.idl.Transaction(self.idl)
        for router in self.idl.tables["Router"].rows.values():
            if router.name in changes:
                chain = changes[router.name]
                router.snat_chain = {i: nodes[n] for i, n in enumerate(chain) if n in nodes}
                LOG.info("router %s: HA chain %s", router.name, ", ".join(chain))
        self.decisions += 1
        self.txn = txn
        txn.commit()

    def report(self) -> None:
        if not self.status_file:
            return
        tmp = f"{self.status_file}.tmp"
        with open(tmp, "w") as f:
            json.dump({"pid": os.getpid(), "has_lock": bool(self.idl.has_lock),
                       "decisions": self.decisions, "time": time.time()}, f)
        os.replace(tmp, self.status_file)

    def run(self) -> int:
        import ovs.poller

        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        last_report = 0.0
        while self.running:
            self.step()
            now = time.monotonic()
            if now - last_report >= 0.5:
                self.report()
                last_report = now
            poller = ovs.poller.Poller()
            self.idl.wait(poller)
            poller.fd_wait(self._stop_r, select.POLLIN)
            poller.timer_wait(200)  # liveness moves with the clock, not only with the rows
            poller.block()
        self.idl.close()
        return 0
