"""The lab driven by Neutron: the topology's objects created through Neutron's REST API, as
an operator (and Nova) would, and the names the lab gives them.

`create()` makes the external network (flat, `router:external`), each tenant network
(VXLAN, its VNI allocated by Neutron) with one subnet, each router with its gateway and
interfaces, each VM's port (named after the VM, bound to its node as Nova binds it) and
each floating IP; it returns the Neutron id of every object by its name in the topology.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from typing import Any

from dvr.lab import LabError
from flows.model import Topology

EXTERNAL_NETWORK = "public"
EXTERNAL_PHYSNET = "physnet-ext"


class NeutronApi:
    """Neutron's REST API, no authentication (`auth_strategy = noauth`)."""

    def __init__(self, url: str, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict[str, Any] | None = None
             ) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}/v2.0/{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                text = resp.read()
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read()).get("NeutronError", {}).get("message", "")
            except ValueError:
                detail = ""
            raise LabError(f"Neutron: {method} {path}: {exc.code} {detail}".rstrip()) from None
        except OSError as exc:
            raise LabError(f"Neutron at {self.url}: {method} {path}: {exc}") from None
        return json.loads(text) if text else {}

    def create(self, kind: str, **attrs: Any) -> dict[str, Any]:
        return self.call("POST", f"{kind}s", {kind: attrs})[kind]

    def list(self, collection: str, **filters: str) -> list[dict[str, Any]]:
        query = "&".join(f"{k}={v}" for k, v in filters.items())
        return self.call("GET", f"{collection}{'?' + query if query else ''}")[collection]


def create(api: NeutronApi, topo: Topology, raw: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Create the topology's objects; returns {"networks"|"subnets"|"routers"|"vms"|
    "floating_ips": {name: Neutron id}}. Values the file gives (IPs, MACs, MTUs, external
    and floating IPs) are asked of Neutron; the rest Neutron allocates."""
    ids: dict[str, dict[str, str]] = {k: {} for k in ("networks", "subnets", "routers", "vms",
                                                      "floating_ips")}
    raw_nets = raw.get("networks") or {}
    raw_vms = raw.get("vms") or {}
    raw_routers = raw.get("routers") or {}
    ext_net = None
    if topo.external is not None:
        e = topo.external
        ext_net = api.create("network", name=EXTERNAL_NETWORK, **{
            "router:external": True, "provider:network_type": "flat",
            "provider:physical_network": EXTERNAL_PHYSNET})
        api.create("subnet", name=f"{EXTERNAL_NETWORK}-v4", network_id=ext_net["id"],
                   ip_version=4, cidr=str(e.cidr), gateway_ip=str(e.gateway_ip),
                   enable_dhcp=False)
        ids["networks"][EXTERNAL_NETWORK] = ext_net["id"]
    for name, net in topo.networks.items():
        spec = raw_nets.get(name) or {}
        attrs: dict[str, Any] = {"name": name, "provider:network_type": "vxlan"}
        if "mtu" in spec:
            attrs["mtu"] = net.mtu
        if "vni" in spec:
            attrs["provider:segmentation_id"] = net.vni
        n = api.create("network", **attrs)
        s = api.create("subnet", name=f"{name}-v4", network_id=n["id"], ip_version=4,
                       cidr=str(net.cidr), gateway_ip=str(net.gateway_ip), enable_dhcp=False)
        ids["networks"][name], ids["subnets"][name] = n["id"], s["id"]
    for name, router in topo.routers.items():
        attrs = {"name": name}
        if router.external_gateway and ext_net is not None:
            gw: dict[str, Any] = {"network_id": ext_net["id"], "enable_snat": True}
            if "external_ip" in (raw_routers.get(name) or {}):
                gw["external_fixed_ips"] = [{"ip_address": str(router.external_ip)}]
            attrs["external_gateway_info"] = gw
        r = api.create("router", **attrs)
        ids["routers"][name] = r["id"]
        for itf in router.interfaces:
            api.call("PUT", f"routers/{r['id']}/add_router_interface",
                     {"subnet_id": ids["subnets"][itf.network]})
    for name, vm in topo.vms.items():
        spec = raw_vms.get(name) or {}
        fixed: dict[str, Any] = {"subnet_id": ids["subnets"][vm.network]}
        if "ip" in spec:
            fixed["ip_address"] = str(vm.ip)
        attrs = {"name": name, "network_id": ids["networks"][vm.network],
                 "fixed_ips": [fixed], "device_owner": "compute:nova",
                 "device_id": str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{name}.instance")),
                 "binding:host_id": vm.node, "port_security_enabled": False}
        if "mac" in spec:
            attrs["mac_address"] = vm.mac
        p = api.create("port", **attrs)
        if p.get("binding:vif_type") in ("binding_failed", "unbound"):
            raise LabError(f"Neutron could not bind port {name} on {vm.node} "
                           f"({p.get('binding:vif_type')}): is its dvr agent alive?")
        ids["vms"][name] = p["id"]
        if vm.floating_ip is not None and ext_net is not None:
            f = api.create("floatingip", floating_network_id=ext_net["id"],
                           floating_ip_address=str(vm.floating_ip), port_id=p["id"])
            ids["floating_ips"][name] = f["id"]
    return ids
