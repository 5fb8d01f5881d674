"""Neutron's resources as dvr's desired state: pure, no Neutron import, no I/O.

Neutron's objects arrive as the plain dicts of its API (a network, its subnets, a port, a
router and its interface ports, a floating IP); here they become entries of the topology
document that the northbound database holds (`flows.northbound.document`), keyed by
Neutron's own UUIDs:

- a tenant network (VXLAN) with one IPv4 subnet -> `networks.<network id>` with the
  subnet's cidr, the router's address on it as `gateway_ip` (else the subnet's), Neutron's
  MTU and VNI (its segmentation id);
- the external network (`router:external`) -> `external` (cidr and gateway of its subnet);
- a port of a VM (not a `network:*` device) bound to a host -> `vms.<port id>`, with its MAC,
  first IPv4 fixed IP, the host as its node and the floating IP associated with it;
- a router -> `routers.<router id>`: its interface networks, and with a gateway port its
  external IP; the SNAT candidates are left to the registered network nodes (`[]`).

Each entry carries Neutron's ids and revision numbers in `external_ids`; `put()` refuses
an entry older than the one held (`Stale`): a late update never undoes a newer one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flows import northbound
from flows.model import DEFAULT_MTU, DEFAULT_REMOTE_IP

REVISION = "neutron:revision_number"
OWNER = "neutron:owner"  # which Neutron resource kind an entry mirrors


# an update older than what the northbound database holds (`flows.northbound`'s: the
# O(change) write refuses it with the same words)
Stale = northbound.Stale


class Unsupported(ValueError):
    """A Neutron request dvr cannot serve (said to the user as Neutron's InvalidInput)."""


# --- what is dvr's ---------------------------------------------------------------------------
def is_external(network: Mapping[str, Any]) -> bool:
    return bool(network.get("router:external"))


def is_overlay(network: Mapping[str, Any]) -> bool:
    """A tenant network dvr routes: VXLAN (segments or the provider attributes)."""
    if is_external(network):
        return False
    segments = network.get("segments") or [{
        "provider:network_type": network.get("provider:network_type"),
        "provider:segmentation_id": network.get("provider:segmentation_id")}]
    return any(s.get("provider:network_type") == "vxlan" for s in segments)


def vni_of(network: Mapping[str, Any]) -> int | None:
    segments = network.get("segments") or [network]
    for s in segments:
        if s.get("provider:network_type") == "vxlan":
            return int(s["provider:segmentation_id"])
    return None


def ipv4_subnets(subnets: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted((s for s in subnets if int(s.get("ip_version", 4)) == 4),
                  key=lambda s: s["id"])


def is_vm_port(port: Mapping[str, Any]) -> bool:
    """A port a VM (or anything but Neutron's own devices) plugs: compute:*, or no owner."""
    return not str(port.get("device_owner") or "").startswith("network:")


def first_ipv4(port: Mapping[str, Any]) -> str | None:
    for f in port.get("fixed_ips") or []:
        if ipaddress.ip_address(f["ip_address"]).version == 4:
            return str(f["ip_address"])
    return None


def _ids(kind: str, resource: Mapping[str, Any], **more: Any) -> dict[str, str]:
    out = {OWNER: kind, REVISION: str(int(resource.get("revision_number") or 0))}
    if resource.get("name"):
        out[f"neutron:{kind}_name"] = str(resource["name"])[:255]
    for k, v in more.items():
        if v is not None:
            out[f"neutron:{k}"] = str(v)
    return out


# --- entries ---------------------------------------------------------------------------------
def network_entry(network: Mapping[str, Any], subnets: Iterable[Mapping[str, Any]],
                  router_ip: str | None = None) -> dict[str, Any] | None:
    """`networks.<id>`, or None while the network is not dvr's or has no IPv4 subnet."""
    if not is_overlay(network):
        return None
    v4 = ipv4_subnets(subnets)
    if not v4:
        return None
    subnet = v4[0]
    vni = vni_of(network)
    if vni is None:
        return None
    gateway = router_ip or subnet.get("gateway_ip")
    if not gateway:  # a subnet without a gateway: the first host, as the model's default
        gateway = str(ipaddress.IPv4Network(subnet["cidr"]).network_address + 1)
    return {"cidr": str(ipaddress.IPv4Network(subnet["cidr"])), "gateway_ip": str(gateway),
            "mtu": int(network.get("mtu") or DEFAULT_MTU), "vni": vni,
            "external_ids": _ids("network", network, subnet_id=subnet["id"],
                                 subnet_revision=int(subnet.get("revision_number") or 0))}


def external_entry(subnets: Iterable[Mapping[str, Any]],
                   held: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """`external` from the external network's IPv4 subnet; what only the cloud's operator
    knows (the upstream's `remote_ip`, `gateway_mac`) is kept from what is held."""
    v4 = ipv4_subnets(subnets)
    if not v4 or not v4[0].get("gateway_ip"):
        return None
    out = {"cidr": str(ipaddress.IPv4Network(v4[0]["cidr"])),
           "gateway_ip": str(v4[0]["gateway_ip"]),
           "remote_ip": str((held or {}).get("remote_ip") or DEFAULT_REMOTE_IP)}
    if held and held.get("gateway_mac"):
        out["gateway_mac"] = held["gateway_mac"]
    return out


def vm_entry(port: Mapping[str, Any], floating_ip: Mapping[str, Any] | None = None,
             nodes: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """`vms.<port id>`, or None while the port is not a VM's bound to a compute node."""
    host = port.get("binding:host_id")
    if not is_vm_port(port) or not host:
        return None
    if nodes is not None and (host not in nodes or nodes[host].get("role") != "compute"):
        return None
    ip = first_ipv4(port)
    if ip is None:
        return None
    spec: dict[str, Any] = {"node": host, "network": port["network_id"], "ip": ip,
                            "mac": str(port["mac_address"]).lower()}
    more: dict[str, Any] = {}
    if floating_ip and floating_ip.get("floating_ip_address"):
        spec["floating_ip"] = str(floating_ip["floating_ip_address"])
        more = {"fip_id": floating_ip["id"],
                "fip_revision": int(floating_ip.get("revision_number") or 0)}
    spec["external_ids"] = _ids("port", port, **more)
    return spec


def router_entry(router: Mapping[str, Any], interface_networks: Iterable[str],
                 has_external: bool = True) -> dict[str, Any]:
    """`routers.<id>`: its interfaces (network ids, in the order given), and SNAT through
    its gateway port's first IPv4 address."""
    spec: dict[str, Any] = {"interfaces": list(dict.fromkeys(interface_networks))}
    gw = router.get("external_gateway_info") or {}
    ext_ip = next((f["ip_address"] for f in gw.get("external_fixed_ips") or []
                   if ipaddress.ip_address(f["ip_address"]).version == 4), None)
    if gw and ext_ip and has_external and gw.get("enable_snat", True) is not False:
        spec.update(external_gateway=True, external_ip=str(ext_ip), snat_nodes=[])
    spec["external_ids"] = _ids("router", router)
    return spec


# --- edits of the document -------------------------------------------------------------------
def revision_of(entry: Mapping[str, Any] | None, key: str = REVISION) -> int:
    return northbound.revision_of(dict(entry) if entry else None, key)


def put(doc: dict[str, Any], section: str, name: str, entry: Mapping[str, Any] | None,
        revisions: Iterable[str] = (REVISION,)) -> bool:
    """Set (or, with None, remove) `doc[section][name]`; refuse (`Stale`) an entry whose
    revision numbers are older than the held one's. True when it changed anything."""
    held = doc.setdefault(section, {}).get(name)
    if entry is not None:
        northbound.check_revisions(section, name, dict(entry), held, revisions)
    if entry is None:
        return doc[section].pop(name, None) is not None
    if held == entry:
        return False
    doc[section][name] = dict(entry)
    return True


# --- a whole cloud (the sync) ------------------------------------------------------------
@dataclass
class NeutronState:
    """What Neutron holds, as lists of its API dicts."""
    networks: list[dict[str, Any]] = field(default_factory=list)
    subnets: list[dict[str, Any]] = field(default_factory=list)
    ports: list[dict[str, Any]] = field(default_factory=list)
    routers: list[dict[str, Any]] = field(default_factory=list)
    floating_ips: list[dict[str, Any]] = field(default_factory=list)


def router_interfaces(ports: Iterable[Mapping[str, Any]]) -> dict[str, list[tuple[str, str]]]:
    """Router id -> its (network id, IPv4 address) interfaces, from the interface ports."""
    out: dict[str, list[tuple[str, str]]] = {}
    for p in sorted(ports, key=lambda p: (p.get("created_at") or "", p["id"])):
        if p.get("device_owner") in ("network:router_interface",
                                     "network:router_interface_distributed"):
            ip = first_ipv4(p)
            if ip and p.get("device_id"):
                out.setdefault(p["device_id"], []).append((p["network_id"], ip))
    return out


def desired(state: NeutronState, nodes: Mapping[str, Any],
            held_external: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The document Neutron's state makes, on the `nodes` registered in the northbound."""
    subnets: dict[str, list[dict[str, Any]]] = {}
    for s in state.subnets:
        subnets.setdefault(s["network_id"], []).append(s)
    interfaces = router_interfaces(state.ports)
    router_ip: dict[str, str] = {}
    for itfs in interfaces.values():
        for net, ip in itfs:
            router_ip.setdefault(net, ip)
    doc: dict[str, Any] = {"nodes": dict(nodes), "networks": {}, "routers": {}, "vms": {}}
    external = None
    for net in sorted(state.networks, key=lambda n: (n.get("created_at") or "", n["id"])):
        if is_external(net):
            external = external or external_entry(subnets.get(net["id"], []), held_external)
            continue
        entry = network_entry(net, subnets.get(net["id"], []), router_ip.get(net["id"]))
        if entry is not None:
            doc["networks"][net["id"]] = entry
    if external:
        doc["external"] = external
    for r in sorted(state.routers, key=lambda r: (r.get("created_at") or "", r["id"])):
        nets = [n for n, _ in interfaces.get(r["id"], []) if n in doc["networks"]]
        doc["routers"][r["id"]] = router_entry(r, nets, external is not None)
    fips = {f["port_id"]: f for f in state.floating_ips if f.get("port_id")}
    for p in sorted(state.ports, key=lambda p: p["id"]):
        if p["network_id"] not in doc["networks"]:
            continue
        entry = vm_entry(p, fips.get(p["id"]), nodes)
        if entry is not None:
            doc["vms"][p["id"]] = entry
    return doc


# --- the difference between two documents (what the sync reports and repairs) ------------
@dataclass(frozen=True)
class Difference:
    section: str
    name: str
    kind: str  # "missing" (in Neutron, not in the northbound), "extra", "different"
    detail: str = ""

    def __str__(self) -> str:
        what = {"missing": "in Neutron, missing from the northbound",
                "extra": "in the northbound, not in Neutron",
                "different": "differs"}[self.kind]
        return f"{self.section}.{self.name}: {what}{': ' + self.detail if self.detail else ''}"


def _comparable(section: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(entry)
    if section == "routers" and out.get("snat_nodes") == []:
        out.pop("snat_nodes")
    return out


def differences(want: Mapping[str, Any], held: Mapping[str, Any]) -> list[Difference]:
    """What differs between the document Neutron makes (`want`) and the one held, for the
    sections Neutron owns (networks, routers, vms, and external once it has one)."""
    out: list[Difference] = []
    # the provider network is Neutron's once Neutron has an external network; before, it
    # is the operator's (registered with the nodes)
    if "external" in want and want["external"] != held.get("external"):
        kind = "missing" if "external" not in held else "different"
        out.append(Difference("external", "external", kind))
    for section in ("networks", "routers", "vms"):
        w, h = want.get(section, {}), held.get(section, {})
        for name in sorted(set(w) | set(h)):
            if name not in h:
                out.append(Difference(section, name, "missing"))
            elif name not in w:
                out.append(Difference(section, name, "extra"))
            else:
                a, b = _comparable(section, w[name]), _comparable(section, h[name])
                if a != b:
                    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                    out.append(Difference(section, name, "different", ", ".join(keys)))
    return out


def repaired(want: Mapping[str, Any], held: Mapping[str, Any]) -> dict[str, Any]:
    """The held document with Neutron's sections replaced by what Neutron makes; nodes,
    and the HA chains the scheduler keeps, are the northbound's own."""
    out = {k: v for k, v in held.items()}
    out["nodes"] = dict(held.get("nodes", {}))
    for section in ("networks", "routers", "vms"):
        out[section] = {}
        for name, entry in want.get(section, {}).items():
            h = held.get(section, {}).get(name)
            if section == "routers" and h is not None and \
                    _comparable(section, entry) == _comparable(section, h):
                entry = h  # keep an explicit SNAT candidacy the operator gave
            out[section][name] = entry
    if "external" in want:
        out["external"] = want["external"]
    return out
