"""The ML2 mechanism driver `dvr`: Neutron's networks, subnets and ports into dvr's
northbound database, port binding on hosts whose dvr agent is alive, and port and
floating-IP status from what the agents report.

Writes go through `NbWriter` (`dvr.neutron.writer`): each Neutron event re-reads the
resources it concerns from Neutron (`translate` makes them entries, `Put`s) and queues them;
a port's entry is written in O(change) (its own rows read and checked), anything else in one
transaction of the whole document, refusing entries older than the held ones (revision
numbers). A write that cannot reach
the northbound database is not lost: the writer remembers it, and the status thread, once
the database answers again, repairs the whole difference (`dvr.neutron.sync`).

The status thread (one per API worker) polls the Agent table: a port the agent on its host
reports wired completes its provisioning block (the port turns ACTIVE), one that it stops
reporting turns DOWN; a floating IP an agent reports NATed turns ACTIVE; each agent appears
in Neutron's agent list (`openstack network agent list`) as a "dvr agent".
"""

from __future__ import annotations

import threading
import time
from typing import Any

from neutron_lib import constants as n_const
from neutron_lib import context as n_context
from neutron_lib import exceptions as n_exc
from neutron_lib.api.definitions import portbindings
from neutron_lib.callbacks import events, registry, resources
from neutron_lib.plugins import constants as plugin_constants
from neutron_lib.plugins import directory
from neutron_lib.plugins.ml2 import api
from oslo_config import cfg
from oslo_log import log as logging

from agent import tls
from dvr import nb
from dvr.neutron import translate as tr
from dvr.neutron.writer import Edit, NbWriter, Put
from flows import northbound

LOG = logging.getLogger(__name__)

AGENT_TYPE = "dvr agent"
AGENT_BINARY = "dvr-agent"
INTERFACE_OWNERS = (n_const.DEVICE_OWNER_ROUTER_INTF, n_const.DEVICE_OWNER_DVR_INTERFACE)

OPTS = [
    cfg.StrOpt("northbound", default="unix:/run/dvr/nb.sock",
               help="dvr's northbound database: unix:PATH or ssl:HOST:PORT (plain "
                    "tcp:HOST:PORT only where asked for), or the members of a cluster, "
                    "comma-separated. Over the network, a remote without a role: the "
                    "driver writes the desired state."),
    cfg.StrOpt("nb_private_key", help="The driver's TLS private key, for ssl: remotes."),
    cfg.StrOpt("nb_certificate", help="The driver's TLS certificate."),
    cfg.StrOpt("nb_ca_cert", help="The CA certificate the database servers' are checked "
                                   "against."),
    cfg.FloatOpt("agent_down_time", default=5.0,
                 help="Seconds after its last heartbeat that a dvr agent counts as dead: "
                      "no port is bound to its host."),
    cfg.FloatOpt("status_interval", default=0.25,
                 help="Seconds between two reads of the agents' reports (port and "
                      "floating-IP status)."),
    cfg.FloatOpt("timeout", default=5.0,
                 help="Seconds to wait for the northbound database on each write."),
]
cfg.CONF.register_opts(OPTS, group="dvr")


def _conf() -> Any:
    return cfg.CONF.dvr


def _connect() -> nb.Northbound:
    _tls()
    return nb.Northbound(_conf().northbound, timeout=_conf().timeout)


def _tls() -> None:
    """The driver's TLS identity, from [dvr] nb_private_key, nb_certificate, nb_ca_cert
    (set once per process, before its first ssl: connection)."""
    conf = _conf()
    wanted = (conf.nb_private_key, conf.nb_certificate, conf.nb_ca_cert)
    have = tls.identity()
    try:
        if any(wanted) and (have is None or have.files() != wanted):
            tls.configure(*wanted)
        tls.require(conf.northbound)
    except tls.TlsError as exc:
        raise nb.NbError(str(exc)) from None


# --- the northbound writer (dvr.neutron.writer) -----------------------------------------------
WRITER = NbWriter(_connect)


def put_entry(section: str, name: str, entry: dict[str, Any] | None,
              revisions: tuple[str, ...] = (tr.REVISION,)) -> Put:
    return Put(section, name, entry, revisions)


# --- Neutron's resources, re-read -----------------------------------------------------------
def core() -> Any:
    return directory.get_plugin()


def l3() -> Any:
    return directory.get_plugin(plugin_constants.L3)


def network_edit(ctx: Any, network_id: str) -> Edit:
    """The entry of one network (or the external one), as Neutron holds it now."""
    try:
        network = core().get_network(ctx, network_id)
    except n_exc.NetworkNotFound:
        return put_entry("networks", network_id, None)
    subnets = core().get_subnets(ctx, filters={"network_id": [network_id]})
    if tr.is_external(network):
        def external(doc: dict[str, Any]) -> None:
            entry = tr.external_entry(subnets, doc.get("external"))
            if entry is None:
                doc.pop("external", None)
            else:
                doc["external"] = entry
        return external
    itfs = core().get_ports(ctx, filters={"network_id": [network_id],
                                          "device_owner": list(INTERFACE_OWNERS)})
    router_ip = next((ip for _, ip in
                      sorted((p.get("created_at") or "", tr.first_ipv4(p)) for p in itfs)
                      if ip), None)
    entry = tr.network_entry(network, subnets, router_ip)
    return put_entry("networks", network_id, entry, (tr.REVISION, "neutron:subnet_revision"))


def port_edit(ctx: Any, port_id: str) -> Put:
    """The entry of one port, as Neutron holds it now (none while it is on a network that
    is not dvr's or not bound to a compute node of dvr's: `Put.unplaced`)."""
    try:
        port = core().get_port(ctx, port_id)
    except n_exc.PortNotFound:
        return put_entry("vms", port_id, None)
    fips = l3().get_floatingips(ctx, filters={"port_id": [port_id]}) if l3() else []
    return Put("vms", port_id, tr.vm_entry(port, fips[0] if fips else None),
               (tr.REVISION, "neutron:fip_revision"), unplaced=True)


def router_edit(ctx: Any, router_id: str) -> Edit:
    from neutron_lib.exceptions import l3 as l3_exc

    try:
        router = l3().get_router(ctx, router_id)
    except l3_exc.RouterNotFound:
        return put_entry("routers", router_id, None)
    ports = core().get_ports(ctx, filters={"device_id": [router_id],
                                           "device_owner": list(INTERFACE_OWNERS)})
    nets = [n for n, _ in tr.router_interfaces(ports).get(router_id, [])]

    def edit(doc: dict[str, Any]) -> None:
        entry = tr.router_entry(router, [n for n in nets if n in doc.get("networks", {})],
                                "external" in doc)
        held = doc.get("routers", {}).get(router_id)
        if held and held.get("snat_nodes") and entry.get("external_gateway"):
            entry["snat_nodes"] = held["snat_nodes"]  # an operator's explicit candidates
        put_entry("routers", router_id, entry)(doc)
    return edit


# --- the mechanism driver ------------------------------------------------------------------
class DvrMechanismDriver(api.MechanismDriver):
    """ML2 mechanism driver for dvr (VXLAN tenant networks, ports bound to dvr agents)."""

    def initialize(self) -> None:
        self.status: StatusThread | None = None
        registry.subscribe(self._post_fork, resources.PROCESS, events.AFTER_INIT)
        LOG.info("dvr mechanism driver: northbound %s", _conf().northbound)

    def _post_fork(self, resource: Any, event: Any, trigger: Any, payload: Any = None) -> None:
        self.start_status()

    def start_status(self) -> None:
        if self.status is None or not self.status.is_alive():
            self.status = StatusThread()
            self.status.start()

    @property
    def connectivity(self) -> str:
        return portbindings.CONNECTIVITY_L2

    # networks
    def create_network_postcommit(self, context: Any) -> None:
        self._network(context._plugin_context, context.current["id"])

    def update_network_postcommit(self, context: Any) -> None:
        self._network(context._plugin_context, context.current["id"])

    def delete_network_postcommit(self, context: Any) -> None:
        net = context.current
        if tr.is_external(net):
            WRITER.apply(f"external network {net['id']} deleted",
                         [lambda doc: doc.pop("external", None)])
        else:
            WRITER.apply(f"network {net['id']} deleted", [put_entry("networks", net["id"], None)])

    def _network(self, ctx: Any, network_id: str) -> None:
        self.start_status()
        WRITER.apply(f"network {network_id}", [network_edit(ctx, network_id)])

    # subnets
    def create_subnet_precommit(self, context: Any) -> None:
        subnet = context.current
        network = context.network.current
        if int(subnet.get("ip_version", 4)) != 4 or not tr.is_overlay(network):
            return
        others = [s for s in core().get_subnets(context._plugin_context,
                                                filters={"network_id": [subnet["network_id"]],
                                                         "ip_version": [4]})
                  if s["id"] != subnet["id"]]
        if others:
            raise n_exc.InvalidInput(error_message=(
                f"network {subnet['network_id']} has an IPv4 subnet already "
                f"({others[0]['id']}): dvr routes one IPv4 subnet per network"))

    def create_subnet_postcommit(self, context: Any) -> None:
        self._network(context._plugin_context, context.current["network_id"])

    def update_subnet_postcommit(self, context: Any) -> None:
        self._network(context._plugin_context, context.current["network_id"])

    def delete_subnet_postcommit(self, context: Any) -> None:
        self._network(context._plugin_context, context.current["network_id"])

    # ports
    def create_port_precommit(self, context: Any) -> None:
        self._block(context, context.current, None)

    def update_port_precommit(self, context: Any) -> None:
        self._block(context, context.current, context.original)

    def _block(self, context: Any, port: dict[str, Any], original: dict[str, Any] | None
               ) -> None:
        """A VM's port bound to a host stays DOWN until the agent there reports it wired
        (Neutron's provisioning blocks, as ML2/OVN)."""
        from neutron.db import provisioning_blocks

        host = port.get(portbindings.HOST_ID)
        if (not host or not tr.is_vm_port(port) or port["status"] == n_const.PORT_STATUS_ACTIVE
                or (original is not None and original.get(portbindings.HOST_ID) == host)):
            return
        provisioning_blocks.add_provisioning_component(
            context._plugin_context, port["id"], resources.PORT,
            provisioning_blocks.L2_AGENT_ENTITY)

    def create_port_postcommit(self, context: Any) -> None:
        self._port(context._plugin_context, context.current)

    def update_port_postcommit(self, context: Any) -> None:
        self._port(context._plugin_context, context.current)

    def delete_port_postcommit(self, context: Any) -> None:
        port = context.current
        if tr.is_vm_port(port):
            WRITER.apply(f"port {port['id']} deleted", [put_entry("vms", port["id"], None)])

    def _port(self, ctx: Any, port: dict[str, Any]) -> None:
        self.start_status()
        owner = port.get("device_owner") or ""
        if owner in INTERFACE_OWNERS and port.get("device_id"):
            WRITER.apply(f"router {port['device_id']} interface",
                         [network_edit(ctx, port["network_id"]),
                          router_edit(ctx, port["device_id"])])
        elif owner == n_const.DEVICE_OWNER_ROUTER_GW and port.get("device_id"):
            WRITER.apply(f"router {port['device_id']} gateway",
                         [router_edit(ctx, port["device_id"])])
        elif tr.is_vm_port(port):
            WRITER.apply(f"port {port['id']}", [port_edit(ctx, port["id"])])

    # binding
    def bind_port(self, context: Any) -> None:
        port = context.current
        host = context.host
        if port.get(portbindings.VNIC_TYPE, portbindings.VNIC_NORMAL) != \
                portbindings.VNIC_NORMAL:
            return
        alive, why = agent_alive(host)
        if not alive:
            LOG.warning("dvr: port %s not bound to host %s: %s", port["id"], host, why)
            return
        for segment in context.segments_to_bind:
            if segment[api.NETWORK_TYPE] == "vxlan":
                context.set_binding(segment[api.ID], portbindings.VIF_TYPE_OVS,
                                    {portbindings.CAP_PORT_FILTER: False,
                                     portbindings.OVS_HYBRID_PLUG: False,
                                     portbindings.VIF_DETAILS_BRIDGE_NAME: "br-int",
                                     portbindings.VIF_DETAILS_CONNECTIVITY:
                                         self.connectivity})
                return
        LOG.debug("dvr: port %s: no VXLAN segment to bind", port["id"])


# --- agents ------------------------------------------------------------------------------------
def read_agents(conn: nb.Northbound) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The Agent rows by node, and the Node table's roles."""
    agents, nodes = conn.transact([
        {"op": "select", "table": "Agent", "where": [],
         "columns": ["node", "heartbeat", "vms", "floating_ips", "version", "converged",
                     "flows", "snat", "started"]},
        {"op": "select", "table": "Node", "where": [], "columns": ["name", "role"]}])
    out = {}
    for r in agents.get("rows", []):
        r = dict(r)
        for col in ("vms", "floating_ips", "snat"):
            r[col] = set(northbound.members(r.get(col)))
        out[r["node"]] = r
    return out, {n["name"]: n["role"] for n in nodes.get("rows", [])}


def _is_alive(row: dict[str, Any], now: float) -> bool:
    return now - row["heartbeat"] / 1000 <= _conf().agent_down_time


_AGENTS_READ: list[Any] = [0.0, {}, {}]  # when, agents, roles: one read serves a bulk's binds
AGENTS_FRESH_S = 0.5


def agent_alive(host: str) -> tuple[bool, str]:
    when, agents, roles = _AGENTS_READ
    if time.monotonic() - when > AGENTS_FRESH_S:
        try:
            conn = _connect()
        except nb.NbError as exc:
            return False, f"the northbound database is unreachable ({exc})"
        try:
            agents, roles = read_agents(conn)
        except nb.NbError as exc:
            return False, str(exc)
        finally:
            conn.close()
        _AGENTS_READ[:] = [time.monotonic(), agents, roles]
    if host not in roles:
        return False, "no such node in dvr's northbound database"
    if roles[host] != "compute":
        return False, f"node {host} is a {roles[host]} node; VMs run on compute nodes"
    row = agents.get(host)
    if row is None:
        return False, "no dvr agent has reported from it"
    if not _is_alive(row, time.time()):
        ago = time.time() - row["heartbeat"] / 1000
        return False, f"its dvr agent is dead (last heard {ago:.0f} s ago)"
    return True, ""


class StatusThread(threading.Thread):
    """Polls the agents' reports: port and floating-IP status, Neutron's agent list, and
    the repair after a lost write."""

    AGENT_REPORT_INTERVAL = 10.0  # s between two agent heartbeats written to Neutron

    def __init__(self) -> None:
        super().__init__(name="dvr-status", daemon=True)
        self.wired: dict[str, set[str]] = {}  # node -> ports reported wired
        self.natted: set[str] | None = None
        self.reported: dict[str, tuple[float, bool]] = {}
        # the first look repairs what was lost while no neutron-server ran (a write queued
        # when the last one died, say)
        self.was_unreachable = True

    def run(self) -> None:
        while True:
            try:
                self.poll()
            except Exception:  # never let the thread die: log, go on
                LOG.exception("dvr: status poll failed")
            time.sleep(_conf().status_interval)

    def poll(self) -> None:
        try:
            conn = _connect()
        except nb.NbError:
            self.was_unreachable = True
            return
        try:
            agents, roles = read_agents(conn)
        finally:
            conn.close()
        ctx = n_context.get_admin_context()
        if self.was_unreachable or WRITER.dirty:
            self.was_unreachable = False
            WRITER.dirty = False
            WRITER.run_alone("repair", lambda: self._repair(ctx))
        now = time.time()
        alive = {n for n, r in agents.items() if _is_alive(r, now)}
        for node, row in agents.items():
            wired = row["vms"] if node in alive else set()
            before = self.wired.get(node)
            if before is None:  # first look: bring Neutron in line with what is wired
                self._first_look(ctx, node, wired)
            else:
                for port_id in sorted(wired - before):
                    self._up(ctx, port_id)
                for port_id in sorted(before - wired):
                    self._down(ctx, port_id, node)
            self.wired[node] = set(wired)
            self._agent(ctx, node, row, node in alive, roles.get(node, ""))
        natted = set().union(*(agents[n]["floating_ips"] for n in alive)) if alive else set()
        if natted != self.natted:
            self._floating_ips(ctx, natted)
            self.natted = natted

    def _repair(self, ctx: Any) -> None:
        from dvr.neutron import sync

        try:
            diffs = sync.run(ctx, _conf().northbound, repair=True, timeout=_conf().timeout)
        except Exception as exc:
            WRITER.dirty = True
            LOG.warning("dvr: repair failed (%s); tried again on the next poll", exc)
            return
        for d in diffs:
            LOG.warning("dvr: repaired: %s", d)
        LOG.info("dvr: northbound compared with Neutron: %d differences repaired", len(diffs))

    def _first_look(self, ctx: Any, node: str, wired: set[str]) -> None:
        ports = core().get_ports(ctx, filters={portbindings.HOST_ID: [node]})
        for p in ports:
            if not tr.is_vm_port(p):
                continue
            if p["id"] in wired and p["status"] != n_const.PORT_STATUS_ACTIVE:
                self._up(ctx, p["id"])
            elif p["id"] not in wired and p["status"] == n_const.PORT_STATUS_ACTIVE:
                self._down(ctx, p["id"], node)

    def _up(self, ctx: Any, port_id: str) -> None:
        from neutron.db import provisioning_blocks

        LOG.info("dvr: port %s wired", port_id)
        provisioning_blocks.provisioning_complete(ctx, port_id, resources.PORT,
                                                  provisioning_blocks.L2_AGENT_ENTITY)

    def _down(self, ctx: Any, port_id: str, node: str) -> None:
        from neutron.db import provisioning_blocks

        try:
            port = core().get_port(ctx, port_id)
        except n_exc.PortNotFound:
            return
        if port.get(portbindings.HOST_ID) != node:
            return  # it moved: the other host's agent tells
        LOG.info("dvr: port %s no longer wired on %s", port_id, node)
        provisioning_blocks.add_provisioning_component(
            ctx, port_id, resources.PORT, provisioning_blocks.L2_AGENT_ENTITY)
        core().update_port_status(ctx, port_id, n_const.PORT_STATUS_DOWN)

    def _floating_ips(self, ctx: Any, natted: set[str]) -> None:
        plugin = l3()
        if plugin is None:
            return
        for fip in plugin.get_floatingips(ctx):
            want = (n_const.FLOATINGIP_STATUS_ACTIVE
                    if fip.get("port_id") and fip["floating_ip_address"] in natted
                    else n_const.FLOATINGIP_STATUS_DOWN)
            if fip["status"] != want:
                plugin.update_floatingip_status(ctx, fip["id"], want)
                if fip.get("port_id"):  # its revision went up, and no event tells
                    WRITER.apply(f"floating IP {fip['id']} {want}",
                                 [port_edit(ctx, fip["port_id"])])

    def _agent(self, ctx: Any, node: str, row: dict[str, Any], alive: bool, role: str
               ) -> None:
        last, was_alive = self.reported.get(node, (0.0, False))
        if not alive or (was_alive and time.monotonic() - last < self.AGENT_REPORT_INTERVAL):
            self.reported[node] = (last, alive and was_alive)
            return
        state = {"agent_type": AGENT_TYPE, "binary": AGENT_BINARY, "host": node,
                 "topic": "N/A", "start_flag": not was_alive,
                 "configurations": {"role": role, "version": row.get("version"),
                                    "flows": row.get("flows"), "converged":
                                    row.get("converged"), "snat": sorted(row["snat"])}}
        core().create_or_update_agent(ctx, state)
        self.reported[node] = (time.monotonic(), True)
