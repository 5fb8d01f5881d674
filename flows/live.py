"""A topology kept up to date object by object, as an agent's copy of the northbound changes.

`build_topology()` reads, checks and allocates a whole document: O(cloud) for every change.
`LiveTopology` gives the same model (equal to `build_topology()` of the same document) for a
document changed a few objects at a time:

- a VM (a Port row) added, changed or removed is checked alone against indexes of the
  cloud's VMs (addresses per network, MACs, port ids, floating IPs) and against the rest of
  the model; only its model object is made anew, every other object is the previous one;
- a change of the nodes, networks or routers (small tables) builds them anew (the model's
  own code, on the document without its VMs: the allocations of router keys, zones and
  MACs depend on each other), then checks again only the VMs they can affect (those on a
  changed node or network, the floating IPs behind a changed router, a MAC now a router's
  or a node's) and keeps every VM object;
- what the model would allocate for a VM (an address or MAC left out, as the northbound
  database never does), a router's external IP left out, a changed external network, and
  any refused document are handed to `build_topology()` itself: a refused change raises its
  `TopologyError` and the last valid model stays, and the next changes are built whole
  until the document is valid again.

`change` says what the last update changed (`flows.incremental.Change`), for the planner.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from flows.incremental import Change
from flows.model import (
    DEFAULT_MTU,
    MAC_RE,
    MAX_VNI,
    UUID_RE,
    VM,
    Network,
    RouterInterface,
    Topology,
    TopologyError,
    _Checker,
    _mac_for,
    build_topology,
    port_id_for,
)
from flows.planner import Scope

VM_KEYS = ("node", "network", "ip", "mac", "floating_ip", "port_id", "external_ids")
Doc = dict[str, Any]


class Layered(Mapping[str, Any]):
    """An immutable mapping made of a shared base dict and the few entries changed since
    (`changed()` gives a new one, O(those entries)): a new topology's VMs without copying
    the cloud's. The base is merged anew once the changes outgrow the square root of its
    size, so that lookups stay two dict lookups."""

    __slots__ = ("_base", "_len", "_top")
    _GONE = object()

    def __init__(self, base: Mapping[str, Any], top: dict[str, Any] | None = None,
                 length: int | None = None):
        self._base = base
        self._top = top or {}
        self._len = len(base) if length is None else length

    def changed(self, updates: Mapping[str, Any]) -> Layered:
        """A new mapping with these entries set (the value `None`: removed)."""
        top = dict(self._top)
        n = self._len
        for k, v in updates.items():
            had = k in self
            if v is None:
                if had:
                    top[k] = self._GONE
                    n -= 1
            else:
                top[k] = v
                n += not had
        if len(top) * len(top) > len(self._base) + 4096:
            merged = dict(self._base)
            for k, v in top.items():
                if v is self._GONE:
                    merged.pop(k, None)
                else:
                    merged[k] = v
            return Layered(merged)
        return Layered(self._base, top, n)

    def __getitem__(self, key: str) -> Any:
        v = self._top.get(key, self)
        if v is self:
            return self._base[key]
        if v is self._GONE:
            raise KeyError(key)
        return v

    def get(self, key: str, default: Any = None) -> Any:
        v = self._top.get(key, self)
        if v is self:
            return self._base.get(key, default)
        return default if v is self._GONE else v

    def __contains__(self, key: object) -> bool:
        v = self._top.get(key, self)  # type: ignore[call-overload]
        if v is self:
            return key in self._base
        return v is not self._GONE

    def __iter__(self) -> Iterator[str]:
        top = self._top
        for k in self._base:
            if top.get(k, self) is not self._GONE:
                yield k
        for k, v in top.items():
            if v is not self._GONE and k not in self._base:
                yield k

    def __len__(self) -> int:
        return self._len


class _Refused(Exception):
    """A change the incremental checks refuse (the whole build says why)."""


class LiveTopology:
    """The model of a document that changes a few objects at a time (see the module)."""

    def __init__(self, source: str = "northbound"):
        self.source = source
        self.topology: Topology | None = None  # the last valid model
        self.change: Change | None = None  # what the last update changed (None: unknown)
        self.infra: Doc = {}  # the document without its VMs, as last given
        self.vms: dict[str, Any] = {}  # the document's VMs, as last given
        self._valid = False  # whether the document as given is the model's
        self._simple = False  # ... and every VM's and router's address is explicit
        self.by_net: dict[str, set[str]] = {}
        self.by_node: dict[str, set[str]] = {}
        self.builds = 0  # whole builds so far (the first, refusals, what is not explicit)
        # updates by the way they went: "vms" (only VMs), "networks", "interfaces" (one
        # router's), "small tables" (built anew without the VMs), "whole"
        self.paths: dict[str, int] = {}

    @property
    def valid(self) -> bool:
        """Whether the document as last given is the model's (not refused)."""
        return self._valid

    # --- whole documents ------------------------------------------------------------------
    def load(self, doc: Doc) -> Topology:
        """The model of a whole document (`build_topology()`); raises when refused."""
        self.infra = {k: v for k, v in doc.items() if k != "vms"}
        self.vms = dict(doc.get("vms") or {})
        return self._build_whole()

    def _build_whole(self) -> Topology:
        before = self.topology
        self._valid = False
        self.builds += 1
        self._count("whole")
        topo = build_topology({**self.infra, "vms": self.vms}, self.source)
        if before is not None:  # the VMs that did not change stay the same objects
            vms = {n: o if (o := before.vms.get(n)) == vm else vm for n, vm in topo.vms.items()}
            topo = Topology(source=topo.source, nodes=topo.nodes, external=topo.external,
                            networks=topo.networks, routers=topo.routers, vms=vms,
                            _router_of=topo._router_of, _by_port=topo._by_port)
        self._index(topo)
        self.topology = topo
        self._valid = True
        self.change = None if before is None else _change(before, topo)
        return topo

    def _index(self, topo: Topology) -> None:
        self._simple = (isinstance(self.vms, dict) and all(
            isinstance(s, dict) and "ip" in s and "mac" in s for s in self.vms.values())
            and not _pending_external_ip(self.infra))
        self._ips: dict[tuple[str, ipaddress.IPv4Address], str] = {}
        self._macs: dict[str, str] = {}
        self._ports: dict[str, str] = {}
        self._fips: dict[ipaddress.IPv4Address, str] = {}
        self.by_net: dict[str, set[str]] = {}
        self.by_node: dict[str, set[str]] = {}
        for vm in topo.vms.values():
            self._add(vm)
        self._infra_indexes(topo)

    def _infra_indexes(self, topo: Topology) -> None:
        """The addresses of the nodes and routers: their MACs (with each label's own MAC,
        as if alone: when no two of those collide, a label added or removed moves no
        other), the routers' external IPs, the networks' VNIs."""
        self._infra_macs = _infra_macs(topo)
        self._ext_ips = _external_ips(topo)
        self._vnis = {net.vni: net.name for net in topo.networks.values()}
        self._natural = {label: _natural_mac(label) for label in _labels(topo)}
        self._collision_free = len(set(self._natural.values())) == len(self._natural)
        # the networks the routers' specs name, and how many times
        self._listed: dict[str, int] = {}
        routers = self.infra.get("routers")
        for spec in (routers.values() if isinstance(routers, dict) else ()):
            self._list(spec, 1)

    def _list(self, spec: Any, sign: int) -> None:
        itfs = spec.get("interfaces") if isinstance(spec, dict) else None
        for net in itfs if isinstance(itfs, list) else ():
            if isinstance(net, str):
                n = self._listed.get(net, 0) + sign
                if n:
                    self._listed[net] = n
                else:
                    del self._listed[net]

    def _add(self, vm: VM) -> None:
        self._ips[(vm.network, vm.ip)] = vm.name
        self._macs[vm.mac] = vm.name
        self._ports[vm.port_id] = vm.name
        if vm.floating_ip is not None:
            self._fips[vm.floating_ip] = vm.name
        self.by_net.setdefault(vm.network, set()).add(vm.name)
        self.by_node.setdefault(vm.node, set()).add(vm.name)

    def _remove(self, vm: VM) -> None:
        for index, key in ((self._ips, (vm.network, vm.ip)), (self._macs, vm.mac),
                           (self._ports, vm.port_id), (self._fips, vm.floating_ip)):
            if index.get(key) == vm.name:  # type: ignore[attr-defined]
                del index[key]  # type: ignore[attr-defined]
        for by, key in ((self.by_net, vm.network), (self.by_node, vm.node)):
            names = by.get(key)
            if names is not None:
                names.discard(vm.name)
                if not names:
                    del by[key]

    # --- changes --------------------------------------------------------------------------
    def update(self, vms: Mapping[str, Any] | None = None, infra: Doc | None = None
               ) -> Topology:
        """The model after these changes of the document: `vms`, VM name -> its spec (None:
        removed); `infra`, the whole document without its VMs when any of it changed.
        Raises `TopologyError` when the document is refused (the last model stays)."""
        prev = self.infra
        if infra is not None:
            if infra.get("external") != self.infra.get("external"):
                self._valid = False  # every floating IP depends on it: built whole
            self.infra = infra
        for name, spec in (vms or {}).items():
            if spec is None:
                self.vms.pop(name, None)
            else:
                self.vms[name] = spec
        if not self._valid or not self._simple or self.topology is None:
            return self._build_whole()
        try:
            return self._update(dict(vms or {}), infra, prev)
        except _Refused:
            return self._build_whole()

    def _update(self, vms: dict[str, Any], infra: Doc | None, prev: Doc) -> Topology:
        old = self.topology
        assert old is not None
        base, infra_change = old, Change()
        if infra is not None:
            if _pending_external_ip(infra, prev):
                raise _Refused
            fast = (self._networks_only(old, prev, infra, set(vms))
                    or self._interfaces_only(old, prev, infra, set(vms)))
            if fast is not None:
                base, infra_change = fast
                self._count("networks" if infra_change.networks else "interfaces")
            else:
                base = self._infra(old, infra, set(vms))
                infra_change = _infra_change(old, base)
                self._count("small tables")
        else:
            self._count("vms")
        # VMs changed: out of the indexes first, then in, each checked (undone if refused)
        gone = [old.vms[n] for n in vms if n in old.vms]
        for vm in gone:
            self._remove(vm)
        made: list[VM] = []
        try:
            for name, spec in vms.items():
                if spec is None:
                    continue
                vm = self._check(base, name, spec)
                self._add(vm)
                made.append(vm)
        except _Refused:
            for vm in made:
                self._remove(vm)
            for vm in gone:
                self._add(vm)
            if infra is not None:  # the indexes were of the old nodes and networks
                self._infra_indexes(old)
            raise
        all_vms, by_port = old.vms, old._by_port  # shared when no VM changed
        if gone or made:
            vm_updates: dict[str, Any] = {vm.name: None for vm in gone}
            port_updates: dict[str, Any] = {vm.port_id: None for vm in gone}
            vm_updates.update((vm.name, vm) for vm in made)
            port_updates.update((vm.port_id, vm.name) for vm in made)
            all_vms = _layered(old.vms).changed(vm_updates)
            by_port = _layered(old._by_port).changed(port_updates)
        topo = Topology(source=self.source, nodes=base.nodes, external=base.external,
                        networks=base.networks, routers=base.routers, vms=all_vms,
                        digest=old.digest, _router_of=base._router_of, _by_port=by_port)
        changed_vms = frozenset(n for n in vms if old.vms.get(n) != all_vms.get(n))
        self.change = infra_change | Change(vms=changed_vms)
        self.topology = topo
        return topo

    def _count(self, path: str) -> None:
        self.paths[path] = self.paths.get(path, 0) + 1

    def _networks_only(self, old: Topology, prev: Doc, infra: Doc, changing: set[str]
                       ) -> tuple[Topology, Change] | None:
        """Networks added, changed or removed that no router names: each checked alone
        (None: the change is not of that kind)."""
        if not _same_but(prev, infra, "networks"):
            return None
        before, after = prev.get("networks"), infra.get("networks")
        if not isinstance(before, dict) or not isinstance(after, dict):
            return None
        changed = {n for n in before.keys() | after.keys() if before.get(n) != after.get(n)}
        if changed & self._listed.keys():  # a router names it (the routers did not change)
            return None
        networks = dict(old.networks)
        vnis = dict(self._vnis)
        for name in changed:
            if name in networks:
                vnis.pop(networks.pop(name).vni, None)
        for name in changed:
            spec = after.get(name)
            if spec is None:
                if self.by_net.get(name, set()) - changing:
                    raise _Refused  # VMs still on it
                continue
            net = _network(self.source, name, spec)
            if net.vni in vnis:
                raise _Refused
            vnis[net.vni] = name
            networks[name] = net
        part = Topology(source=self.source, nodes=old.nodes, external=old.external,
                        networks=networks, routers=old.routers, vms=old.vms,
                        _router_of=old._router_of, _by_port=old._by_port)
        for name in changed:
            for vm in self.by_net.get(name, set()) - changing:
                self._check(part, vm, self.vms[vm], unique=False)
        self._vnis = vnis
        return part, Change(networks=frozenset(changed))

    def _interfaces_only(self, old: Topology, prev: Doc, infra: Doc, changing: set[str]
                         ) -> tuple[Topology, Change] | None:
        """One router's interfaces changed, nothing else: that router made anew, the VMs
        of the networks it joined or left checked again (None: the change is not of that
        kind, or an interface's MAC would move another's)."""
        if not _same_but(prev, infra, "routers") or not self._collision_free:
            return None
        before, after = prev.get("routers"), infra.get("routers")
        if not isinstance(before, dict) or not isinstance(after, dict) or \
                before.keys() != after.keys():
            return None
        changed = [n for n in after if before[n] != after[n]]
        if len(changed) != 1:
            return None
        name = changed[0]
        spec, was = after[name], before[name]
        if not isinstance(spec, dict) or not isinstance(was, dict) or name not in old.routers \
                or {k: v for k, v in spec.items() if k != "interfaces"} != \
                {k: v for k, v in was.items() if k != "interfaces"}:
            return None
        itfs = spec.get("interfaces", [])
        if not isinstance(itfs, list):
            raise _Refused
        router = old.routers[name]
        seen: list[str] = []
        for net in itfs:  # the model's rules for a router's interfaces
            if not isinstance(net, str) or net not in old.networks or net in seen:
                raise _Refused
            owner = old.router_of(net)
            if owner is not None and owner.name != name:
                raise _Refused
            if any(old.networks[net].cidr.overlaps(old.networks[o].cidr) for o in seen):
                raise _Refused
            seen.append(net)
        natural = dict(self._natural)
        for itf in router.interfaces:
            del natural[f"rif:{name}:{itf.network}"]
        taken = set(natural.values())
        made = []
        for net in seen:
            mac = _natural_mac(f"rif:{name}:{net}")
            if mac in taken:
                return None  # a collision: the model's own allocation decides
            if self._macs.get(mac) is not None:
                raise _Refused  # a VM's MAC
            taken.add(mac)
            natural[f"rif:{name}:{net}"] = mac
            made.append(RouterInterface(net, old.networks[net].gateway_ip, mac))
        new = dataclasses.replace(router, interfaces=tuple(made))
        router_of = {n: r for n, r in old._router_of.items() if r != name}
        router_of.update(dict.fromkeys(seen, name))
        routers = dict(old.routers)
        routers[name] = new
        part = Topology(source=self.source, nodes=old.nodes, external=old.external,
                        networks=old.networks, routers=routers, vms=old.vms,
                        _router_of=router_of, _by_port=old._by_port)
        moved = {i.network for i in router.interfaces} ^ set(seen)
        for net in moved:
            for vm in self.by_net.get(net, set()) - changing:
                self._check(part, vm, self.vms[vm], unique=False)
        self._natural = natural
        self._infra_macs = _infra_macs(part)
        self._list(was, -1)
        self._list(spec, 1)
        return part, Change(routers=frozenset({name}))

    def _infra(self, old: Topology, infra: Doc, changing: set[str]) -> Topology:
        """The nodes, networks and routers of `infra` (the model's own build, without the
        VMs), the VMs they can affect checked again; a topology holding the old VMs."""
        try:
            part = build_topology({**infra, "vms": {}}, self.source)
        except TopologyError:
            raise _Refused from None
        for r in part.routers.values():  # an external IP already a floating IP
            if r.external_ip is not None and self._fips.get(r.external_ip) not in (
                    None, *changing):
                raise _Refused
        suspects: set[str] = set()
        for name in old.nodes.keys() | part.nodes.keys():
            if old.nodes.get(name) != part.nodes.get(name):
                suspects |= self.by_node.get(name, set())
        for name in old.networks.keys() | part.networks.keys():
            if old.networks.get(name) != part.networks.get(name):
                suspects |= self.by_net.get(name, set())
        for name in old._router_of.keys() | part._router_of.keys():
            a, b = old.router_of(name), part.router_of(name)
            if (a and a.name, a and a.external_gateway) != (b and b.name,
                                                            b and b.external_gateway):
                suspects |= self.by_net.get(name, set())
        macs = _infra_macs(part)
        suspects.update(n for m in macs if (n := self._macs.get(m)) is not None)
        for name in suspects - changing:
            spec = self.vms.get(name)
            if spec is None:
                raise _Refused
            self._check(part, name, spec, unique=False)
        self._infra_indexes(part)
        return Topology(source=self.source, nodes=part.nodes, external=part.external,
                        networks=part.networks, routers=part.routers, vms=old.vms,
                        digest=old.digest, _router_of=part._router_of, _by_port=old._by_port)

    def _check(self, topo: Topology, name: str, spec: Any, unique: bool = True) -> VM:
        """VM `name` of `spec` as `build_topology()` makes it, checked by its rules against
        `topo` (and the indexes, with `unique`); _Refused at the first broken one."""
        c = _Checker(self.source)
        key = f"vms.{name}"
        if not c.name(name, key) or not isinstance(spec, dict):
            raise _Refused
        c.known_keys(spec, key, VM_KEYS)
        ids = c.external_ids(spec.get("external_ids"), f"{key}.external_ids")
        if c.errors or "ip" not in spec or "mac" not in spec:
            raise _Refused
        fip = None
        if spec.get("floating_ip") is not None:
            fip = c.ip(spec["floating_ip"], key)
            ext = topo.external
            if (fip is None or ext is None
                    or not c.host_in(fip, ext.cidr, key, "external.cidr")
                    or fip == ext.gateway_ip
                    or (unique and self._fips.get(fip) not in (None, name))
                    or fip in self._ext_ips):
                raise _Refused
        port_id = spec.get("port_id", name if UUID_RE.match(name) else port_id_for(name))
        if not isinstance(port_id, str) or not UUID_RE.match(port_id) or (
                unique and self._ports.get(port_id) not in (None, name)):
            raise _Refused
        node = topo.nodes.get(spec.get("node")) if isinstance(spec.get("node"), str) else None
        if node is None or node.is_network:
            raise _Refused
        net = topo.networks.get(spec.get("network")) \
            if isinstance(spec.get("network"), str) else None
        if net is None:
            raise _Refused
        ip = c.ip(spec["ip"], f"{key}.ip")
        if (ip is None or not c.host_in(ip, net.cidr, f"{key}.ip", "network")
                or ip == net.gateway_ip
                or (unique and self._ips.get((net.name, ip)) not in (None, name))):
            raise _Refused
        mac = str(spec["mac"]).lower()
        if (not MAC_RE.match(mac) or int(mac[:2], 16) & 1
                or (unique and self._macs.get(mac) not in (None, name))
                or mac in self._infra_macs):
            raise _Refused
        if fip is not None:
            router = topo.router_of(net.name)
            if router is None or not router.external_gateway:
                raise _Refused
        return VM(name=name, node=node.name, network=net.name, ip=ip, mac=mac,
                  floating_ip=fip,
                  port_id=str(spec.get("port_id") or
                              (name if UUID_RE.match(name) else port_id_for(name))),
                  external_ids=ids)

    # --- what a node's plan depends on ------------------------------------------------------
    def scope(self, node: str) -> Scope:
        """`flows.planner.scope()` of the model, from the indexes: O(the node's VMs and the
        routers), not O(cloud)."""
        topo = self.topology
        assert topo is not None
        local = [topo.vms[n] for n in self.by_node.get(node, ())]
        snat = [r for r in topo.routers.values() if r.external_gateway and node in r.snat_nodes]
        networks = topo.reachable_networks({vm.network for vm in local})
        for r in snat:
            networks.update(i.network for i in r.interfaces)
        natting = topo.external is not None and (
            bool(snat) or any(vm.floating_ip is not None for vm in local))
        return Scope(node, frozenset(networks), natting)


def _layered(m: Mapping[str, Any]) -> Layered:
    return m if isinstance(m, Layered) else Layered(m)


def _pending_external_ip(infra: Doc, prev: Doc | None = None) -> bool:
    """A router with a gateway and no explicit external IP: the model allocates it around
    the floating IPs (the VMs), a whole build's business. With `prev` (a document that had
    none), only the routers whose spec is not the same object as there are looked at."""
    routers = infra.get("routers") or {}
    if not isinstance(routers, dict):
        return True
    before = prev.get("routers") if prev is not None else None
    if routers is before:
        return False
    if not isinstance(before, dict):
        before = {}
    return any(
        isinstance(s, dict) and s.get("external_gateway") is True and "external_ip" not in s
        for n, s in routers.items() if before.get(n) is not s)


def _same_but(a: Doc, b: Doc, section: str) -> bool:
    """Whether two documents without VMs differ at most in `section`."""
    return a.keys() == b.keys() and all(a[k] == b[k] for k in a if k != section)


def _network(source: str, name: str, spec: Any) -> Network:
    """Network `name` of `spec` as `build_topology()` makes it, by its rules (_Refused at
    the first broken one, or when it would allocate the VNI)."""
    c = _Checker(source)
    key = f"networks.{name}"
    if not c.name(name, key) or not isinstance(spec, dict):
        raise _Refused
    c.known_keys(spec, key, ("cidr", "gateway_ip", "mtu", "vni", "external_ids"))
    ids = c.external_ids(spec.get("external_ids"), f"{key}.external_ids")
    if c.errors or "cidr" not in spec or "vni" not in spec:
        raise _Refused
    cidr = c.cidr(spec["cidr"], f"{key}.cidr")
    if cidr is None:
        raise _Refused
    gw: ipaddress.IPv4Address | None = cidr.network_address + 1
    if "gateway_ip" in spec:
        gw = c.ip(spec["gateway_ip"], f"{key}.gateway_ip")
        if gw is None or not c.host_in(gw, cidr, f"{key}.gateway_ip", "the network's cidr"):
            raise _Refused
    assert gw is not None
    mtu = spec.get("mtu", DEFAULT_MTU)
    vni = spec["vni"]
    if (not isinstance(mtu, int) or isinstance(mtu, bool) or not 576 <= mtu <= 9000
            or not isinstance(vni, int) or isinstance(vni, bool) or not 1 <= vni <= MAX_VNI):
        raise _Refused
    return Network(name, cidr, gw, mtu, vni, ids)


def _labels(topo: Topology) -> list[str]:
    """The labels the model derives router and node MACs from."""
    out = [f"rif:{r.name}:{i.network}" for r in topo.routers.values() for i in r.interfaces]
    out += [f"rgw:{r.name}" for r in topo.routers.values() if r.external_mac]
    return out + [f"node:{n}" for n in topo.nodes]


def _natural_mac(label: str) -> str:
    """The MAC a label gets when nothing else holds it."""
    return _mac_for(label, set())


def _infra_macs(topo: Topology) -> set[str]:
    """The MACs of routers and nodes (a VM may not take one)."""
    out = {n.external_mac for n in topo.nodes.values()}
    for r in topo.routers.values():
        out.update(i.mac for i in r.interfaces)
        if r.external_mac:
            out.add(r.external_mac)
    return out


def _external_ips(topo: Topology) -> set[ipaddress.IPv4Address]:
    return {r.external_ip for r in topo.routers.values() if r.external_ip is not None}


def _infra_change(old: Topology, new: Topology) -> Change:
    return Change(networks=_differ(old.networks, new.networks),
                  routers=_differ(old.routers, new.routers),
                  nodes=old.nodes != new.nodes, external=old.external != new.external)


def _change(old: Topology, new: Topology) -> Change:
    return _infra_change(old, new) | Change(vms=_differ(old.vms, new.vms))


def _differ(a: Mapping[str, Any], b: Mapping[str, Any]) -> frozenset[str]:
    return frozenset(k for k in _keys(a, b) if a.get(k) != b.get(k))


def _keys(a: Mapping[str, Any], b: Mapping[str, Any]) -> Iterable[str]:
    return a.keys() | b.keys()
