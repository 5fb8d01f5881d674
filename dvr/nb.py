"""The northbound database: the cloud's desired state in an `ovsdb-server` (schema
`dvr/nb.ovsschema`), written and read over OVSDB's JSON-RPC (`dvr/jsonrpc.py`).

The database holds the *effective* topology: every value the model allocates (VNIs, MACs,
IPs, external IPs) is written out, so what is read back is the same cloud whatever the order
of its rows. `load` validates first and replaces the whole desired state in one transaction
(a refused topology writes nothing); `dump` reads it back as a topology document.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from dvr import jsonrpc
from dvr.model import Topology, build_topology, to_dict

DB = "DVR_Northbound"
SCHEMA = Path(__file__).with_name("nb.ovsschema")


class NbError(Exception):
    """The database could not be reached or refused a transaction."""


MAX_FAILOVERS = 5  # connections lost in one change before giving up


class NbLost(NbError):
    """The connection, or the leader, was lost: a transaction's outcome is unknown."""


def split_remotes(target: str) -> list[str]:
    """`unix:A,tcp:H:P,...` as a list (a comma inside a remote's options is kept)."""
    out: list[str] = []
    for part in target.split(","):
        part = part.strip()
        if out and ":" not in part:
            out[-1] += "," + part
        elif part:
            out.append(part)
    return out


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


def _lost_leader(error: str) -> bool:
    return any(w in error.lower() for w in ("not leader", "leadership", "cluster",
                                            "connection", "closed"))


# the tables of the desired state, in the order `document()` reads them
DESIRED_TABLES = ("NB_Global", "Node", "External", "Network", "Router", "Port")


def dump_ops() -> list[dict[str, Any]]:
    return [{"op": "select", "table": t, "where": []} for t in DESIRED_TABLES]


def _one(value: Any) -> Any:
    """An optional column's value, or None."""
    if isinstance(value, list) and value and value[0] == "set":
        return value[1][0] if value[1] else None
    return value


def _pairs(value: Any) -> list[tuple[int, str]]:
    """A map column of position -> ["uuid", U], in position order."""
    items = value[1] if isinstance(value, list) and value and value[0] == "map" else []
    return sorted((int(k), v[1]) for k, v in items)


def document(results: list[dict[str, Any]]) -> dict[str, Any]:
    """A topology document from rows in OVSDB's JSON form, one result per table of
    DESIRED_TABLES (what `dump_ops()` selects; an agent's IDL copy in the same form)."""
    _, nodes, ext, nets, routers, ports = (r.get("rows", []) for r in results)
    node_name = {n["_uuid"][1]: n["name"] for n in nodes}
    net_name = {n["_uuid"][1]: n["name"] for n in nets}
    data: dict[str, Any] = {"nodes": {}}
    for n in sorted(nodes, key=lambda r: r["position"]):
        spec: dict[str, Any] = {"role": n["role"]}
        if _one(n["tunnel_ip"]):
            spec["tunnel_ip"] = _one(n["tunnel_ip"])
        data["nodes"][n["name"]] = spec
    if ext:
        e = ext[0]
        data["external"] = {"cidr": e["cidr"], "gateway_ip": e["gateway_ip"],
                            "remote_ip": e["remote_ip"]}
        if _one(e["gateway_mac"]):
            data["external"]["gateway_mac"] = _one(e["gateway_mac"])
    data["networks"] = {
        n["name"]: {"cidr": n["cidr"], "gateway_ip": n["gateway_ip"], "mtu": n["mtu"],
                    "vni": n["vni"]}
        for n in sorted(nets, key=lambda r: r["position"])}
    data["routers"] = {}
    for r in sorted(routers, key=lambda r: r["position"]):
        spec = {"interfaces": [net_name[u] for _, u in _pairs(r["interfaces"])]}
        if r["external_gateway"]:
            spec["external_gateway"] = True
            spec["external_ip"] = _one(r["external_ip"])
            spec["snat_nodes"] = [node_name[u] for _, u in _pairs(r["snat_nodes"])]
        data["routers"][r["name"]] = spec
    data["vms"] = {}
    for p in sorted(ports, key=lambda r: r["name"]):
        spec = {"node": node_name[p["node"][1]], "network": net_name[p["network"][1]],
                "ip": p["ip"], "mac": p["mac"]}
        if _one(p["floating_ip"]):
            spec["floating_ip"] = _one(p["floating_ip"])
        data["vms"][p["name"]] = spec
    return data


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
            if _lost_leader(str(error)):
                raise NbLost(f"{self.remote}: {error}")
            raise NbError(f"{self.remote}: {error}")
        for op, res in zip(ops, results, strict=False):
            if isinstance(res, dict) and res.get("error"):
                raise NbError(f"{op['op']} {op.get('table', '')}: {res['error']}: "
                              f"{res.get('details', '')}".rstrip(": "))
        if len(results) > len(ops) and results[-1] and results[-1].get("error"):
            err = f"{results[-1]['error']}: {results[-1].get('details', '')}"
            if _lost_leader(err):
                raise NbLost(f"{self.remote}: {err}")
            raise NbError(f"transaction refused: {err}")
        return results

    def _reconnect(self) -> None:
        self.close()
        self.conn = None
        self._connect()

    def load(self, topo: Topology) -> str:
        """Replace the desired state with `topo`, changing only the rows that differ, in
        one transaction. Returns the new generation."""
        doc = to_dict(topo)
        return self.change(lambda _: doc, validate=False)  # a Topology is valid already

    def change(self, edit: Any, retries: int = 5, validate: bool = True) -> str:
        """Read the desired state, `edit` its document, validate the result (a
        TopologyError writes nothing), write the difference in one transaction guarded by
        the generation read; a concurrent change makes it start over.

        A transaction whose answer is lost (the leader died) may or may not have been
        committed: the state is read again from the new leader, and the change counts as
        done when it shows the generation that transaction was writing; it is never
        written twice."""
        expected: str | None = None  # what a transaction sent but unconfirmed would make
        conflicts = failovers = 0
        while True:
            try:
                results = self.transact(dump_ops())
                uuids, generation = _uuids(results)
                if expected is not None and generation == expected:
                    return expected
                old = document(results) if generation is not None else None
                new = edit(json.loads(json.dumps(old)))  # a copy (plain JSON data)
                if validate:
                    new = to_dict(build_topology(new, "<change>"))
                if old is not None and new == old:
                    return generation or ""
                expected = generation_of(new)
                self.transact(diff_ops(old, new, uuids, generation))
                return expected
            except NbLost:
                failovers += 1
                if failovers > MAX_FAILOVERS:
                    raise
                self._reconnect()  # the leader, or an NbError when none comes
            except NbError as exc:
                if "timed out" not in str(exc) and "wait" not in str(exc):
                    raise
                conflicts += 1  # somebody else changed it meanwhile: read again
                if conflicts >= retries:
                    raise NbError("the desired state kept changing under this change; "
                                  "try again") from None

    def dump(self) -> dict[str, Any]:
        return document(self.transact(dump_ops()))

    def topology(self, source: str = "<northbound>") -> Topology:
        return build_topology(self.dump(), source)


def summary(data: dict[str, Any]) -> str:
    """`dvr nb show`: the desired state, object by object."""
    out = []
    for name, n in data["nodes"].items():
        tunnel = f" tunnel {n['tunnel_ip']}" if "tunnel_ip" in n else ""
        out.append(f"node {name} ({n['role']}){tunnel}")
    if "external" in data:
        e = data["external"]
        out.append(f"external {e['cidr']} gateway {e['gateway_ip']} remote {e['remote_ip']}")
    for name, n in data["networks"].items():
        out.append(f"network {name} {n['cidr']} vni {n['vni']} mtu {n['mtu']}")
    for name, r in data["routers"].items():
        ext = (f" external {r['external_ip']} snat {','.join(r['snat_nodes'])}"
               if r.get("external_gateway") else "")
        out.append(f"router {name}: {', '.join(r['interfaces'])}{ext}")
    for name, v in data["vms"].items():
        fip = f" floating {v['floating_ip']}" if "floating_ip" in v else ""
        out.append(f"vm {name} on {v['node']}: {v['network']} {v['ip']} {v['mac']}{fip}")
    return "\n".join(out)


# --- incremental changes --------------------------------------------------------------------
def generation_of(doc: dict[str, Any]) -> str:
    """The generation of a desired state: a hash of its document (what agents report)."""
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _logical(doc: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Rows by table and key, references as (table, key) pairs."""
    rows: dict[str, dict[str, dict[str, Any]]] = {t: {} for t in
                                                  ("Node", "External", "Network", "Router",
                                                   "Port")}
    for i, (name, spec) in enumerate(doc["nodes"].items()):
        rows["Node"][name] = {"name": name, "role": spec["role"], "position": i,
                              "tunnel_ip": spec.get("tunnel_ip")}
    if "external" in doc:
        e = doc["external"]
        rows["External"]["external"] = {"cidr": e["cidr"], "gateway_ip": e["gateway_ip"],
                                        "remote_ip": e["remote_ip"],
                                        "gateway_mac": e.get("gateway_mac")}
    for i, (name, spec) in enumerate(doc["networks"].items()):
        rows["Network"][name] = {"name": name, "position": i, "cidr": spec["cidr"],
                                 "gateway_ip": spec["gateway_ip"], "mtu": spec["mtu"],
                                 "vni": spec["vni"]}
    for i, (name, spec) in enumerate(doc["routers"].items()):
        rows["Router"][name] = {
            "name": name, "position": i,
            "interfaces": tuple(("Network", n) for n in spec["interfaces"]),
            "external_gateway": bool(spec.get("external_gateway", False)),
            "external_ip": spec.get("external_ip"),
            "snat_nodes": tuple(("Node", n) for n in spec.get("snat_nodes", []))}
    for name, spec in doc["vms"].items():
        rows["Port"][name] = {"name": name, "node": ("Node", spec["node"]),
                              "network": ("Network", spec["network"]), "ip": spec["ip"],
                              "mac": spec["mac"], "floating_ip": spec.get("floating_ip")}
    return rows


def diff_ops(old: dict[str, Any] | None, new: dict[str, Any],
             uuids: dict[tuple[str, str], str], old_generation: str | None
             ) -> list[dict[str, Any]]:
    """The operations that turn the database from `old` into `new`, row by row, guarded
    by a wait on the generation read with `old` (a concurrent change makes it fail)."""
    before = _logical(old) if old else {t: {} for t in _logical(new)}
    after = _logical(new)
    ops: list[dict[str, Any]] = [{
        "op": "wait", "table": "NB_Global", "where": [], "columns": ["generation"],
        "until": "==", "timeout": 0,
        "rows": [{"generation": old_generation}] if old_generation is not None else []}]
    named: dict[tuple[str, str], str] = {}

    def ref(target: tuple[str, str]) -> list[str]:
        if target in named:
            return ["named-uuid", named[target]]
        return ["uuid", uuids[target]]

    def encode(value: Any) -> Any:
        if value is None:
            return ["set", []]
        if isinstance(value, tuple) and value and isinstance(value[0], tuple):
            return ["map", [[i, ref(t)] for i, t in enumerate(value)]]
        if isinstance(value, tuple) and len(value) == 2 and value[0] in after:
            return ref(value)
        if isinstance(value, tuple):  # an empty list of references
            return ["map", []]
        return value

    for table in after:
        for key in after[table]:
            if key not in before[table]:
                named[(table, key)] = f"{table.lower()}{len(named)}"
    for table in ("Port", "Router", "Network", "Node", "External"):
        for key in before[table]:
            if key not in after[table]:
                ops.append({"op": "delete", "table": table,
                            "where": [["_uuid", "==", ["uuid", uuids[(table, key)]]]]})
    for table in ("Node", "External", "Network", "Router", "Port"):
        for key, row in after[table].items():
            if key not in before[table]:
                ops.append({"op": "insert", "table": table, "uuid-name": named[(table, key)],
                            "row": {c: encode(v) for c, v in row.items()}})
            elif row != before[table][key]:
                changed = {c: encode(v) for c, v in row.items() if before[table][key].get(c) != v}
                ops.append({"op": "update", "table": table,
                            "where": [["_uuid", "==", ["uuid", uuids[(table, key)]]]],
                            "row": changed})
    generation = generation_of(new)
    if old_generation is None:
        ops.append({"op": "insert", "table": "NB_Global",
                    "row": {"generation": generation, "changes": 1}})
    else:
        ops.append({"op": "update", "table": "NB_Global", "where": [],
                    "row": {"generation": generation}})
        ops.append({"op": "mutate", "table": "NB_Global", "where": [],
                    "mutations": [["changes", "+=", 1]]})
    return ops


def _uuids(results: list[dict[str, Any]]) -> tuple[dict[tuple[str, str], str], str | None]:
    glob, nodes, ext, nets, routers, ports = (r.get("rows", []) for r in results)
    out: dict[tuple[str, str], str] = {}
    for table, rows in (("Node", nodes), ("Network", nets), ("Router", routers),
                        ("Port", ports)):
        for r in rows:
            out[(table, r["name"])] = r["_uuid"][1]
    for r in ext:
        out[("External", "external")] = r["_uuid"][1]
    return out, (glob[0]["generation"] if glob else None)


# --- the daily changes, as edits of the document ----------------------------------------------
class ChangeError(ValueError):
    """A change that names something that does not exist."""


def _need(doc: dict[str, Any] | None, section: str, name: str) -> dict[str, Any]:
    if not doc or name not in doc.get(section, {}):
        raise ChangeError(f"{section}.{name}: no such {section[:-1] if section != 'vms' else 'vm'}")
    return doc[section][name]


def vm_add(name: str, node: str, network: str, ip: str | None = None,
           mac: str | None = None, floating_ip: str | None = None) -> Any:
    def edit(doc: dict[str, Any] | None) -> dict[str, Any]:
        if not doc:
            raise ChangeError("the database holds no desired state: load one first")
        if name in doc["vms"]:
            raise ChangeError(f"vms.{name}: already exists")
        spec: dict[str, Any] = {"node": node, "network": network}
        for key, value in (("ip", ip), ("mac", mac), ("floating_ip", floating_ip)):
            if value is not None:
                spec[key] = value
        doc["vms"][name] = spec
        return doc
    return edit


def vm_del(name: str) -> Any:
    def edit(doc: dict[str, Any] | None) -> dict[str, Any]:
        _need(doc, "vms", name)
        del doc["vms"][name]  # type: ignore[index]
        return doc  # type: ignore[return-value]
    return edit


def fip_set(vm: str, fip: str) -> Any:
    """Associate `fip` with `vm`, moving it from the VM that holds it, if any."""
    def edit(doc: dict[str, Any] | None) -> dict[str, Any]:
        spec = _need(doc, "vms", vm)
        for other in doc["vms"].values():  # type: ignore[index]
            if other.get("floating_ip") == fip:
                del other["floating_ip"]
        spec["floating_ip"] = fip
        return doc  # type: ignore[return-value]
    return edit


def fip_del(vm: str) -> Any:
    def edit(doc: dict[str, Any] | None) -> dict[str, Any]:
        spec = _need(doc, "vms", vm)
        if "floating_ip" not in spec:
            raise ChangeError(f"vms.{vm}: has no floating IP")
        del spec["floating_ip"]
        return doc  # type: ignore[return-value]
    return edit


def router_if(router: str, network: str, add: bool) -> Any:
    def edit(doc: dict[str, Any] | None) -> dict[str, Any]:
        spec = _need(doc, "routers", router)
        itfs = spec["interfaces"]
        if add:
            if network in itfs:
                raise ChangeError(f"routers.{router}.interfaces: {network} is already on it")
            itfs.append(network)
        else:
            if network not in itfs:
                raise ChangeError(f"routers.{router}.interfaces: {network} is not on it")
            itfs.remove(network)
        return doc  # type: ignore[return-value]
    return edit
