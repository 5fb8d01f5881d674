"""The cloud's desired state: nodes, networks, routers, VMs and floating IPs.

`load_topology()` reads the YAML file described in the topology contract, checks every rule
and fills in what the file leaves out (VNIs, MACs, IPs, external IPs) deterministically:
the same file always yields the same addresses. An object's address is chosen from the hash
of its own name, avoiding what is explicitly taken; on a collision, objects are served in
file order, so adding a VM (a network, a router) at the end never moves the others. Router
and node MACs avoid only each other, never the VMs' (a VM may not take one): a copy of the
cloud holding only some of its VMs derives the same ones.

Nothing here has side effects; the model is immutable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,11}\Z")
# a cloud's own identity of an object (Neutron's UUIDs), accepted wherever a name is
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
EXTERNAL_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}\Z")
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}\Z")
Role = Literal["compute", "network"]
ROLES: tuple[Role, ...] = get_args(Role)
DEFAULT_MTU = 1450
DEFAULT_REMOTE_IP = "198.51.100.10"
# Neutron's base MAC: operators recognise these as cloud ports.
MAC_PREFIX = (0xFA, 0x16, 0x3E)
PORT_NAMESPACE = uuid.UUID("5b1f9a52-3d5e-4c1e-9a57-6d7672000000")
MAX_VNI = (1 << 24) - 1
ROUTER_KEY_BASE = 1 << 24  # router datapath keys live above the VNI range
MAX_ZONE = (1 << 16) - 1  # conntrack zones are 16 bits; 0 is the default zone, never used


class TopologyError(ValueError):
    """One or more rule violations; `errors` holds (key path, reason) pairs."""

    def __init__(self, source: str, errors: list[tuple[str, str]]):
        self.source = source
        self.errors = errors
        first_key, first_reason = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(f"{source}: {first_key}: {first_reason}{more}")

    def keys(self) -> list[str]:
        return [k for k, _ in self.errors]


@dataclass(frozen=True)
class Node:
    name: str
    role: Role
    index: int  # position in the file: stable identity for the lab's underlay address
    tunnel_ip: ipaddress.IPv4Address | None = None  # overlay endpoint (VXLAN/Geneve)
    # the node's own MAC on the provider network: floating IPs hosted here answer with it
    external_mac: str = ""

    @property
    def is_network(self) -> bool:
        return self.role == "network"


@dataclass(frozen=True)
class External:
    cidr: ipaddress.IPv4Network
    gateway_ip: ipaddress.IPv4Address
    remote_ip: ipaddress.IPv4Address
    # the upstream gateway's MAC when it is known in advance (extension key, the lab sets
    # it); otherwise agents resolve it by ARP on the provider network
    gateway_mac: str | None = None


@dataclass(frozen=True)
class Network:
    name: str
    cidr: ipaddress.IPv4Network
    gateway_ip: ipaddress.IPv4Address
    mtu: int
    vni: int  # overlay segmentation id, also the logical-switch key in flows
    # another system's tags (Neutron's ids, revision numbers), sorted pairs; flows ignore them
    external_ids: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class RouterInterface:
    network: str
    ip: ipaddress.IPv4Address
    mac: str


@dataclass(frozen=True)
class Router:
    name: str
    key: int  # logical-router key in flows
    interfaces: tuple[RouterInterface, ...]
    external_gateway: bool
    external_ip: ipaddress.IPv4Address | None
    external_mac: str | None
    snat_nodes: tuple[str, ...]
    snat_zone: int = 0  # conntrack zone of the router's source NAT (16 bits)
    dnat_zone: int = 0  # conntrack zone of its destination NAT (floating IPs inbound)
    external_ids: tuple[tuple[str, str], ...] = ()

    def interface_on(self, network: str) -> RouterInterface | None:
        for itf in self.interfaces:
            if itf.network == network:
                return itf
        return None


@dataclass(frozen=True)
class VM:
    name: str
    node: str
    network: str
    ip: ipaddress.IPv4Address
    mac: str
    floating_ip: ipaddress.IPv4Address | None
    port_id: str  # what Nova/os-vif writes into external_ids:iface-id
    external_ids: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Topology:
    source: str
    nodes: Mapping[str, Node]
    external: External | None
    networks: Mapping[str, Network]
    routers: Mapping[str, Router]
    vms: Mapping[str, VM]
    digest: str = ""  # content hash: the generation agents report when converged
    _router_of: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    _by_port: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def router_of(self, network: str) -> Router | None:
        name = self._router_of.get(network)
        return self.routers[name] if name else None

    def vm_by_port(self, port_id: str) -> VM | None:
        name = self._by_port.get(port_id)
        return self.vms[name] if name else None

    def vms_on(self, node: str) -> list[VM]:
        return [vm for vm in self.vms.values() if vm.node == node]

    def reachable_networks(self, networks: Iterable[str]) -> set[str]:
        """Networks a VM on one of `networks` may reach: its own, and those on its router."""
        out: set[str] = set()
        for net in networks:
            out.add(net)
            router = self.router_of(net)
            if router:
                out.update(i.network for i in router.interfaces)
        return out

    @cached_property
    def vms_by_ip(self) -> dict[ipaddress.IPv4Address, list[VM]]:
        """VMs by address (one address may be used on several isolated networks)."""
        out: dict[ipaddress.IPv4Address, list[VM]] = {}
        for vm in self.vms.values():
            out.setdefault(vm.ip, []).append(vm)
        return out

    @cached_property
    def _floating_ips(self) -> dict[ipaddress.IPv4Address, VM]:
        return {vm.floating_ip: vm for vm in self.vms.values() if vm.floating_ip}

    def floating_ips(self) -> dict[ipaddress.IPv4Address, VM]:
        """Every associated floating IP and the VM it belongs to (computed once; the
        planner asks for it on every node it plans)."""
        return self._floating_ips

    def network_nodes(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.is_network]


def port_id_for(vm_name: str) -> str:
    return str(uuid.uuid5(PORT_NAMESPACE, f"vm:{vm_name}"))


def _digest(text: str, salt: str = "") -> int:
    return int.from_bytes(hashlib.sha256((salt + text).encode()).digest()[:8], "big")


def _mac_for(label: str, taken: set[str]) -> str:
    attempt = 0
    while True:
        h = _digest(label, str(attempt))
        tail = ((h >> 16) & 0xFF, (h >> 8) & 0xFF, h & 0xFF)
        mac = ":".join(f"{b:02x}" for b in (*MAC_PREFIX, *tail))
        if mac not in taken:
            taken.add(mac)
            return mac
        attempt += 1


@dataclass
class _InfraMacs:
    macs: dict[str, str]  # label (rif:ROUTER:NET, rgw:ROUTER, node:NODE) -> MAC
    owner: dict[str, str]  # MAC -> who holds it, for error messages


def _infrastructure_macs(router_specs: Mapping[str, Any], router_of: Mapping[str, str],
                         nodes: Mapping[str, Any], has_external: bool) -> _InfraMacs:
    """Router interface, router gateway and node provider MACs: from their labels, avoiding
    only each other (routers in name order, then nodes)."""
    taken: set[str] = set()
    out = _InfraMacs({}, {})

    def take(label: str, owner: str) -> None:
        mac = _mac_for(label, taken)
        out.macs[label] = mac
        out.owner[mac] = owner

    for name in sorted(router_specs):
        spec = router_specs[name]
        for net in spec.get("interfaces", []):
            if router_of.get(net) == name:
                take(f"rif:{name}:{net}", f"router {name}'s MAC on {net}")
        if spec.get("external_gateway") is True and has_external:
            take(f"rgw:{name}", f"router {name}'s external MAC")
    for n in nodes:
        take(f"node:{n}", f"node {n}'s MAC on the provider network")
    return out


def _pick_ip(
    label: str, net: ipaddress.IPv4Network, taken: set[ipaddress.IPv4Address]
) -> ipaddress.IPv4Address | None:
    """A free host address of `net`, chosen from the label's hash, probing upwards."""
    first = int(net.network_address) + 1
    size = net.num_addresses - 2 if net.prefixlen < 31 else net.num_addresses
    if size <= 0:
        return None
    start = _digest(label) % size
    for i in range(size):
        ip = ipaddress.IPv4Address(first + (start + i) % size)
        if ip not in taken:
            taken.add(ip)
            return ip
    return None


class _Checker:
    def __init__(self, source: str):
        self.source = source
        self.errors: list[tuple[str, str]] = []

    def err(self, key: str, reason: str) -> None:
        self.errors.append((key, reason))

    def mapping(self, value: Any, key: str, required: bool = True) -> dict:
        if value is None:
            if required:
                self.err(key, "is required")
            return {}
        if not isinstance(value, dict):
            self.err(key, f"must be a mapping, not {type(value).__name__}")
            return {}
        return value

    def known_keys(self, value: dict, key: str, allowed: Iterable[str]) -> None:
        allowed = set(allowed)
        for k in value:
            if k not in allowed:
                self.err(f"{key}.{k}" if key else str(k),
                         f"unknown key (expected one of: {', '.join(sorted(allowed))})")

    def name(self, name: Any, key: str) -> bool:
        if not isinstance(name, str) or not (NAME_RE.match(name) or UUID_RE.match(name)):
            self.err(key, f"invalid name {name!r}: use [a-z][a-z0-9-]{{0,11}} or a UUID")
            return False
        return True

    def external_ids(self, value: Any, key: str) -> tuple[tuple[str, str], ...]:
        """Tags of another system (Neutron's ids and revision numbers): string to string."""
        if value is None:
            return ()
        if not isinstance(value, dict):
            self.err(key, f"must be a mapping of strings, not {type(value).__name__}")
            return ()
        out = []
        for k, v in value.items():
            if not isinstance(k, str) or not EXTERNAL_ID_RE.match(k):
                self.err(f"{key}.{k}", "invalid key: use [A-Za-z0-9_.:-]{1,64}")
            elif not isinstance(v, str | int) or isinstance(v, bool):
                self.err(f"{key}.{k}", f"must be a string, not {type(v).__name__}")
            else:
                out.append((k, str(v)))
        return tuple(sorted(out))

    def ip(self, value: Any, key: str) -> ipaddress.IPv4Address | None:
        try:
            return ipaddress.IPv4Address(str(value))
        except ValueError:
            self.err(key, f"{value!r} is not an IPv4 address")
            return None

    def cidr(self, value: Any, key: str) -> ipaddress.IPv4Network | None:
        try:
            net = ipaddress.IPv4Network(str(value), strict=True)
        except ValueError as exc:
            self.err(key, f"{value!r} is not an IPv4 network ({exc})")
            return None
        if net.prefixlen > 29:
            self.err(key, f"{net} is too small: a subnet needs at least a /29")
            return None
        return net

    def host_in(
        self, ip: ipaddress.IPv4Address, net: ipaddress.IPv4Network, key: str, what: str
    ) -> bool:
        if ip not in net:
            self.err(key, f"{ip} is outside {what} {net}")
            return False
        if ip in (net.network_address, net.broadcast_address):
            self.err(key, f"{ip} is the network or broadcast address of {net}")
            return False
        return True


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable: the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_topology(path: str | Path) -> Topology:
    """Read and validate a topology file; raise TopologyError naming file, key and reason."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TopologyError(str(path), [("(file)", f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        raise TopologyError(str(path), [("(file)", f"not UTF-8 text: {exc.reason}")]) from None
    return parse_topology(text, str(path))


def parse_topology(text: str, source: str = "<topology>") -> Topology:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "(file)"
        reason = f"not valid YAML: {getattr(exc, 'problem', exc)}"
        raise TopologyError(source, [(where, reason)]) from None
    topo = build_topology(data, source)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return _replace_digest(topo, digest)


def _replace_digest(topo: Topology, digest: str) -> Topology:
    return Topology(
        source=topo.source,
        nodes=topo.nodes,
        external=topo.external,
        networks=topo.networks,
        routers=topo.routers,
        vms=topo.vms,
        digest=digest,
        _router_of=topo._router_of,
        _by_port=topo._by_port,
    )


def build_topology(data: Any, source: str = "<topology>") -> Topology:
    c = _Checker(source)
    if not isinstance(data, dict):
        raise TopologyError(source, [("(top)", "the file must be a YAML mapping")])
    c.known_keys(data, "", ("nodes", "external", "networks", "routers", "vms"))

    # nodes
    nodes: dict[str, Node] = {}
    tunnel_owner: dict[ipaddress.IPv4Address, str] = {}
    for i, (name, spec) in enumerate(c.mapping(data.get("nodes"), "nodes").items()):
        key = f"nodes.{name}"
        if not c.name(name, key):
            continue
        spec = c.mapping(spec, key)
        c.known_keys(spec, key, ("role", "tunnel_ip"))
        role = spec.get("role", "compute")
        if role not in ROLES:
            c.err(f"{key}.role", f"unknown role {role!r} (expected compute or network)")
            continue
        tunnel_ip = None
        if spec.get("tunnel_ip") is not None:
            tunnel_ip = c.ip(spec["tunnel_ip"], f"{key}.tunnel_ip")
            if tunnel_ip is None:
                continue
            if tunnel_ip in tunnel_owner:
                c.err(f"{key}.tunnel_ip", f"{tunnel_ip} is already the tunnel_ip of nodes."
                      f"{tunnel_owner[tunnel_ip]}")
                continue
            tunnel_owner[tunnel_ip] = name
        nodes[name] = Node(name, role, i, tunnel_ip)
    if not nodes and not any(k == "nodes" for k, _ in c.errors):
        c.err("nodes", "at least one node is required")

    # external network
    external: External | None = None
    if data.get("external") is not None:
        ext = c.mapping(data.get("external"), "external")
        c.known_keys(ext, "external", ("cidr", "gateway_ip", "remote_ip", "gateway_mac"))
        cidr = c.cidr(ext.get("cidr"), "external.cidr") if "cidr" in ext else None
        if "cidr" not in ext:
            c.err("external.cidr", "is required")
        gw = c.ip(ext.get("gateway_ip"), "external.gateway_ip") if "gateway_ip" in ext else None
        if "gateway_ip" not in ext:
            c.err("external.gateway_ip", "is required")
        remote = c.ip(ext.get("remote_ip", DEFAULT_REMOTE_IP), "external.remote_ip")
        if cidr and gw and c.host_in(gw, cidr, "external.gateway_ip", "external.cidr"):
            if remote and remote in cidr:
                c.err("external.remote_ip", f"{remote} must be outside external.cidr {cidr}")
            elif remote:
                gw_mac = None
                if ext.get("gateway_mac") is not None:
                    gw_mac = str(ext["gateway_mac"]).lower()
                    if not MAC_RE.match(gw_mac) or int(gw_mac[:2], 16) & 1:
                        c.err("external.gateway_mac",
                              f"{ext['gateway_mac']!r} is not a unicast MAC address")
                        gw_mac = None
                external = External(cidr, gw, remote, gw_mac)

    # networks
    networks: dict[str, Network] = {}
    vnis: dict[int, str] = {}
    raw_nets = c.mapping(data.get("networks"), "networks", required=False)
    pending_vni: list[tuple[str, ipaddress.IPv4Network, ipaddress.IPv4Address, int,
                            tuple[tuple[str, str], ...]]] = []
    for name, spec in raw_nets.items():
        key = f"networks.{name}"
        if not c.name(name, key):
            continue
        spec = c.mapping(spec, key)
        c.known_keys(spec, key, ("cidr", "gateway_ip", "mtu", "vni", "external_ids"))
        net_ids = c.external_ids(spec.get("external_ids"), f"{key}.external_ids")
        if "cidr" not in spec:
            c.err(f"{key}.cidr", "is required")
            continue
        cidr = c.cidr(spec["cidr"], f"{key}.cidr")
        if cidr is None:
            continue
        gw = cidr.network_address + 1
        if "gateway_ip" in spec:
            gw = c.ip(spec["gateway_ip"], f"{key}.gateway_ip")
            if gw is None or not c.host_in(gw, cidr, f"{key}.gateway_ip", "the network's cidr"):
                continue
        mtu = spec.get("mtu", DEFAULT_MTU)
        if not isinstance(mtu, int) or isinstance(mtu, bool) or not 576 <= mtu <= 9000:
            c.err(f"{key}.mtu", f"{mtu!r} is not an MTU between 576 and 9000")
            continue
        if "vni" in spec:
            vni = spec["vni"]
            if not isinstance(vni, int) or isinstance(vni, bool) or not 1 <= vni <= MAX_VNI:
                c.err(f"{key}.vni", f"{vni!r} is not a VNI between 1 and {MAX_VNI}")
                continue
            if vni in vnis:
                c.err(f"{key}.vni", f"VNI {vni} is already used by network {vnis[vni]}")
                continue
            vnis[vni] = name
            networks[name] = Network(name, cidr, gw, mtu, vni, net_ids)
        else:
            pending_vni.append((name, cidr, gw, mtu, net_ids))
    for name, cidr, gw, mtu, net_ids in pending_vni:  # file order: see the module docstring
        vni = 1 + _digest(f"net:{name}") % (MAX_VNI - 1)
        while vni in vnis:
            vni = vni % (MAX_VNI - 1) + 1
        vnis[vni] = name
        networks[name] = Network(name, cidr, gw, mtu, vni, net_ids)

    # routers
    routers: dict[str, Router] = {}
    router_of: dict[str, str] = {}
    macs: set[str] = set()
    explicit_macs: dict[str, str] = {}
    ext_taken: set[ipaddress.IPv4Address] = set()
    if external:
        ext_taken.add(external.gateway_ip)
    raw_vms = c.mapping(data.get("vms"), "vms", required=False)
    # floating IPs and explicit external IPs are claimed before any allocation
    fip_owner: dict[ipaddress.IPv4Address, str] = {}
    for vname, spec in raw_vms.items():
        if isinstance(spec, dict) and spec.get("floating_ip") is not None:
            key = f"vms.{vname}.floating_ip"
            fip = c.ip(spec["floating_ip"], key)
            if fip is None:
                continue
            if external is None:
                c.err(key, "a floating IP needs an `external:` network")
            elif c.host_in(fip, external.cidr, key, "external.cidr"):
                if fip == external.gateway_ip:
                    c.err(key, f"{fip} is the external gateway_ip")
                elif fip in fip_owner:
                    c.err(key, f"{fip} is already the floating IP of vms.{fip_owner[fip]}")
                else:
                    fip_owner[fip] = vname
    ext_taken.update(fip_owner)

    pending_ext: list[str] = []
    raw_routers = c.mapping(data.get("routers"), "routers", required=False)
    ext_ip_owner: dict[ipaddress.IPv4Address, str] = {}
    router_specs: dict[str, dict] = {}
    has_network_node = any(n.is_network for n in nodes.values())  # once, not per router
    for name, spec in raw_routers.items():
        key = f"routers.{name}"
        if not c.name(name, key):
            continue
        spec = c.mapping(spec, key)
        c.known_keys(
            spec, key, ("interfaces", "external_gateway", "external_ip", "snat_nodes",
                        "external_ids")
        )
        c.external_ids(spec.get("external_ids"), f"{key}.external_ids")
        router_specs[name] = spec
        itfs = spec.get("interfaces", [])
        if not isinstance(itfs, list):
            c.err(f"{key}.interfaces", "must be a list of network names")
            itfs = []
        seen: dict[str, int] = {}
        for i, net in enumerate(itfs):
            ikey = f"{key}.interfaces[{i}]"
            if not isinstance(net, str) or net not in networks:
                if not isinstance(net, str) or net not in raw_nets:
                    c.err(ikey, f"unknown network {net!r}")
                continue
            if net in seen:
                c.err(ikey, f"network {net} is listed twice")
                continue
            if net in router_of:
                c.err(ikey, f"network {net} is already on router {router_of[net]}; "
                      "a network's gateway_ip belongs to one router")
                continue
            for other in seen:
                if networks[net].cidr.overlaps(networks[other].cidr):
                    c.err(ikey, f"{net} {networks[net].cidr} overlaps {other} "
                          f"{networks[other].cidr} on the same router")
                    break
            else:
                seen[net] = i
                router_of[net] = name
        ext_gw = spec.get("external_gateway", False)
        if not isinstance(ext_gw, bool):
            c.err(f"{key}.external_gateway", f"must be true or false, not {ext_gw!r}")
            ext_gw = False
        if ext_gw and external is None:
            c.err(f"{key}.external_gateway", "needs an `external:` network")
            ext_gw = False
        if ext_gw and not has_network_node:
            c.err(f"{key}.external_gateway", "needs at least one node with role network for SNAT")
        if "external_ip" in spec:
            ekey = f"{key}.external_ip"
            if not ext_gw:
                c.err(ekey, "needs external_gateway: true")
            else:
                eip = c.ip(spec["external_ip"], ekey)
                if eip and external and c.host_in(eip, external.cidr, ekey, "external.cidr"):
                    if eip == external.gateway_ip:
                        c.err(ekey, f"{eip} is the external gateway_ip")
                    elif eip in fip_owner:
                        c.err(ekey, f"{eip} is the floating IP of vms.{fip_owner[eip]}")
                    elif eip in ext_ip_owner:
                        c.err(ekey, f"{eip} is already the external_ip of routers."
                              f"{ext_ip_owner[eip]}")
                    else:
                        ext_ip_owner[eip] = name
        elif ext_gw:
            pending_ext.append(name)
        snat = spec.get("snat_nodes")
        if snat is not None and snat != []:  # [] is the default, as left out
            skey = f"{key}.snat_nodes"
            if not ext_gw:
                c.err(skey, "needs external_gateway: true")
            elif not isinstance(snat, list):
                c.err(skey, "must be a list of network node names")
            else:
                for i, n in enumerate(snat):
                    if not isinstance(n, str) or n not in nodes:
                        c.err(f"{skey}[{i}]", f"unknown node {n!r}")
                    elif not nodes[n].is_network:
                        c.err(f"{skey}[{i}]", f"node {n} has role {nodes[n].role}, not network")
                    elif snat.index(n) != i:
                        c.err(f"{skey}[{i}]", f"node {n} is listed twice")
    ext_taken.update(ext_ip_owner)
    ext_ips: dict[str, ipaddress.IPv4Address | None] = {v: k for k, v in ext_ip_owner.items()}
    for name in pending_ext:  # file order: see the module docstring
        assert external is not None
        ip = _pick_ip(f"router:{name}", external.cidr, ext_taken)
        if ip is None:
            c.err(f"routers.{name}.external_ip", f"no free address left in {external.cidr}")
        ext_ips[name] = ip

    # VMs: explicit addresses first, then allocation
    vm_specs: dict[str, dict] = {}
    net_taken: dict[str, set[ipaddress.IPv4Address]] = {
        n: {net.gateway_ip} for n, net in networks.items()
    }
    ip_owner: dict[tuple[str, ipaddress.IPv4Address], str] = {}
    port_owner: dict[str, str] = {}
    for name, spec in raw_vms.items():
        key = f"vms.{name}"
        if not c.name(name, key):
            continue
        spec = c.mapping(spec, key)
        c.known_keys(spec, key, ("node", "network", "ip", "mac", "floating_ip", "port_id",
                                 "external_ids"))
        c.external_ids(spec.get("external_ids"), f"{key}.external_ids")
        ok = True
        port_id = spec.get("port_id", name if UUID_RE.match(name) else port_id_for(name))
        if not isinstance(port_id, str) or not UUID_RE.match(port_id):
            c.err(f"{key}.port_id", f"{port_id!r} is not a UUID (lower case)")
            ok = False
        elif port_id in port_owner:
            c.err(f"{key}.port_id", f"{port_id} is already the port of vms.{port_owner[port_id]}")
            ok = False
        else:
            port_owner[port_id] = name
        node = spec.get("node")
        if node is None:
            c.err(f"{key}.node", "is required")
            ok = False
        elif not isinstance(node, str) or node not in nodes:
            c.err(f"{key}.node", f"unknown node {node!r}")
            ok = False
        elif nodes[node].is_network:
            c.err(f"{key}.node", f"{node} is a network node; VMs run on compute nodes")
            ok = False
        net = spec.get("network")
        if net is None:
            c.err(f"{key}.network", "is required")
            ok = False
        elif not isinstance(net, str) or net not in networks:
            if not isinstance(net, str) or net not in raw_nets:
                c.err(f"{key}.network", f"unknown network {net!r}")
            ok = False
        if ok and "ip" in spec:
            ip = c.ip(spec["ip"], f"{key}.ip")
            cidr = networks[net].cidr
            if ip is None or not c.host_in(ip, cidr, f"{key}.ip", f"network {net}"):
                ok = False
            elif ip == networks[net].gateway_ip:
                c.err(f"{key}.ip", f"{ip} is the gateway_ip of network {net}")
                ok = False
            elif (net, ip) in ip_owner:
                c.err(f"{key}.ip", f"{ip} is already used by vms.{ip_owner[(net, ip)]}")
                ok = False
            else:
                ip_owner[(net, ip)] = name
                net_taken[net].add(ip)
        if "mac" in spec:
            mac = str(spec["mac"]).lower()
            if not MAC_RE.match(mac) or int(mac[:2], 16) & 1:
                c.err(f"{key}.mac", f"{spec['mac']!r} is not a unicast MAC address")
                ok = False
            elif mac in explicit_macs:
                c.err(f"{key}.mac", f"{mac} is already used by vms.{explicit_macs[mac]}")
                ok = False
            else:
                explicit_macs[mac] = name
        fip = spec.get("floating_ip")
        if ok and fip is not None:
            router = router_of.get(net)
            rspec = router_specs.get(router or "", {})
            if router is None:
                c.err(f"{key}.floating_ip", f"network {net} is on no router")
                ok = False
            elif rspec.get("external_gateway") is not True:
                c.err(f"{key}.floating_ip",
                      f"router {router} of network {net} has no external_gateway")
                ok = False
        if ok:
            vm_specs[name] = spec
    if c.errors:
        raise TopologyError(source, c.errors)
    # the MACs of routers and nodes come from their own names alone, whatever the VMs
    # hold, so that a copy of the cloud holding only some VMs (an agent's share of the
    # northbound database) derives the same ones; a VM may not take one
    infra = _infrastructure_macs(router_specs, router_of, nodes, external is not None)
    for mac, name in explicit_macs.items():
        if mac in infra.owner:
            c.err(f"vms.{name}.mac", f"{mac} is {infra.owner[mac]}")
    macs.update(explicit_macs)
    macs.update(infra.owner)

    if c.errors:
        raise TopologyError(source, c.errors)

    vms: dict[str, VM] = {}
    for name in vm_specs:  # file order: see the module docstring
        spec = vm_specs[name]
        net = networks[spec["network"]]
        if "ip" in spec:
            ip = ipaddress.IPv4Address(str(spec["ip"]))
        else:
            picked = _pick_ip(f"vm:{name}", net.cidr, net_taken[net.name])
            if picked is None:
                c.err(f"vms.{name}.ip", f"no free address left in network {net.name}")
                continue
            ip = picked
        mac = str(spec["mac"]).lower() if "mac" in spec else _mac_for(f"vm:{name}", macs)
        fip = spec.get("floating_ip")
        vms[name] = VM(
            name=name,
            node=spec["node"],
            network=net.name,
            ip=ip,
            mac=mac,
            floating_ip=ipaddress.IPv4Address(str(fip)) if fip is not None else None,
            port_id=str(spec.get("port_id") or
                        (name if UUID_RE.match(name) else port_id_for(name))),
            external_ids=c.external_ids(spec.get("external_ids"), f"vms.{name}.external_ids"),
        )
    if c.errors:
        raise TopologyError(source, c.errors)
    vms = dict(sorted(vms.items()))

    router_keys: set[int] = set()
    zones: set[int] = set()
    network_nodes = [n.name for n in nodes.values() if n.is_network]
    defaulted = 0  # routers whose HA chain is the default, so far (in name order)
    for name in sorted(router_specs):
        spec = router_specs[name]
        key = ROUTER_KEY_BASE + _digest(f"router:{name}") % MAX_VNI
        while key in router_keys:
            key += 1
        router_keys.add(key)
        router_zones = []
        for kind in ("snat", "dnat"):
            zone = 1 + _digest(f"zone:{kind}:{name}") % MAX_ZONE
            while zone in zones:
                zone = zone % MAX_ZONE + 1
            zones.add(zone)
            router_zones.append(zone)
        itfs = tuple(
            RouterInterface(net, networks[net].gateway_ip, infra.macs[f"rif:{name}:{net}"])
            for net in spec.get("interfaces", [])
            if router_of.get(net) == name
        )
        ext_gw = bool(spec.get("external_gateway", False)) and external is not None
        snat = spec.get("snat_nodes")
        if not snat and ext_gw and network_nodes:
            # every network node, rotated so that the routers' first choices spread evenly
            k = defaulted % len(network_nodes)
            snat = network_nodes[k:] + network_nodes[:k]
            defaulted += 1
        routers[name] = Router(
            name=name,
            key=key,
            interfaces=itfs,
            external_gateway=ext_gw,
            external_ip=ext_ips.get(name) if ext_gw else None,
            external_mac=infra.macs[f"rgw:{name}"] if ext_gw else None,
            snat_nodes=tuple(snat or ()) if ext_gw else (),
            snat_zone=router_zones[0],
            dnat_zone=router_zones[1],
            external_ids=c.external_ids(spec.get("external_ids"), f"routers.{name}.external_ids"),
        )
    # each node's MAC on the provider network
    nodes = {n: dataclasses.replace(node, external_mac=infra.macs[f"node:{n}"])
             for n, node in nodes.items()}

    return Topology(
        source=source,
        nodes=nodes,
        external=external,
        networks=networks,
        routers=routers,
        vms=vms,
        _router_of=router_of,
        _by_port={vm.port_id: vm.name for vm in vms.values()},
    )


def to_dict(topo: Topology) -> dict:
    """The topology with every allocated value written out (a file that loads to the same)."""
    out: dict[str, Any] = {
        "nodes": {
            n.name: {"role": n.role, **({"tunnel_ip": str(n.tunnel_ip)} if n.tunnel_ip else {})}
            for n in sorted(topo.nodes.values(), key=lambda n: n.index)
        },
    }
    if topo.external:
        out["external"] = {
            "cidr": str(topo.external.cidr),
            "gateway_ip": str(topo.external.gateway_ip),
            "remote_ip": str(topo.external.remote_ip),
        }
        if topo.external.gateway_mac:
            out["external"]["gateway_mac"] = topo.external.gateway_mac
    out["networks"] = {
        n.name: {"cidr": str(n.cidr), "gateway_ip": str(n.gateway_ip), "mtu": n.mtu,
                 "vni": n.vni, **_ids(n.external_ids)}
        for n in topo.networks.values()
    }
    routers: dict[str, Any] = {}
    for r in topo.routers.values():
        spec: dict[str, Any] = {"interfaces": [i.network for i in r.interfaces]}
        if r.external_gateway:
            spec["external_gateway"] = True
            spec["external_ip"] = str(r.external_ip)
            spec["snat_nodes"] = list(r.snat_nodes)
        spec.update(_ids(r.external_ids))
        routers[r.name] = spec
    out["routers"] = routers
    vms: dict[str, Any] = {}
    for vm in topo.vms.values():
        spec = {"node": vm.node, "network": vm.network, "ip": str(vm.ip), "mac": vm.mac}
        if vm.floating_ip:
            spec["floating_ip"] = str(vm.floating_ip)
        if vm.port_id != (vm.name if UUID_RE.match(vm.name) else port_id_for(vm.name)):
            spec["port_id"] = vm.port_id
        spec.update(_ids(vm.external_ids))
        vms[vm.name] = spec
    out["vms"] = vms
    return out


def _ids(pairs: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    return {"external_ids": dict(pairs)} if pairs else {}


# --- the allocation rules, for a writer that changes one object (flows.northbound) -------------
def default_port_id(vm_name: str) -> str:
    """A VM's port id when none is given: its name when that is a UUID, else derived."""
    return vm_name if UUID_RE.match(vm_name) else port_id_for(vm_name)


def infrastructure_macs(routers: Mapping[str, Any], router_of: Mapping[str, str],
                        nodes: Iterable[str], has_external: bool) -> dict[str, str]:
    """The MACs of routers and nodes, as `build_topology()` derives them from `routers`
    (name -> spec with `interfaces` and `external_gateway`), the network each router holds
    and the node names in file order: MAC -> who holds it (a VM may not take one)."""
    return _infrastructure_macs(routers, router_of, list(nodes), has_external).owner


def vm_ip(name: str, net: ipaddress.IPv4Network, taken: Iterable[ipaddress.IPv4Address]
          ) -> ipaddress.IPv4Address | None:
    """The address `build_topology()` allocates to VM `name` on `net` when `taken` holds
    the network's gateway_ip and every other address its VMs hold (None: the network is
    full)."""
    return _pick_ip(f"vm:{name}", net, set(taken))


def vm_mac(name: str, taken: Iterable[str]) -> str:
    """The MAC `build_topology()` allocates to VM `name` when `taken` holds every other
    VM's MAC and the routers' and nodes' (`infrastructure_macs()`)."""
    return _mac_for(f"vm:{name}", set(taken))


def infrastructure_macs_of(routers: Mapping[str, Any], router_of: Mapping[str, str],
                           nodes: Iterable[str], has_external: bool
                           ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The same MACs by holder: each router's (its interfaces' and its gateway's) and each
    node's, sorted; every router and node of the arguments has an entry."""
    names = list(nodes)
    labels = _infrastructure_macs(routers, router_of, names, has_external).macs
    by_router: dict[str, list[str]] = {r: [] for r in routers}
    by_node: dict[str, list[str]] = {n: [] for n in names}
    for label, mac in labels.items():
        kind, _, rest = label.partition(":")
        if kind == "node":
            by_node[rest].append(mac)
        else:
            by_router[rest.split(":")[0]].append(mac)
    return ({r: sorted(m) for r, m in by_router.items()},
            {n: sorted(m) for n, m in by_node.items()})
