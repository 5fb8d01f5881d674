"""Where the agent reads the desired state from: one small interface, several backends."""

from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod
from typing import Any

from dvr.model import Topology, TopologyError, build_topology, load_topology


class Source(ABC):
    """The desired state of the cloud. `poll()` is cheap and says whether it changed."""

    @abstractmethod
    def poll(self) -> bool:
        """True when `load()` may now return something new."""

    @abstractmethod
    def load(self) -> Topology:
        """The current desired state; raises on an invalid one (the agent keeps the last)."""

    def wait(self, poller: Any) -> bool:
        """Arrange for `poller` (an `ovs.poller.Poller`) to wake when `poll()` may have news.
        False when the source cannot be waited for and must be polled on a timer."""
        return False


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


class NbSource(Source):
    """The northbound database, through the `ovs` IDL: the server pushes every change (a
    monitor); `poll()` only processes what has arrived. Reconnects by itself, keeping the
    last state meanwhile."""

    def __init__(self, remote: str):
        warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
        import ovs.db.idl

        from dvr import nb

        helper = ovs.db.idl.SchemaHelper(location=str(nb.SCHEMA))
        helper.register_all()
        self.idl = ovs.db.idl.Idl(remote, helper)
        # a database back after a restart or a failover is found within a second (the
        # default backoff grows to 8 s); the bindings offer no public call for this
        session = getattr(self.idl, "_session", None)
        if session is not None:
            session.reconnect.set_backoff(RECONNECT_MIN_MS, RECONNECT_MAX_MS)
        self._seen: str | None = None

    def _generation(self) -> str | None:
        rows = list(self.idl.tables["NB_Global"].rows.values())
        return rows[0].generation if rows else None

    def wait(self, poller: Any) -> bool:
        self.idl.wait(poller)
        return True

    def poll(self) -> bool:
        """True when the desired state has a new generation (agents' own reports, in the
        same database, do not count)."""
        self.idl.run()
        return self.idl.has_ever_connected() and self._generation() != self._seen

    def report(self, node: str, status: dict[str, Any]) -> None:
        """Write this agent's row of the Agent table (skipped while the previous report
        is still on its way)."""
        import ovs.db.idl

        if self.idl.txn is not None or not self.idl.has_ever_connected():
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
        txn.commit()

    def load(self) -> Topology:
        self._seen = self._generation()
        glob = list(self.idl.tables["NB_Global"].rows.values())
        if not glob:
            raise TopologyError("northbound", [("(database)", "holds no desired state yet")])
        topo = build_topology(document_of(self.idl), "northbound")
        return _with_digest(topo, glob[0].generation)

    def close(self) -> None:
        self.idl.close()


def _one(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else (value or None)


def document_of(idl: Any) -> dict[str, Any]:
    """The topology document the IDL's replica of the northbound database holds."""
    t = idl.tables
    doc: dict[str, Any] = {"nodes": {}}
    for n in sorted(t["Node"].rows.values(), key=lambda r: r.position):
        spec: dict[str, Any] = {"role": n.role}
        if _one(n.tunnel_ip):
            spec["tunnel_ip"] = _one(n.tunnel_ip)
        doc["nodes"][n.name] = spec
    for e in t["External"].rows.values():
        doc["external"] = {"cidr": e.cidr, "gateway_ip": e.gateway_ip,
                           "remote_ip": e.remote_ip}
        if _one(e.gateway_mac):
            doc["external"]["gateway_mac"] = _one(e.gateway_mac)
    doc["networks"] = {
        n.name: {"cidr": n.cidr, "gateway_ip": n.gateway_ip, "mtu": n.mtu, "vni": n.vni}
        for n in sorted(t["Network"].rows.values(), key=lambda r: r.position)}
    doc["routers"] = {}
    for r in sorted(t["Router"].rows.values(), key=lambda r: r.position):
        spec = {"interfaces": [r.interfaces[k].name for k in sorted(r.interfaces)]}
        if r.external_gateway:
            spec["external_gateway"] = True
            spec["external_ip"] = _one(r.external_ip)
            spec["snat_nodes"] = [r.snat_nodes[k].name for k in sorted(r.snat_nodes)]
        doc["routers"][r.name] = spec
    doc["vms"] = {}
    for p in sorted(t["Port"].rows.values(), key=lambda r: r.name):
        spec = {"node": p.node.name, "network": p.network.name, "ip": p.ip, "mac": p.mac}
        if _one(p.floating_ip):
            spec["floating_ip"] = _one(p.floating_ip)
        doc["vms"][p.name] = spec
    return doc


def _with_digest(topo: Topology, digest: str) -> Topology:
    import dataclasses

    return dataclasses.replace(topo, digest=digest)
