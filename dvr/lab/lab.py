"""`dvr lab`: a multi-node cloud on one machine.

Every node is a network namespace running its own ovsdb-server, ovs-vswitchd (userspace
datapath) and dvr-agent; nodes reach each other over an underlay segment (a Linux bridge in
the lab's underlay namespace) where each node's tunnel endpoint sits on its `br-phy`. VMs are
namespaces plugged into their node's `br-int` the way Nova/os-vif plugs them. The external
host holds the provider network's gateway and an "internet" address behind it.

Every resource carries the lab's prefix: namespaces `<prefix>-n-<node>`, `<prefix>-v-<vm>`,
`<prefix>-ul`, `<prefix>-ext`; files under `<rundir>/<prefix>-lab/`; processes whose command
line names that directory. `down` finds and removes all of them, whatever state `up` left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import yaml

from dvr.lab import LabError, run
from dvr.lab.netlink import NetlinkError, Netns, delete_namespace, ensure_namespace, list_namespaces
from dvr.lab.pki import Pki, PkiError
from flows import northbound
from flows.model import (
    NAME_RE,
    VM,
    Topology,
    TopologyError,
    load_topology,
    parse_topology,
    to_dict,
)

LOG = logging.getLogger(__name__)
PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
UNDERLAY = ipaddress.IPv4Network("198.18.0.0/16")  # RFC 2544 benchmarking range
UNDERLAY_MTU = 1600
# the management network: how the nodes' agents and schedulers reach the northbound
# database, through their kernel (a veth `mg0`, 198.19.X.Y for the underlay's 198.18.X.Y), not
# through their own Open vSwitch, as a hypervisor's management NIC: a node whose
# ovs-vswitchd holds its datapath (flow-restore-wait) still reaches the desired state
MGMT = ipaddress.IPv4Network("198.19.0.0/16")
VSWITCH_SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"
DEFAULT_TOPOLOGY = Path(__file__).parents[1] / "examples" / "default.yaml"
CONVERGE_TIMEOUT = 60.0
# the external host's MAC on the provider segment (each lab has its own segment)
GATEWAY_MAC = "02:d7:ee:00:00:01"
PROVIDER_BRIDGE = "br-ex"
# a clustered northbound database: member i (nb1, nb2, ...) in its own namespace on the
# underlay at 198.18.250.i, clients on NB_PORT, RAFT between members on NB_RAFT_PORT
NB_PORT, NB_RAFT_PORT = 6641, 6643
NB_MEMBER_NET = 250
# the databases' TLS remotes (each member's): agents on NB_PORT with the role that lets each
# write only its own Agent row, schedulers on NB_SCHEDULER_PORT with theirs; operators'
# tools without a role on NB_ADMIN_PORT, on the member's loopback only (and its unix socket)
NB_SCHEDULER_PORT, NB_ADMIN_PORT = 6642, 6644
# the standalone database's address on the underlay (in the underlay's namespace)
NB_STANDALONE_HOST = 254
MAX_NB_MEMBERS = 9
NB_CLUSTER_TIMEOUT = 20.0
BFD_INTERVAL = 100  # ms between BFD packets on the tunnels to and between network nodes
CUT_TABLE = "dvrcut"  # the nftables table of `dvr lab cut`, on the underlay bridge
AGENT_DOWN_TIME = 3.0  # s after its last report that an agent counts as dead
METRICS_HOST, METRICS_PORT = "127.0.0.1", 9101  # each agent's /metrics, inside its node


def rundir() -> Path:
    return Path(os.environ.get("DVR_LAB_RUNDIR", "/run"))


HostKind = Literal["vm", "node", "ext"]  # a VM, a node, the external host


class Lab:
    def __init__(self, prefix: str = "dvr"):
        if not PREFIX_RE.match(prefix):
            raise LabError(f"invalid prefix {prefix!r}: use [a-z][a-z0-9]{{0,7}}")
        self.prefix = prefix
        self.dir = rundir() / f"{prefix}-lab"
        self.ul_ns = f"{prefix}-ul"
        self.ext_ns = f"{prefix}-ext"

    # --- names ----------------------------------------------------------------------------
    def node_ns(self, node: str) -> str:
        return f"{self.prefix}-n-{node}"

    def vm_ns(self, vm: str) -> str:
        return f"{self.prefix}-v-{vm}"

    def node_dir(self, node: str) -> Path:
        return self.dir / "nodes" / node

    @property
    def topology_file(self) -> Path:
        """The desired state the agents watch (the user's file plus lab facts)."""
        return self.dir / "topology.yaml"

    @property
    def state_file(self) -> Path:
        return self.dir / "lab.json"

    def ovs_env(self, node: str) -> dict[str, str]:
        d = str(self.node_dir(node))
        return {**os.environ, "OVS_RUNDIR": d, "OVS_DBDIR": d, "OVS_LOGDIR": d,
                "OVS_SYSCONFDIR": d}

    def is_up(self) -> bool:
        return self.state_file.exists()

    def state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            raise LabError(f"lab {self.prefix} is not up (no {self.state_file})") from None

    def _save_state(self, state: dict[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        os.replace(tmp, self.state_file)

    def topology(self, live: bool = False) -> Topology:
        """The lab's effective desired state; its digest is the generation the northbound
        database gives it (what agents report when they have converged on it). With
        `live`, the routers' HA chains as the scheduler keeps them (what agents plan by)."""
        if self._nb_present():
            from dvr import nb

            try:
                conn = nb.Northbound(self.nb_connection(), timeout=2)
                try:
                    return conn.topology("northbound", live=live)
                finally:
                    conn.close()
            except (nb.NbError, TopologyError) as exc:
                LOG.warning("northbound database unreadable (%s); using the lab's file", exc)
        return _nb_generation(load_topology(self.topology_file))

    @property
    def nb_socket(self) -> Path:
        return self.dir / "nb.sock"

    # --- the northbound database ------------------------------------------------------------
    def nb_members(self) -> list[str]:
        """The members of the lab's clustered northbound database ([] when standalone)."""
        try:
            n = int(self.state().get("nb_cluster", 0))
        except LabError:
            return []
        return [f"nb{i}" for i in range(1, n + 1)]

    def nb_member_ns(self, member: str) -> str:
        return f"{self.prefix}-{member}"

    @staticmethod
    def nb_member_ip(member: str) -> str:
        """A member's address, on the management network."""
        return str(MGMT.network_address + NB_MEMBER_NET * 256 + int(member[2:]))

    @staticmethod
    def nb_standalone_ip() -> str:
        return str(MGMT.network_address + NB_MEMBER_NET * 256 + NB_STANDALONE_HOST)

    @staticmethod
    def mgmt_ip(tunnel_ip: str) -> str:
        """A node's management address: its underlay address's place in MGMT."""
        offset = int(ipaddress.IPv4Address(tunnel_ip)) - int(UNDERLAY.network_address)
        return str(MGMT.network_address + offset)

    @property
    def pki(self) -> Pki:
        """The lab's PKI: a CA, a certificate for each node (CN: its name), for `admin`,
        and for each database server (`server_nb`, `server_nb1`, ...)."""
        return Pki(self.dir / "pki")

    def nb_tls(self) -> bool:
        """Whether the lab's databases speak TLS on the network (the default), or plain
        TCP (`up --nb-tcp`: no TLS, no roles)."""
        try:
            return self.state().get("nb_transport", "ssl") == "ssl"
        except LabError:
            return True

    def nb_connection(self, agents: bool = False, port: int = NB_PORT) -> str:
        """How to reach the northbound database: from this host (unix sockets), or, with
        `agents`, as the nodes' agents do (over the underlay, TLS unless the lab was
        brought up with plain TCP; `port` NB_SCHEDULER_PORT: as the schedulers do)."""
        members = self.nb_members()
        if agents:
            tls = self.nb_tls()  # (the lab's state file, read once)
            proto = "ssl" if tls else "tcp"
            if not tls:
                port = NB_PORT  # no roles: one remote for all
            ips = ([self.nb_member_ip(m) for m in members] if members
                   else [self.nb_standalone_ip()])
            return ",".join(f"{proto}:{ip}:{port}" for ip in ips)
        if not members:
            return f"unix:{self.nb_socket}"
        return ",".join(f"unix:{self.dir / m / 'nb.sock'}" for m in members)

    def nb_remotes(self) -> list[northbound.Remote]:
        """The remotes every database server of the lab listens on (NB_Global.connections)."""
        if not self.nb_tls():
            return [northbound.Remote(f"ptcp:{NB_PORT}")]
        return [northbound.Remote(f"pssl:{NB_PORT}", northbound.AGENT_ROLE),
                northbound.Remote(f"pssl:{NB_SCHEDULER_PORT}", northbound.SCHEDULER_ROLE),
                northbound.Remote(f"pssl:{NB_ADMIN_PORT}:127.0.0.1")]

    def _server_args(self, name: str) -> list[str]:
        """ovsdb-server's remotes from the database, and its TLS identity `name`."""
        args = ["--remote=db:DVR_Northbound,NB_Global,connections"]
        if self.nb_tls():
            key, cert, ca = self.pki.files(name)
            args += [f"--private-key={key}", f"--certificate={cert}", f"--ca-cert={ca}"]
        return args

    def _set_nb_remotes(self) -> None:
        from dvr import nb

        try:
            conn = nb.Northbound(self.nb_connection(), timeout=NB_CLUSTER_TIMEOUT)
            try:
                conn.set_connections(self.nb_remotes())
            finally:
                conn.close()
        except nb.NbError as exc:
            raise LabError(f"cannot set the northbound database's remotes: {exc}") from None

    def _nb_present(self) -> bool:
        members = self.nb_members()
        if not members:
            return self.nb_socket.exists()
        return any((self.dir / m / "nb.sock").exists() for m in members)

    def nb_roles(self) -> dict[str, str]:
        """Each member's role (leader, follower, ...; "down" when its server is dead)."""
        from dvr import nb

        out = {}
        for m in self.nb_members():
            if not _alive(_read_pid(self.dir / m / "nb.pid")):
                out[m] = "down"
                continue
            out[m] = nb.member_role(f"unix:{self.dir / m / 'nb.sock'}", timeout=1.0)
        return out

    def nb_leader(self, timeout: float = NB_CLUSTER_TIMEOUT) -> str:
        """The member that leads the cluster now (waiting for an election to end)."""
        deadline = time.monotonic() + timeout
        while True:
            roles = self.nb_roles()
            leaders = [m for m, r in roles.items() if r == "leader"]
            if len(leaders) == 1:
                return leaders[0]
            if time.monotonic() > deadline:
                raise LabError(f"the northbound cluster has no leader: {roles}")
            time.sleep(0.05)

    def _create_nb_members(self, count: int) -> None:
        """A RAFT cluster of `count` ovsdb-servers, each in its own namespace with an
        address on the management network; the first creates the cluster, the others join
        it."""
        members = [f"nb{i}" for i in range(1, count + 1)]
        with Netns(self.ul_ns) as ul:
            for m in members:
                ensure_namespace(self.nb_member_ns(m))
                ul.add_veth(f"u-{m}", "eth0", self.nb_member_ns(m), mtu=UNDERLAY_MTU)
                ul.set_link(f"u-{m}", master="mg", up=True, mtu=UNDERLAY_MTU)
        for m in members:
            with Netns(self.nb_member_ns(m)) as ns:
                ns.up_loopback()
                ns.set_link("eth0", up=True, mtu=UNDERLAY_MTU)
                ns.add_address("eth0", f"{self.nb_member_ip(m)}/{MGMT.prefixlen}")
            d = self.dir / m
            d.mkdir(parents=True, exist_ok=True)
            raft = "ssl" if self.nb_tls() else "tcp"
            local = f"{raft}:{self.nb_member_ip(m)}:{NB_RAFT_PORT}"
            if m == members[0]:
                cmd = ["ovsdb-tool", "create-cluster", str(d / "nb.db"),
                       str(northbound.SCHEMA), local]
            else:
                first = f"{raft}:{self.nb_member_ip(members[0])}:{NB_RAFT_PORT}"
                cmd = ["ovsdb-tool", "join-cluster", str(d / "nb.db"), "DVR_Northbound",
                       local, first]
            run.run(None, cmd)
        for m in members:
            self._start_nb_member(m)
        self._wait_nb_cluster(members)
        self._set_nb_remotes()

    def _start_nb_member(self, member: str) -> None:
        d = self.dir / member
        self._sh(self.nb_member_ns(member), [
            "ovsdb-server", str(d / "nb.db"), f"--remote=punix:{d}/nb.sock",
            *self._server_args(f"server_{member}"), f"--pidfile={d}/nb.pid",
            f"--unixctl={d}/nb.ctl", f"--log-file={d}/nb.log",
            "--detach", "--no-chdir", "-vconsole:off"])

    def _wait_nb_cluster(self, members: list[str], timeout: float = NB_CLUSTER_TIMEOUT
                         ) -> None:
        """Until each of `members` is a connected member of a cluster with a leader."""
        deadline = time.monotonic() + timeout
        while True:
            roles = self.nb_roles()
            if (all(roles.get(m) in ("leader", "follower") for m in members)
                    and "leader" in roles.values()):
                return
            if time.monotonic() > deadline:
                raise LabError(f"the northbound cluster did not form within "
                               f"{timeout:.0f}s: {roles}")
            time.sleep(0.05)

    def _start_northbound(self) -> None:
        """The lab's northbound database: a standalone ovsdb-server with this project's
        schema, in the underlay's namespace: the nodes' agents reach it on the underlay
        (at nb_standalone_ip), this host's tools on its unix socket."""
        db = self.dir / "nb.db"
        fresh = not db.exists()
        if fresh:
            run.run(None, ["ovsdb-tool", "create", str(db), str(northbound.SCHEMA)])
        self._sh(self.ul_ns, [
            "ovsdb-server", str(db), f"--remote=punix:{self.nb_socket}",
            *self._server_args("server_nb"), f"--pidfile={self.dir}/nb.pid",
            f"--unixctl={self.dir}/nb.ctl",
            f"--log-file={self.dir}/nb.log", "--detach", "--no-chdir", "-vconsole:off"])
        if fresh:
            self._set_nb_remotes()

    def nb_agents(self) -> dict[str, dict[str, Any]]:
        """The Agent table of the lab's northbound database, by node ({} if unreachable)."""
        if not self._nb_present():
            return {}
        from dvr import nb

        try:
            conn = nb.Northbound(self.nb_connection(), timeout=2)
            try:
                rows = conn.transact([{"op": "select", "table": "Agent", "where": []}])[0]
            finally:
                conn.close()
        except nb.NbError:
            return {}
        members = northbound.members
        out = {}
        for r in rows.get("rows", []):
            out[r["node"]] = {
                "heartbeat": r["heartbeat"] / 1000, "generation": r["generation"],
                "converged": r["converged"], "flows": r["flows"], "version": r["version"],
                "snat": sorted(members(r["snat"])), "vms": sorted(members(r["vms"])),
                "error": (members(r["error"]) or [None])[0],
                "gateway_mac": (members(r["gateway_mac"]) or [None])[0], "source": "northbound",
                "started": r["started"] / 1000, "bfd": dict(_map(r["bfd"]))}
        return out

    def _load_northbound(self, eff: Topology) -> None:
        from dvr import nb

        conn = nb.Northbound(self.nb_connection())
        try:
            conn.load(eff)
        except nb.NbError as exc:
            raise LabError(f"northbound database: {exc}") from None
        finally:
            conn.close()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        rundir().mkdir(parents=True, exist_ok=True)
        path = rundir() / f"{self.prefix}-lab.lock"
        with open(path, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # --- commands -------------------------------------------------------------------------
    def up(self, topology: str | Path | None = None, timeout: float = CONVERGE_TIMEOUT,
           nb_cluster: int | None = None, bfd_interval: int | None = None,
           neutron: bool = False, l2_agents: list[str] | None = None,
           nb_tls: bool | None = None) -> None:
        """Build the lab (its northbound database standalone, or a RAFT cluster of
        `nb_cluster` members; with `neutron`, driven by a Neutron API that holds the
        topology's objects), or apply `topology` to the running lab."""
        path = Path(topology) if topology else DEFAULT_TOPOLOGY
        topo = load_topology(path)  # validate before anything is created
        raw = yaml.safe_load(path.read_text())
        for node in l2_agents or []:
            if not neutron:
                raise LabError("--l2-agent needs --neutron")
            if node not in topo.nodes or topo.nodes[node].is_network:
                raise LabError(f"--l2-agent {node}: not a compute node of the topology")
        if nb_cluster is not None and not 1 <= nb_cluster <= MAX_NB_MEMBERS:
            raise LabError(f"--nb-cluster: between 1 and {MAX_NB_MEMBERS} members")
        with self.locked():
            if self.is_up():
                have = len(self.nb_members())
                if nb_cluster is not None and nb_cluster != have:
                    raise LabError(f"lab {self.prefix} runs its northbound database "
                                   f"{f'as {have} members' if have else 'standalone'}: "
                                   "`dvr lab down` first to change that")
                if nb_tls is not None and nb_tls != self.nb_tls():
                    raise LabError(f"lab {self.prefix}'s northbound database speaks "
                                   f"{'TLS' if self.nb_tls() else 'plain TCP'}: "
                                   "`dvr lab down` first to change that")
                if neutron != self.neutron_driven():
                    raise LabError(f"lab {self.prefix} is "
                                   f"{'' if self.neutron_driven() else 'not '}driven by "
                                   "Neutron: `dvr lab down` first to change that")
                self._apply(topo, raw, path, timeout)
                return
            try:
                self._create(topo, raw, path, timeout, nb_cluster or 0,
                             BFD_INTERVAL if bfd_interval is None else bfd_interval,
                             neutron, sorted(set(l2_agents or [])), nb_tls is not False)
            except BaseException:
                if os.environ.get("DVR_LAB_KEEP"):  # for a post-mortem; `down` removes it
                    LOG.error("lab %s: up failed; kept as it is (DVR_LAB_KEEP)", self.prefix)
                    raise
                LOG.error("lab %s: up failed; removing what was created", self.prefix)
                self._down()
                raise

    def apply(self, topology: str | Path, timeout: float = CONVERGE_TIMEOUT) -> None:
        path = Path(topology)
        topo = load_topology(path)
        raw = yaml.safe_load(path.read_text())
        with self.locked():
            if not self.is_up():
                raise LabError(f"lab {self.prefix} is not up: run `dvr lab up` first")
            self._apply(topo, raw, path, timeout)

    def neutron_driven(self) -> bool:
        return self.is_up() and bool(self.state().get("neutron"))

    def down(self) -> None:
        with self.locked():
            self._down()
        with contextlib.suppress(OSError):
            (rundir() / f"{self.prefix}-lab.lock").unlink()

    # --- building -------------------------------------------------------------------------
    def _effective(self, raw: dict[str, Any], underlay: dict[str, str]) -> tuple[str, Topology]:
        """The user's topology with each node's tunnel endpoint filled in by the lab. (The
        external host's MAC is left out: agents resolve it by ARP, as in a real cloud.)"""
        data = json.loads(json.dumps(raw))  # deep copy of plain YAML data
        for name, spec in (data.get("nodes") or {}).items():
            if isinstance(spec, dict) and name in underlay and "tunnel_ip" not in spec:
                spec["tunnel_ip"] = underlay[name]
        text = yaml.safe_dump(data, sort_keys=False)
        return text, _nb_generation(parse_topology(text, str(self.topology_file)))

    def _allocate_underlay(self, topo: Topology, current: dict[str, str]) -> dict[str, str]:
        out = {n: ip for n, ip in current.items() if n in topo.nodes}
        # (no node's management address may be a database server's)
        servers = [self.nb_member_ip(f"nb{i}") for i in range(1, MAX_NB_MEMBERS + 1)]
        servers.append(self.nb_standalone_ip())
        used = set(out.values()) | {str(UNDERLAY.network_address + (
            int(ipaddress.IPv4Address(ip)) - int(MGMT.network_address))) for ip in servers}
        hosts = (str(h) for h in UNDERLAY.hosts())
        for node in sorted(topo.nodes.values(), key=lambda n: n.index):
            if node.name in out:
                continue
            if node.tunnel_ip is not None:
                out[node.name] = str(node.tunnel_ip)
            else:
                ip = next(h for h in hosts if h not in used and not h.endswith(".0.1"))
                out[node.name] = ip
            used.add(out[node.name])
        return out

    def _write_topology(self, text: str) -> None:
        tmp = self.topology_file.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.topology_file)

    def _create(self, topo: Topology, raw: dict[str, Any], path: Path, timeout: float,
                nb_cluster: int = 0, bfd_interval: int = 0, neutron: bool = False,
                l2_agents: list[str] | None = None, nb_tls: bool = True) -> None:
        for cmd in ("ovsdb-server", "ovs-vswitchd", "ovs-vsctl", "ovsdb-tool", "ethtool"):
            if shutil.which(cmd) is None:
                raise LabError(f"{cmd} not found: install openvswitch-switch and ethtool")
        if not Path(VSWITCH_SCHEMA).is_file():
            raise LabError(f"{VSWITCH_SCHEMA} not found: install openvswitch-common")
        if not northbound.SCHEMA.is_file():
            raise LabError(f"the northbound schema {northbound.SCHEMA} is missing from this "
                           "installation of dvr: reinstall it")
        self.dir.mkdir(parents=True, exist_ok=True)
        underlay = self._allocate_underlay(topo, {})
        text, eff = self._effective(raw, underlay)
        self._write_topology(text)
        state = {"prefix": self.prefix, "source": str(path.resolve()), "underlay": underlay,
                 "vms": {}, "nodes": sorted(eff.nodes), "nb_cluster": nb_cluster,
                 "bfd_interval": bfd_interval, "nb_transport": "ssl" if nb_tls else "tcp"}
        self._save_state(state)
        if nb_tls:
            servers = [f"server_nb{i}" for i in range(1, nb_cluster + 1)] or ["server_nb"]
            try:
                self.pki.ensure([*sorted(eff.nodes), "admin", *servers])
            except PkiError as exc:
                raise LabError(f"the lab's PKI: {exc}") from None
        ensure_namespace(self.ul_ns)
        with Netns(self.ul_ns) as ul:
            ul.up_loopback()
            ul.add_bridge("ul")
            ul.add_bridge("ex")
            ul.add_bridge("mg")
            ul.set_link("mg", up=True, mtu=UNDERLAY_MTU)
            if not nb_cluster:  # the standalone database's address on the management net
                ul.add_address("mg", f"{self.nb_standalone_ip()}/{MGMT.prefixlen}")
        if nb_cluster:
            self._create_nb_members(nb_cluster)
        else:
            self._start_northbound()
        # with Neutron, the lab registers the nodes (and the provider network's upstream);
        # Neutron writes the rest
        self._load_northbound(_nodes_only(eff) if neutron else eff)
        self._create_external(eff)
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda n: self._create_node(n, underlay[n], eff.nodes[n].is_network),
                          sorted(eff.nodes)))
        self._warm_underlay(underlay)
        if neutron:
            self._create_through_neutron(eff, raw, state, timeout, l2_agents or [])
            return
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda vm: self._plug_vm(eff, vm), eff.vms.values()))
        state["vms"] = {vm.name: vm.node for vm in eff.vms.values()}
        self._save_state(state)
        self.wait_converged(eff, timeout)

    def _create_through_neutron(self, eff: Topology, raw: dict[str, Any],
                                state: dict[str, Any], timeout: float,
                                l2_agents: list[str]) -> None:
        """Start Neutron with the dvr driver on the lab's northbound database (and, on
        `l2_agents`, Neutron's own OVS agent with ML2's openvswitch driver), create the
        topology's objects through its API, and plug each VM on its port, as Nova would."""
        from dvr.lab import neutron as lab_neutron
        from dvr.neutron import service

        self.wait_converged(self.topology(), timeout)  # agents alive: ports can be bound
        workdir = self.dir / "neutron"
        try:
            service.ensure_venv(log=self.dir / "neutron-install.log")
            drivers = ("dvr", "openvswitch") if l2_agents else ("dvr",)
            api = service.Neutron(workdir, self.nb_connection(), mechanism_drivers=drivers,
                                  extra_config={
                "dvr": {"agent_down_time": str(AGENT_DOWN_TIME + 2)},
                # a lab is one operator's: no quota stops its tests and benchmarks
                "quotas": {f"quota_{r}": "-1" for r in ("network", "subnet", "port",
                                                        "router", "floatingip")},
                # the API as clouds have it (ports in a default group; dvr applies no
                # security groups); without it Neutron 29 fails every bulk port create
                "securitygroup": {"enable_security_group": "true"}})
            url = api.start()
            state["neutron"] = {"url": url, "workdir": str(workdir), "ids": {},
                                "l2_agents": l2_agents}
            self._save_state(state)
            if l2_agents:
                self._start_l2_agents(api, l2_agents, state)
        except service.NeutronError as exc:
            raise LabError(f"Neutron: {exc}") from None
        ids = lab_neutron.create(lab_neutron.NeutronApi(url), eff, raw)
        state["neutron"]["ids"] = ids
        self._save_state(state)
        self.wait_northbound(lambda t: set(ids["vms"].values()) <= set(t.vms), timeout,
                             "the VMs' ports")
        topo = self.topology()
        names = {v: k for k, v in ids["vms"].items()}
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda vm: self._plug_vm(topo, vm, names[vm.name]),
                          [topo.vms[i] for i in ids["vms"].values()]))
        state["vms"] = {name: topo.vms[i].node for name, i in ids["vms"].items()}
        self._save_state(state)
        self.wait_converged(self.topology(), timeout)

    # --- Neutron's own OVS agent beside dvr's ---------------------------------------------
    def _start_l2_agents(self, api: Any, nodes: list[str], state: dict[str, Any]) -> None:
        """RabbitMQ and neutron-rpc-server in the lab's controller namespace (on the
        underlay), and neutron-openvswitch-agent on each of `nodes` (its own integration
        bridge br-l2, the provider bridge as physnet1)."""
        from dvr.neutron import l2agent

        ctl = l2agent.create_ctl_namespace(self.prefix, UNDERLAY.prefixlen, UNDERLAY_MTU)
        rabbit = l2agent.RabbitMQ(self.dir / "rabbitmq", ctl, l2agent.CTL_ADDRESS)
        url = rabbit.start()
        state["neutron"]["transport_url"] = url
        self._save_state(state)
        l2agent.RpcServer(api, ctl, url).start()
        for node in nodes:
            self.l2_agent(node, api).start()

    def l2_agent(self, node: str, api: Any = None) -> Any:
        """The Neutron OVS agent of `node` (a lab started with `--l2-agent`)."""
        from dvr.neutron import l2agent, service

        st = self.state().get("neutron") or {}
        if node not in (st.get("l2_agents") or []):
            raise LabError(f"node {node} of lab {self.prefix} runs no Neutron OVS agent "
                           "(`dvr lab up --neutron --l2-agent NODE`)")
        api = api or service.Neutron.find(Path(st["workdir"]))
        return l2agent.OvsAgent(self.node_dir(node) / "neutron-ovs-agent", self.node_ns(node),
                                node, self.node_dir(node) / "db.sock", st["transport_url"], api)

    def restart_neutron(self, timeout: float = 120) -> None:
        """Restart the Neutron API (neutron-server); its database keeps running."""
        from dvr.neutron import service

        st = self.state().get("neutron") or {}
        found = service.Neutron.find(Path(st["workdir"])) if st else None
        if found is None:
            raise LabError(f"lab {self.prefix} runs no Neutron (`dvr lab up --neutron`)")
        try:
            found.restart_api(timeout)
        except service.NeutronError as exc:
            raise LabError(f"Neutron: {exc}") from None

    def restart_l2_agent(self, node: str) -> None:
        from dvr.neutron import service

        try:
            self.l2_agent(node).restart()
        except service.NeutronError as exc:
            raise LabError(f"Neutron OVS agent on {node}: {exc}") from None

    def plug(self, name: str, port_id: str | None = None) -> dict[str, Any]:
        """Plug a VM named `name` on a Neutron port (default: the port named `name`), as
        Nova and os-vif do: a namespace whose eth0 has the port's MAC and address, its other
        end on the bridge Neutron bound the port to, on the port's host. Returns the port."""
        from dvr.lab import neutron as lab_neutron

        url = self.neutron_url()
        if not url:
            raise LabError(f"lab {self.prefix} runs no Neutron (`dvr lab up --neutron`)")
        api = lab_neutron.NeutronApi(url)
        if port_id:
            port = api.call("GET", f"ports/{port_id}")["port"]
        else:
            found = api.list("ports", name=name)
            if len(found) != 1:
                raise LabError(f"{len(found)} Neutron ports are named {name!r}: give --port")
            port = found[0]
        if port.get("binding:vif_type") != "ovs":
            raise LabError(f"port {port['id']} is not bound to an OVS bridge "
                           f"(vif_type {port.get('binding:vif_type')})")
        if not NAME_RE.match(name) or name in self.state()["vms"]:
            raise LabError(f"VM name {name!r}: taken, or not [a-z][a-z0-9-]{{0,11}}")
        node = port["binding:host_id"]
        self._need_node(node)
        fixed = port["fixed_ips"][0]
        subnet = api.call("GET", f"subnets/{fixed['subnet_id']}")["subnet"]
        net = api.call("GET", f"networks/{port['network_id']}")["network"]
        cidr = ipaddress.IPv4Network(subnet["cidr"])
        self._plug_port(name, node, port["mac_address"], f"{fixed['ip_address']}/"
                        f"{cidr.prefixlen}", int(net.get("mtu") or 1500),
                        subnet.get("gateway_ip"),
                        port["binding:vif_details"].get("bridge_name", "br-int"), port["id"])
        with self.locked():
            state = self.state()
            state["vms"][name] = node
            state["neutron"]["ids"].setdefault("vms", {})[name] = port["id"]
            state["neutron"].setdefault("plugged", {})[name] = {
                "port_id": port["id"], "node": node,
                "bridge": port["binding:vif_details"].get("bridge_name", "br-int")}
            self._save_state(state)
        return port

    def wait_northbound(self, ready: Any, timeout: float, what: str) -> Topology:
        """Wait until the northbound's desired state satisfies `ready(topology)`."""
        deadline = time.monotonic() + timeout
        while True:
            topo = self.topology()
            if ready(topo):
                return topo
            if time.monotonic() > deadline:
                raise LabError(f"the northbound database did not get {what} within "
                               f"{timeout:.0f}s")
            time.sleep(0.05)

    def neutron_url(self) -> str | None:
        return (self.state().get("neutron") or {}).get("url") if self.is_up() else None

    @staticmethod
    def _neutron_vms(state: dict[str, Any]) -> dict[str, str]:
        """A Neutron lab's VMs: lab name -> Neutron port id ({} without Neutron)."""
        return ((state.get("neutron") or {}).get("ids") or {}).get("vms", {})

    def vm_label(self, vm: str) -> str:
        """The lab's name of a VM (its namespace's): the topology's name, also for a VM
        Neutron holds by its port id."""
        ids = self._neutron_vms(self.state())
        return next((name for name, i in ids.items() if i == vm), vm)

    def vm_id(self, name: str) -> str:
        """The desired state's name of a lab VM: its Neutron port id with Neutron."""
        return self._neutron_vms(self.state()).get(name, name)

    def _create_external(self, topo: Topology) -> None:
        ensure_namespace(self.ext_ns)
        with Netns(self.ul_ns) as ul:
            ul.add_veth("x-ext", "ext0", self.ext_ns)
            ul.set_link("x-ext", master="ex", up=True)
        with Netns(self.ext_ns) as ext:
            ext.up_loopback()
            mac = topo.external.gateway_mac if topo.external else None
            ext.set_link("ext0", up=True, mac=mac or GATEWAY_MAC)
            if topo.external:
                ext.add_address("ext0", f"{topo.external.gateway_ip}/"
                                f"{topo.external.cidr.prefixlen}")
                # the "internet" host: an address behind the gateway (no dummy module here)
                ext.add_address("lo", f"{topo.external.remote_ip}/32")
        self._sh(self.ext_ns, ["ethtool", "-K", "ext0", "tx", "off"], check=False)

    def _sh(self, ns: str, cmd: list[str], node: str | None = None, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        """`cmd` inside namespace `ns`; with `node`, its OVS tools talk to that node's OVS."""
        return run.run(ns, cmd, env=self.ovs_env(node) if node else None, check=check)

    def _vsctl(self, node: str, *args: str) -> str:
        return self._sh(self.node_ns(node), ["ovs-vsctl", "--timeout=20", *args],
                        node=node).stdout

    def _create_node(self, node: str, tunnel_ip: str, network: bool = False) -> None:
        ns = self.node_ns(node)
        d = self.node_dir(node)
        d.mkdir(parents=True, exist_ok=True)
        ensure_namespace(ns)
        with Netns(self.ul_ns) as ul:
            ul.add_veth(f"n-{node}", "ul0", ns, mtu=UNDERLAY_MTU)
            ul.set_link(f"n-{node}", master="ul", up=True, mtu=UNDERLAY_MTU)
            # the provider (external) network: a flat segment every node is on
            ul.add_veth(f"e-{node}", "ex0", ns)
            ul.set_link(f"e-{node}", master="ex", up=True)
            # the management network (the northbound database), through the node's kernel
            ul.add_veth(f"m-{node}", "mg0", ns, mtu=UNDERLAY_MTU)
            ul.set_link(f"m-{node}", master="mg", up=True, mtu=UNDERLAY_MTU)
        with Netns(ns) as n:
            n.up_loopback()
            n.set_link("ul0", up=True, mtu=UNDERLAY_MTU)
            n.set_link("ex0", up=True)
            n.set_link("mg0", up=True, mtu=UNDERLAY_MTU)
            n.add_address("mg0", f"{self.mgmt_ip(tunnel_ip)}/{MGMT.prefixlen}")
        db = d / "conf.db"
        if not db.exists():
            run.run(None, ["ovsdb-tool", "create", str(db), VSWITCH_SCHEMA])
        self._start_ovsdb(node)
        self._start_vswitchd(node)
        self._vsctl(node, "--no-wait", "init")
        self._vsctl(node, "--may-exist", "add-br", "br-phy", "--", "set", "bridge", "br-phy",
                    "datapath_type=netdev", f"other-config:hwaddr={underlay_mac(tunnel_ip)}",
                    "--", "--may-exist", "add-port", "br-phy", "ul0")
        # ul0 belongs to OVS: the node's kernel must not answer ARP or speak IPv6 on it
        self._sh(ns, ["sysctl", "-q", "-w", "net.ipv4.conf.ul0.arp_ignore=8",
                      "net.ipv6.conf.ul0.disable_ipv6=1"], check=False)
        self._vsctl(node, "--may-exist", "add-br", "br-int", "--", "set", "bridge", "br-int",
                    "datapath_type=netdev", "fail_mode=secure")
        # the provider bridge, as an operator sets it up for Neutron: the uplink on a
        # bridge of its own (standalone: it switches normally); the agent patches it to br-int
        self._vsctl(node, "--may-exist", "add-br", PROVIDER_BRIDGE, "--", "set", "bridge",
                    PROVIDER_BRIDGE, "datapath_type=netdev", "--", "--may-exist",
                    "add-port", PROVIDER_BRIDGE, "ex0")
        self._sh(ns, ["sysctl", "-q", "-w", "net.ipv4.conf.ex0.arp_ignore=8",
                      "net.ipv6.conf.ex0.disable_ipv6=1"], check=False)
        self._sh(ns, ["ethtool", "-K", "ex0", "tx", "off"], check=False)
        with Netns(ns) as n:
            n.set_link("br-phy", up=True, mtu=UNDERLAY_MTU)
            n.add_address("br-phy", f"{tunnel_ip}/{UNDERLAY.prefixlen}")
        self._write_agent_config(node, tunnel_ip)
        self._start_agent(node)
        if network:  # the HA chains' scheduler runs beside every network node's agent
            self._start_scheduler(node)

    def _warm_underlay(self, underlay: dict[str, str], nodes: list[str] | None = None) -> None:
        """Fill the nodes' tunnel neighbour tables (all nodes by default) with their peers'
        underlay MACs. The table lives in ovs-vswitchd: a restarted one needs it again.

        OVS's userspace tunnels drop the packet that triggers an ARP for the remote
        endpoint; the lab knows every endpoint's MAC, so it sets them, as a pre-resolved
        underlay would."""
        def warm(node: str) -> None:
            cmds = "; ".join(
                f"ovs-appctl tnl/neigh/set br-phy {ip} {underlay_mac(ip)} >/dev/null"
                for n, ip in sorted(underlay.items()) if n != node)
            if cmds:
                self._sh(self.node_ns(node), ["sh", "-c", cmds], node=node, check=False)

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(warm, sorted(nodes or underlay)))

    def _node_tls(self, node: str) -> list[str]:
        """The TLS files of `node` (made if missing), as the tools' -p -c -C take them."""
        if not self.nb_tls():
            return []
        try:
            self.pki.ensure([node])
        except PkiError as exc:
            raise LabError(f"the lab's PKI: {exc}") from None
        key, cert, ca = self.pki.files(node)
        return ["--private-key", key, "--certificate", cert, "--ca-cert", ca]

    def _agent_tls(self, node: str) -> str:
        if not self._node_tls(node):
            return ""
        key, cert, ca = self.pki.files(node)
        return (f"[northbound]\nprivate_key = {key}\ncertificate = {cert}\n"
                f"ca_cert = {ca}\n")

    def _write_agent_config(self, node: str, tunnel_ip: str) -> None:
        d = self.node_dir(node)
        (d / "agent.ini").write_text(
            "[DEFAULT]\n"
            f"node = {node}\n"
            "[ovs]\n"
            f"ovsdb_connection = unix:{d}/db.sock\n"
            f"ovs_rundir = {d}\n"
            "integration_bridge = br-int\n"
            f"external_bridge = {PROVIDER_BRIDGE}\n"
            "datapath_type = netdev\n"
            "tunnel_type = vxlan\n"
            f"local_ip = {tunnel_ip}\n"
            f"bfd_interval = {self.state().get('bfd_interval', BFD_INTERVAL)}\n"
            "[topology]\n"
            "source = nb\n"
            f"nb_connection = {self.nb_connection(agents=True)}\n"
            f"file = {self.topology_file}\n"
            + self._agent_tls(node) +
            "[metrics]\n"  # on the node's own loopback: `dvr lab node NODE -- curl ...`
            f"bind_host = {METRICS_HOST}\n"
            f"port = {METRICS_PORT}\n"
            "[agent]\n"
            f"status_file = {d}/agent-status.json\n"
            "resync_interval = 5\n"
            f"agent_down_time = {AGENT_DOWN_TIME}\n"
        )

    # --- processes ------------------------------------------------------------------------
    def _procs(self, node: str) -> dict[str, Path]:
        d = self.node_dir(node)
        return {"agent": d / "agent.pid", "ovs-vswitchd": d / "ovs-vswitchd.pid",
                "ovsdb-server": d / "ovsdb-server.pid", "scheduler": d / "scheduler.pid"}

    def _start_ovsdb(self, node: str) -> None:
        d = self.node_dir(node)
        self._sh(self.node_ns(node), [
            "ovsdb-server", str(d / "conf.db"), f"--remote=punix:{d}/db.sock",
            f"--pidfile={d}/ovsdb-server.pid", f"--unixctl={d}/ovsdb-server.ctl",
            f"--log-file={d}/ovsdb-server.log", "--detach", "--no-chdir", "-vconsole:off",
        ], node=node)

    def _start_vswitchd(self, node: str) -> None:
        d = self.node_dir(node)
        self._sh(self.node_ns(node), [
            "ovs-vswitchd", f"unix:{d}/db.sock", f"--pidfile={d}/ovs-vswitchd.pid",
            f"--log-file={d}/ovs-vswitchd.log", "--detach", "--no-chdir", "-vconsole:off",
        ], node=node)

    def _start_agent(self, node: str) -> None:
        d = self.node_dir(node)
        # the agent of the same installation as this command (a venv's, say)
        exe = Path(sys.executable).parent / "dvr-agent"
        cmd = [str(exe)] if exe.exists() else run.python("-m", "agent.main")
        with open(d / "agent.log", "ab") as log:
            proc = run.start(self.node_ns(node), [*cmd, "--config-file", str(d / "agent.ini")],
                             env=run.python_env(), stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True, cwd="/")
        (d / "agent.pid").write_text(f"{proc.pid}\n")

    # --- partitions ---------------------------------------------------------------------
    def cuts(self) -> list[tuple[str, str]]:
        """The pairs of nodes whose underlay traffic is cut (`cut`)."""
        try:
            return [tuple(c) for c in self.state().get("cuts", [])]  # type: ignore[misc]
        except LabError:
            return []

    def cut(self, a: str, b: str) -> None:
        """Drop all underlay traffic between nodes `a` and `b` (both stay alive): their
        tunnels, hence their BFD sessions, go down; everything else flows."""
        self._set_cut(a, b, True)

    def heal(self, a: str, b: str) -> None:
        """Restore the underlay between `a` and `b`."""
        self._set_cut(a, b, False)

    def _set_cut(self, a: str, b: str, cut: bool) -> None:
        with self.locked():
            self._need_node(a)
            self._need_node(b)
            if a == b:
                raise LabError(f"cut: {a} and {b} are the same node")
            state = self.state()
            pair = sorted((a, b))
            cuts = [c for c in state.get("cuts", []) if c != pair]
            if cut:
                cuts.append(pair)
            state["cuts"] = sorted(cuts)
            self._save_state(state)
            self._apply_cuts(state["cuts"])

    def _apply_cuts(self, cuts: list[list[str]]) -> None:
        """The lab's cuts as one nftables table on the underlay bridge (made anew, atomically:
        `nft -f` applies a whole script or nothing)."""
        rules = "".join(f"    iifname \"n-{x}\" oifname \"n-{y}\" drop\n"
                        f"    iifname \"n-{y}\" oifname \"n-{x}\" drop\n" for x, y in cuts)
        script = (f"table bridge {CUT_TABLE}\ndelete table bridge {CUT_TABLE}\n"
                  f"table bridge {CUT_TABLE} {{\n  chain forward {{\n"
                  "    type filter hook forward priority 0; policy accept;\n"
                  f"{rules}  }}\n}}\n")
        run.run(self.ul_ns, ["nft", "-f", "-"], input=script)

    def _start_scheduler(self, node: str) -> None:
        d = self.node_dir(node)
        exe = Path(sys.executable).parent / "dvr"
        cmd = [str(exe)] if exe.exists() else run.python("-m", "dvr.cli")
        with open(d / "scheduler.log", "ab") as log:
            proc = run.start(self.node_ns(node), [
                *cmd, "scheduler", "--db",
                self.nb_connection(agents=True, port=NB_SCHEDULER_PORT), *self._node_tls(node),
                "--agent-down-time", str(AGENT_DOWN_TIME),
                "--status-file", str(d / "scheduler-status.json")],
                env=run.python_env(), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd="/")
        (d / "scheduler.pid").write_text(f"{proc.pid}\n")

    def schedulers(self) -> dict[str, dict[str, Any]]:
        """Each network node's scheduler: alive, and whether it holds the lock (acts)."""
        out = {}
        for node in self.state().get("nodes", []):
            pidfile = self._procs(node)["scheduler"]
            if not pidfile.exists():
                continue
            try:
                st = json.loads((self.node_dir(node) / "scheduler-status.json").read_text())
            except (OSError, ValueError):
                st = {}
            alive = _alive(_read_pid(pidfile))
            out[node] = {"alive": alive, "pid": _read_pid(pidfile),
                         "has_lock": alive and bool(st.get("has_lock"))
                         and time.time() - st.get("time", 0) < 2}
        return out

    def kill_node(self, node: str) -> None:
        self._need_node(node)
        for pidfile in self._procs(node).values():
            _kill_pidfile(pidfile, signal.SIGKILL)

    def start_node(self, node: str, timeout: float = CONVERGE_TIMEOUT) -> None:
        self._need_node(node)
        procs = self._procs(node)
        if not _alive(_read_pid(procs["ovsdb-server"])):
            self._start_ovsdb(node)
        if not _alive(_read_pid(procs["ovs-vswitchd"])):
            self._restart_vswitchd(node)
        if not _alive(_read_pid(procs["agent"])):
            self._start_agent(node)
        if procs["scheduler"].exists() and not _alive(_read_pid(procs["scheduler"])):
            self._start_scheduler(node)
        self.wait_converged(self.topology(), timeout, nodes=[node])

    def _restart_vswitchd(self, node: str) -> None:
        self._start_vswitchd(node)
        self._vsctl(node, "wait-until", "Interface", "br-phy", "ofport>0")
        self._warm_underlay(self.state()["underlay"], nodes=[node])

    def restart_agent(self, node: str, timeout: float = CONVERGE_TIMEOUT) -> None:
        self._need_node(node)
        _kill_pidfile(self._procs(node)["agent"], signal.SIGTERM)
        self._start_agent(node)
        self.wait_converged(self.topology(), timeout, nodes=[node])

    def restart_ovs(self, node: str, timeout: float = CONVERGE_TIMEOUT) -> None:
        self._need_node(node)
        syncs = (self.agent_status(node) or {}).get("syncs", 0)
        _kill_pidfile(self._procs(node)["ovs-vswitchd"], signal.SIGKILL)
        # as an OVS upgrade does (ovs-ctl --restart): the new ovs-vswitchd forwards nothing
        # until the agent has put every flow back and cleared it
        self._vsctl(node, "--no-wait", "set", "Open_vSwitch", ".",
                    "other_config:flow-restore-wait=true")
        self._restart_vswitchd(node)
        if not _alive(_read_pid(self._procs(node)["agent"])):
            return  # no agent to put the flows back: the switch forwards nothing meanwhile
        # converged again only once the agent has synced with the new ovs-vswitchd
        deadline = time.monotonic() + timeout
        while (self.agent_status(node) or {}).get("syncs", 0) <= syncs:
            if time.monotonic() > deadline:
                raise LabError(f"{node}: the agent did not resync within {timeout:.0f}s")
            time.sleep(0.02)
        self.wait_converged(self.topology(), timeout, nodes=[node])

    def kill_northbound(self, member: str | None = None) -> str | None:
        """Stop the northbound database at once (kill -9); agents keep their last state.
        In a cluster: the member given, or the leader; returns the member killed."""
        members = self.nb_members()
        if not members:
            if member:
                raise LabError(f"lab {self.prefix}'s northbound database is standalone: "
                               "no members")
            _kill_pidfile(self.dir / "nb.pid", signal.SIGKILL)
            with contextlib.suppress(OSError):
                self.nb_socket.unlink()
            return None
        if member is None:
            member = self.nb_leader()
        elif member not in members:
            raise LabError(f"unknown northbound member {member!r} (members: "
                           f"{', '.join(members)})")
        _kill_pidfile(self.dir / member / "nb.pid", signal.SIGKILL)
        with contextlib.suppress(OSError):
            (self.dir / member / "nb.sock").unlink()
        return member

    def start_northbound(self, member: str | None = None) -> None:
        """Bring the northbound database back (its file kept the desired state); in a
        cluster, the member given or every dead one, which rejoin the cluster."""
        members = self.nb_members()
        if not members:
            if not _alive(_read_pid(self.dir / "nb.pid")):
                self._start_northbound()
            return
        if member is not None and member not in members:
            raise LabError(f"unknown northbound member {member!r} (members: "
                           f"{', '.join(members)})")
        dead = [m for m in ([member] if member else members)
                if not _alive(_read_pid(self.dir / m / "nb.pid"))]
        for m in dead:
            self._start_nb_member(m)
        self._wait_nb_cluster(dead)

    def _need_node(self, node: str) -> None:
        if node not in self.state()["underlay"]:
            raise LabError(f"unknown node {node!r} in lab {self.prefix}")

    # --- VMs (the lab plays Nova and os-vif) ----------------------------------------------
    def _plug_vm(self, topo: Topology, vm: VM, label: str | None = None) -> None:
        """Plug `vm` (in the namespace of its lab name `label`, default its name)."""
        net = topo.networks[vm.network]
        gateway = str(net.gateway_ip) if topo.router_of(vm.network) is not None else None
        self._plug_port(label or vm.name, vm.node, vm.mac, f"{vm.ip}/{net.cidr.prefixlen}",
                        net.mtu, gateway, "br-int", vm.port_id)

    def _plug_port(self, label: str, node: str, mac: str, address: str, mtu: int,
                   gateway: str | None, bridge: str, port_id: str) -> None:
        """A VM namespace `label` with eth0 (`mac`, `address`, a default route via `gateway`)
        whose other end is an OVS port of `bridge` on `node` carrying `port_id`."""
        ns, node_ns, tap = self.vm_ns(label), self.node_ns(node), f"tap{label}"
        ensure_namespace(ns)
        with Netns(node_ns) as n:
            n.add_veth(tap, "eth0", ns)
            n.set_link(tap, up=True, mtu=mtu)
        with Netns(ns) as v:
            v.up_loopback()
            v.set_link("eth0", mac=mac, mtu=mtu, up=True)
            v.add_address("eth0", address)
            if gateway:
                v.add_route("0.0.0.0/0", gateway)
        # userspace datapath: checksums must be complete on the wire (see lab facts)
        self._sh(ns, ["ethtool", "-K", "eth0", "tx", "off"], check=False)
        self._sh(node_ns, ["ethtool", "-K", tap, "tx", "off"], check=False)
        self._vsctl(node, "--may-exist", "add-port", bridge, tap, "--", "set",
                    "Interface", tap, f"external_ids:iface-id={port_id}",
                    f"external_ids:attached-mac={mac}", "external_ids:iface-status=active",
                    f"external_ids:vm-uuid={uuid.uuid5(uuid.NAMESPACE_DNS, label)}")

    def _unplug_vm(self, name: str, node: str) -> None:
        ns = self.node_ns(node)
        if ns in list_namespaces():
            self._sh(ns, ["ovs-vsctl", "--timeout=20", "--if-exists", "del-port", "br-int",
                          f"tap{name}"], node=node, check=False)
        delete_namespace(self.vm_ns(name))

    # --- changing a running lab -----------------------------------------------------------
    def _apply(self, topo: Topology, raw: dict[str, Any], path: Path, timeout: float) -> None:
        state = self.state()
        if state.get("neutron"):
            raise LabError(f"lab {self.prefix} is driven by Neutron ({state['neutron']['url']}):"
                           " change it through Neutron's API")
        old = self.topology()
        underlay = self._allocate_underlay(topo, state["underlay"])
        text, eff = self._effective(raw, underlay)
        for name, node in list(state["vms"].items()):
            new = eff.vms.get(name)
            was = old.vms.get(name)
            if new is None or was is None or (new.node, new.network, new.ip, new.mac) != (
                    was.node, was.network, was.ip, was.mac):
                self._unplug_vm(name, node)
                del state["vms"][name]
        for node in set(state["underlay"]) - set(eff.nodes):
            self._destroy_node(node)
        state["underlay"] = underlay
        state["nodes"] = sorted(eff.nodes)
        state["source"] = str(path.resolve())
        self._save_state(state)
        new_nodes = [n for n in eff.nodes if not (self.node_dir(n) / "agent.ini").exists()]
        # the new desired state first, so that new agents start with it
        self._write_topology(text)
        self._load_northbound(eff)
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda n: self._create_node(n, underlay[n], eff.nodes[n].is_network),
                          new_nodes))
        if new_nodes:
            self._warm_underlay(underlay)
        if eff.external and old.external != eff.external:
            delete_namespace(self.ext_ns)
            with Netns(self.ul_ns) as ul, contextlib.suppress(NetlinkError):
                ul.ipr.link("del", index=ul.index("x-ext"))
            self._create_external(eff)
        for vm in eff.vms.values():
            if vm.name not in state["vms"]:
                self._plug_vm(eff, vm)
                state["vms"][vm.name] = vm.node
        self._save_state(state)
        self.wait_converged(eff, timeout)

    def _destroy_node(self, node: str) -> None:
        for pidfile in self._procs(node).values():
            _kill_pidfile(pidfile, signal.SIGKILL)
        delete_namespace(self.node_ns(node))
        for link in (f"n-{node}", f"e-{node}"):
            with Netns(self.ul_ns) as ul, contextlib.suppress(NetlinkError):
                ul.ipr.link("del", index=ul.index(link))
        shutil.rmtree(self.node_dir(node), ignore_errors=True)

    # --- convergence and status -----------------------------------------------------------
    def agent_status(self, node: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.node_dir(node) / "agent-status.json").read_text())
        except (OSError, ValueError):
            return None

    def _node_converged(self, topo: Topology, node: str) -> tuple[bool, str]:
        st = self.agent_status(node)
        if st is None:
            return False, "no status yet"
        pid = _read_pid(self._procs(node)["agent"])
        if not _alive(pid):
            return False, "agent is not running"
        if st.get("pid") != pid:
            return False, "agent is starting"
        if st.get("generation") != topo.digest:
            return False, st.get("error") or "working on an older topology"
        if not st.get("converged"):
            return False, st.get("error") or "not converged"
        want = sorted(vm.name for vm in topo.vms_on(node))
        if st.get("vms") != want:
            return False, f"bound VMs {st.get('vms')} != {want}"
        # the BFD sessions to the nodes that run (SNAT steers by them)
        for peer, state in sorted((st.get("bfd") or {}).items()):
            if state != "up" and peer in topo.nodes and _alive(
                    _read_pid(self._procs(peer)["ovs-vswitchd"])):
                return False, f"BFD session to {peer} is {state}"
        return True, ""

    def wait_converged(
        self, topo: Topology, timeout: float = CONVERGE_TIMEOUT, nodes: list[str] | None = None
    ) -> None:
        deadline = time.monotonic() + timeout
        pending = list(nodes or topo.nodes)
        why = ""
        while pending:
            still = []
            for node in pending:
                ok, reason = self._node_converged(topo, node)
                if not ok:
                    still.append(node)
                    why = f"{node}: {reason}"
            pending = still
            if not pending:
                return
            if time.monotonic() > deadline:
                raise LabError(f"agents did not converge within {timeout:.0f}s ({why})")
            time.sleep(0.02)

    def status(self) -> dict[str, Any]:
        state = self.state()
        topo = self.topology()
        nodes = {}
        reports = self.nb_agents()
        for name in sorted(topo.nodes):
            procs = {k: _alive(_read_pid(p)) for k, p in self._procs(name).items()}
            # what the agent reported to the northbound database (its status file if none)
            st = reports.get(name) or self.agent_status(name) or {}
            converged, reason = self._node_converged(topo, name)
            alive = bool(procs["agent"]) and time.time() - st.get("heartbeat", 0) < (
                AGENT_DOWN_TIME)
            nodes[name] = {
                "role": topo.nodes[name].role,
                "namespace": self.node_ns(name),
                "tunnel_ip": state["underlay"].get(name),
                "ovsdb_server": procs["ovsdb-server"],
                "ovs_vswitchd": procs["ovs-vswitchd"],
                "agent": {
                    "alive": alive,
                    "pid": _read_pid(self._procs(name)["agent"]),
                    "metrics": f"http://{METRICS_HOST}:{METRICS_PORT}/metrics",
                    # alive since it started, dead since its last report
                    "since": st.get("started") if alive else st.get("heartbeat"),
                    "bfd": st.get("bfd", {}),
                    "converged": converged,
                    "reason": reason or None,
                    "flows": st.get("flows", 0),
                    "generation": st.get("generation"),
                    "vms": st.get("vms", []),
                    "snat": st.get("snat", []),
                    "gateway_mac": st.get("gateway_mac"),
                    "reported_to": st.get("source", "status file"),
                },
            }
        labels = {i: name for name, i in self._neutron_vms(state).items()}
        vms = {
            labels.get(vm.name, vm.name): {
                "node": vm.node, "network": vm.network, "ip": str(vm.ip), "mac": vm.mac,
                "floating_ip": str(vm.floating_ip) if vm.floating_ip else None,
                "namespace": self.vm_ns(labels.get(vm.name, vm.name)), "port_id": vm.port_id}
            for vm in sorted(topo.vms.values(), key=lambda v: v.name)
        }
        routers = {
            r.name: {"interfaces": {i.network: {"ip": str(i.ip), "mac": i.mac}
                                    for i in r.interfaces},
                     "external_gateway": r.external_gateway}
            for r in topo.routers.values()
        }
        chains = {r.name: r.snat_nodes for r in self.topology(live=True).routers.values()}
        snat = {}
        for r in topo.routers.values():
            if not r.external_gateway:
                continue
            chain = list(chains.get(r.name, r.snat_nodes))
            active = [n for n in chain if r.name in (nodes.get(n, {}).get("agent", {})
                                                      .get("snat", []))
                      and nodes[n]["agent"]["alive"]]
            snat[r.name] = {"external_ip": str(r.external_ip), "snat_nodes": list(r.snat_nodes),
                            "chain": chain, "active": active,
                            "standbys": [n for n in chain if n not in active]}
        members = self.nb_members()
        roles = self.nb_roles()
        northbound = {
            "model": "clustered" if members else "standalone",
            "connection": self.nb_connection(),
            "agents_connection": self.nb_connection(agents=True),
            "schedulers_connection": self.nb_connection(agents=True, port=NB_SCHEDULER_PORT),
            "transport": "ssl" if self.nb_tls() else "tcp",
            "remotes": [{"target": r.target, "role": r.role} for r in self.nb_remotes()],
            **({"pki": str(self.pki.dir)} if self.nb_tls() else {}),
            "members": {m: {"namespace": self.nb_member_ns(m), "address": self.nb_member_ip(m),
                            "role": roles[m]} for m in members},
        }
        neutron = None
        if state.get("neutron"):
            from dvr.neutron import service

            found = service.Neutron.find(Path(state["neutron"]["workdir"]))
            probe = found.status() if found else {}
            neutron = {"url": state["neutron"]["url"], "ids": state["neutron"].get("ids", {}),
                       **{k: probe[k] for k in ("api", "db") if k in probe}}
        return {"prefix": self.prefix, "topology": state.get("source"), "neutron": neutron,
                "cuts": [list(c) for c in self.cuts()], "schedulers": self.schedulers(),
                "generation": topo.digest, "northbound": northbound, "nodes": nodes,
                "vms": vms, "routers": routers, "snat": snat,
                "external": {"namespace": self.ext_ns,
                             "gateway_ip": str(topo.external.gateway_ip),
                             "remote_ip": str(topo.external.remote_ip)}
                if topo.external else None}

    # --- running commands inside --------------------------------------------------------
    def target(self, kind: HostKind, name: str, topo: Topology | None = None
               ) -> tuple[str, dict[str, str] | None]:
        """The namespace and environment of a VM (`vm`), a node (`node`: its OVS tools talk
        to its own OVS) or the external host (`ext`), checked against `topo` (default: the
        lab's desired state)."""
        if kind == "ext":
            return self.ext_ns, None
        topo = topo or self.topology()
        if kind == "vm":
            plugged = ((self.state().get("neutron") or {}).get("plugged") or {}
                       ) if self.is_up() else {}
            if self.vm_id(name) not in topo.vms and name not in plugged:
                raise LabError(f"unknown VM {name!r} in lab {self.prefix}")
            return self.vm_ns(self.vm_label(name)), None
        if kind == "node":
            if name not in topo.nodes:
                raise LabError(f"unknown node {name!r} in lab {self.prefix}")
            return self.node_ns(name), self.ovs_env(name)
        raise ValueError(f"no such kind of lab host: {kind!r}")

    def run_in(self, kind: HostKind, name: str, cmd: list[str], topo: Topology | None = None,
            check: bool = True, timeout: float = run.TIMEOUT
            ) -> subprocess.CompletedProcess[str]:
        """Run `cmd` inside a VM, a node or the external host (see `target()`)."""
        ns, env = self.target(kind, name, topo)
        return run.run(ns, cmd, env=env, check=check, timeout=timeout)

    def exec_argv(self, kind: HostKind, name: str, cmd: list[str]
                  ) -> tuple[list[str], dict[str, str]]:
        """The command line and environment that run `cmd` inside a VM, node or the
        external host (for programs that start it themselves)."""
        ns, env = self.target(kind, name)
        return run.argv(ns, cmd), dict(os.environ) if env is None else env

    # --- tearing down ---------------------------------------------------------------------
    def _down(self) -> None:
        marker = str(self.dir)
        if (self.dir / "neutron").is_dir():
            from dvr.neutron import service

            found = service.Neutron.find(self.dir / "neutron")
            if found is not None:
                with contextlib.suppress(Exception):
                    found.stop()
        pids = set()
        if (self.dir / "nodes").is_dir():
            for node_dir in (self.dir / "nodes").iterdir():
                for p in ("agent.pid", "ovs-vswitchd.pid", "ovsdb-server.pid", "scheduler.pid"):
                    pid = _read_pid(node_dir / p)
                    if pid:
                        pids.add(pid)
        pids.update(_pids_mentioning(marker))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:
            _wait_dead(pid, 5.0)
        if f"{self.prefix}-ctl" in list_namespaces():  # Neutron's RabbitMQ and rpc-server
            from dvr.neutron import l2agent

            with contextlib.suppress(Exception):
                l2agent.delete_ctl_namespace(self.prefix)
        pattern = re.compile(rf"^{re.escape(self.prefix)}-(n-|v-|ul$|ext$|nb\d+$|ctl$)")
        for ns in list_namespaces():
            if pattern.match(ns):
                delete_namespace(ns)
        shutil.rmtree(self.dir, ignore_errors=True)


def _map(value: Any) -> list[tuple[Any, Any]]:
    """An OVSDB map column's pairs."""
    if isinstance(value, list) and value and value[0] == "map":
        return [tuple(p) for p in value[1]]
    return []


def _nodes_only(topo: Topology) -> Topology:
    """The nodes of `topo` and its provider network, nothing else."""
    return dataclasses.replace(topo, networks={}, routers={}, vms={}, _router_of={},
                               _by_port={})


def _nb_generation(topo: Topology) -> Topology:
    return dataclasses.replace(topo, digest=northbound.generation_of(to_dict(topo)))


def underlay_mac(ip: str) -> str:
    """The MAC of a node's br-phy, derived from its underlay address."""
    octets = ipaddress.IPv4Address(ip).packed
    return "02:d7:" + ":".join(f"{b:02x}" for b in octets)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int | None) -> bool:
    """True for a running process; a zombie counts as dead."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _wait_dead(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.01)


def _kill_pidfile(pidfile: Path, sig: int) -> None:
    pid = _read_pid(pidfile)
    if pid and _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        _wait_dead(pid, 10.0)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
            _wait_dead(pid, 5.0)


def _pids_mentioning(marker: str) -> list[int]:
    out = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker + "/" in cmdline or cmdline.rstrip().endswith(marker):
            out.append(int(entry))
    return out


__all__ = ["Lab", "LabError", "TopologyError"]
