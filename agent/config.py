"""Every option of dvr-agent, declared once (oslo.config), listed for oslo-config-generator.

Options live on a private ConfigOpts built by `make_conf()`; the planner never sees them, the
agent passes plain values.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from oslo_config import cfg

from agent.version import VERSION

# what an operator installs beside the package: the systemd unit, the sample configuration
# (made by oslo-config-generator from the options below) and the generator's configuration
ETC = Path(__file__).with_name("etc")

DEFAULT_OPTS = [
    cfg.StrOpt("node", required=True,
               help="This node's name, as it appears under `nodes:` in the topology."),
]

OVS_OPTS = [
    cfg.StrOpt("ovsdb_connection", default="unix:/var/run/openvswitch/db.sock",
               help="OVSDB server of this node's Open vSwitch."),
    cfg.StrOpt("ovs_rundir", default="/var/run/openvswitch",
               help="Run directory of ovs-vswitchd, where <bridge>.mgmt sockets live."),
    cfg.StrOpt("openflow_connection",
               help="OpenFlow endpoint of the integration bridge (unix:PATH or tcp:HOST:PORT); "
                    "default: unix:<ovs_rundir>/<integration_bridge>.mgmt."),
    cfg.StrOpt("integration_bridge", default="br-int",
               help="The bridge VM ports are plugged into."),
    cfg.StrOpt("external_bridge", default="br-ex",
               help="The provider bridge on the external network (created by the operator "
                    "with its uplink); the agent patches it to the integration bridge and "
                    "resolves the upstream gateway's MAC through its own interface. "
                    "Empty: this node has no external network."),
    cfg.StrOpt("datapath_type", default="system",
               choices=[("system", "the kernel datapath"), ("netdev", "userspace")],
               help="Datapath of the bridges the agent creates (netdev: userspace)."),
    cfg.StrOpt("tunnel_type", default="vxlan",
               choices=[("vxlan", "VXLAN, UDP 4789"), ("geneve", "Geneve, UDP 6081")],
               help="Overlay encapsulation between nodes."),
    cfg.StrOpt("local_ip", help="This node's tunnel endpoint address."),
    cfg.IntOpt("bfd_interval", default=100, min=0,
               help="Milliseconds between BFD packets on the tunnels with a network node at "
                    "one end (a dead peer is detected after three); compute nodes steer a "
                    "router's SNAT to the first live node of its HA chain by it. 0: no BFD "
                    "(no SNAT failover)."),
    cfg.FloatOpt("ovsdb_timeout", default=10.0, min=1.0,
                 help="Seconds to wait for an OVSDB transaction."),
]

TOPOLOGY_OPTS = [
    cfg.StrOpt("source", default="file",
               choices=[("file", "a topology file"), ("nb", "the northbound database")],
               help="Where the desired state comes from: a topology file, or the "
                    "northbound database."),
    cfg.StrOpt("file", help="Topology file (YAML), for source=file."),
    cfg.StrOpt("nb_connection",
               help="The northbound database, for source=nb: unix:PATH, ssl:HOST:PORT "
                    "(with the [northbound] TLS files) or, only where asked for, plain "
                    "tcp:HOST:PORT; a cluster's members comma-separated."),
]

NORTHBOUND_OPTS = [
    cfg.StrOpt("private_key",
               help="This agent's TLS private key (PEM), for ssl: northbound remotes."),
    cfg.StrOpt("certificate",
               help="This agent's certificate (PEM). Its CN must be this node's name: the "
                    "database lets the agent write only the Agent row of that name. A "
                    "certificate replaced on disk is taken at once (the agent reconnects)."),
    cfg.StrOpt("ca_cert",
               help="The CA certificate (PEM) the database servers' certificates are "
                    "checked against."),
]

AGENT_OPTS = [
    cfg.StrOpt("status_file", default="/var/lib/dvr/agent-status.json",
               help="Where the agent reports liveness and convergence (JSON)."),
    cfg.FloatOpt("poll_interval", default=0.05, min=0.01,
                 help="Seconds between checks of the topology source and local ports."),
    cfg.FloatOpt("resync_interval", default=5.0, min=0.5,
                 help="Seconds between checks of the switch: the count of the flows of ours "
                      "it holds and its groups of ours against what the agent installed "
                      "(O(groups): one round trip for the flows); a difference reads every "
                      "flow back and repairs it."),
    cfg.FloatOpt("audit_interval", default=300.0, min=0.5,
                 help="Seconds between full comparisons of desired and installed flows, "
                      "every flow read back from the switch (O(flows)): what the checks "
                      "cannot see, a flow of ours changed in place by someone else."),
    cfg.FloatOpt("heartbeat_interval", default=1.0, min=0.1,
                 help="Seconds between status reports while nothing changes."),
    cfg.FloatOpt("agent_down_time", default=5.0, min=0.5,
                 help="Seconds after its last report that an agent counts as dead: a network "
                      "node weighs the other agents' views of BFD sessions only while they "
                      "are fresher than this (and the scheduler replaces a node in an HA "
                      "chain once it has been dead this long)."),
]


METRICS_OPTS = [
    cfg.StrOpt("bind_host", default="",
               help="Address of the Prometheus text endpoint (/metrics); empty: no endpoint. "
                    "127.0.0.1 keeps it on this host."),
    cfg.PortOpt("port", default=9101, help="Port of the Prometheus text endpoint."),
]

LOGGING_OPTS = [
    cfg.StrOpt("log_format", default="text",
               choices=[("text", "one line of text a record"), ("json", "one JSON object a line")],
               help="Log lines as text, or as one JSON object a line (time, level, logger, "
                    "node, message) for a log pipeline."),
]


def list_opts() -> list[tuple[str | None, list[cfg.Opt]]]:
    return [
        (None, DEFAULT_OPTS + LOGGING_OPTS),
        ("ovs", OVS_OPTS),
        ("topology", TOPOLOGY_OPTS),
        ("northbound", NORTHBOUND_OPTS),
        ("agent", AGENT_OPTS),
        ("metrics", METRICS_OPTS),
    ]


def make_conf(argv: Sequence[str] | None = None) -> cfg.ConfigOpts:
    conf = cfg.ConfigOpts()
    for group, opts in list_opts():
        conf.register_opts(opts, group=group)
    conf(list(argv or []), project="dvr", prog="dvr-agent", version=VERSION,
         default_config_files=[])
    return conf
