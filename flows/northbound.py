"""The northbound database's pure half: its schema, and the desired state as rows.

The database (schema `nb.ovsschema` beside this file, an `ovsdb-server` serves it) holds the
*effective* topology: every value the model allocates (VNIs, MACs, IPs, external IPs) is
written out, so what is read back is the same cloud whatever the order of its rows. Here:
the rows of a dump (or of an agent's IDL copy, in the same JSON form) as a topology document
(`document()`); a document as the OVSDB operations that turn the database into it, row by
row, guarded by the generation read (`diff_ops()`); the generation of a document; the
daily changes (`vm_add()`, `fip_set()`, ...) as edits of the document (the whole-document
path, and the reference of the next); and the same changes in O(change)
(`vm_add_change()`, ..., and `vm_put_change()`, a port's entry put whole as a mirror of
another system's ports writes it): commands that read only the rows they concern and return
the operations of the rows they change (see "the daily changes in O(change)" below). No I/O:
`dvr/nb.py` is the client that sends these operations.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import uuid
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.model import (
    MAC_RE,
    NAME_RE,
    UUID_RE,
    TopologyError,
    _Checker,
    default_port_id,
    infrastructure_macs,
    infrastructure_macs_of,
    vm_ip,
    vm_mac,
)

DB = "DVR_Northbound"
SCHEMA = Path(__file__).with_name("nb.ovsschema")


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


# the tables of the desired state, in the order `document()` reads them
DESIRED_TABLES = ("NB_Global", "Node", "External", "Network", "Router", "Port")
# the servers' own remotes (NB_Global.connections) and the roles of their clients (RBAC):
# written by operators' tools only, read by the servers
ACCESS_TABLES = ("Connection", "RBAC_Role", "RBAC_Permission")


def dump_ops() -> list[dict[str, Any]]:
    return [{"op": "select", "table": t, "where": []} for t in DESIRED_TABLES]


def members(value: Any) -> list[Any]:
    """A set column's members in OVSDB's JSON form (a lone member comes as itself)."""
    if isinstance(value, list) and value and value[0] == "set":
        return list(value[1])
    return [value]


def _one(value: Any) -> Any:
    """An optional column's value, or None."""
    if isinstance(value, list) and value and value[0] == "set":
        return value[1][0] if value[1] else None
    return value


def _ids(value: Any) -> dict[str, Any]:
    """A row's external_ids as the document's optional key."""
    items = value[1] if isinstance(value, list) and value and value[0] == "map" else []
    return {"external_ids": dict(items)} if items else {}


class _Tags(tuple):
    """A string-to-string map column's pairs (external_ids), told apart from references."""


class _Strings(tuple):
    """A set-of-strings column's members (a router's or node's MACs)."""


def _ids_map(ids: dict[str, str] | None) -> _Tags:
    return _Tags(sorted((str(k), str(v)) for k, v in (ids or {}).items()))


def _pairs(value: Any) -> list[tuple[int, str]]:
    """A map column of position -> ["uuid", U], in position order."""
    items = value[1] if isinstance(value, list) and value and value[0] == "map" else []
    return sorted((int(k), v[1]) for k, v in items)


def document(results: list[dict[str, Any]], live: bool = False) -> dict[str, Any]:
    """A topology document from rows in OVSDB's JSON form, one result per table of
    DESIRED_TABLES (what `dump_ops()` selects; an agent's IDL copy in the same form).

    A router's `snat_nodes` are what the operator gave; with `live`, its HA chain as the
    scheduler keeps it (`Router.snat_chain`: the node serving it first, dead nodes
    replaced), when it has one: what the agents plan by."""
    _, nodes, ext, nets, routers, ports = (r.get("rows", []) for r in results[:6])
    node_name = {n["_uuid"][1]: n["name"] for n in nodes}
    network_nodes = {n["_uuid"][1] for n in nodes if n["role"] == "network"}
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
                    "vni": n["vni"], **_ids(n.get("external_ids"))}
        for n in sorted(nets, key=lambda r: r["position"])}
    data["routers"] = {}
    for r in sorted(routers, key=lambda r: r["position"]):
        spec = {"interfaces": [net_name[u] for _, u in _pairs(r["interfaces"])]}
        if r["external_gateway"]:
            spec["external_gateway"] = True
            spec["external_ip"] = _one(r["external_ip"])
            spec["snat_nodes"] = [node_name[u] for _, u in _pairs(r["snat_nodes"])]
            # the scheduler's role may write the chain: only network nodes count in it
            chain = [node_name[u] for _, u in _pairs(r.get("snat_chain"))
                     if u in node_name and u in network_nodes]
            if live and chain:
                spec["snat_nodes"] = chain
        spec.update(_ids(r.get("external_ids")))
        data["routers"][r["name"]] = spec
    data["vms"] = {p["name"]: _port_spec(p, node_name, net_name)
                   for p in sorted(ports, key=lambda r: r["name"])}
    return data


def _port_spec(p: dict[str, Any], node_name: dict[str, str], net_name: dict[str, str]
               ) -> dict[str, Any]:
    """A Port row as the document's entry (its node and network named by the maps)."""
    spec = {"node": node_name[p["node"][1]], "network": net_name[p["network"][1]],
            "ip": p["ip"], "mac": p["mac"]}
    if _one(p["floating_ip"]):
        spec["floating_ip"] = _one(p["floating_ip"])
    port_id = _one(p.get("port_id"))
    if port_id and port_id != default_port_id(p["name"]):  # the default left out
        spec["port_id"] = port_id
    spec.update(_ids(p.get("external_ids")))
    return spec


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
    router_of: dict[str, str] = {}  # a network's router: the first that lists it
    for rname, spec in doc["routers"].items():
        for net in spec["interfaces"]:
            router_of.setdefault(net, rname)
    router_macs, node_macs = infrastructure_macs_of(
        doc["routers"], router_of, list(doc["nodes"]), "external" in doc)
    for i, (name, spec) in enumerate(doc["nodes"].items()):
        rows["Node"][name] = {"name": name, "role": spec["role"], "position": i,
                              "tunnel_ip": spec.get("tunnel_ip"),
                              "macs": _Strings(node_macs[name])}
    if "external" in doc:
        e = doc["external"]
        rows["External"]["external"] = {"cidr": e["cidr"], "gateway_ip": e["gateway_ip"],
                                        "remote_ip": e["remote_ip"],
                                        "gateway_mac": e.get("gateway_mac")}
    for i, (name, spec) in enumerate(doc["networks"].items()):
        rows["Network"][name] = {"name": name, "position": i, "cidr": spec["cidr"],
                                 "gateway_ip": spec["gateway_ip"], "mtu": spec["mtu"],
                                 "vni": spec["vni"],
                                 "router": ("Router", router_of[name]) if name in router_of
                                 else None,
                                 "external_ids": _ids_map(spec.get("external_ids"))}
    for i, (name, spec) in enumerate(doc["routers"].items()):
        rows["Router"][name] = {
            "name": name, "position": i,
            "interfaces": tuple(("Network", n) for n in spec["interfaces"]),
            "external_gateway": bool(spec.get("external_gateway", False)),
            "external_ip": spec.get("external_ip"),
            "snat_nodes": tuple(("Node", n) for n in spec.get("snat_nodes", [])),
            "macs": _Strings(router_macs[name]),
            "external_ids": _ids_map(spec.get("external_ids"))}
    for name, spec in doc["vms"].items():
        rows["Port"][name] = {"name": name, "node": ("Node", spec["node"]),
                              "network": ("Network", spec["network"]), "ip": spec["ip"],
                              "mac": spec["mac"], "floating_ip": spec.get("floating_ip"),
                              "fip_key": fip_key(name, spec.get("floating_ip")),
                              "port_id": spec.get("port_id") or default_port_id(name),
                              "external_ids": _ids_map(spec.get("external_ids"))}
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
        if isinstance(value, _Tags):
            return ["map", [list(p) for p in value]]
        if isinstance(value, _Strings):
            return ["set", list(value)]
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
                            "row": {c: encode(v) for c, v in row.items()},
                            **({"uuid": port_uuid(key)} if table == "Port" else {})})
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


def uuids_of(results: list[dict[str, Any]]) -> tuple[dict[tuple[str, str], str], str | None]:
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


# --- the daily changes in O(change) -----------------------------------------------------------
# A command reads only the rows it concerns and writes only those it changes: a generator
# that yields the operations of a read (selects, in one transaction: a consistent snapshot),
# receives their results, and returns a `Write` (None: nothing to change). `dvr/nb.py`
# drives it: the first read begins with NB_Global (the generation the write is guarded by),
# and the write sets a fresh generation in the same transaction.
#
# What the whole-document path (`build_topology()` of the edited document) checks is checked
# here by the rules of the objects touched; uniqueness across the cloud by the database
# itself, at commit: the schema's indexes on Port (name, port_id, (network, ip), mac, and
# fip_key: a port's floating IP, or its own name when it has none, since an index over the
# optional floating_ip would make every port without one collide). A Port row's UUID is
# derived from its name (`port_uuid()`, OVSDB's "uuid" of an insert), so that a command
# finds a port by name in O(1) (ovsdb-server looks rows up by UUID; any other condition is
# a scan). A change refused at commit is read again to name the rows it collides with, in
# the order and words of `build_topology()`.

PORT_ROW_NS = uuid.UUID("b7e1c7d2-5a0e-4f4b-9d4c-64767220706f")
SOURCE = "<change>"  # the source a refused change's TopologyError names
GLOBAL_SELECT = {"op": "select", "table": "NB_Global", "where": [],
                 "columns": ["generation"]}
Reads = list[dict[str, Any]]
Results = list[dict[str, Any]]


def port_uuid(name: str) -> str:
    """The UUID of the Port row of VM `name`."""
    return str(uuid.uuid5(PORT_ROW_NS, name))


def fip_key(name: str, floating_ip: str | None) -> str:
    """Port.fip_key: the port's floating IP, or a value of its own when it has none."""
    return floating_ip if floating_ip else f"-{name}"


def fresh_generation() -> str:
    """The generation of a change written in O(change): new each time (64 random bits)."""
    return uuid.uuid4().hex[:16]


@dataclass
class Refusal:
    """A write the database refused at commit (an index would hold a value twice)."""
    error: str
    details: str

    def index(self) -> tuple[str, ...]:
        """The columns of the index the write would break (empty: not an index)."""
        m = re.search(r'for index on columns? (.*?)\.\s', self.details + " ")
        return tuple(re.findall(r'"([^"]+)"', m.group(1))) if m else ()

    def rows(self) -> list[str]:
        """The UUIDs of the rows that collide."""
        return re.findall(r"UUID ([0-9a-f]{8}-[0-9a-f-]{27})", self.details)


@dataclass
class Write:
    """The operations of a change (without the guard and the generation: the driver adds
    them) and what to do when the database refuses them at commit: `refused(refusal,
    hints)`, a command of its own that reads and then raises (the change is refused) or
    returns another write to try at the same generation, or None (the hints updated: start
    over with them)."""
    ops: list[dict[str, Any]]
    refused: Callable[[Refusal, dict[str, Any]],
                      Generator[Reads, Results, Write | None]] | None = None


Command = Generator[Reads, Results, Write | None]


def _select(table: str, where: list[Any], columns: list[str] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"op": "select", "table": table, "where": where}
    if columns is not None:
        op["columns"] = columns
    return op


def _by_uuid(table: str, u: str, columns: list[str] | None = None) -> dict[str, Any]:
    return _select(table, [["_uuid", "==", ["uuid", u]]], columns)


def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return result.get("rows", [])


def _uuid_of(value: Any) -> str | None:
    value = _one(value)
    return value[1] if isinstance(value, list) and len(value) == 2 else None


def _update(table: str, u: str, row: dict[str, Any]) -> dict[str, Any]:
    return {"op": "update", "table": table, "where": [["_uuid", "==", ["uuid", u]]],
            "row": row}


class _Errors(_Checker):
    """Rule violations in the order `build_topology()` finds them, with its checks."""

    def __init__(self) -> None:
        super().__init__(SOURCE)

    def raise_if_any(self) -> None:
        if self.errors:
            raise TopologyError(SOURCE, self.errors)


def _external(rows: list[dict[str, Any]]) -> tuple[ipaddress.IPv4Network,
                                                   ipaddress.IPv4Address] | None:
    if not rows:
        return None
    return ipaddress.IPv4Network(rows[0]["cidr"]), ipaddress.IPv4Address(rows[0]["gateway_ip"])


def _fip_phase(e: _Errors, vm: str, value: str, external: Any) -> ipaddress.IPv4Address | None:
    """`build_topology()`'s first pass over a VM's floating IP (before any owner check)."""
    key = f"vms.{vm}.floating_ip"
    fip = e.ip(value, key)
    if fip is None:
        return None
    if external is None:
        e.err(key, "a floating IP needs an `external:` network")
        return None
    cidr, gateway = external
    if not e.host_in(fip, cidr, key, "external.cidr"):
        return None
    if fip == gateway:
        e.err(key, f"{fip} is the external gateway_ip")
        return None
    return fip


def _fip_router_phase(e: _Errors, vm: str, net: str, router: dict[str, Any] | None) -> None:
    if router is None:
        e.err(f"vms.{vm}.floating_ip", f"network {net} is on no router")
    elif router["external_gateway"] is not True:
        e.err(f"vms.{vm}.floating_ip",
              f"router {router['name']} of network {net} has no external_gateway")


def _port(name: str, columns: list[str], first: Reads
          ) -> Generator[Reads, Results, tuple[Results, dict[str, Any] | None]]:
    """The results of the reads `first` and the Port row of VM `name`, found by its UUID
    in the same transaction (a row written before names gave UUIDs: by its name, a scan)."""
    results = yield [*first, _by_uuid("Port", port_uuid(name), [*columns, "name"])]
    rows = [r for r in _rows(results[-1]) if r["name"] == name]
    if not rows:
        rows = _rows((yield [_select("Port", [["name", "==", name]],
                                     sorted({*columns, "name", "_uuid"}))])[0])
    return results[:-1], (rows[0] if rows else None)


def _owners(keys: dict[str, list[Any]], but: str | None = None
            ) -> Generator[Reads, Results, dict[str, str]]:
    """The VMs that hold each of these values (the refusal of a change: scans), by what
    `keys` names: what -> a Port condition; VM `but` left out (the one being replaced)."""
    names = list(keys)
    results = yield [_select("Port", keys[n], ["name"]) for n in names]
    held = {n: sorted(r["name"] for r in _rows(res) if r["name"] != but)
            for n, res in zip(names, results, strict=True)}
    return {n: vms[0] for n, vms in held.items() if vms}


def _glob(results: Results) -> bool:
    return bool(_rows(results[0]))


@dataclass
class _VmCheck:
    """A VM's entry and the rows its change read, for `_vm_errors()`: its node's row (in
    `nodes`, looked up by name), its network's, the provider network, the routers whose
    external IP its floating IP is, its network's router. `held`: the VM is in the
    document already (it keeps its place there, by name; a new VM comes last); `keys` and
    `external_ids`: what the entry gives besides (checked as the model checks them)."""
    name: str
    node: str
    network: str
    ip: str | None
    mac: str | None
    floating_ip: str | None
    port_id: str
    nodes: list[dict[str, Any]]
    net: dict[str, Any] | None
    external: Any
    ext_ip_of: list[dict[str, Any]]
    router: dict[str, Any] | None
    held: bool = False
    keys: tuple[str, ...] = ()
    external_ids: Any = None


VM_KEYS = ("node", "network", "ip", "mac", "floating_ip", "port_id", "external_ids")


def _vm_errors(v: _VmCheck, owners: dict[str, str]) -> _Errors:
    """What `build_topology()` finds wrong with a document holding VM `v` (and otherwise
    valid), in its order and words: the floating IPs first, then the routers, then the VMs
    in the document's order. `owners`: the other VMs holding what `v` claims (what -> VM:
    "fip", "port_id", "ip", "mac"). The first in the document keeps a value, the later is
    refused: `v` when it comes after the holder (always, when it is new), else the holder,
    in its place (its checks as the model makes them, knowing `v` took the value first)."""
    name = v.name
    e = _Errors()

    def first(holder: str) -> bool:  # the holder comes before `v` in the document
        return not v.held or holder < name

    later: dict[str, list[tuple[int, str, str]]] = {}  # a later holder's errors, in order
    fip = None
    if v.floating_ip is not None:
        fip = _fip_phase(e, name, v.floating_ip, v.external)
        if fip is not None and "fip" in owners:
            if first(owners["fip"]):
                e.err(f"vms.{name}.floating_ip",
                      f"{fip} is already the floating IP of vms.{owners['fip']}")
                fip = None
            else:  # the holder is refused, in the same pass over the floating IPs
                e.err(f"vms.{owners['fip']}.floating_ip",
                      f"{fip} is already the floating IP of vms.{name}")
    if fip is not None:
        for r in sorted(v.ext_ip_of, key=lambda r: r.get("position", 0)):
            if r["external_gateway"]:
                e.err(f"routers.{r['name']}.external_ip",
                      f"{fip} is the floating IP of vms.{name}")
    key = f"vms.{name}"
    if not (NAME_RE.match(name) or UUID_RE.match(name)):
        e.err(key, f"invalid name {name!r}: use [a-z][a-z0-9-]{{0,11}} or a UUID")
        return e
    if v.keys:
        e.known_keys(dict.fromkeys(v.keys), key, VM_KEYS)
    e.external_ids(v.external_ids, f"{key}.external_ids")
    ok = True
    port_id, holder_ok = v.port_id, True
    if not UUID_RE.match(port_id):
        e.err(f"{key}.port_id", f"{port_id!r} is not a UUID (lower case)")
        ok = False
    elif "port_id" in owners:
        if first(owners["port_id"]):
            e.err(f"{key}.port_id", f"{port_id} is already the port of vms."
                  f"{owners['port_id']}")
            ok = False
        else:
            later.setdefault(owners["port_id"], []).append((
                0, f"vms.{owners['port_id']}.port_id",
                f"{port_id} is already the port of vms.{name}"))
            holder_ok = False
    me = next((n for n in v.nodes if n["name"] == v.node), None)
    if me is None:
        e.err(f"{key}.node", f"unknown node {v.node!r}")
        ok = False
    elif me["role"] == "network":
        e.err(f"{key}.node", f"{v.node} is a network node; VMs run on compute nodes")
        ok = False
    if v.net is None:
        e.err(f"{key}.network", f"unknown network {v.network!r}")
        ok = False
    if ok and v.ip is not None:
        assert v.net is not None
        addr = e.ip(v.ip, f"{key}.ip")
        cidr = ipaddress.IPv4Network(v.net["cidr"])
        if addr is None or not e.host_in(addr, cidr, f"{key}.ip", f"network {v.network}"):
            ok = False
        elif str(addr) == v.net["gateway_ip"]:
            e.err(f"{key}.ip", f"{addr} is the gateway_ip of network {v.network}")
            ok = False
        elif "ip" in owners and first(owners["ip"]):
            e.err(f"{key}.ip", f"{addr} is already used by vms.{owners['ip']}")
            ok = False
        elif "ip" in owners:
            h = owners["ip"]  # refused there unless its port_id was already
            if holder_ok or owners.get("port_id") != h:
                later.setdefault(h, []).append(
                    (3, f"vms.{h}.ip", f"{addr} is already used by vms.{name}"))
    if v.mac is not None:
        mac_l = str(v.mac).lower()
        if not MAC_RE.match(mac_l) or int(mac_l[:2], 16) & 1:
            e.err(f"{key}.mac", f"{v.mac!r} is not a unicast MAC address")
            ok = False
        elif "mac" in owners and first(owners["mac"]):
            e.err(f"{key}.mac", f"{mac_l} is already used by vms.{owners['mac']}")
            ok = False
        elif "mac" in owners:
            later.setdefault(owners["mac"], []).append(
                (4, f"vms.{owners['mac']}.mac", f"{mac_l} is already used by vms.{name}"))
    if ok and v.floating_ip is not None:
        _fip_router_phase(e, name, v.network, v.router)
    for h in sorted(later):
        for _, k, reason in sorted(later[h]):
            e.err(k, reason)
    return e


def vm_add_change(name: str, node: str, network: str, ip: str | None = None,
                  mac: str | None = None, floating_ip: str | None = None
                  ) -> Callable[[dict[str, Any]], Command]:
    """`dvr nb vm-add`: one Port row; read: its node, its network and the network's router,
    the routers whose external IP its floating IP is, and whether a router or node holds
    its MAC (Router.macs, Node.macs); an address left out is the one the whole document
    would give it."""
    mac_l = str(mac).lower() if mac is not None else None
    fip_s = _norm_ip(floating_ip) if floating_ip is not None else None

    def command(hints: dict[str, Any]) -> Command:
        # the MAC to look up: the one given, or the first choice the model would make
        candidate = mac_l if mac_l is not None else vm_mac(
            name, {*hints.get("macs", ()), *hints.get("infra", ())})
        results = yield [
            GLOBAL_SELECT,
            _by_uuid("Port", port_uuid(name), ["name"]),
            _select("Node", [["name", "==", node]], ["_uuid", "name", "role"]),
            _select("Network", [["name", "==", network]],
                    ["_uuid", "cidr", "gateway_ip", "router"]),
            _select("External", [], ["cidr", "gateway_ip"]),
            _select("Router", [["external_ip", "==", fip_s or ""]],
                    ["name", "external_gateway"]),
            _select("Router", [["macs", "includes", candidate]], ["name"]),
            _select("Node", [["macs", "includes", candidate]], ["name"])]
        if not _glob(results):
            raise ChangeError("the database holds no desired state: load one first")
        if _rows(results[1]):
            raise ChangeError(f"vms.{name}: already exists")
        nodes = _rows(results[2])
        nets = _rows(results[3])
        external = _external(_rows(results[4]))
        ext_ip_of = _rows(results[5]) if fip_s is not None else []
        infra_hit = bool(_rows(results[6]) or _rows(results[7]))
        net = nets[0] if nets else None
        router = None
        if floating_ip is not None and net is not None and _uuid_of(net.get("router")):
            rows = _rows((yield [_by_uuid("Router", _uuid_of(net["router"]) or "",
                                          ["name", "external_gateway"])])[0])
            router = rows[0] if rows else None
        port_id = default_port_id(name)

        def errors(owners: dict[str, str]) -> _Errors:
            return _vm_errors(_VmCheck(
                name=name, node=node, network=network, ip=ip, mac=mac,
                floating_ip=floating_ip, port_id=port_id, nodes=nodes, net=net,
                external=external, ext_ip_of=ext_ip_of, router=router), owners)

        def unique_keys() -> dict[str, list[Any]]:
            keys: dict[str, list[Any]] = {"port_id": [["port_id", "==", port_id]]}
            if floating_ip is not None:
                keys["fip"] = [["fip_key", "==", _norm_ip(floating_ip)]]
            if net is not None and ip is not None:
                keys["ip"] = [["network", "==", net["_uuid"]], ["ip", "==", _norm_ip(ip)]]
            if mac_l is not None:
                keys["mac"] = [["mac", "==", mac_l]]
            return keys

        def refuse() -> Generator[Reads, Results, None]:
            owners = yield from _owners(unique_keys())
            errors(owners).raise_if_any()

        e = errors({})
        if e.errors:
            yield from refuse()
            e.raise_if_any()
        assert net is not None
        # the routers' and nodes' MACs: a VM's may not be one of them
        if infra_hit and mac_l is not None:  # after the collisions, as in the model
            yield from refuse()
            owner = yield from _infra_owner(mac_l)
            raise TopologyError(SOURCE, [(f"vms.{name}.mac", f"{mac_l} is {owner}")])
        if infra_hit:  # the model's next choice: look it up in turn
            hints.setdefault("infra", []).append(candidate)
            hints["generation"] = _rows(results[0])[0]["generation"]
            return (yield from command(hints))
        cidr = ipaddress.IPv4Network(net["cidr"])
        gateway = ipaddress.IPv4Address(net["gateway_ip"])
        fip = str(ipaddress.IPv4Address(floating_ip)) if floating_ip is not None else None
        me = next(n for n in nodes if n["name"] == node)

        def attempt(hints: dict[str, Any]) -> Generator[Reads, Results, Write]:
            """The insert, with the addresses the whole document would give (the hints:
            what this generation showed taken)."""
            if ip is not None:
                addr = str(ipaddress.IPv4Address(str(ip)))
            else:  # free among the network's taken addresses
                taken = {gateway} | {ipaddress.IPv4Address(a) for a in hints.get("ips", ())}
                picked = vm_ip(name, cidr, taken)
                if picked is None:
                    yield from refuse()
                    raise TopologyError(SOURCE, [(f"vms.{name}.ip", "no free address left "
                                                  f"in network {network}")])
                addr = str(picked)
            the_mac = candidate  # looked up among the routers' and nodes' MACs
            row = {"name": name, "node": me["_uuid"], "network": net["_uuid"], "ip": addr,
                   "mac": the_mac, "floating_ip": fip if fip else ["set", []],
                   "fip_key": fip_key(name, fip), "port_id": port_id,
                   "external_ids": ["map", []]}

            def refused(refusal: Refusal, hints: dict[str, Any]
                        ) -> Generator[Reads, Results, Write | None]:
                index = refusal.index()
                if index == ("name",):
                    raise ChangeError(f"vms.{name}: already exists")
                if index == ("network", "ip") and ip is None and not hints.get("ips"):
                    ports = yield [_select("Port", [["network", "==", net["_uuid"]]], ["ip"])]
                    hints["ips"] = sorted({r["ip"] for r in _rows(ports[0])})
                    return (yield from attempt(hints))
                if index == ("mac",) and mac_l is None:  # the next choice, looked up anew
                    hints.setdefault("macs", []).append(the_mac)
                    return None
                yield from refuse()  # raises, or the collision is gone: start over
                return None

            return Write([{"op": "insert", "table": "Port", "uuid": port_uuid(name),
                           "row": row}], refused)

        return (yield from attempt(hints))

    return command


def _infra_owner(mac: str) -> Generator[Reads, Results, str]:
    """Who among the routers and nodes holds `mac`, in the model's words (the refusal of
    a change: every router, network and node read)."""
    results = yield [
        _select("Router", [], ["name", "position", "interfaces", "external_gateway"]),
        _select("Network", [], ["_uuid", "name"]),
        _select("Node", [], ["name", "position"]),
        _select("External", [], ["_uuid"])]
    net_name = {r["_uuid"][1]: r["name"] for r in _rows(results[1])}
    specs: dict[str, dict[str, Any]] = {}
    router_of: dict[str, str] = {}
    for r in sorted(_rows(results[0]), key=lambda r: r["position"]):
        itfs = [net_name[u] for _, u in _pairs(r["interfaces"])]
        specs[r["name"]] = {"interfaces": itfs, "external_gateway": r["external_gateway"]}
        for n in itfs:
            router_of.setdefault(n, r["name"])
    nodes = [r["name"] for r in sorted(_rows(results[2]), key=lambda r: r["position"])]
    owners = infrastructure_macs(specs, router_of, nodes, bool(_rows(results[3])))
    return owners.get(mac, "a router's or a node's MAC")


def _norm_ip(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(str(value)))
    except ValueError:
        return str(value)


def vm_del_change(name: str) -> Callable[[dict[str, Any]], Command]:
    """`dvr nb vm-del`: its Port row, nothing else (nothing refers to a VM)."""

    def command(hints: dict[str, Any]) -> Command:
        results, port = yield from _port(name, ["_uuid"], [GLOBAL_SELECT])
        if port is None or not _glob(results):
            raise ChangeError(f"vms.{name}: no such vm")
        return Write([{"op": "delete", "table": "Port",
                       "where": [["_uuid", "==", port["_uuid"]]]}])

    return command


def fip_set_change(vm: str, floating_ip: str) -> Callable[[dict[str, Any]], Command]:
    """`dvr nb fip-set`: the VM's Port row, its network and router, the provider network
    and the routers whose external IP it is; the VM holding it already (if any) is the one
    the index on fip_key names when the write is refused: moved from there at the second
    try."""
    fip_s = _norm_ip(floating_ip)

    def command(hints: dict[str, Any]) -> Command:
        results, port = yield from _port(vm, ["_uuid", "network", "floating_ip"], [
            GLOBAL_SELECT, _select("External", [], ["cidr", "gateway_ip"]),
            _select("Router", [["external_ip", "==", fip_s]], ["name", "external_gateway"])])
        if port is None or not _glob(results):
            raise ChangeError(f"vms.{vm}: no such vm")
        if _one(port["floating_ip"]) == fip_s:
            return None  # it holds it already
        net = _rows((yield [_by_uuid("Network", port["network"][1], ["name", "router"])])[0])[0]
        router = None
        if _uuid_of(net.get("router")):
            rows = _rows((yield [_by_uuid("Router", _uuid_of(net["router"]) or "",
                                          ["name", "external_gateway"])])[0])
            router = rows[0] if rows else None
        e = _Errors()
        fip = _fip_phase(e, vm, floating_ip, _external(_rows(results[1])))
        if fip is not None:
            for r in _rows(results[2]):
                if r["external_gateway"]:
                    e.err(f"routers.{r['name']}.external_ip",
                          f"{fip} is the floating IP of vms.{vm}")
        _fip_router_phase(e, vm, net["name"], router)
        e.raise_if_any()
        ops = [_update("Port", port["_uuid"][1], {"floating_ip": fip_s,
                                                  "fip_key": fip_key(vm, fip_s)})]

        def refused(refusal: Refusal, hints: dict[str, Any]
                    ) -> Generator[Reads, Results, Write | None]:
            others = [u for u in refusal.rows() if u != port["_uuid"][1]]
            if refusal.index() == ("fip_key",) and others:  # the VM holding it: moved
                holder = _rows((yield [_by_uuid("Port", others[0],
                                                ["name", "floating_ip"])])[0])
                if holder and _one(holder[0]["floating_ip"]) == fip_s:
                    return Write([_update("Port", others[0], {
                        "floating_ip": ["set", []],
                        "fip_key": fip_key(holder[0]["name"], None)}), *ops])
            raise TopologyError(SOURCE, [(f"vms.{vm}.floating_ip", refusal.details)])

        return Write(ops, refused)

    return command


def fip_del_change(vm: str) -> Callable[[dict[str, Any]], Command]:
    """`dvr nb fip-del`: the VM's Port row."""

    def command(hints: dict[str, Any]) -> Command:
        results, port = yield from _port(vm, ["_uuid", "floating_ip"], [GLOBAL_SELECT])
        if port is None or not _glob(results):
            raise ChangeError(f"vms.{vm}: no such vm")
        if not _one(port["floating_ip"]):
            raise ChangeError(f"vms.{vm}: has no floating IP")
        return Write([_update("Port", port["_uuid"][1], {"floating_ip": ["set", []],
                                                         "fip_key": fip_key(vm, None)})])

    return command


class Stale(ChangeError):
    """An entry whose revision numbers are older than those of the entry held: refused, so
    that a late writer never undoes a newer write."""


def revision_of(entry: dict[str, Any] | None, key: str) -> int:
    """The revision number `key` of an entry's external_ids (-1: none)."""
    if not entry:
        return -1
    try:
        return int((entry.get("external_ids") or {}).get(key, -1))
    except ValueError:
        return -1


def check_revisions(section: str, name: str, entry: dict[str, Any],
                    held: dict[str, Any] | None, keys: Iterable[str]) -> None:
    """Refuse (`Stale`) `entry` when one of its revision numbers `keys` is older than the
    held entry's (a number it does not give is not compared)."""
    if held is None:
        return
    for key in keys:
        new, old = revision_of(entry, key), revision_of(held, key)
        if 0 <= new < old:
            raise Stale(f"{section}.{name}: {key} {new} is older than the {old} held")


PORT_COLUMNS = ["_uuid", "node", "network", "ip", "mac", "floating_ip", "port_id",
                "external_ids"]


def vm_put_change(name: str, entry: dict[str, Any] | None, revisions: Iterable[str] = (),
                  unplaced: bool = False) -> Callable[[dict[str, Any]], Command]:
    """Put VM `name`'s entry whole, as a writer that mirrors another system's ports does
    (Neutron's): None deletes its Port row (absent: nothing to write); an entry (node,
    network, ip, mac, and optionally floating_ip, port_id, external_ids: its addresses
    given, nothing allocated) creates the row or replaces it, written as given. An entry
    whose revision numbers `revisions` (keys of its external_ids) are older than the held
    row's is refused (`Stale`), and one equal to it writes nothing. With `unplaced`, an
    entry on a network the database does not hold or on a node that is not a compute node
    counts as None (a port that is not the cloud's).

    Read: the VM's row, its node, its network and the network's router, the provider
    network and the routers whose external IP its floating IP is (with one), whether a
    router or node holds its MAC; checked as `build_topology()` checks the document
    holding it (the VM in its place there: a held one by its name, a new one last), the
    uniqueness of its port id, address, MAC and floating IP by the indexes at commit. The
    row is looked up by its UUID (`port_uuid()`); by name (a scan) only for a delete that
    does not find it so, or once an insert is refused by the index on names (a row from
    before names gave UUIDs)."""
    revisions = tuple(revisions)
    if entry is not None and ("ip" not in entry or "mac" not in entry):
        raise ValueError(f"vms.{name}: a put gives the VM's ip and mac")

    def command(hints: dict[str, Any]) -> Command:
        if entry is None:
            results, port = yield from _port(name, ["_uuid"], [GLOBAL_SELECT])
            if not _glob(results):
                raise ChangeError("the database holds no desired state: load one first")
            return _delete_port(port)
        node, network = str(entry.get("node")), str(entry.get("network"))
        ip, mac, fip = entry["ip"], entry["mac"], entry.get("floating_ip")
        mac_l = str(mac).lower()
        reads = [GLOBAL_SELECT,
                 _select("Node", [["name", "==", node]], ["_uuid", "name", "role"]),
                 _select("Network", [["name", "==", network]],
                         ["_uuid", "cidr", "gateway_ip", "router"]),
                 _select("Router", [["macs", "includes", mac_l]], ["name"]),
                 _select("Node", [["macs", "includes", mac_l]], ["name"])]
        if fip is not None:  # the provider network: one row at most
            reads += [_select("External", [], ["cidr", "gateway_ip"]),
                      _select("Router", [["external_ip", "==", _norm_ip(fip)]],
                              ["name", "position", "external_gateway"])]
        if hints.get("by_name"):  # a row from before names gave UUIDs: a scan
            results, port = yield from _port(name, PORT_COLUMNS, reads)
        else:  # by its UUID alone: a new port is not looked for by name
            results = yield [*reads, _by_uuid("Port", port_uuid(name), [*PORT_COLUMNS, "name"])]
            found = [r for r in _rows(results[-1]) if r["name"] == name]
            results, port = results[:-1], (found[0] if found else None)
        if not _glob(results):
            raise ChangeError("the database holds no desired state: load one first")
        nodes, nets = _rows(results[1]), _rows(results[2])
        net = nets[0] if nets else None
        me = nodes[0] if nodes else None
        if unplaced and (net is None or me is None or me["role"] != "compute"):
            return _delete_port(port)
        held = None
        if port is not None:
            node_of = {port["node"][1]: node if me and port["node"] == me["_uuid"] else ""}
            net_of = {port["network"][1]: network if net and port["network"] == net["_uuid"]
                      else ""}
            held = _port_spec({**port, "name": name}, node_of, net_of)
        check_revisions("vms", name, entry, held, revisions)
        if held == dict(entry):
            return None
        infra_hit = bool(_rows(results[3]) or _rows(results[4]))
        external = _external(_rows(results[5])) if fip is not None else None
        ext_ip_of = _rows(results[6]) if fip is not None else []
        router = None
        if fip is not None and net is not None and _uuid_of(net.get("router")):
            rows = _rows((yield [_by_uuid("Router", _uuid_of(net["router"]) or "",
                                          ["name", "external_gateway"])])[0])
            router = rows[0] if rows else None
        port_id = entry.get("port_id", default_port_id(name))
        check = _VmCheck(name=name, node=node, network=network, ip=ip, mac=mac,
                         floating_ip=fip, port_id=str(port_id), nodes=nodes, net=net,
                         external=external, ext_ip_of=ext_ip_of, router=router,
                         held=port is not None, keys=tuple(entry),
                         external_ids=entry.get("external_ids"))

        def refuse() -> Generator[Reads, Results, None]:
            """Raises when the VMs holding what it claims make it (or them) refused."""
            keys: dict[str, list[Any]] = {"port_id": [["port_id", "==", str(port_id)]],
                                          "mac": [["mac", "==", mac_l]]}
            if fip is not None:
                keys["fip"] = [["fip_key", "==", _norm_ip(fip)]]
            if net is not None:
                keys["ip"] = [["network", "==", net["_uuid"]], ["ip", "==", _norm_ip(ip)]]
            owners = yield from _owners(keys, but=name)
            _vm_errors(check, owners).raise_if_any()

        e = _vm_errors(check, {})
        if e.errors:
            yield from refuse()
            e.raise_if_any()
        if infra_hit:  # after the collisions, as in the model
            yield from refuse()
            owner = yield from _infra_owner(mac_l)
            raise TopologyError(SOURCE, [(f"vms.{name}.mac", f"{mac_l} is {owner}")])
        assert net is not None and me is not None
        row = {"node": me["_uuid"], "network": net["_uuid"], "ip": ip, "mac": mac,
               "floating_ip": fip if fip is not None else ["set", []],
               "fip_key": fip_key(name, fip), "port_id": str(port_id),
               "external_ids": ["map", [list(p) for p in
                                        _ids_map(entry.get("external_ids"))]]}
        if port is not None:
            ops = [_update("Port", port["_uuid"][1], row)]
        else:
            ops = [{"op": "insert", "table": "Port", "uuid": port_uuid(name),
                    "row": {"name": name, **row}}]

        def refused(refusal: Refusal, hints: dict[str, Any]
                    ) -> Generator[Reads, Results, Write | None]:
            if refusal.index() == ("name",) and port is None and not hints.get("by_name"):
                hints["by_name"] = True  # held under another UUID: found by name, again
                return None
            yield from refuse()  # raises: what it collides with is held at this generation
            raise TopologyError(SOURCE, [(f"vms.{name}", refusal.details)])

        return Write(ops, refused)

    return command


def _delete_port(port: dict[str, Any] | None) -> Write | None:
    if port is None:
        return None
    return Write([{"op": "delete", "table": "Port", "where": [["_uuid", "==", port["_uuid"]]]}])


def router_if_change(router: str, network: str, add: bool
                     ) -> Callable[[dict[str, Any]], Command]:
    """`dvr nb router-if-add` / `-del`: the routers, networks and nodes (what a router's
    interface changes: which network is whose, the routers' and nodes' MACs), and the
    ports it concerns: on that network with a floating IP (removed), or holding a MAC the
    change gives a router (scans: a rare change)."""

    def command(hints: dict[str, Any]) -> Command:
        results = yield [
            GLOBAL_SELECT,
            _select("Router", [], ["_uuid", "name", "position", "interfaces",
                                   "external_gateway"]),
            _select("Network", [], ["_uuid", "name", "cidr"]),
            _select("Node", [], ["_uuid", "name", "position"]),
            _select("External", [], ["_uuid"])]
        routers = sorted(_rows(results[1]), key=lambda r: r["position"])
        nets = {r["name"]: r for r in _rows(results[2])}
        net_name = {r["_uuid"][1]: r["name"] for r in _rows(results[2])}
        node_rows = sorted(_rows(results[3]), key=lambda r: r["position"])
        nodes = [r["name"] for r in node_rows]
        has_external = bool(_rows(results[4]))
        me = next((r for r in routers if r["name"] == router), None)
        if me is None or not _glob(results):
            raise ChangeError(f"routers.{router}: no such router")
        itfs = {r["name"]: [net_name[u] for _, u in _pairs(r["interfaces"])] for r in routers}
        old = itfs[router]
        if add:
            if network in old:
                raise ChangeError(f"routers.{router}.interfaces: {network} is already on it")
            new = [*old, network]
        else:
            if network not in old:
                raise ChangeError(f"routers.{router}.interfaces: {network} is not on it")
            new = [n for n in old if n != network]

        def router_of(lists: dict[str, list[str]]) -> dict[str, str]:
            out: dict[str, str] = {}
            for r in routers:
                for n in lists[r["name"]]:
                    out.setdefault(n, r["name"])
            return out

        e = _Errors()
        if add:
            key = f"routers.{router}.interfaces[{len(old)}]"
            holder = router_of(itfs).get(network)
            pos = {r["name"]: i for i, r in enumerate(routers)}
            if network not in nets:
                e.err(key, f"unknown network {network!r}")
            elif holder is not None and pos[holder] < pos[router]:
                e.err(key, f"network {network} is already on router {holder}; "
                      "a network's gateway_ip belongs to one router")
            else:
                cidr = ipaddress.IPv4Network(nets[network]["cidr"])
                for other in old:
                    ocidr = ipaddress.IPv4Network(nets[other]["cidr"])
                    if cidr.overlaps(ocidr):
                        e.err(key, f"{network} {cidr} overlaps {other} {ocidr} on the same "
                              "router")
                        break
                else:
                    if holder is not None:  # a later router lists it: that one is refused
                        e.err(f"routers.{holder}.interfaces[{itfs[holder].index(network)}]",
                              f"network {network} is already on router {router}; "
                              "a network's gateway_ip belongs to one router")
                        if me["external_gateway"] is not True:  # its floating IPs now here
                            fips = yield [_select("Port", [
                                ["network", "==", nets[network]["_uuid"]],
                                ["floating_ip", "!=", ["set", []]]], ["name"])]
                            for name in sorted(r["name"] for r in _rows(fips[0])):
                                e.err(f"vms.{name}.floating_ip", f"router {router} of "
                                      f"network {network} has no external_gateway")
        elif network in nets:
            fips = yield [_select("Port", [["network", "==", nets[network]["_uuid"]],
                                           ["floating_ip", "!=", ["set", []]]], ["name"])]
            for name in sorted(r["name"] for r in _rows(fips[0])):
                e.err(f"vms.{name}.floating_ip", f"network {network} is on no router")
        e.raise_if_any()

        def macs(lists: dict[str, list[str]]) -> dict[str, str]:
            specs = {r["name"]: {"interfaces": lists[r["name"]],
                                 "external_gateway": r["external_gateway"]} for r in routers}
            return infrastructure_macs(specs, router_of(lists), nodes, has_external)

        def macs_of(lists: dict[str, list[str]]
                    ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
            specs = {r["name"]: {"interfaces": lists[r["name"]],
                                 "external_gateway": r["external_gateway"]} for r in routers}
            return infrastructure_macs_of(specs, router_of(lists), nodes, has_external)

        before, after = macs(itfs), macs({**itfs, router: new})
        taken = sorted(m for m in after if m not in before)
        if taken:
            holders = yield [_select("Port", [["mac", "==", m]], ["name", "mac"])
                             for m in taken]
            found = sorted((r["name"], r["mac"]) for res in holders for r in _rows(res))
            for name, m in found:
                e.err(f"vms.{name}.mac", f"{m} is {after[m]}")
            e.raise_if_any()
        ops = [_update("Router", me["_uuid"][1], {"interfaces": ["map", [
            [i, nets[n]["_uuid"]] for i, n in enumerate(new)]]})]
        # the routers' and nodes' MACs as the model derives them now (Router.macs,
        # Node.macs: what vm-add looks a MAC up in)
        old_r, old_n = macs_of(itfs)
        new_r, new_n = macs_of({**itfs, router: new})
        for r in routers:
            if new_r[r["name"]] != old_r[r["name"]]:
                ops.append(_update("Router", r["_uuid"][1],
                                   {"macs": ["set", new_r[r["name"]]]}))
        for n in node_rows:
            if new_n[n["name"]] != old_n[n["name"]]:
                ops.append(_update("Node", n["_uuid"][1], {"macs": ["set", new_n[n["name"]]]}))
        if network in nets:
            ops.append(_update("Network", nets[network]["_uuid"][1], {
                "router": me["_uuid"] if add else ["set", []]}))
        return Write(ops)

    return command


# --- who may write what: the servers' remotes and the roles of their clients (OVSDB RBAC) --
# A client on a remote with a role may read everything, and write only what the role's
# permission for a table allows, in rows whose `authorization` column equals the CN of the
# client's certificate (ovsdb-server takes it from the TLS session). A remote without a
# role gives full access: the operators' tools and the Neutron driver use it, through the
# members' unix sockets or a TLS remote on a management address only.
AGENT_ROLE = "dvr-agent"
SCHEDULER_ROLE = "dvr-scheduler"


def _agent_columns() -> list[str]:
    columns = json.loads(SCHEMA.read_text())["tables"]["Agent"]["columns"]
    return sorted(c for c in columns if c != "node")


def roles() -> dict[str, dict[str, dict[str, Any]]]:
    """Role -> table -> permission. An agent inserts and updates only the Agent row of its
    node (the CN of its certificate); the scheduler only reorders routers' HA chains."""
    return {
        AGENT_ROLE: {"Agent": {"authorization": ["node"], "insert_delete": True,
                               "update": _agent_columns()}},
        SCHEDULER_ROLE: {"Router": {"authorization": [""], "insert_delete": False,
                                    "update": ["snat_chain"]}},
    }


@dataclass(frozen=True)
class Remote:
    """One of the servers' remotes: `pssl:PORT[:IP]` (or `ptcp:`), its clients' role
    ("" for none: full access)."""
    target: str
    role: str = ""
    read_only: bool = False
    inactivity_probe: int | None = None


def parse_remotes(words: list[str]) -> list[Remote]:
    """`role=ROLE TARGET... [role=OTHER TARGET...]` (as ovn-sbctl set-connection takes
    them): each `role=` applies to the targets after it; `read-only` to the next one."""
    out: list[Remote] = []
    role, read_only = "", False
    known = set(roles())
    for w in words:
        if w.startswith("role="):
            role = w.partition("=")[2]
            if role and role not in known:
                raise ChangeError(f"role {role!r}: not one of {', '.join(sorted(known))} "
                                  "(or role= for full access)")
        elif w == "read-only":
            read_only = True
        elif w.split(":", 1)[0] in ("pssl", "ptcp", "punix") and ":" in w:
            out.append(Remote(w, role, read_only))
            read_only = False
        else:
            raise ChangeError(f"{w!r}: not a passive remote (pssl:PORT[:IP], ptcp:PORT[:IP], "
                              "punix:PATH) nor role=ROLE or read-only")
    targets = [r.target for r in out]
    if len(set(targets)) != len(targets):
        raise ChangeError("a remote is given twice")
    return out


def access_ops(remotes: list[Remote], existing: list[dict[str, Any]],
               global_exists: bool) -> list[dict[str, Any]]:
    """The operations that make the servers' remotes `remotes` and the project's roles
    what `roles()` says, replacing the rows of the roles in `existing` (RBAC_Role rows
    with their permissions, as selected); other roles are left as they are."""
    mine = set(roles())
    ops: list[dict[str, Any]] = []
    for row in existing:
        if row["name"] not in mine:
            continue
        for _, ref in row["permissions"][1]:
            ops.append({"op": "delete", "table": "RBAC_Permission",
                        "where": [["_uuid", "==", ref]]})
        ops.append({"op": "delete", "table": "RBAC_Role",
                    "where": [["_uuid", "==", row["_uuid"]]]})
    for i, (role, tables) in enumerate(sorted(roles().items())):
        perms = []
        for j, (table, p) in enumerate(sorted(tables.items())):
            name = f"perm{i}_{j}"
            ops.append({"op": "insert", "table": "RBAC_Permission", "uuid-name": name,
                        "row": {"table": table,
                                "authorization": ["set", p["authorization"]],
                                "insert_delete": p["insert_delete"],
                                "update": ["set", p["update"]]}})
            perms.append([table, ["named-uuid", name]])
        ops.append({"op": "insert", "table": "RBAC_Role",
                    "row": {"name": role, "permissions": ["map", perms]}})
    refs = []
    for i, r in enumerate(remotes):
        row: dict[str, Any] = {"target": r.target, "role": r.role, "read_only": r.read_only}
        if r.inactivity_probe is not None:
            row["inactivity_probe"] = r.inactivity_probe
        ops.append({"op": "insert", "table": "Connection", "uuid-name": f"conn{i}",
                    "row": row})
        refs.append(["named-uuid", f"conn{i}"])
    connections = ["set", refs]
    if global_exists:   # the old Connection rows go with their references (not roots)
        ops.append({"op": "update", "table": "NB_Global", "where": [],
                    "row": {"connections": connections}})
    else:  # a database nothing was loaded into yet: its NB_Global row, no generation
        ops.append({"op": "insert", "table": "NB_Global",
                    "row": {"generation": "", "changes": 0, "connections": connections}})
    return ops
