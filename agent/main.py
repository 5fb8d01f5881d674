"""dvr-agent: keeps one node's Open vSwitch in step with the desired state.

The loop: wake on a change of the topology source or of OVSDB (a port plugged, a tunnel got
its OpenFlow number), or on the resync timer; plan the node's flows (pure); diff them against
the flows carrying our cookie; apply the difference in one bundle; report. Flows of any other
cookie are never read or touched, nothing is flushed on start, and stopping the agent leaves
the dataplane as it is.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent import arp, config, tls
from agent.conntrack import Conntrack, ConntrackError
from agent.flowtables import (
    Desired,
    Installed,
    diff,
    diff_groups,
    diff_touched,
    diff_touched_groups,
)
from agent.metrics import Metrics
from agent.ofswitch import OpenFlowError, Switch
from agent.ovsdb import Ovsdb, OvsdbError
from agent.source import FileSource, NbSource, Source
from agent.version import VERSION
from flows import ha, nat, northbound
from flows.incremental import Change, IncrementalPlan
from flows.model import Topology, TopologyError
from flows.nat import Binding
from flows.planner import announcements
from flows.ports import bfd_config, needs_bfd, node_ports

LOG = logging.getLogger(__name__)
# a newly hosted address is announced by gratuitous ARP at these delays (seconds): several,
# because one can be lost, or ignored by a neighbour that updated its entry a moment ago
GARP_DELAYS = (0.0, 0.5, 1.5)
# the upstream gateway's MAC, when the topology does not give it, is resolved by ARP and
# checked again every GATEWAY_REFRESH seconds (every GATEWAY_RETRY while unanswered)
GATEWAY_REFRESH, GATEWAY_RETRY, GATEWAY_TIMEOUT = 30.0, 1.0, 0.2
# the loop wakes at least this often (seconds), even when nothing is due
MAX_SLEEP = 1.0
# every so often (seconds) a periodic resync also plans the node whole, the reference the
# incremental plan must equal (flows.incremental): a difference is logged and the whole plan
# kept
REPLAN_INTERVAL = 600.0
# a BFD session that has not come up within this many seconds of the agent's start counts as
# down (before that, only one seen up and gone down does): sessions take a second to come up
BFD_SETTLE = 3.0
# how often a network node publishes the translations of the routers it serves that did not
# keep their port (flows.nat)
NAT_SYNC = 1.0
# ... and how long a node that took a router over still holds the translations the node it
# replaced published (for the connections whose first packet comes late)
HELD_GRACE = 60.0


@dataclass
class SyncResult:
    added: int
    deleted: int
    flows: int
    vms: list[str] = field(default_factory=list)
    snat: list[str] = field(default_factory=list)
    announce: dict[str, str] = field(default_factory=dict)
    provider: int | None = None
    timing: dict[str, float] = field(default_factory=dict)  # milliseconds, by phase
    read_back: bool = False  # every flow read back from the switch and diffed


class _Clock:
    """Milliseconds spent in each phase of a sync, for the log and the status."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps[phase] = round((now - self._t) * 1e3, 2)
        self._t = now

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in self.laps.items())
        return f"{sum(self.laps.values()):.1f} ms ({parts})"


class DvrAgent:
    def __init__(self, conf: Any, source: Source | None = None):
        self.conf = conf
        self.node: str = conf.node
        self.bridge: str = conf.ovs.integration_bridge
        if source is None:
            source = (NbSource(conf.topology.nb_connection, conf.node)
                      if conf.topology.source == "nb"
                      else FileSource(conf.topology.file))
        self.source = source
        target = conf.ovs.openflow_connection or (
            f"unix:{os.path.join(conf.ovs.ovs_rundir, self.bridge)}.mgmt")
        self.switch = Switch(target)
        self.ovsdb: Ovsdb | None = None
        self.topo: Topology | None = None
        self.running = True
        self._stop_r, self._stop_w = os.pipe()  # wakes the loop from a signal handler
        self.status: dict[str, Any] = {
            "node": self.node, "pid": os.getpid(), "version": VERSION, "converged": False,
            "generation": None, "flows": 0, "vms": [], "floating_ips": [], "snat": [],
            "error": None, "syncs": 0, "started": time.time(), "bfd": {},
        }
        self._last_report = 0.0
        self._announced: dict[str, str] = {}  # provider addresses answered here -> MAC
        self._garps: list[tuple[float, str, str, int]] = []  # (due, ip, mac, port)
        self._gateway: tuple[str, str] | None = None  # (gateway IP, resolved MAC)
        self._gateway_next = 0.0
        # the flows we own on the switch, as last known (see agent/flowtables.py)
        self.installed = Installed()
        # the node's plan, indexed by object and updated by what changed (flows.incremental);
        # what changed in the topology since its last update (None: unknown, compared); the
        # cookies and group ids it touched since the last committed bundle (None: unknown,
        # every flow is diffed)
        self.planner: IncrementalPlan | None = None
        self._change: Change | None = Change()
        self._loaded: Topology | None = None  # the last topology the source handed out
        self._touched: set[int] | None = None
        self._touched_groups: set[int] = set()
        self._peers: tuple[Any, dict[str, str], dict[str, dict[str, str]]] | None = None
        # SNAT claims (flows.ha): this node's BFD sessions as the last sync read them, the
        # peers whose session has been up since the start, the claims in force
        self.started = time.monotonic()
        self._bfd: dict[str, str] = {}
        self._bfd_seen_up: set[str] = set()
        # the peers whose session was up at the last sync that reached the switch, and
        # those trusted without their session since the switch restarted (peer -> until)
        self._up_before: frozenset[str] = frozenset()
        self._trusted: dict[str, float] = {}
        self._synced_on = 0  # the switch connection of the last sync
        # the switch connection a sync completed on with flow-restore-wait unset: the flag
        # set later on that same switch is for its coming restart, not this one's
        self._synced_unheld_on: int | None = None
        self._held_noted = False
        self._vm_ports: Mapping[str, int] = {}  # the local VMs' OpenFlow ports, last sync
        # what the last sync read plugged, and for which nodes and external network
        self._plugged: tuple[Any, Any] | None = None
        self._claims: frozenset[str] = frozenset()
        self._reports_seen = -1  # the source's report_changes when claims were last weighed
        self._ha_due: float | None = None  # when the claims must be weighed again
        # translations: published (ours), committed here as a standby (router -> bindings)
        self.conntrack = Conntrack(conf.ovs.ovs_rundir)
        self._published: list[str] = []
        self._held: frozenset[Binding] = frozenset()  # what the serving nodes publish
        self._held_by_router: dict[str, tuple[float, frozenset[Binding]]] = {}
        self._nat_next = 0.0
        self.metrics = Metrics(self.node, VERSION)
        # this agent's TLS files, looked at once a second: a rotated certificate is taken
        # by reconnecting (the `ovs` streams read the files at each connection)
        self._tls = tls.Watch(tls.identity())
        self._tls_next = 0.0
        self._refused_seen = 0
        if conf.metrics.bind_host:
            self.status["metrics"] = self.metrics.serve(conf.metrics.bind_host,
                                                        conf.metrics.port)

    def _watch_identity(self, now: float) -> None:
        """Reconnect when the TLS files changed; count the reports the database refused."""
        if isinstance(self.source, NbSource):
            refused = self.source.refused
            if refused > self._refused_seen:
                self.metrics.nb_refused.inc(refused - self._refused_seen)
                self._refused_seen = refused
        if now < self._tls_next or self._tls.ident is None:
            return
        self._tls_next = now + 1.0
        if self._tls.changed() and isinstance(self.source, NbSource):
            self.metrics.nb_reconnects.labels("certificate").inc()
            self.source.reconnect(f"the certificate {self._tls.ident.certificate} changed")

    # --- status ---------------------------------------------------------------------------
    def report(self, **changes: Any) -> None:
        self.status.update(changes)
        self.status["heartbeat"] = time.time()
        self.metrics.state(self.status["heartbeat"], self.source.connected(),
                           self.status.get("bfd") or {}, self.status.get("snat") or [])
        publish = getattr(self.source, "report", None)
        if publish is not None:  # the northbound database has an Agent table
            try:
                publish(self.node, self.status)
            except Exception:  # a report must never stop the agent
                LOG.warning("cannot report to the northbound database", exc_info=True)
        path = self.conf.agent.status_file
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.status, f, sort_keys=True)
        os.replace(tmp, path)
        self._last_report = time.monotonic()

    # --- one reconciliation ---------------------------------------------------------------
    def sync(self, full: bool = True, replan: bool = False, check: bool = False
             ) -> SyncResult:
        """One reconciliation. `full` reads back the flows we own from the switch and
        diffs them all; else the flows the last successful sync left are taken as
        installed (a change of the desired state alone: the switch and its ports did not
        change meanwhile) and only the flows the plan's update touched are diffed. `check`
        first asks the switch how many flows of ours it holds, and which groups: any
        difference from what the last sync left reads every flow back (a flow deleted
        behind the agent's back, a switch restarted). The plan itself is updated
        incrementally (flows.incremental), planned whole at start and with `replan`."""
        assert self.topo is not None and self.ovsdb is not None
        topo = self.topo
        clock = _Clock()
        if not full and self.ovsdb.flow_restore_wait():
            full = True  # a switch restarted, waiting for every flow: read what it has
        peers, bfd = self._tunnels(topo)
        wants = (topo.nodes, topo.external, self.ovsdb.changes)
        if self._plugged is not None and self._plugged[0] == wants:
            # the nodes and the external network the same, and not one OVSDB row changed
            # since the last sync: what is plugged and the tunnels are as they were
            plugged = self._plugged[1]
        else:
            changes = self.ovsdb.changes  # before reading: a change meanwhile reads again
            plugged = self.ovsdb.plugged(self.bridge)
            changed = self.ovsdb.ensure_tunnels(self.bridge, peers, self.conf.ovs.tunnel_type,
                                                self.conf.ovs.local_ip, plugged, bfd)
            provider_bridge = self.conf.ovs.external_bridge
            if topo.external is not None and provider_bridge:
                changed |= self.ovsdb.ensure_provider_patch(self.bridge, provider_bridge)
            if changed:  # read again what the changes made
                plugged = self.ovsdb.plugged(self.bridge)
            self._plugged = None if changed else ((topo.nodes, topo.external, changes),
                                                  plugged)
        self._bfd = dict(plugged.bfd)
        self._claims = self.claims()
        self._held = self.held()
        ports = dataclasses.replace(
            node_ports(topo, self.node, plugged, self.gateway_mac(), self._claims),
            held=self._held, trusted=self._trust())
        clock.lap("ovsdb")
        desired = self._plan(topo, ports, replan)
        clock.lap("plan")
        # the connection what is installed is true of: a reconnection during the bundle (a
        # switch restarted meanwhile) makes the next sync read the flows back
        connection = self.switch.connections
        known = None if full else self.installed.by_cookie(connection)
        known_groups = None if full else self.installed.groups_by_id(connection)
        if check and known is not None and known_groups is not None:
            if not self._holds(known, known_groups, connection):
                known = known_groups = None
                full = True
            clock.lap("check")
        if known is not None and known_groups is not None and self._touched is not None:
            # a change of the desired state alone: the flows the plan touched, O(change)
            stale, missing = diff_touched(desired, known, self._touched)
            new_groups, changed_groups, stale_groups = diff_touched_groups(
                desired.groups, known_groups, self._touched_groups)
            self.installed.forget()  # unknown until the bundle is committed
            self._bundle(new_groups, changed_groups, stale, missing, stale_groups)
            clock.lap("apply")
            self.installed.changed(known, stale, missing, {
                **{g.group_id: g for g in (*new_groups, *changed_groups)},
                **dict.fromkeys(stale_groups)}, connection)
        else:
            current = None if full else self.installed.known(connection)
            groups = None if full else self.installed.groups(connection)
            if current is None or groups is None:
                current = self.switch.dump_owned(desired.by_cookie)
                groups = self.switch.dump_groups()
                connection = self.switch.connections
                self.installed.read(current, connection, groups)
                clock.lap("dump")
            stale, missing = diff(desired, current)
            new_groups, changed_groups, stale_groups = diff_groups(dict(desired.groups),
                                                                   groups)
            self.installed.forget()  # unknown until the bundle is committed
            self._bundle(new_groups, changed_groups, stale, missing, stale_groups)
            clock.lap("apply")
            self.installed.applied(current, stale, missing, connection, dict(desired.groups))
        self._touched, self._touched_groups = set(), set()  # the switch has the plan
        self._up_before = frozenset(p for p, st in self._bfd.items() if st == ha.UP)
        self._synced_on = self.switch.connections
        self._vm_ports = ports.vms
        if stale or missing or new_groups or changed_groups or stale_groups:
            LOG.info("node %s: +%d -%d flows (%d desired), groups +%d ~%d -%d in %s",
                     self.node, len(missing), len(stale), len(desired), len(new_groups),
                     len(changed_groups), len(stale_groups), clock)
        return SyncResult(len(missing), len(stale), len(desired), sorted(ports.vms),
                          sorted(ports.snat), announcements(topo, self.node, ports),
                          ports.provider, clock.laps, full)

    def _holds(self, flows: Any, groups: Any, connection: int) -> bool:
        """Whether the switch still holds what the last sync left: as many flows of ours
        (the switch counts them: one round trip) and the same groups of ours."""
        count = self.switch.count_owned()
        same = (count == len(flows) and self.switch.connections == connection
                and self.switch.dump_groups() == dict(groups))
        if not same:
            LOG.info("node %s: the switch holds %d flows of ours, %d were installed: "
                     "reading them back", self.node, count, len(flows))
        return same

    def _trust(self) -> frozenset[str]:
        """The peers to count as up although their BFD session is not. A restarted switch
        starts every session from down, and a session comes up only a second or so after
        the switch forwards again (a peer that is not up sends one BFD packet a second,
        RFC 5880): meanwhile its fast-failover groups would send nothing to the network
        nodes, and the node's VMs would lose the outside. So when the switch may have
        restarted (the agent's connection to it is not the one of the last sync), the peers
        whose session was up at the last sync are trusted, for BFD_SETTLE at most, each
        until its own session is up again; a peer that dies meanwhile costs that long."""
        now = time.monotonic()
        restarted = not self.switch.connected or self.switch.connections != self._synced_on
        if restarted:
            for p in self._up_before:
                self._trusted.setdefault(p, now + BFD_SETTLE)
        # a session's state counts once the switch is the one of the last sync (just after
        # a restart, the database may still show the old switch's)
        self._trusted = {p: until for p, until in self._trusted.items()
                         if until > now and (restarted or self._bfd.get(p) != ha.UP)}
        return frozenset(self._trusted)

    def _tunnels(self, topo: Topology) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
        """The tunnels this node wants (peer -> remote IP) and their BFD settings: computed
        again only when the topology's nodes changed (the model keeps them otherwise)."""
        if self._peers is None or self._peers[0] is not topo.nodes:
            peers = {
                n.name: str(n.tunnel_ip)
                for n in topo.nodes.values()
                if n.name != self.node and n.tunnel_ip is not None
            }
            bfd = {p: bfd_config(self.conf.ovs.bfd_interval)
                   if needs_bfd(topo, self.node, p) else {} for p in peers}
            self._peers = (topo.nodes, peers, bfd)
        return self._peers[1], self._peers[2]

    def _plan(self, topo: Topology, ports: Any, replan: bool = False) -> Desired:
        """The node's desired flows: the plan updated by what changed since its last
        update (planned whole the first time, and with `replan`: checked against the
        updated one), the flows it touched noted for the diff."""
        if self.planner is not None and replan:
            self.planner.update(topo, ports, self._change)
            whole = IncrementalPlan(topo, self.node, ports)
            if whole.by_cookie.keys() != self.planner.by_cookie.keys() \
                    or whole.groups != self.planner.groups:
                LOG.error("node %s: the incremental plan differs from the whole plan "
                          "(%d flows missing, %d extra); planned whole", self.node,
                          len(whole.by_cookie.keys() - self.planner.by_cookie.keys()),
                          len(self.planner.by_cookie.keys() - whole.by_cookie.keys()))
            self.planner = whole
            self._touched = None  # diff every flow
        elif self.planner is None:
            self.planner = IncrementalPlan(topo, self.node, ports)
            self._touched = None  # diff every flow once
        else:
            # what changed since the plan's topology, up to the last one loaded (the one
            # planned, or a later one this agent refused: then kept for the next)
            delta = self.planner.update(topo, ports, self._change)
            if self._touched is not None:
                self._touched.update(delta.added)
                self._touched.update(delta.removed)
            self._touched_groups |= delta.groups
        if topo is self._loaded:
            self._change = Change()
        return Desired.of(self.planner.by_cookie, self.planner.groups)

    def _bundle(self, new_groups: list[Any], changed_groups: list[Any], stale: list[Any],
                missing: list[Any], stale_groups: list[int]) -> None:
        with self.switch.bundle() as bundle:
            bundle.add_groups(new_groups)  # groups before the flows that apply them
            bundle.add_groups(changed_groups, modify=True)
            bundle.delete(stale)
            bundle.add(missing)
            bundle.delete_groups(stale_groups)  # and after the flows that applied them

    # --- SNAT claims ------------------------------------------------------------------------
    def claims(self) -> frozenset[str]:
        """The routers this node speaks for on the provider network (flows.ha): weighed on
        its BFD sessions and on what the other agents report (fresh ones only)."""
        assert self.topo is not None
        now = time.monotonic()
        self._bfd_seen_up |= {p for p, state in self._bfd.items() if state == ha.UP}
        settled = set(self._bfd_seen_up)
        if now - self.started >= BFD_SETTLE:
            settled |= set(self._bfd)
        fresh = self.conf.agent.agent_down_time
        seen = self.source.reports(fresh)
        self._reports_seen = self.source.report_changes
        # weigh again when a report goes stale, or when the sessions settle
        due = [self.started + BFD_SETTLE] if now - self.started < BFD_SETTLE else []
        due += [now + fresh - age for age in self.source.report_ages().values()
                if age <= fresh]
        self._ha_due = min(due) if due else None
        return ha.claims(self.topo, self.node,
                         ha.View(self._bfd, frozenset(settled), seen))

    def _claims_changed(self) -> bool:
        """Weigh the claims (and the translations held) again if the others' reports
        changed or a deadline passed; True when they differ from those in force (a sync
        must install them)."""
        if self.topo is None:
            return False
        moved = self.source.report_changes != self._reports_seen
        due = self._ha_due is not None and time.monotonic() >= self._ha_due
        if not (moved or due):
            return False
        return self.claims() != self._claims or self.held() != self._held

    # --- translations that must survive a failover ------------------------------------------
    def sync_translations(self) -> bool:
        """On a network node, every NAT_SYNC: publish the translations of the routers this
        node serves that did not keep their source port (flows.nat). True when they
        changed (a report is due)."""
        now = time.monotonic()
        if self.topo is None or now < self._nat_next or not self._network_node():
            return False
        self._nat_next = now + NAT_SYNC
        published: list[str] = []
        routers = [self.topo.routers[n] for n in sorted(self._claims) if n in self.topo.routers]
        if routers:
            try:
                lines = self.conntrack.dump()  # one read for all the routers served here
            except ConntrackError as exc:
                LOG.warning("cannot read the translations: %s", exc)
                return False
            for router in routers:
                zone = f",zone={router.snat_zone},"
                published += [str(b) for b in nat.moved_translations(
                    router.name, str(router.external_ip), [ln for ln in lines if zone in ln])
                    if b.proto != 1]
        changed = published != self._published
        self._published = published
        return changed

    def held(self) -> frozenset[Binding]:
        """The translations the nodes serving the routers this node stands by for publish:
        what it must hold ready (the planner makes flows of them)."""
        if self.topo is None or not self._network_node():
            return frozenset()
        now = time.monotonic()
        out: set[Binding] = set()
        for router in self.topo.routers.values():
            if not router.external_gateway or self.node not in router.snat_nodes:
                self._held_by_router.pop(router.name, None)
                continue
            if router.name not in self._claims:
                found = frozenset(
                    b for t in self.source.bindings(router.name,
                                                    self.conf.agent.agent_down_time)
                    if (b := nat.Binding.parse(t)) is not None)
                self._held_by_router[router.name] = (now, found)
            since, found = self._held_by_router.get(router.name, (now, frozenset()))
            if now - since <= HELD_GRACE:  # served here: kept a while after the takeover
                out |= found
        return frozenset(out)

    def _network_node(self) -> bool:
        node = self.topo.nodes.get(self.node) if self.topo else None
        return node is not None and node.is_network

    # --- the upstream gateway ---------------------------------------------------------------
    def gateway_mac(self) -> str | None:
        ext = self.topo.external if self.topo else None
        if ext is None:
            return None
        if ext.gateway_mac:
            return ext.gateway_mac
        if self._gateway and self._gateway[0] == str(ext.gateway_ip):
            return self._gateway[1]
        return None

    def _resolves_gateway(self) -> bool:
        """Whether the gateway's MAC is this agent's to resolve (an external network whose
        gateway MAC the topology does not give, and a provider bridge to ask through)."""
        ext = self.topo.external if self.topo else None
        return ext is not None and not ext.gateway_mac and bool(self.conf.ovs.external_bridge)

    def refresh_gateway(self) -> bool:
        """Resolve the gateway's MAC by ARP when it is due; True when it changed. A gateway
        that stops answering keeps its last MAC (as a kernel neighbour entry would)."""
        if not self._resolves_gateway():
            return False
        assert self.topo is not None and self.topo.external is not None
        ext, bridge = self.topo.external, self.conf.ovs.external_bridge
        now = time.monotonic()
        gw = str(ext.gateway_ip)
        if self._gateway and self._gateway[0] != gw:
            self._gateway, self._gateway_next = None, 0.0
        if now < self._gateway_next:
            return False
        before = self.gateway_mac()
        try:
            mac = arp.resolve(bridge, gw, GATEWAY_TIMEOUT)
        except arp.ArpError as exc:
            LOG.warning("cannot resolve the gateway %s: %s", gw, exc)
            mac = None
        if mac is not None:
            self._gateway = (gw, mac)
            self._gateway_next = now + GATEWAY_REFRESH
        else:
            self._gateway_next = now + GATEWAY_RETRY
        after = self.gateway_mac()
        if after != before:
            LOG.info("node %s: gateway %s is at %s", self.node, gw, after)
        return after != before

    # --- gratuitous ARP -------------------------------------------------------------------
    def _announce(self, result: SyncResult) -> None:
        """Schedule gratuitous ARPs for provider addresses newly answered here."""
        now = time.monotonic()
        if result.provider is not None:
            for ip, mac in sorted(result.announce.items()):
                if self._announced.get(ip) != mac:
                    LOG.info("node %s: announcing %s at %s", self.node, ip, mac)
                    self._garps += [(now + d, ip, mac, result.provider) for d in GARP_DELAYS]
        self._announced = dict(result.announce)
        # forget announcements of addresses that are no longer here
        self._garps = [g for g in self._garps if self._announced.get(g[1]) == g[2]]

    def _send_due_garps(self) -> None:
        now = time.monotonic()
        due = [g for g in self._garps if g[0] <= now]
        if not due:
            return
        self._garps = [g for g in self._garps if g[0] > now]
        for _, ip, mac, port in due:
            try:
                self.switch.packet_out(port, arp.gratuitous_arp(ip, mac))
            except OpenFlowError as exc:
                LOG.warning("gratuitous ARP for %s failed: %s", ip, exc)

    def _restore_done(self) -> None:
        """After a sync that installed every flow: if ovs-vswitchd was started holding its
        datapath (flow-restore-wait, an OVS restart or upgrade), let it forward. A failure
        is retried after the next sync; the switch forwards nothing meanwhile, never half.

        The flag is read by ovs-vswitchd when it starts: set on a switch this agent has
        already synced on the same connection (an operator about to restart or upgrade it:
        `ovs-vsctl set ... flow-restore-wait=true; systemctl restart ovs-vswitchd`), it is
        for the next ovs-vswitchd, and clearing it would make that one flush the kernel's
        flows at start. It is left set until the agent's connection is to a new switch."""
        assert self.ovsdb is not None
        try:
            if not self.ovsdb.flow_restore_wait():
                self._synced_unheld_on = self._synced_on
                self._held_noted = False
                return
            if self._synced_unheld_on == self._synced_on:
                if not self._held_noted:
                    sent = self._confirm_gateways()
                    LOG.info("node %s: flow-restore-wait set on the running switch: left set "
                             "for its restart; %d VMs told their gateway's MAC again",
                             self.node, sent)
                    self._held_noted = True
                return
            self.ovsdb.clear_flow_restore_wait()
            self._held_noted = False
            LOG.info("node %s: every flow is back: flow-restore-wait cleared", self.node)
        except OvsdbError as exc:
            LOG.warning("cannot clear flow-restore-wait: %s", exc)

    def _confirm_gateways(self) -> int:
        """Ahead of a restart of the switch: tell every local VM on a routed network, by a
        unicast ARP reply from its gateway, that the gateway is at the router's MAC, which
        makes its neighbour entry reachable again (Linux: for 15 to 45 s, then stale but
        usable, probed only 5 s after its next use). The kernel datapath cannot answer ARP
        itself (it cannot rewrite ARP fields: those replies are made in ovs-vswitchd), so a
        VM that probes its gateway while ovs-vswitchd is down would get no answer and
        drop what it sends until the switch is back; confirmed now, it has no reason to
        probe during the restart. Returns how many VMs were told."""
        assert self.topo is not None
        sent = 0
        for vm in self.topo.vms_on(self.node):
            port = self._vm_ports.get(vm.name)
            router = self.topo.router_of(vm.network)
            if port is None or router is None:
                continue
            for itf in router.interfaces:
                if itf.network != vm.network:
                    continue
                try:
                    self.switch.packet_out(
                        port, arp.unicast_reply(itf.mac, str(itf.ip), vm.mac, str(vm.ip)))
                    sent += 1
                except OpenFlowError as exc:
                    LOG.warning("ARP reply to %s failed: %s", vm.name, exc)
        return sent

    # --- the loop -------------------------------------------------------------------------
    def _load(self) -> bool:
        try:
            topo = self.source.load()
        except TopologyError as exc:
            LOG.error("desired state refused, keeping the last one: %s", exc)
            self.metrics.refused.inc()
            self.report(error=str(exc))
            return False
        # what changed since the topology last handed out, for the planner (the source
        # handed this one out: merged even if the agent keeps its last state)
        change = self.source.delta()
        self._change = None if change is None or self._change is None else self._change | change
        self._loaded = topo
        if self.node not in topo.nodes:
            LOG.error("node %s is not in the topology; keeping the last state", self.node)
            self.report(error=f"node {self.node} is not in the topology")
            return False
        self.topo = topo
        return True

    def run(self) -> int:
        conf = self.conf
        self.report()
        while self.running and self.ovsdb is None:
            try:
                self.ovsdb = Ovsdb(conf.ovs.ovsdb_connection, conf.ovs.ovsdb_timeout)
                self.ovsdb.ensure_bridge(self.bridge, conf.ovs.datapath_type)
            except OvsdbError as exc:
                self.ovsdb = None
                self.report(error=str(exc), converged=False)
                LOG.warning("%s; retrying", exc)
                time.sleep(1)
        # full: read the switch's flows back; check: count them first (see sync())
        dirty = full = True
        check = False
        next_resync = next_audit = 0.0
        next_replan = time.monotonic() + REPLAN_INTERVAL
        backoff = 0.1
        while self.running:
            now = time.monotonic()
            if self.source.poll() and self._load():
                dirty = True
            if self.ovsdb is not None and self.ovsdb.changed.is_set():
                self.ovsdb.changed.clear()
                # ports changed (the plan follows them), or a restarted ovs-vswitchd
                dirty = check = True
            if now >= next_resync:
                dirty = check = True
            if now >= next_audit:
                dirty = full = True
            if self.refresh_gateway():
                dirty = True
            if self._trusted and min(self._trusted.values()) <= now:
                dirty = True  # a trusted peer's session did not come up in time
            if not dirty and self._claims_changed():
                dirty = True  # another node took over, or gave up, a router
            if dirty and self.topo is not None:
                replan = full and now >= next_replan
                try:
                    result = self.sync(full, replan, check)
                except (OpenFlowError, OvsdbError) as exc:
                    LOG.warning("sync failed: %s", exc)
                    self.metrics.failed("bundle" if isinstance(exc, OpenFlowError) else "ovsdb")
                    self.report(converged=False, error=str(exc))
                    # back off, but try again at once when OVSDB changes: a restarted
                    # ovs-vswitchd numbering its ports is ready for the flows
                    self._pause(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                backoff = 0.1
                self.metrics.synced(result.read_back, result.flows, result.added,
                                    result.deleted, result.timing)
                self._restore_done()
                if full or check:
                    next_resync = now + conf.agent.resync_interval
                if full:
                    next_audit = now + conf.agent.audit_interval
                if replan:
                    next_replan = now + REPLAN_INTERVAL
                dirty = full = check = False
                self._announce(result)
                self.report(converged=True, generation=self.topo.digest, flows=result.flows,
                            vms=result.vms, snat=result.snat, error=None,
                            # the floating IPs of the VMs wired here: NATed on this node
                            floating_ips=sorted(
                                str(self.topo.vms[v].floating_ip) for v in result.vms
                                if v in self.topo.vms and self.topo.vms[v].floating_ip),
                            known_vms=len(self.topo.vms),  # what the source holds
                            gateway_mac=self.gateway_mac(), bfd=dict(self._bfd),
                            syncs=self.status["syncs"] + 1,
                            last_change={"added": result.added, "deleted": result.deleted,
                                         "ms": result.timing})
            elif now - self._last_report >= conf.agent.heartbeat_interval:
                self.report()
            if self.sync_translations():
                self.report(snat_bindings=list(self._published))
            self._watch_identity(now)
            self._send_due_garps()
            self._wait(min(next_resync, next_audit), backoff if dirty else None)
        if self.ovsdb is not None:
            self.ovsdb.close()
        self.switch.close()
        return 0

    def _pause(self, seconds: float) -> None:
        """Sleep `seconds`, or until OVSDB reports a change or the agent is stopped."""
        import ovs.poller

        poller = ovs.poller.Poller()
        if self.ovsdb is not None:
            poller.fd_wait(self.ovsdb.changed.fd, select.POLLIN)
        poller.fd_wait(self._stop_r, select.POLLIN)
        poller.timer_wait(int(seconds * 1000))
        poller.block()

    def _wait(self, next_resync: float, retry: float | None) -> None:
        """Sleep until something may need doing: the northbound database or OVSDB
        reports a change, or the next resync, heartbeat, gratuitous ARP or gateway check
        is due. A file source is polled every `poll_interval`."""
        import ovs.poller

        poller = ovs.poller.Poller()
        polled = not self.source.wait(poller)
        if self.ovsdb is not None:
            poller.fd_wait(self.ovsdb.changed.fd, select.POLLIN)
        poller.fd_wait(self._stop_r, select.POLLIN)
        poller.timer_wait(int(self._sleep(time.monotonic(), next_resync, retry, polled) * 1000))
        poller.block()

    def _sleep(self, now: float, next_resync: float, retry: float | None,
               polled: bool) -> float:
        """Seconds until the first timer is due (at most MAX_SLEEP)."""
        due = [next_resync, self._last_report + self.conf.agent.heartbeat_interval,
               now + MAX_SLEEP]
        due += [g[0] for g in self._garps]
        if self._resolves_gateway():
            due.append(self._gateway_next)
        if self._ha_due is not None:
            due.append(self._ha_due)
        due += self._trusted.values()
        if self._network_node():
            due.append(self._nat_next)
        if retry is not None:
            due.append(now + retry)
        if polled:
            due.append(now + self.conf.agent.poll_interval)
        return max(0.0, min(due) - now)

    def stop(self, *_: Any) -> None:
        self.running = False
        os.write(self._stop_w, b"!")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (ISO 8601, UTC), level, logger, node, pid, message."""

    def __init__(self, node: str):
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
               .isoformat(timespec="milliseconds"), "level": record.levelname,
               "logger": record.name, "node": self.node, "pid": record.process,
               "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
    )
    try:
        conf = config.make_conf(argv)
        if conf.log_format == "json":
            for handler in logging.getLogger().handlers:
                handler.setFormatter(JsonFormatter(conf.node))
        if conf.topology.source == "file" and not conf.topology.file:
            raise ValueError("[topology] file is required with source=file")
        if conf.topology.source == "nb" and not conf.topology.nb_connection:
            raise ValueError("[topology] nb_connection is required with source=nb")
        if conf.topology.source == "nb" and not northbound.SCHEMA.is_file():
            raise ValueError(f"the northbound schema {northbound.SCHEMA} is missing from "
                             "this installation: reinstall dvr")
        tls.configure(conf.northbound.private_key, conf.northbound.certificate,
                      conf.northbound.ca_cert)
        if conf.topology.source == "nb":
            tls.require(conf.topology.nb_connection)
    except Exception as exc:
        print(f"dvr-agent: {exc}", file=sys.stderr)
        return 2
    agent = DvrAgent(conf)
    signal.signal(signal.SIGTERM, agent.stop)
    signal.signal(signal.SIGINT, agent.stop)
    return agent.run()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
