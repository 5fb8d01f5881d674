"""What operators scrape from a dvr agent: a Prometheus text endpoint (prometheus-client),
off unless `[metrics] bind_host` is set.

dvr_agent_info{node,version}             1
dvr_agent_converged                      1 when the last sync succeeded on the current state
dvr_agent_flows_installed                flows this agent owns on the integration bridge
dvr_agent_syncs_total{kind}              syncs done: full (flows read back) or incremental
dvr_agent_sync_seconds                   histogram of a sync's duration
dvr_agent_sync_phase_seconds{phase}      histogram of each phase (ovsdb, plan, dump, apply)
dvr_agent_flow_changes_total{change}     flows added and deleted
dvr_agent_sync_errors_total{kind}        failed syncs: bundle (refused by the switch), ovsdb
dvr_agent_desired_state_errors_total     desired states refused (kept the last good one)
dvr_agent_northbound_connected           1 while connected to the northbound database
dvr_agent_bfd_session_up{peer}           1 for each tunnel whose BFD session is up
dvr_agent_snat_active{router}            1 for each router whose SNAT this node serves
dvr_agent_heartbeat_timestamp_seconds    the last report
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, node: str, version: str):
        self.registry = r = CollectorRegistry()
        self.url: str | None = None
        Gauge("dvr_agent_info", "This agent", ["node", "version"], registry=r).labels(
            node, version).set(1)
        self.converged = Gauge("dvr_agent_converged", "The last sync succeeded", registry=r)
        self.flows = Gauge("dvr_agent_flows_installed", "Flows owned on the bridge",
                           registry=r)
        self.syncs = Counter("dvr_agent_syncs", "Syncs done", ["kind"], registry=r)
        self.sync_seconds = Histogram("dvr_agent_sync_seconds", "A sync's duration",
                                      buckets=BUCKETS, registry=r)
        self.phase_seconds = Histogram("dvr_agent_sync_phase_seconds", "A sync phase",
                                       ["phase"], buckets=BUCKETS, registry=r)
        self.changes = Counter("dvr_agent_flow_changes", "Flows added and deleted",
                               ["change"], registry=r)
        self.errors = Counter("dvr_agent_sync_errors", "Failed syncs", ["kind"], registry=r)
        self.refused = Counter("dvr_agent_desired_state_errors",
                               "Desired states refused", registry=r)
        self.northbound = Gauge("dvr_agent_northbound_connected",
                                "Connected to the northbound database", registry=r)
        self.nb_refused = Counter("dvr_agent_northbound_writes_refused",
                                  "Reports the northbound database refused (RBAC)",
                                  registry=r)
        self.nb_reconnects = Counter("dvr_agent_northbound_reconnects",
                                     "Reconnections to the northbound database the agent "
                                     "asked for", ["reason"], registry=r)
        self.bfd = Gauge("dvr_agent_bfd_session_up", "A tunnel's BFD session is up", ["peer"],
                         registry=r)
        self.snat = Gauge("dvr_agent_snat_active", "SNAT served here", ["router"], registry=r)
        self.heartbeat = Gauge("dvr_agent_heartbeat_timestamp_seconds", "The last report",
                               registry=r)
        for kind in ("full", "incremental"):
            self.syncs.labels(kind)
        for kind in ("bundle", "ovsdb"):
            self.errors.labels(kind)
        for change in ("added", "deleted"):
            self.changes.labels(change)
        self._peers: set[str] = set()
        self._routers: set[str] = set()

    def serve(self, host: str, port: int) -> str:
        """Serve the metrics on host:port (a thread of its own); returns the URL."""
        start_http_server(port, addr=host, registry=self.registry)
        self.url = f"http://{host}:{port}/metrics"
        return self.url

    def synced(self, full: bool, flows: int, added: int, deleted: int,
               timing_ms: Mapping[str, float]) -> None:
        self.syncs.labels("full" if full else "incremental").inc()
        self.flows.set(flows)
        self.changes.labels("added").inc(added)
        self.changes.labels("deleted").inc(deleted)
        for phase, ms in timing_ms.items():
            self.phase_seconds.labels(phase).observe(ms / 1000)
        self.sync_seconds.observe(sum(timing_ms.values()) / 1000)
        self.converged.set(1)

    def failed(self, kind: str) -> None:
        self.errors.labels(kind).inc()
        self.converged.set(0)

    def state(self, heartbeat: float, northbound: bool | None, bfd: Mapping[str, str],
              snat: Iterable[str]) -> None:
        self.heartbeat.set(heartbeat)
        if northbound is not None:
            self.northbound.set(1 if northbound else 0)
        for peer in self._peers - set(bfd):
            self.bfd.remove(peer)
        for peer, state in bfd.items():
            self.bfd.labels(peer).set(1 if state == "up" else 0)
        self._peers = set(bfd)
        routers = set(snat)
        for router in self._routers - routers:
            self.snat.remove(router)
        for router in routers:
            self.snat.labels(router).set(1)
        self._routers = routers
