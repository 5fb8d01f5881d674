"""Generated clouds of any size, for the benchmarks and the tests.

`generate()` returns a topology document as a topology file holds it: plain dicts, lists and
strings, what `flows.model.build_topology()` takes and `yaml.safe_dump()` writes. It does no
I/O; the same arguments give the same document. The shapes it makes:

- **nodes**: `computes` compute nodes `c0, c1, ...` and `network_nodes` network nodes `net1,
  net2, ...`, with their `tunnel_ip` counted up from `tunnel_ips` when that is given;
- **networks** `n0, n1, ...` in consecutive blocks of 10.0.0.0/8, every block as large as the
  most crowded network needs (a /24 at least); the last `overlapping` routed networks reuse
  the CIDRs of the first ones, as tenants' address plans overlap behind different routers
  (VM addresses stay unique across the cloud all the same);
- **routers** `r0, r1, ...`, each joining the next `per_router` networks (one number for
  every router, the last taking what remains, or one number per router); the last
  `isolated` networks are on no router. The first `external_routers` routers (all of them
  by default when there is an external network) have an external gateway and an explicit
  `external_ip`; with `snat_nodes`, each also names that many network nodes, drawn at
  random, as its SNAT candidates (a tuple: the count itself drawn from it);
- **VMs** `v0, v1, ...`, each with an explicit IP (the network's 10th address, 11th, ...)
  and none on the networks named in `empty`. By default they go round-robin over the
  networks and over the compute nodes, shifted by one node whenever a (node, network) pair
  would repeat, so that every network spreads over every compute. With `per_compute`, each
  compute hosts a few networks drawn at random (that many, or a count drawn from a tuple)
  and the VMs go round-robin over the computes, each on one of its node's networks drawn
  at random;
- **floating IPs**: every `fip_every`-th VM of each network whose router has an external
  gateway (its first, then every k-th), counting only VMs on the first `fip_computes`
  computes when that is given, from the external network's free addresses.

`base` is a document to extend: the generated nodes, networks, routers and VMs are added to
a copy of it, their names begin with `prefix`, their CIDRs and addresses avoid the ones it
holds, and its external network (when it has one) is used instead of `external`. `seed`
makes the random choices. A shape that cannot be built raises `ValueError`.
"""

from __future__ import annotations

import ipaddress
import json
import math
import random
from collections.abc import Collection, Iterator, Sequence
from typing import Any

Document = dict[str, Any]
Count = int | tuple[int, ...]

NETWORK_SPACE = ipaddress.IPv4Network("10.0.0.0/8")
EXTERNAL = "100.64.0.0/16"  # room for 65,000 floating IPs
REMOTE_IP = "198.51.100.10"  # the external host's address beyond the gateway (the default)
FIRST_HOST = 10  # a VM's address: its network's 10th address, then 11th, ...


def generate(
    vms: int,
    *,
    computes: int = 10,
    network_nodes: int = 1,
    networks: int = 2,
    per_router: int | Sequence[int] = 2,
    isolated: int = 0,
    overlapping: int = 0,
    external_routers: int | None = None,
    snat_nodes: Count | None = None,
    empty: Collection[str] = (),
    per_compute: Count | None = None,
    fip_every: int = 0,
    fip_computes: int | None = None,
    external: str | None = EXTERNAL,
    tunnel_ips: str | None = None,
    seed: int = 0,
    base: Document | None = None,
    prefix: str = "",
) -> Document:
    """A topology document of the shape the arguments describe (see the module's docstring)."""
    rng = random.Random(seed)
    doc: Document = json.loads(json.dumps(base)) if base else {}
    for section in ("nodes", "networks", "routers", "vms"):
        doc.setdefault(section, {})

    compute_names = [f"{prefix}c{i}" for i in range(computes)]
    net_node_names = [f"{prefix}net{i + 1}" for i in range(network_nodes)]
    net_names = [f"{prefix}n{i}" for i in range(networks)]
    groups = _router_groups(networks - isolated, per_router)
    router_names = [f"{prefix}r{i}" for i in range(len(groups))]
    vm_names = [f"{prefix}v{k}" for k in range(vms)]
    for section, names in (("nodes", compute_names + net_node_names), ("networks", net_names),
                           ("routers", router_names), ("vms", vm_names)):
        taken = sorted(set(names) & set(doc[section]))
        if taken:
            raise ValueError(f"{section} {', '.join(taken[:3])} already in the document")

    # nodes
    first_tunnel = ipaddress.IPv4Address(tunnel_ips) if tunnel_ips else None
    for i, name in enumerate(compute_names + net_node_names):
        node: dict[str, Any] = {"role": "compute" if i < computes else "network"}
        if first_tunnel is not None:
            node["tunnel_ip"] = str(first_tunnel + i)
        doc["nodes"][name] = node

    # routers, and which of them reach the outside
    if "external" not in doc and external is not None:
        cidr = ipaddress.IPv4Network(external)
        doc["external"] = {"cidr": str(cidr), "gateway_ip": str(cidr.network_address + 1)}
    n_external = len(groups) if external_routers is None and "external" in doc else (
        external_routers or 0)
    if n_external > len(groups):
        raise ValueError(f"{n_external} routers with an external gateway, of {len(groups)}")
    if n_external and "external" not in doc:
        raise ValueError("routers with an external gateway need an external network")
    all_net_nodes = [n for n, v in doc["nodes"].items() if v.get("role") == "network"]
    router_of: dict[str, str] = {}
    start = 0
    for r, (name, size) in enumerate(zip(router_names, groups, strict=True)):
        interfaces = net_names[start:start + size]
        start += size
        router: dict[str, Any] = {"interfaces": interfaces}
        if r < n_external:
            router["external_gateway"] = True
            if snat_nodes is not None:
                count = _draw(rng, snat_nodes)
                if count > len(all_net_nodes):
                    raise ValueError(f"{count} SNAT nodes, of {len(all_net_nodes)}")
                router["snat_nodes"] = rng.sample(all_net_nodes, count)
        doc["routers"][name] = router
        router_of.update(dict.fromkeys(interfaces, name))

    # where the VMs go
    holders = [n for n in net_names if n not in empty]
    if vms and not (holders and compute_names):
        raise ValueError("VMs need a compute node and a network to go on")
    placed: list[tuple[str, str]] = []  # (node, network) of each VM
    if per_compute is None:
        cycle = math.lcm(len(holders), computes or 1)  # VMs before a (node, network) repeats
        for k in range(vms):
            placed.append((compute_names[(k + k // cycle) % computes],
                           holders[k % len(holders)]))
    else:
        hosted = {c: rng.sample(holders, min(_draw(rng, per_compute), len(holders)))
                  for c in compute_names}
        for k in range(vms):
            node_name = compute_names[k % computes]
            placed.append((node_name, rng.choice(hosted[node_name])))

    # networks: one CIDR each, the overlapping ones shared; addresses counted per CIDR
    routed = net_names[:len(net_names) - isolated]
    if overlapping > len(routed) // 2:
        raise ValueError(f"{overlapping} overlapping networks, of {len(routed)} routed")
    shares = {routed[len(routed) - overlapping + i]: routed[i] for i in range(overlapping)}
    for copy, original in shares.items():
        if router_of[copy] == router_of[original]:
            raise ValueError(f"{copy} would overlap {original} on router {router_of[copy]}")
    owner = {n: shares.get(n, n) for n in net_names}  # the network whose CIDR it uses
    crowd = {n: 0 for n in net_names}
    for _, net in placed:
        crowd[owner[net]] += 1
    size = max(8, math.ceil(math.log2(max(crowd.values(), default=0) + FIRST_HOST + 1)))
    blocks = _blocks(32 - size, _networks_of(doc))
    cidr_of = {n: next(blocks) for n in net_names if owner[n] == n}
    for n in net_names:
        doc["networks"][n] = {"cidr": str(cidr_of[owner[n]])}

    # VMs, their addresses and floating IPs
    free = _external_pool(doc)
    for name in router_names[:n_external]:
        doc["routers"][name]["external_ip"] = _next(free, "a router's external IP")
    used = dict.fromkeys(cidr_of, 0)
    outside = {n for n, r in router_of.items() if r in router_names[:n_external]}
    eligible: dict[str, int] = {}
    fip_nodes = set(compute_names if fip_computes is None else compute_names[:fip_computes])
    for name, (node_name, net) in zip(vm_names, placed, strict=True):
        block = cidr_of[owner[net]]
        vm: dict[str, Any] = {"node": node_name, "network": net,
                              "ip": str(block.network_address + FIRST_HOST + used[owner[net]])}
        used[owner[net]] += 1
        if fip_every and net in outside and node_name in fip_nodes:
            nth = eligible.get(net, 0)
            eligible[net] = nth + 1
            if nth % fip_every == 0:
                vm["floating_ip"] = _next(free, "a floating IP")
        doc["vms"][name] = vm
    order = ("nodes", "external", "networks", "routers", "vms")
    return {**{k: doc[k] for k in order if k in doc}, **doc}


def sample_paths(doc: Document) -> list[tuple[str, str, str]]:
    """One packet of each kind of path through a generated cloud, as `dvr trace` takes it:
    (label, sender, packet) for the same network across nodes, routed across nodes, a
    floating IP out and in, centralized SNAT and floating IP to floating IP. The cloud needs a
    router of two networks or more with an external gateway, floating IPs behind two routers
    and a VM without one."""
    vms = doc["vms"]
    router_of = {n: r for r in doc["routers"].values() if r.get("external_gateway")
                 for n in r["interfaces"]}
    remote = doc.get("external", {}).get("remote_ip", REMOTE_IP)

    def first(what: str, test: Any) -> str:
        found = next((name for name, vm in vms.items() if test(vm)), None)
        if found is None:
            raise ValueError(f"the cloud has no {what}")
        return found

    v0 = first("VM with a floating IP behind a router of two networks",
               lambda vm: vm.get("floating_ip")
               and len(router_of.get(vm["network"], {}).get("interfaces", ())) > 1)
    a = vms[v0]
    mine = router_of[a["network"]]["interfaces"]
    other_net = next(n for n in mine if n != a["network"])
    same = first("second VM on that network", lambda vm: vm["network"] == a["network"]
                 and vm["node"] != a["node"])
    routed = first("VM on another network of that router", lambda vm: vm["network"] == other_net
                   and vm["node"] != a["node"])
    snat = first("VM without a floating IP behind an external gateway",
                 lambda vm: not vm.get("floating_ip") and vm["network"] in router_of)
    far = first("floating IP behind another router", lambda vm: vm.get("floating_ip")
                and vm["node"] != a["node"] and vm["network"] not in mine)
    return [
        ("same network", v0, f"icmp, ip.dst={vms[same]['ip']}"),
        ("routed", v0, f"tcp, ip.dst={vms[routed]['ip']}, tcp.dport=22"),
        ("floating IP out", v0, f"tcp, ip.dst={remote}, tcp.dport=443"),
        ("floating IP in", "ext", f"tcp, ip.dst={a['floating_ip']}, tcp.dport=22"),
        ("SNAT", snat, f"udp, ip.dst={remote}"),
        ("FIP to FIP", v0, f"icmp, ip.dst={vms[far]['floating_ip']}"),
    ]


def _router_groups(routed: int, per_router: int | Sequence[int]) -> list[int]:
    """How many networks each router joins."""
    if routed < 0:
        raise ValueError("more isolated networks than networks")
    if isinstance(per_router, int):
        if per_router < 1:
            raise ValueError("a router joins one network at least")
        whole, rest = divmod(routed, per_router)
        return [per_router] * whole + ([rest] if rest else [])
    groups = list(per_router)
    if sum(groups) != routed or min(groups, default=1) < 1:
        raise ValueError(f"routers of {groups} networks for {routed} routed networks")
    return groups


def _draw(rng: random.Random, count: Count) -> int:
    return count if isinstance(count, int) else rng.choice(count)


def _networks_of(doc: Document) -> list[ipaddress.IPv4Network]:
    """The CIDRs a document already holds (its networks' and its external network's)."""
    cidrs = [n.get("cidr") for n in doc["networks"].values()]
    cidrs.append(doc.get("external", {}).get("cidr"))
    return [ipaddress.IPv4Network(c) for c in cidrs if c]


def _blocks(prefixlen: int, avoid: list[ipaddress.IPv4Network]) -> Iterator[ipaddress.IPv4Network]:
    """Consecutive blocks of NETWORK_SPACE that overlap none of `avoid`."""
    for block in NETWORK_SPACE.subnets(new_prefix=prefixlen):
        if not any(block.overlaps(a) for a in avoid):
            yield block
    raise ValueError(f"no room left for /{prefixlen} networks in {NETWORK_SPACE}")


def _external_pool(doc: Document) -> Iterator[str]:
    """The external network's addresses nothing in the document holds yet, in order."""
    ext = doc.get("external")
    if not ext:
        return iter(())
    used = {ext.get("gateway_ip"), ext.get("remote_ip")}
    used |= {vm.get("floating_ip") for vm in doc["vms"].values()}
    used |= {r.get("external_ip") for r in doc["routers"].values()}
    return (str(ip) for ip in ipaddress.IPv4Network(ext["cidr"]).hosts() if str(ip) not in used)


def _next(free: Iterator[str], what: str) -> str:
    ip = next(free, None)
    if ip is None:
        raise ValueError(f"the external network has no address left for {what}")
    return ip
