"""The northbound database: the cloud's desired state in an `ovsdb-server` (schema
`dvr/nb.ovsschema`), written and read over OVSDB's JSON-RPC with the `ovs` bindings.

The database holds the *effective* topology: every value the model allocates (VNIs, MACs,
IPs, external IPs) is written out, so what is read back is the same cloud whatever the order
of its rows. `load` validates first and replaces the whole desired state in one transaction
(a refused topology writes nothing); `dump` reads it back as a topology document.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from dvr.model import Topology, build_topology, to_dict

DB = "DVR_Northbound"
SCHEMA = Path(__file__).with_name("nb.ovsschema")
STATE_TABLES = ("Port", "Router", "Network", "Node", "External", "NB_Global")


class NbError(Exception):
    """The database could not be reached or refused a transaction."""


def _opt(value: Any) -> Any:
    return ["set", []] if value is None else value


def _map(pairs: list[tuple[int, str]]) -> list[Any]:
    return ["map", [[i, ["named-uuid", ref]] for i, ref in pairs]]


def load_ops(topo: Topology) -> list[dict[str, Any]]:
    """One transaction's operations: delete the desired state, insert `topo`'s."""
    data = to_dict(topo)
    ops: list[dict[str, Any]] = [{"op": "delete", "table": t, "where": []} for t in STATE_TABLES]
    ops.append({"op": "insert", "table": "NB_Global", "row": {"generation": topo.digest}})
    node_ref = {name: f"node{i}" for i, name in enumerate(data["nodes"])}
    for i, (name, spec) in enumerate(data["nodes"].items()):
        ops.append({"op": "insert", "table": "Node", "uuid-name": node_ref[name],
                    "row": {"name": name, "role": spec["role"], "position": i,
                            "tunnel_ip": _opt(spec.get("tunnel_ip"))}})
    if "external" in data:
        ext = data["external"]
        ops.append({"op": "insert", "table": "External",
                    "row": {"cidr": ext["cidr"], "gateway_ip": ext["gateway_ip"],
                            "remote_ip": ext["remote_ip"],
                            "gateway_mac": _opt(ext.get("gateway_mac"))}})
    net_ref = {name: f"net{i}" for i, name in enumerate(data["networks"])}
    for i, (name, spec) in enumerate(data["networks"].items()):
        ops.append({"op": "insert", "table": "Network", "uuid-name": net_ref[name],
                    "row": {"name": name, "position": i, "cidr": spec["cidr"],
                            "gateway_ip": spec["gateway_ip"], "mtu": spec["mtu"],
                            "vni": spec["vni"]}})
    for i, (name, spec) in enumerate(data["routers"].items()):
        ops.append({"op": "insert", "table": "Router", "row": {
            "name": name, "position": i,
            "interfaces": _map([(j, net_ref[n]) for j, n in enumerate(spec["interfaces"])]),
            "external_gateway": bool(spec.get("external_gateway", False)),
            "external_ip": _opt(spec.get("external_ip")),
            "snat_nodes": _map([(j, node_ref[n])
                                for j, n in enumerate(spec.get("snat_nodes", []))])}})
    for name, spec in data["vms"].items():
        ops.append({"op": "insert", "table": "Port", "row": {
            "name": name, "node": ["named-uuid", node_ref[spec["node"]]],
            "network": ["named-uuid", net_ref[spec["network"]]], "ip": spec["ip"],
            "mac": spec["mac"], "floating_ip": _opt(spec.get("floating_ip"))}})
    return ops


def dump_ops() -> list[dict[str, Any]]:
    return [{"op": "select", "table": t, "where": []}
            for t in ("NB_Global", "Node", "External", "Network", "Router", "Port")]


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
    """A topology document from the rows `dump_ops()` selected."""
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
    """A connection to the northbound database (unix:PATH or tcp:HOST:PORT)."""

    def __init__(self, target: str, timeout: float = 10.0):
        warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
        import ovs.jsonrpc
        import ovs.stream

        self.target = target
        error, stream = ovs.stream.Stream.open_block(ovs.stream.Stream.open(target),
                                                     int(timeout * 1000))
        if error:
            raise NbError(f"cannot connect to the northbound database at {target}: "
                          f"{_strerror(error)}")
        self.conn = ovs.jsonrpc.Connection(stream)

    def close(self) -> None:
        self.conn.close()

    def transact(self, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
        import ovs.jsonrpc

        request = ovs.jsonrpc.Message.create_request("transact", [DB, *ops])
        error, reply = self.conn.transact_block(request)
        if error:
            raise NbError(f"{self.target}: {_strerror(error)}")
        if reply.error:
            raise NbError(f"{self.target}: {reply.error}")
        results = reply.result
        for op, res in zip(ops, results, strict=False):
            if isinstance(res, dict) and res.get("error"):
                raise NbError(f"{op['op']} {op.get('table', '')}: {res['error']}: "
                              f"{res.get('details', '')}".rstrip(": "))
        if len(results) > len(ops) and results[-1] and results[-1].get("error"):
            raise NbError(f"transaction refused: {results[-1]['error']}: "
                          f"{results[-1].get('details', '')}")
        return results

    def load(self, topo: Topology) -> None:
        self.transact(load_ops(topo))

    def dump(self) -> dict[str, Any]:
        return document(self.transact(dump_ops()))

    def topology(self, source: str = "<northbound>") -> Topology:
        return build_topology(self.dump(), source)


def _strerror(error: int) -> str:
    import os

    return os.strerror(error) if isinstance(error, int) and error > 0 else str(error)


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
