"""The northbound database's pure half: its schema, and the desired state as rows.

The database (schema `nb.ovsschema` beside this file, an `ovsdb-server` serves it) holds the
*effective* topology: every value the model allocates (VNIs, MACs, IPs, external IPs) is
written out, so what is read back is the same cloud whatever the order of its rows. Here:
the rows of a dump (or of an agent's IDL copy, in the same JSON form) as a topology document
(`document()`); a document as the OVSDB operations that turn the database into it, row by
row, guarded by the generation read (`diff_ops()`); the generation of a document; and the
daily changes (`vm_add()`, `fip_set()`, ...) as edits of the document. No I/O: `dvr/nb.py`
is the client that sends these operations.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

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
                    "vni": n["vni"], **_ids(n.get("external_ids"))}
        for n in sorted(nets, key=lambda r: r["position"])}
    data["routers"] = {}
    for r in sorted(routers, key=lambda r: r["position"]):
        spec = {"interfaces": [net_name[u] for _, u in _pairs(r["interfaces"])]}
        if r["external_gateway"]:
            spec["external_gateway"] = True
            spec["external_ip"] = _one(r["external_ip"])
            spec["snat_nodes"] = [node_name[u] for _, u in _pairs(r["snat_nodes"])]
            chain = [node_name[u] for _, u in _pairs(r.get("snat_chain")) if u in node_name]
            if live and chain:
                spec["snat_nodes"] = chain
        spec.update(_ids(r.get("external_ids")))
        data["routers"][r["name"]] = spec
    data["vms"] = {}
    for p in sorted(ports, key=lambda r: r["name"]):
        spec = {"node": node_name[p["node"][1]], "network": net_name[p["network"][1]],
                "ip": p["ip"], "mac": p["mac"]}
        if _one(p["floating_ip"]):
            spec["floating_ip"] = _one(p["floating_ip"])
        if _one(p.get("port_id")):
            spec["port_id"] = _one(p["port_id"])
        spec.update(_ids(p.get("external_ids")))
        data["vms"][p["name"]] = spec
    return data


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
                                 "vni": spec["vni"],
                                 "external_ids": _ids_map(spec.get("external_ids"))}
    for i, (name, spec) in enumerate(doc["routers"].items()):
        rows["Router"][name] = {
            "name": name, "position": i,
            "interfaces": tuple(("Network", n) for n in spec["interfaces"]),
            "external_gateway": bool(spec.get("external_gateway", False)),
            "external_ip": spec.get("external_ip"),
            "snat_nodes": tuple(("Node", n) for n in spec.get("snat_nodes", [])),
            "external_ids": _ids_map(spec.get("external_ids"))}
    for name, spec in doc["vms"].items():
        rows["Port"][name] = {"name": name, "node": ("Node", spec["node"]),
                              "network": ("Network", spec["network"]), "ip": spec["ip"],
                              "mac": spec["mac"], "floating_ip": spec.get("floating_ip"),
                              "port_id": spec.get("port_id"),
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
