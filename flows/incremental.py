"""A node's plan indexed by the model object behind each flow, updated by what changed.

`plan()` (flows.planner) computes a node's whole flow set; `IncrementalPlan` holds the same
set as entries keyed by the object behind them, each entry built by one of the planner's
builders:

    ("defaults", "")      the table defaults (the provider port, the gateway's MAC)
    ("tunnel", peer)      the tunnel from a peer node
    ("network", name)     a network with a VM bound here (its VNI from the tunnels)
    ("vm", name)          a VM bound here (port security, local delivery)
    ("router", name)      a router's distributed part (a local network on it, or its SNAT)
    ("snat", name)        a router's SNAT held ready here (active or standby)
    ("no-provider", vm)   a floating IP bound on a node without a provider network
    ("provider", "")      what comes in from the provider network
    ("fip", vm)           a floating IP bound here: its DNAT and SNAT
    ("conntrack", name)   a router NATing here: its conntrack states
    ("fip-out", vm)       where NATed traffic goes for a floating IP of the cloud
    ("external-out", r)   where NATed traffic goes for a router's external IP elsewhere
    ("remote", vm)        a VM on another node, on a network reachable from here

Each entry keeps a *signature*: the model objects and port numbers its builder reads. An
update (`update()`) is given the new topology and ports and what changed (`Change`: the VMs,
networks and routers added, removed or changed, and whether the nodes or the external network
changed), derives from them the entries that may be affected (an object changed, or something
it depends on: a network's router, a router's interfaces, the node's local networks, the
networks reachable from them, the routers whose SNAT it holds, which routers NAT here, the
tunnels, the port numbers), rebuilds those whose signature differs and returns the flows
added and removed. Whatever it cannot follow cheaply (the nodes, the external network, the
provider port or the gateway's MAC changed) re-plans everything. The flow set it holds is
always `plan()`'s for the same inputs (a property test checks it over random changes).

A flow built by two entries is counted twice and leaves the set with the last of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flows.model import VM, Router, Topology
from flows.ofp import Flow, Group, GroupAction
from flows.planner import (
    NodePorts,
    _conntrack_states,
    _defaults,
    _external_delivery,
    _fip_delivery,
    _floating_ip,
    _local_network,
    _local_vm,
    _no_provider,
    _provider_in,
    _remote_vm,
    _router,
    _snat,
    _tunnel,
    snat_node,
)

Key = tuple[str, str]
_EMPTY: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Change:
    """What changed between two topologies: the VMs, networks and routers added, removed
    or changed (by name), and whether any node or the external network did."""

    vms: frozenset[str] = _EMPTY
    networks: frozenset[str] = _EMPTY
    routers: frozenset[str] = _EMPTY
    nodes: bool = False
    external: bool = False

    def __or__(self, other: Change) -> Change:
        return Change(self.vms | other.vms, self.networks | other.networks,
                      self.routers | other.routers, self.nodes or other.nodes,
                      self.external or other.external)

    def __bool__(self) -> bool:
        return bool(self.vms or self.networks or self.routers or self.nodes or self.external)

    @staticmethod
    def between(old: Topology, new: Topology) -> Change:
        """The change from `old` to `new`, by comparing them (objects shared between the
        two are skipped at once: a topology updated in place shares its unchanged ones)."""
        return Change(_changed(old.vms, new.vms), _changed(old.networks, new.networks),
                      _changed(old.routers, new.routers), not _same(old.nodes, new.nodes),
                      old.external != new.external)


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return a is b or (len(a) == len(b) and all(
        (o := a.get(k)) is v or o == v for k, v in b.items()))


def _changed(a: Mapping[str, Any], b: Mapping[str, Any]) -> frozenset[str]:
    if a is b:
        return _EMPTY
    out = {k for k, v in b.items() if (o := a.get(k)) is not v and o != v}
    added = sum(1 for k in out if k not in a)
    if len(a) > len(b) - added:  # some of `a` are gone
        out.update(k for k in a if k not in b)
    return frozenset(out)


@dataclass
class Delta:
    """What an update changed in the flow set: flows added and removed (by cookie), and
    the ids of the groups whose definition may have changed."""

    added: dict[int, Flow] = field(default_factory=dict)
    removed: dict[int, Flow] = field(default_factory=dict)
    groups: set[int] = field(default_factory=set)
    full: bool = False  # everything was planned anew
    entries: int = 0  # entries rebuilt

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.groups)


@dataclass
class _Derived:
    """What a node's plan derives from the topology and its ports before any builder."""

    local: dict[str, int]  # VMs bound here -> ofport (those the topology knows)
    local_nets: frozenset[str]
    snat: frozenset[str]  # routers whose SNAT this node holds ready
    routers: frozenset[str]  # routers of the local networks
    reachable: frozenset[str]
    natting: frozenset[str]  # routers that NAT here (provider side)
    dnatting: frozenset[str]  # ... for a floating IP bound here
    held: dict[str, tuple[Any, ...]]  # router -> the translations held for it, sorted


def _derive(topo: Topology, node: str, ports: NodePorts, prev: _Derived | None = None,
            prev_topo: Topology | None = None) -> _Derived:
    """(`prev`, of `prev_topo`: reused for what depends on routers only, when `topo` holds
    the same routers, the same objects.)"""
    local = {n: o for n, o in ports.vms.items() if n in topo.vms}
    local_nets = frozenset(topo.vms[n].network for n in local)
    same = (prev is not None and prev_topo is not None and topo.routers is prev_topo.routers
            and topo._router_of is prev_topo._router_of)
    if same and prev is not None:
        snat = prev.snat
    else:
        snat = frozenset(r.name for r in topo.routers.values()
                         if r.external_gateway and node in r.snat_nodes)
    if same and prev is not None and local_nets == prev.local_nets:
        routers, reachable = prev.routers, prev.reachable
    else:
        routers = frozenset(r.name for r in (topo.router_of(n) for n in local_nets) if r)
        found = set(topo.reachable_networks(local_nets))
        for name in snat:
            found.update(i.network for i in topo.routers[name].interfaces)
        reachable = frozenset(found)
    dnatting: set[str] = set()
    if topo.external is not None and ports.provider is not None:
        for n in local:
            vm = topo.vms[n]
            router = topo.router_of(vm.network)
            if vm.floating_ip and router and router.external_gateway:
                dnatting.add(router.name)
        natting = frozenset(snat | dnatting)
    else:
        natting = frozenset()
    held: dict[str, list[Any]] = {}
    for b in ports.held:
        held.setdefault(b.router, []).append(b)
    return _Derived(local, local_nets, snat, routers, reachable, natting,
                    frozenset(dnatting), {r: tuple(sorted(bs)) for r, bs in held.items()})


class IncrementalPlan:
    """A node's flows, indexed by model object, kept up to date by `update()`.

    `by_cookie` and `groups` are the flow set and its groups (live: they change with each
    update); `flows()` is the set as `plan()` returns it."""

    def __init__(self, topo: Topology, node: str, ports: NodePorts):
        self.node = node
        self.topo = topo
        self.ports = ports
        self.by_cookie: dict[int, Flow] = {}
        self.groups: dict[int, Group] = {}
        self._extra: dict[int, int] = {}  # cookie -> entries holding it beyond the first
        self._group_refs: dict[int, dict[Group, int]] = {}
        self._entries: dict[Key, tuple[Any, Flow | tuple[Flow, ...]]] = {}
        self._delta = Delta()
        self._replan()
        self._flush()

    # --- the flow set ---------------------------------------------------------------------
    def flows(self) -> frozenset[Flow]:
        return frozenset(self.by_cookie.values())

    def __len__(self) -> int:
        return len(self.by_cookie)

    def _put(self, flows: Iterable[Flow]) -> None:
        delta = self._delta
        for f in flows:
            c = f.cookie
            if c in self.by_cookie:
                self._extra[c] = self._extra.get(c, 0) + 1
            else:
                self.by_cookie[c] = f
                if delta.removed.pop(c, None) is None:
                    delta.added[c] = f
            for a in f.actions:
                if isinstance(a, GroupAction):
                    refs = self._group_refs.setdefault(a.group.group_id, {})
                    refs[a.group] = refs.get(a.group, 0) + 1
                    self.groups[a.group.group_id] = a.group
                    delta.groups.add(a.group.group_id)

    def _take(self, flows: Iterable[Flow]) -> None:
        delta = self._delta
        for f in flows:
            c = f.cookie
            n = self._extra.get(c)
            if n:
                if n > 1:
                    self._extra[c] = n - 1
                else:
                    del self._extra[c]
            else:
                del self.by_cookie[c]
                if delta.added.pop(c, None) is None:
                    delta.removed[c] = f
            for a in f.actions:
                if isinstance(a, GroupAction):
                    gid = a.group.group_id
                    refs = self._group_refs[gid]
                    if refs[a.group] > 1:
                        refs[a.group] -= 1
                    else:
                        del refs[a.group]
                    if refs:
                        self.groups[gid] = next(iter(refs))
                    else:
                        del self._group_refs[gid]
                        del self.groups[gid]
                    delta.groups.add(gid)

    # --- planning -------------------------------------------------------------------------
    def _replan(self) -> None:
        """Every entry anew (the reference: the same as `plan()`)."""
        for _, flows in self._entries.values():
            self._take(_flows(flows))
        self._entries = {}
        self._index()
        d = self._d = _derive(self.topo, self.node, self.ports)
        topo = self.topo
        keys: list[Key] = [("defaults", ""), ("provider", "")]
        keys += [("tunnel", p) for p in self.ports.tunnels]
        keys += [("network", n) for n in d.local_nets]
        for n in d.local:
            keys += [("vm", n), ("no-provider", n), ("fip", n)]
        for r in d.routers | d.snat | d.natting:
            keys += [("router", r), ("snat", r), ("conntrack", r)]
        if d.natting:
            keys += [("fip-out", n) for n in self._fips]
            keys += [("external-out", r) for r, router in topo.routers.items()
                     if router.external_gateway]
        for net in d.reachable:
            keys += [("remote", n) for n in self._by_net.get(net, ())]
        for key in keys:
            self._refresh(key)
        self._delta.full = True

    def update(self, topo: Topology, ports: NodePorts, change: Change | None = None
               ) -> Delta:
        """Move to `topo` and `ports` (`change`: what changed since the topology of the
        last update; None: found by comparing the two) and return what changed in the
        flow set."""
        old_topo, old_ports, old = self.topo, self.ports, self._d
        if change is None:
            change = Change.between(old_topo, topo)
        self.topo, self.ports = topo, ports
        self._delta = Delta()
        if (change.nodes or change.external or ports.provider != old_ports.provider
                or ports.gateway_mac != old_ports.gateway_mac):
            self._replan()
            return self._flush()
        self._reindex(old_topo, topo, change.vms)
        new = self._d = _derive(topo, self.node, ports, old, old_topo)
        keys: set[Key] = set()

        # the VMs bound here, and their networks
        local_moved = {n for n in old.local.keys() | new.local.keys()
                       if old.local.get(n) != new.local.get(n)}
        touched_vms = set(change.vms) | local_moved
        nets = set(change.networks)
        if nets:
            touched_vms.update(n for n in old.local.keys() | new.local.keys()
                               if _network_of(old_topo, topo, n) & nets)
        local_any = old.local.keys() | new.local.keys()
        for n in touched_vms & local_any:
            keys.add(("vm", n))
        for n in (old.local_nets ^ new.local_nets) | (nets & (old.local_nets | new.local_nets)):
            keys.add(("network", n))

        # the tunnels
        peers: set[str] = set()
        if old_ports.tunnels != ports.tunnels:
            peers = {p for p in old_ports.tunnels.keys() | ports.tunnels.keys()
                     if old_ports.tunnels.get(p) != ports.tunnels.get(p)}
            keys.update(("tunnel", p) for p in peers)

        # the routers
        routers = set(change.routers)
        for net in nets | (old.local_nets ^ new.local_nets):
            routers.update(_routers_of(old_topo, topo, net))
        routers |= old.snat ^ new.snat
        routers |= old.routers ^ new.routers
        routers |= old.natting ^ new.natting
        routers |= old.dnatting ^ new.dnatting
        routers |= old_ports.snat ^ ports.snat
        routers.update(r for r in old.held.keys() | new.held.keys()
                       if old.held.get(r) != new.held.get(r))
        peers_or_trust = peers | (old_ports.trusted ^ ports.trusted)
        if peers_or_trust:
            routers.update(r.name for t in (old_topo, topo) for r in t.routers.values()
                           if peers_or_trust.intersection(r.snat_nodes))
        if bool(old.natting) != bool(new.natting):
            routers.update(old_topo.routers.keys() | topo.routers.keys())
        for r in routers:
            keys.update((("router", r), ("snat", r), ("conntrack", r), ("external-out", r)))

        # floating IPs bound here, then where NATed traffic goes for every floating IP
        router_nets: set[str] = set()
        for r in routers:
            for t in (old_topo, topo):
                if (router := t.routers.get(r)) is not None:
                    router_nets.update(i.network for i in router.interfaces)
        for n in local_any:
            if n in touched_vms or _network_of(old_topo, topo, n) & router_nets:
                keys.update((("no-provider", n), ("fip", n)))
        if bool(old.natting) != bool(new.natting):
            fip_vms: set[str] = set(self._fips) | self._old_fips
        else:
            fip_vms = {n for n in touched_vms}
            for net in router_nets | nets:
                fip_vms.update(self._fips_by_net.get(net, ()))
        keys.update(("fip-out", n) for n in fip_vms)

        # VMs elsewhere on the networks reachable from here
        remote = set(touched_vms)
        for net in (old.reachable ^ new.reachable) | nets:
            remote.update(self._by_net.get(net, ()))
        for p in peers:
            remote.update(self._by_node.get(p, ()))
        keys.update(("remote", n) for n in remote)

        keys.add(("defaults", ""))
        keys.add(("provider", ""))
        for key in keys:
            self._refresh(key)
        return self._flush()

    def _flush(self) -> Delta:
        delta, self._delta = self._delta, Delta()
        self._old_fips = set()
        return delta

    def _refresh(self, key: Key) -> None:
        """Rebuild one entry if its signature changed (or drop it, no longer wanted)."""
        want = self._want(key)
        have = self._entries.get(key)
        if want is None:
            if have is not None:
                del self._entries[key]
                self._take(_flows(have[1]))
            return
        sig, build = want
        if have is not None and have[0] == sig:
            return
        flows = tuple(build())
        if have is not None:
            self._take(_flows(have[1]))
        self._put(flows)
        # (most entries hold one flow: kept as itself, the memory of a tuple the less)
        self._entries[key] = (sig, flows[0] if len(flows) == 1 else flows)
        self._delta.entries += 1

    def _want(self, key: Key) -> tuple[Any, Callable[[], Iterable[Flow]]] | None:
        """The entry's signature and builder, or None when the plan has no such entry."""
        kind, name = key
        topo, ports, d, node = self.topo, self.ports, self._d, self.node
        provider_side = topo.external is not None and ports.provider is not None
        if kind == "defaults":
            return (ports.provider, ports.gateway_mac), lambda: _defaults(ports)
        if kind == "tunnel":
            ofport = ports.tunnels.get(name)
            if ofport is None:
                return None
            return ofport, lambda: (_tunnel(name, ofport),)
        if kind == "remote":  # the most numerous: first
            vm = topo.vms.get(name)  # type: ignore[assignment]
            if vm is None or name in d.local or vm.network not in d.reachable:
                return None
            tunnel = ports.tunnels.get(vm.node)
            if tunnel is None:
                return None
            net = topo.networks[vm.network]
            return (vm, net, tunnel), lambda: (_remote_vm(net, vm, tunnel),)
        if kind == "network":
            if name not in d.local_nets:
                return None
            net = topo.networks[name]
            return net, lambda: (_local_network(net),)
        if kind == "vm":
            if name not in d.local:
                return None
            vm = topo.vms[name]
            net = topo.networks[vm.network]
            ofport = d.local[name]
            return (vm, net, ofport), lambda: _local_vm(net, vm, ofport)
        if kind == "router":
            if name not in d.routers and name not in d.snat:
                return None
            router = topo.routers[name]
            mine = _used_nets(router, d.local_nets) if name in d.routers else _EMPTY
            sig = (router, _itf_nets(topo, router), mine,
                   tuple(ports.tunnels.get(c) for c in router.snat_nodes),
                   _trust(router, ports))
            return sig, lambda: _router(topo, node, router, set(mine), ports)
        if kind == "snat":
            if name not in d.snat:
                return None
            router = topo.routers[name]
            mine = _used_nets(router, d.local_nets)
            sig = (router, _itf_nets(topo, router), mine,
                   tuple(ports.tunnels.get(c) for c in router.snat_nodes), ports.provider,
                   d.held.get(name), name in ports.snat, _trust(router, ports))
            return sig, lambda: _snat(topo, node, router, set(mine), ports)
        if kind == "no-provider":
            if topo.external is None or ports.provider is not None or name not in d.local:
                return None
            vm = topo.vms[name]
            router = topo.router_of(vm.network)
            if not (vm.floating_ip and router and router.external_gateway):
                return None
            return (vm, _nat(router)), lambda: (_no_provider(vm, router),)
        if not provider_side:
            return None
        provider = ports.provider
        assert provider is not None
        if kind == "provider":
            return provider, lambda: (_provider_in(provider),)
        if kind == "fip":
            if name not in d.local:
                return None
            vm = topo.vms[name]
            router = topo.router_of(vm.network)
            if not (vm.floating_ip and router and router.external_gateway):
                return None
            mac = topo.nodes[node].external_mac
            return (vm, _nat(router), mac), lambda: _floating_ip(topo, node, vm, router)
        if kind == "conntrack":
            if name not in d.natting:
                return None
            router = topo.routers[name]
            dnat = name in d.dnatting
            return (_nat(router), dnat), lambda: _conntrack_states(router, dnat)
        if not d.natting:
            return None
        if kind == "fip-out":
            vm = topo.vms.get(name)  # type: ignore[assignment]
            if vm is None or not vm.floating_ip:
                return None
            router = topo.router_of(vm.network)
            if router is None or not router.external_gateway:
                return None
            local = name in d.local
            mac = topo.nodes[vm.node].external_mac
            return ((vm, _nat(router), local, mac, provider),
                    lambda: _fip_delivery(vm, router, local, mac, provider))
        if kind == "external-out":
            router = topo.routers.get(name)  # type: ignore[assignment]
            if (router is None or not router.external_gateway or name in d.snat
                    or not snat_node(router)):
                return None
            return (router, provider), lambda: (_external_delivery(router, provider),)
        raise ValueError(f"unknown plan entry {key}")

    # --- the topology's VMs by network, by node, with a floating IP -------------------------
    def _index(self) -> None:
        self._by_net: dict[str, set[str]] = {}
        self._by_node: dict[str, set[str]] = {}
        self._fips: set[str] = set()
        self._fips_by_net: dict[str, set[str]] = {}
        self._old_fips: set[str] = set()
        for vm in self.topo.vms.values():
            self._add(vm)

    def _add(self, vm: VM) -> None:
        self._by_net.setdefault(vm.network, set()).add(vm.name)
        self._by_node.setdefault(vm.node, set()).add(vm.name)
        if vm.floating_ip:
            self._fips.add(vm.name)
            self._fips_by_net.setdefault(vm.network, set()).add(vm.name)

    def _remove(self, vm: VM) -> None:
        for index, key in ((self._by_net, vm.network), (self._by_node, vm.node),
                           (self._fips_by_net, vm.network)):
            names = index.get(key)
            if names is not None:
                names.discard(vm.name)
                if not names:
                    del index[key]
        if vm.name in self._fips:
            self._fips.discard(vm.name)
            self._old_fips.add(vm.name)

    def _reindex(self, old: Topology, new: Topology, names: Iterable[str]) -> None:
        for n in names:
            before, after = old.vms.get(n), new.vms.get(n)
            if before is after:
                continue
            if before is not None:
                self._remove(before)
            if after is not None:
                self._add(after)


def _flows(held: Flow | tuple[Flow, ...]) -> tuple[Flow, ...]:
    return (held,) if isinstance(held, Flow) else held


def _network_of(old: Topology, new: Topology, vm: str) -> set[str]:
    return {v.network for t in (old, new) if (v := t.vms.get(vm)) is not None}


def _routers_of(old: Topology, new: Topology, net: str) -> set[str]:
    return {r.name for t in (old, new) if (r := t.router_of(net)) is not None}


def _trust(router: Router, ports: NodePorts) -> tuple[bool, ...]:
    """Which nodes of the router's chain the node trusts without their BFD session."""
    return tuple(c in ports.trusted for c in router.snat_nodes)


def _nat(router: Router) -> tuple[Any, ...]:
    """What the NAT builders read of a router (not its interfaces)."""
    return (router.name, router.key, router.snat_zone, router.dnat_zone,
            router.external_gateway)


def _used_nets(router: Router, local_nets: frozenset[str]) -> frozenset[str]:
    return frozenset(i.network for i in router.interfaces if i.network in local_nets)


def _itf_nets(topo: Topology, router: Router) -> tuple[Any, ...]:
    return tuple(topo.networks[i.network] for i in router.interfaces)
