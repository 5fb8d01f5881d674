"""Random changes of a cloud's desired state and of a node's switch, for the incremental
planner and model tests: the daily ones (VMs added, removed and moved, floating IPs set,
moved and removed, router interfaces added and removed, networks and routers added and
removed, nodes added, SNAT chains changed) and changes the model refuses (an address
outside its network, a duplicate MAC or floating IP, a VM on a network node, a network
still in use removed).

A change edits a topology document in place (`mutate()`); the documents hold every
allocated value written out (as the northbound database does) when `effective` is set.
"""

from __future__ import annotations

import ipaddress
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dvr.lab.generate import generate
from flows.model import Topology, build_topology, to_dict
from flows.nat import Binding
from flows.planner import NodePorts, snat_candidates

Doc = dict[str, Any]


def copy(doc: Doc) -> Doc:
    return json.loads(json.dumps(doc))


def shapes() -> dict[str, Doc]:
    """Clouds of several shapes, every allocated value written out."""
    out = {
        # 4 computes, 2 network nodes; routers with and without a gateway, SNAT chains of
        # one or two, floating IPs, an isolated network
        "mixed": generate(60, computes=4, network_nodes=2, networks=7, per_router=[2, 2, 2],
                          isolated=1, external_routers=2, snat_nodes=(1, 2), fip_every=3,
                          tunnel_ips="192.0.2.1", seed=3),
        # each compute on a few networks only; overlapping CIDRs behind different routers
        "sparse": generate(50, computes=5, network_nodes=3, networks=8, per_router=2,
                           overlapping=1, per_compute=(1, 2), fip_every=2, fip_computes=3,
                           snat_nodes=(1, 3), tunnel_ips="192.0.2.1", seed=5),
        # no external network at all
        "private": generate(30, computes=3, network_nodes=1, networks=4, per_router=[3],
                            isolated=1, external=None, tunnel_ips="192.0.2.1", seed=7),
    }
    return {k: to_dict(build_topology(v, k)) for k, v in out.items()}


def edits(before: Doc, after: Doc) -> tuple[dict[str, Any], Doc | None]:
    """What the agent's source hands its model for a change from `before` to `after`:
    the VMs whose rows changed (None: removed), and the document without VMs when any
    other row changed (copies: the model keeps them)."""
    vms = {n: copy(after["vms"][n]) if n in after["vms"] else None
           for n in before["vms"].keys() | after["vms"].keys()
           if before["vms"].get(n) != after["vms"].get(n)}
    infra_b = {k: v for k, v in before.items() if k != "vms"}
    infra_a = {k: v for k, v in after.items() if k != "vms"}
    return vms, (copy(infra_a) if infra_a != infra_b else None)


@dataclass
class Cloud:
    """A document and the switches of the nodes under test (what is plugged on each)."""

    doc: Doc
    rng: random.Random
    effective: bool = True
    counter: int = 0
    plugged: dict[str, dict[str, int]] = field(default_factory=dict)  # node -> vm -> ofport
    tunnels: dict[str, dict[str, int]] = field(default_factory=dict)  # node -> peer -> ofport
    claims: dict[str, frozenset[str]] = field(default_factory=dict)
    held: dict[str, frozenset[Binding]] = field(default_factory=dict)
    trusted: dict[str, frozenset[str]] = field(default_factory=dict)
    provider: int | None = 60000
    gateway_mac: str | None = "02:00:00:00:00:01"

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    # --- the switches ---------------------------------------------------------------------
    def follow(self, topo: Topology) -> None:
        """Plug newly placed VMs on their node's switch (most of the time: a VM may also be
        waiting to be plugged), unplug VMs gone or moved (not always at once: a VM moving
        is plugged on both nodes for a moment)."""
        for node in list(self.plugged):
            have = self.plugged[node]
            for vm in list(have):
                spec = topo.vms.get(vm)
                if (spec is None or spec.node != node) and self.rng.random() < 0.8:
                    del have[vm]
            for vm in topo.vms.values():
                if vm.node == node and vm.name not in have and self.rng.random() < 0.9:
                    have[vm.name] = 1 + max(have.values(), default=0)
            tun = self.tunnels[node]
            for peer in topo.nodes:
                if peer != node and peer not in tun and self.rng.random() < 0.9:
                    tun[peer] = 100 + topo.nodes[peer].index

    def ports(self, topo: Topology, node: str) -> NodePorts:
        ext = topo.external is not None
        return NodePorts(
            {v: o for v, o in self.plugged[node].items() if v in topo.vms},
            {p: o for p, o in self.tunnels[node].items() if p in topo.nodes},
            provider=self.provider if ext else None,
            gateway_mac=self.gateway_mac if ext else None,
            snat=self.claims.get(node, frozenset()), held=self.held.get(node, frozenset()),
            trusted=self.trusted.get(node, frozenset()))

    def switch_change(self, topo: Topology, node: str) -> str:
        """One change of a node's switch or of what it decided (claims, translations)."""
        rng = self.rng
        kind = rng.choice(["unplug", "plug", "ofport", "tunnel-ofport", "tunnel-gone",
                           "claims", "held", "trusted"])
        have = self.plugged[node]
        if kind == "unplug" and have:
            del have[rng.choice(sorted(have))]
        elif kind == "plug":
            vm = rng.choice(sorted(topo.vms))  # maybe a VM the topology puts elsewhere
            have[vm] = 1 + max(have.values(), default=0)
        elif kind == "ofport" and have:
            have[rng.choice(sorted(have))] = 500 + rng.randrange(100)
        elif kind == "tunnel-ofport" and self.tunnels[node]:
            self.tunnels[node][rng.choice(sorted(self.tunnels[node]))] = 700 + rng.randrange(99)
        elif kind == "tunnel-gone" and self.tunnels[node]:
            del self.tunnels[node][rng.choice(sorted(self.tunnels[node]))]
        elif kind == "claims":
            cands = sorted(snat_candidates(topo, node))
            self.claims[node] = frozenset(r for r in cands if rng.random() < 0.5)
        elif kind == "held":
            cands = sorted(snat_candidates(topo, node))
            self.held[node] = frozenset(
                Binding(r, 17, "10.0.0.10", 4000 + i, "198.51.100.10", 53, 30000 + i)
                for i, r in enumerate(cands) if rng.random() < 0.5)
        elif kind == "trusted":  # the switch restarted: peers trusted until their BFD is up
            peers = sorted(self.tunnels[node])
            self.trusted[node] = frozenset(p for p in peers if rng.random() < 0.5)
        return f"{node}: {kind}"

    # --- the desired state ----------------------------------------------------------------
    def mutate(self) -> str:
        """Edit the document by one random change (maybe one the model refuses); its name."""
        rng = self.rng
        kinds: list[tuple[str, Callable[[], bool]]] = [
            ("vm-add", self._vm_add), ("vm-add", self._vm_add), ("vm-del", self._vm_del),
            ("vm-move", self._vm_move), ("fip-set", self._fip_set), ("fip-move", self._fip_move),
            ("fip-del", self._fip_del), ("if-add", self._if_add), ("if-del", self._if_del),
            ("net-add", self._net_add), ("net-del", self._net_del),
            ("router-add", self._router_add), ("router-del", self._router_del),
            ("node-add", self._node_add), ("chain", self._chain), ("gateway", self._gateway),
            ("bad-ip", self._bad_ip), ("dup-mac", self._dup_mac), ("dup-fip", self._dup_fip),
            ("vm-on-network-node", self._vm_on_network_node),
            ("router-mac", self._router_mac), ("net-add-overlap", self._net_add_overlap),
            ("net-del-busy", self._net_del_busy),
        ]
        while True:
            name, change = rng.choice(kinds)
            if change():  # else it does not apply to this document: draw another
                return name

    def _computes(self) -> list[str]:
        return [n for n, s in self.doc["nodes"].items() if s.get("role", "compute") == "compute"]

    def _free_fip(self) -> str | None:
        ext = self.doc.get("external")
        if not ext:
            return None
        used = {v.get("floating_ip") for v in self.doc["vms"].values()}
        used |= {r.get("external_ip") for r in self.doc["routers"].values()}
        used |= {ext["gateway_ip"]}
        hosts = list(ipaddress.IPv4Network(ext["cidr"]).hosts())
        for _ in range(50):
            ip = str(self.rng.choice(hosts[:400]))
            if ip not in used:
                return ip
        return None

    def _free_ip(self, net: str) -> str | None:
        cidr = ipaddress.IPv4Network(self.doc["networks"][net]["cidr"])
        used = {v["ip"] for v in self.doc["vms"].values() if v["network"] == net and "ip" in v}
        used.add(self.doc["networks"][net]["gateway_ip"])
        for _ in range(50):
            ip = str(cidr.network_address + self.rng.randrange(2, min(cidr.num_addresses - 1,
                                                                       250)))
            if ip not in used:
                return ip
        return None

    def _free_mac(self) -> str:
        return "fa:16:3e:" + ":".join(f"{self.rng.randrange(256):02x}" for _ in range(3))

    def _vm_add(self) -> bool:
        computes, nets = self._computes(), sorted(self.doc["networks"])
        if not computes or not nets:
            return False
        net = self.rng.choice(nets)
        spec: dict[str, Any] = {"node": self.rng.choice(computes), "network": net}
        if self.effective:
            ip = self._free_ip(net)
            if ip is None:
                return False
            spec["ip"], spec["mac"] = ip, self._free_mac()
        if self.rng.random() < 0.3 and (fip := self._free_fip()):
            spec["floating_ip"] = fip  # refused when the network has no gateway
        self.doc["vms"][self.fresh("x")] = spec
        return True

    def _vm(self, test: Callable[[dict[str, Any]], bool] = lambda v: True) -> str | None:
        names = sorted(n for n, v in self.doc["vms"].items() if test(v))
        return self.rng.choice(names) if names else None

    def _vm_del(self) -> bool:
        vm = self._vm()
        if vm is None:
            return False
        del self.doc["vms"][vm]
        return True

    def _vm_move(self) -> bool:
        vm, computes = self._vm(), self._computes()
        if vm is None or len(computes) < 2:
            return False
        self.doc["vms"][vm]["node"] = self.rng.choice(
            [c for c in computes if c != self.doc["vms"][vm]["node"]])
        return True

    def _fip_set(self) -> bool:
        vm, fip = self._vm(lambda v: "floating_ip" not in v), self._free_fip()
        if vm is None or fip is None:
            return False
        self.doc["vms"][vm]["floating_ip"] = fip
        return True

    def _fip_move(self) -> bool:
        src = self._vm(lambda v: "floating_ip" in v)
        dst = self._vm(lambda v: "floating_ip" not in v)
        if src is None or dst is None:
            return False
        self.doc["vms"][dst]["floating_ip"] = self.doc["vms"][src].pop("floating_ip")
        return True

    def _fip_del(self) -> bool:
        vm = self._vm(lambda v: "floating_ip" in v)
        if vm is None:
            return False
        del self.doc["vms"][vm]["floating_ip"]
        return True

    def _if_add(self) -> bool:
        routers = sorted(self.doc["routers"])
        if not routers:
            return False
        router = self.rng.choice(routers)
        on = {n for r in self.doc["routers"].values() for n in r["interfaces"]}
        free = sorted(set(self.doc["networks"]) - on)
        if free and self.rng.random() < 0.85:
            net = self.rng.choice(free)
            cidr = self.doc["networks"][net].get("cidr")
            overlapping = [r for r in routers if any(
                self.doc["networks"].get(n, {}).get("cidr") == cidr
                for n in self.doc["routers"][r]["interfaces"])]
            if overlapping and self.rng.random() < 0.5:  # refused: overlaps on one router
                router = self.rng.choice(overlapping)
        else:  # already on a router (refused), sometimes this one
            net = self.rng.choice(sorted(self.doc["networks"]))
        self.doc["routers"][router]["interfaces"].append(net)
        return True

    def _net_add_overlap(self) -> bool:
        """A network with the CIDR of a routed one (valid until it joins that router)."""
        routed = sorted({n for r in self.doc["routers"].values() for n in r["interfaces"]})
        if not routed:
            return False
        spec = copy(self.doc["networks"][self.rng.choice(routed)])
        spec.pop("external_ids", None)
        if self.effective:
            spec["vni"] = 1 + self.rng.randrange((1 << 24) - 2)
        else:
            spec.pop("vni", None)
        self.doc["networks"][self.fresh("o")] = spec
        return True

    def _net_del_busy(self) -> bool:
        """A network on no router removed while VMs are on it (refused)."""
        on = {n for r in self.doc["routers"].values() for n in r["interfaces"]}
        busy = sorted(({v["network"] for v in self.doc["vms"].values()} - on)
                      & set(self.doc["networks"]))
        if not busy:
            return False
        del self.doc["networks"][self.rng.choice(busy)]
        return True

    def _router_mac(self) -> bool:
        """A VM given the MAC of a router's interface or of a node (refused)."""
        vm = self._vm()
        try:
            topo = build_topology(self.doc)
        except ValueError:
            return False
        macs = sorted({i.mac for r in topo.routers.values() for i in r.interfaces}
                      | {n.external_mac for n in topo.nodes.values()})
        if vm is None or not macs:
            return False
        self.doc["vms"][vm]["mac"] = self.rng.choice(macs)
        return True

    def _if_del(self) -> bool:
        routers = sorted(r for r, s in self.doc["routers"].items() if s["interfaces"])
        if not routers:
            return False
        itfs = self.doc["routers"][self.rng.choice(routers)]["interfaces"]
        itfs.remove(self.rng.choice(itfs))
        return True

    def _net_add(self) -> bool:
        name = self.fresh("m")
        spec: dict[str, Any] = {"cidr": f"10.{200 + self.counter % 50}.{self.counter % 250}.0/24"}
        if self.effective:
            net = ipaddress.IPv4Network(spec["cidr"])
            spec.update(gateway_ip=str(net.network_address + 1), mtu=1450,
                        vni=1 + self.rng.randrange((1 << 24) - 2))
        self.doc["networks"][name] = spec
        return True

    def _net_del(self) -> bool:
        nets = sorted(self.doc["networks"])
        if not nets:
            return False
        used = {v["network"] for v in self.doc["vms"].values()}
        free = [n for n in nets if n not in used]
        net = self.rng.choice(free if free and self.rng.random() < 0.8 else nets)
        del self.doc["networks"][net]
        for r in self.doc["routers"].values():  # mostly as an operator would
            if net in r["interfaces"] and self.rng.random() < 0.8:
                r["interfaces"].remove(net)
        return True

    def _router_add(self) -> bool:
        on = {n for r in self.doc["routers"].values() for n in r["interfaces"]}
        free = sorted(set(self.doc["networks"]) - on)
        spec: dict[str, Any] = {"interfaces": self.rng.sample(free, min(len(free), 2))}
        if "external" in self.doc and self.rng.random() < 0.6:
            spec["external_gateway"] = True
            if self.effective:
                spec["external_ip"] = self._free_fip()
                spec["snat_nodes"] = [n for n, s in self.doc["nodes"].items()
                                      if s.get("role") == "network"][:2]
        self.doc["routers"][self.fresh("q")] = spec
        return True

    def _router_del(self) -> bool:
        routers = sorted(self.doc["routers"])
        if not routers:
            return False
        del self.doc["routers"][self.rng.choice(routers)]
        return True

    def _node_add(self) -> bool:
        if self.rng.random() < 0.5:  # rare in a cloud's life
            return False
        n = len(self.doc["nodes"])
        role = "network" if self.rng.random() < 0.3 else "compute"
        self.doc["nodes"][self.fresh("h")] = {"role": role, "tunnel_ip": f"192.0.2.{100 + n}"}
        return True

    def _chain(self) -> bool:
        routers = sorted(r for r, s in self.doc["routers"].items() if s.get("snat_nodes"))
        if not routers:
            return False
        spec = self.doc["routers"][self.rng.choice(routers)]
        net_nodes = [n for n, s in self.doc["nodes"].items() if s.get("role") == "network"]
        spec["snat_nodes"] = self.rng.sample(net_nodes, self.rng.randint(1, len(net_nodes)))
        return True

    def _gateway(self) -> bool:
        routers = sorted(self.doc["routers"])
        if not routers or "external" not in self.doc:
            return False
        spec = self.doc["routers"][self.rng.choice(routers)]
        if spec.get("external_gateway"):  # refused while a floating IP is behind it
            for key in ("external_gateway", "external_ip", "snat_nodes"):
                spec.pop(key, None)
        else:
            spec["external_gateway"] = True
            spec["external_ip"] = self._free_fip()
            net_nodes = [n for n, s in self.doc["nodes"].items() if s.get("role") == "network"]
            spec["snat_nodes"] = net_nodes[:1]
        return True

    def _bad_ip(self) -> bool:
        vm = self._vm()
        if vm is None:
            return False
        self.doc["vms"][vm]["ip"] = "192.168.255.77"
        return True

    def _dup_mac(self) -> bool:
        a, b = self._vm(), self._vm()
        if a is None or b is None or a == b or "mac" not in self.doc["vms"][b]:
            return False
        self.doc["vms"][a]["mac"] = self.doc["vms"][b]["mac"]
        return True

    def _dup_fip(self) -> bool:
        src = self._vm(lambda v: "floating_ip" in v)
        dst = self._vm(lambda v: "floating_ip" not in v)
        if src is None or dst is None:
            return False
        self.doc["vms"][dst]["floating_ip"] = self.doc["vms"][src]["floating_ip"]
        return True

    def _vm_on_network_node(self) -> bool:
        vm = self._vm()
        nodes = [n for n, s in self.doc["nodes"].items() if s.get("role") == "network"]
        if vm is None or not nodes:
            return False
        self.doc["vms"][vm]["node"] = self.rng.choice(nodes)
        return True
