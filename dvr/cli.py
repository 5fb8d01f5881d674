"""The `dvr` command: `dvr lab ...` (see the topology contract)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

from agent.version import VERSION
from dvr.lab import LabError, run
from dvr.lab.lab import HostKind, Lab
from dvr.lab.netlink import NetlinkError
from flows.model import TopologyError


def _lab_parser(sub: argparse._SubParsersAction) -> None:
    lab = sub.add_parser("lab", help="run a multi-node cloud on this machine")
    lab.add_argument("--prefix", default="dvr", help="name of the lab (default: dvr)")
    cmds = lab.add_subparsers(dest="lab_cmd", required=True, metavar="COMMAND")
    up = cmds.add_parser("up", help="build the lab, or apply a new topology to it")
    up.add_argument("topology", nargs="?", help="topology file (default: built-in example)")
    up.add_argument("--timeout", type=float, default=60.0)
    up.add_argument("--nb-cluster", type=int, metavar="N",
                    help="run the northbound database as a RAFT cluster of N members, each "
                         "in its own namespace (default: one standalone ovsdb-server)")
    up.add_argument("--nb-tcp", action="store_true",
                    help="the northbound database on plain TCP over the underlay: no TLS, "
                         "and so no roles (any client may write anything); by default every "
                         "connection over the network is TLS with the lab's PKI "
                         "(/run/PREFIX-lab/pki) and each agent writes only its own report")
    up.add_argument("--bfd-interval", type=int, metavar="MS",
                    help="milliseconds between BFD packets on the tunnels to and between "
                         "network nodes (default 100; 0: no BFD, no SNAT failover)")
    up.add_argument("--neutron", action="store_true",
                    help="also run a Neutron API (MariaDB, noauth, the dvr driver and L3 "
                         "plugin) on the lab's northbound database, and create the topology's "
                         "objects through it (installs Neutron in its own venv if needed)")
    up.add_argument("--l2-agent", metavar="NODE[,NODE]", default="",
                    help="with --neutron: also run Neutron's own neutron-openvswitch-agent on "
                         "these compute nodes beside dvr's (its own bridge br-l2, RabbitMQ and "
                         "neutron-rpc-server in the namespace <prefix>-ctl), and ML2's "
                         "openvswitch driver for VLAN networks on physnet1")
    pl = cmds.add_parser("plug", help="with --neutron: plug a VM on a Neutron port as Nova "
                         "would (on the port's host, on the bridge it is bound to)")
    pl.add_argument("name", help="the VM's name (and the port's, unless --port)")
    pl.add_argument("--port", help="the Neutron port's id")
    cmds.add_parser("restart-neutron", help="restart the Neutron API (its database stays)")
    rl = cmds.add_parser("restart-l2-agent", help="restart Neutron's OVS agent on a node")
    rl.add_argument("node")
    ap = cmds.add_parser("apply", help="change the desired state of a running lab")
    ap.add_argument("topology")
    ap.add_argument("--timeout", type=float, default=60.0)
    cmds.add_parser("down", help="remove everything the lab created")
    st = cmds.add_parser("status", help="nodes, agents, VMs and SNAT")
    st.add_argument("--json", action="store_true")
    for name, what in (("exec", "VM"), ("node", "NODE")):
        p = cmds.add_parser(name, help=f"run a command inside a {what.lower()}")
        p.add_argument("target", metavar=what)
        p.add_argument("argv", nargs=argparse.REMAINDER)
    cmds.add_parser("kill-nb", help="stop the northbound database at once (kill -9): in a "
                    "cluster, MEMBER or the leader").add_argument("member", nargs="?")
    cmds.add_parser("start-nb", help="bring the northbound database back: in a cluster, "
                    "MEMBER or every dead member").add_argument("member", nargs="?")
    for name, what in (("cut", "drop all underlay traffic between two nodes (a partition)"),
                       ("heal", "restore the underlay traffic between two nodes")):
        p = cmds.add_parser(name, help=what)
        p.add_argument("node_a", metavar="NODE")
        p.add_argument("node_b", metavar="NODE")
    ext = cmds.add_parser("ext", help="run a command on the external host")
    ext.add_argument("argv", nargs=argparse.REMAINDER)
    for name, what in (("kill", "stop a node at once, as a power cut would"),
                       ("start", "bring a killed node back"),
                       ("restart-agent", "restart only the node's agent"),
                       ("restart-ovs", "restart only the node's ovs-vswitchd")):
        p = cmds.add_parser(name, help=what)
        p.add_argument("node")


def _trace_parser(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser("trace", help="follow a packet hop by hop across nodes")
    tr.add_argument("--prefix", default="dvr", help="name of the lab (default: dvr)")
    tr.add_argument("--offline", nargs="?", const="", metavar="TOPOLOGY",
                    help="trace the planned flows, with no lab: of TOPOLOGY, or of the lab "
                         "if it is up, or of the built-in example")
    level = tr.add_mutually_exclusive_group()
    for name in ("minimal", "summary", "detailed", "json"):
        level.add_argument(f"--{name}", dest="level", action="store_const", const=name)
    tr.add_argument("--verify", action="store_true",
                    help="also send the packet for real and capture it wherever the trace "
                         "says it goes; report any difference")
    tr.add_argument("--svg", metavar="FILE", help="also draw the path into FILE (SVG)")
    tr.add_argument("what", nargs="*", metavar="VM PACKET",
                    help="the VM that sends (or `ext`, the external host) and the packet, e.g. "
                         "vm1 'icmp, ip.dst=10.2.0.12' or vm1 'tcp, ip.dst=198.51.100.10, "
                         "tcp.dport=443'")


def trace_main(args: argparse.Namespace) -> int:
    from dvr.lab.lab import DEFAULT_TOPOLOGY
    from dvr.trace import report as tracing
    from dvr.trace.expr import ExprError
    from dvr.trace.offline import offline
    from flows.model import load_topology

    level = args.level or "summary"
    what = list(args.what)
    if args.offline and len(what) == 1 and not os.path.exists(args.offline):
        what.insert(0, args.offline)  # `--offline VM PACKET`: no topology was given
        args.offline = ""
    if len(what) != 2:
        print("dvr: error: usage: dvr trace [--offline [TOPOLOGY]] VM PACKET", file=sys.stderr)
        return 2
    args.sender, args.packet = what
    try:
        if args.offline is None:
            from dvr.trace.live import LiveTracer

            if os.geteuid() != 0:
                raise LabError("the live trace needs root (use --offline without a lab)")
            lab = Lab(args.prefix)
            # a lab driven by Neutron holds its VMs by port id: the lab's name is taken too
            args.sender = lab.vm_id(args.sender) if lab.is_up() else args.sender
            tracer = LiveTracer(lab)
            report = tracer.trace_and_compare(args.sender, args.packet)
            if args.verify:
                report.verify = tracer.verify(report)
        else:
            if args.offline:
                topo = load_topology(args.offline)
            else:
                lab = Lab(args.prefix)
                topo = lab.topology() if lab.is_up() else load_topology(DEFAULT_TOPOLOGY)
                args.sender = lab.vm_id(args.sender) if lab.is_up() else args.sender
            if args.verify:
                raise LabError("--verify sends a real packet: it needs the live lab, not "
                               "--offline")
            report = offline(topo, args.sender, args.packet)
    except ExprError as exc:
        print(f"dvr: error: bad packet: {exc}\n{exc.pointer()}", file=sys.stderr)
        return 2
    except KeyError as exc:
        print(f"dvr: error: {exc.args[0]}", file=sys.stderr)
        return 2
    print(tracing.render(report, level))
    if args.svg:
        with open(args.svg, "w") as f:
            f.write(tracing.svg(report))
    return 0


def _nb_parser(sub: argparse._SubParsersAction) -> None:
    nb = sub.add_parser("nb", help="the northbound database: the desired state")
    nb.add_argument("--db", default=os.environ.get("DVR_NB_DB"),
                    help="unix:PATH or tcp:HOST:PORT of the database, or of each member of "
                         "a cluster, comma-separated (default: $DVR_NB_DB)")
    nb.add_argument("--lab", metavar="PREFIX",
                    help="the database of the running lab PREFIX (standalone or cluster)")
    _tls_arguments(nb)
    cmds = nb.add_subparsers(dest="nb_cmd", required=True, metavar="COMMAND")
    sc = cmds.add_parser(
        "set-connection", help="the servers' remotes and the roles of their clients: "
        "`role=dvr-agent pssl:6641 role=dvr-scheduler pssl:6642 role= pssl:6644:MGMT-IP`; "
        "also (re)writes the project's RBAC roles")
    sc.add_argument("remotes", nargs="+", metavar="[role=ROLE] [read-only] TARGET")
    cmds.add_parser("get-connection", help="print the servers' remotes and their roles")
    ld = cmds.add_parser("load", help="replace the desired state (validated, one transaction)")
    ld.add_argument("topology")
    cmds.add_parser("dump", help="print the desired state as a topology file")
    cmds.add_parser("show", help="print the desired state, object by object")
    va = cmds.add_parser("vm-add", help="add a VM port")
    va.add_argument("name")
    va.add_argument("--node", required=True)
    va.add_argument("--network", required=True)
    va.add_argument("--ip")
    va.add_argument("--mac")
    va.add_argument("--floating-ip")
    cmds.add_parser("vm-del", help="remove a VM port").add_argument("name")
    fs = cmds.add_parser("fip-set", help="associate a floating IP with a VM (moving it if "
                         "another VM holds it)")
    fs.add_argument("vm")
    fs.add_argument("floating_ip")
    cmds.add_parser("fip-del", help="disassociate a VM's floating IP").add_argument("vm")
    for name, what in (("router-if-add", "add a router interface on a network"),
                       ("router-if-del", "remove a router interface")):
        ri = cmds.add_parser(name, help=what)
        ri.add_argument("router")
        ri.add_argument("network")
    sm = cmds.add_parser("snat-move", help="put a network node first in a router's HA chain "
                         "(failback is never automatic: this is how an operator asks for it)")
    sm.add_argument("router")
    sm.add_argument("node")


def _tls_arguments(p: argparse.ArgumentParser) -> None:
    """A database client's TLS identity, for ssl: remotes (as ovn-nbctl takes it)."""
    p.add_argument("-p", "--private-key", default=os.environ.get("DVR_NB_PRIVATE_KEY"),
                   help="the client's private key, for ssl: remotes ($DVR_NB_PRIVATE_KEY)")
    p.add_argument("-c", "--certificate", default=os.environ.get("DVR_NB_CERTIFICATE"),
                   help="the client's certificate ($DVR_NB_CERTIFICATE)")
    p.add_argument("-C", "--ca-cert", default=os.environ.get("DVR_NB_CA_CERT"),
                   help="the CA certificate the servers' are checked against "
                        "($DVR_NB_CA_CERT)")


def _tls_setup(args: argparse.Namespace, target: str) -> None:
    from agent import tls

    try:
        tls.configure(args.private_key, args.certificate, args.ca_cert)
        tls.require(target)
    except tls.TlsError as exc:
        raise LabError(str(exc)) from None


def nb_main(args: argparse.Namespace) -> int:
    import yaml

    from dvr import nb
    from flows import northbound
    from flows.model import load_topology

    if args.lab:
        lab = Lab(args.lab)
        if not lab.is_up():
            raise LabError(f"lab {args.lab} is not up")
        args.db = lab.nb_connection()
    if not args.db:
        raise LabError("no northbound database: give --db unix:PATH, --lab PREFIX, or set "
                       "DVR_NB_DB")
    topo = load_topology(args.topology) if args.nb_cmd == "load" else None  # validate first
    _tls_setup(args, args.db)
    try:
        remotes = (northbound.parse_remotes(args.remotes) if args.nb_cmd == "set-connection"
                   else None)
    except northbound.ChangeError as exc:
        raise LabError(str(exc)) from None
    try:
        db = nb.Northbound(args.db)
        try:
            if remotes is not None:
                db.set_connections(remotes)
                print(f"{len(remotes)} remotes; roles {', '.join(sorted(northbound.roles()))}")
            elif args.nb_cmd == "get-connection":
                for r in db.connections():
                    print(f"{'read-only ' if r.read_only else ''}role={r.role} {r.target}")
            elif topo is not None:
                db.load(topo)
                print(f"loaded {args.topology}: {len(topo.nodes)} nodes, "
                      f"{len(topo.networks)} networks, {len(topo.routers)} routers, "
                      f"{len(topo.vms)} VMs")
            elif args.nb_cmd == "dump":
                print(yaml.safe_dump(db.dump(), sort_keys=False), end="")
            elif args.nb_cmd == "show":
                print(northbound.summary(db.dump()))
            elif args.nb_cmd == "snat-move":
                print(f"router {args.router}: HA chain "
                      f"{', '.join(db.snat_move(args.router, args.node))}")
            else:  # a daily change: reads and writes only the rows it concerns
                change = {
                    "vm-add": lambda: db.vm_add(args.name, args.node, args.network, args.ip,
                                                args.mac, args.floating_ip),
                    "vm-del": lambda: db.vm_del(args.name),
                    "fip-set": lambda: db.fip_set(args.vm, args.floating_ip),
                    "fip-del": lambda: db.fip_del(args.vm),
                    "router-if-add": lambda: db.router_if(args.router, args.network, True),
                    "router-if-del": lambda: db.router_if(args.router, args.network, False),
                }[args.nb_cmd]
                print(f"generation {change()}")
        finally:
            db.close()
    except (nb.NbError, northbound.ChangeError) as exc:
        raise LabError(str(exc)) from None
    return 0


def scheduler_main(args: argparse.Namespace) -> int:
    from dvr.scheduler import Scheduler

    if not args.db:
        raise LabError("no northbound database: give --db or set DVR_NB_DB")
    logging.getLogger().setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"))
    _tls_setup(args, args.db)
    return Scheduler(args.db, args.agent_down_time, args.status_file).run()


def _print_status(st: dict) -> None:
    print(f"lab {st['prefix']}: {st['topology']} (generation {st['generation']})")
    nb = st["northbound"]
    if nb["members"]:
        print("northbound: RAFT cluster, " + ", ".join(
            f"{m} {v['address']} {v['role']}" for m, v in nb["members"].items()))
    else:
        print(f"northbound: standalone, {nb['connection']}")
    transport = nb.get("transport")
    if transport:
        print(f"  agents on {nb['agents_connection']}: "
              + ("TLS, each writes only its own report" if transport == "ssl"
                 else "plain TCP, no roles (--nb-tcp)"))
    print(f"{'NODE':<12} {'ROLE':<8} {'TUNNEL IP':<15} {'OVS':<5} {'AGENT':<16} "
          f"{'CONVERGED':<10} {'FLOWS':>6}  VMS")
    for name, n in st["nodes"].items():
        ovs = "up" if n["ovsdb_server"] and n["ovs_vswitchd"] else "down"
        a = n["agent"]
        since = f" {_ago(a.get('since'))}" if a.get("since") else ""
        agent = f"{'alive' if a['alive'] else 'dead'}{since}"
        print(f"{name:<12} {n['role']:<8} {n['tunnel_ip'] or '-':<15} {ovs:<5} "
              f"{agent:<16} {'yes' if a['converged'] else 'no':<10} "
              f"{a['flows']:>6}  {' '.join(a['vms'])}")
    print(f"\n{'VM':<12} {'NODE':<12} {'NETWORK':<12} {'IP':<15} {'MAC':<18} FLOATING IP")
    for name, v in st["vms"].items():
        print(f"{name:<12} {v['node']:<12} {v['network']:<12} {v['ip']:<15} {v['mac']:<18} "
              f"{v['floating_ip'] or '-'}")
    if st["snat"]:
        print(f"\n{'ROUTER':<12} {'EXTERNAL IP':<15} {'ACTIVE':<12} STANDBYS (HA chain order)")
    for router, s in st["snat"].items():
        print(f"{router:<12} {s['external_ip']:<15} {', '.join(s['active']) or 'none':<12} "
              f"{', '.join(s['standbys']) or '-'}")
    for a, b in st.get("cuts", []):
        print(f"cut: {a} <-> {b}")


def _ago(when: float) -> str:
    """`since 12s` / `since 3m` / `since 2h`."""
    s = max(0.0, time.time() - when)
    return (f"since {s:.0f}s" if s < 120 else f"since {s / 60:.0f}m" if s < 7200
            else f"since {s / 3600:.0f}h")


def _run_inside(lab: Lab, kind: HostKind, target: str, cmd: list[str]) -> int:
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise LabError("no command given (usage: ... -- CMD [ARGS...])")
    ns, env = lab.target(kind, target)
    return run.call(ns, cmd, env=env)


def lab_main(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise LabError("dvr lab needs root (network namespaces and Open vSwitch)")
    lab = Lab(args.prefix)
    cmd = args.lab_cmd
    if cmd == "up":
        t0 = time.monotonic()
        lab.up(args.topology, timeout=args.timeout, nb_cluster=args.nb_cluster,
               bfd_interval=args.bfd_interval, neutron=args.neutron,
               l2_agents=[n for n in args.l2_agent.split(",") if n],
               nb_tls=False if args.nb_tcp else None)
        st = lab.status()
        print(f"lab {lab.prefix} up: {len(st['nodes'])} nodes, {len(st['vms'])} VMs, "
              f"converged in {time.monotonic() - t0:.2f}s"
              + (f"; Neutron API at {st['neutron']['url']}" if st.get("neutron") else ""))
    elif cmd == "apply":
        t0 = time.monotonic()
        lab.apply(args.topology, timeout=args.timeout)
        print(f"lab {lab.prefix}: applied, converged in {time.monotonic() - t0:.2f}s")
    elif cmd == "down":
        lab.down()
    elif cmd == "plug":
        port = lab.plug(args.name, args.port)
        print(f"{args.name}: plugged on port {port['id']} on {port['binding:host_id']} "
              f"({port['binding:vif_details'].get('bridge_name', 'br-int')})")
    elif cmd == "restart-l2-agent":
        lab.restart_l2_agent(args.node)
    elif cmd == "restart-neutron":
        lab.restart_neutron()
    elif cmd == "status":
        st = lab.status()
        if args.json:
            print(json.dumps(st, indent=2))
        else:
            _print_status(st)
    elif cmd == "exec":
        return _run_inside(lab, "vm", args.target, args.argv)
    elif cmd == "node":
        return _run_inside(lab, "node", args.target, args.argv)
    elif cmd == "ext":
        return _run_inside(lab, "ext", "", args.argv)
    elif cmd == "kill":
        lab.kill_node(args.node)
    elif cmd == "start":
        lab.start_node(args.node)
    elif cmd == "restart-agent":
        lab.restart_agent(args.node)
    elif cmd == "cut":
        lab.cut(args.node_a, args.node_b)
    elif cmd == "heal":
        lab.heal(args.node_a, args.node_b)
    elif cmd == "kill-nb":
        killed = lab.kill_northbound(args.member)
        if killed:
            print(f"lab {lab.prefix}: killed northbound member {killed}")
    elif cmd == "start-nb":
        lab.start_northbound(args.member)
    elif cmd == "restart-ovs":
        lab.restart_ovs(args.node)
    return 0


def neutron_sync_main(args: argparse.Namespace) -> int:
    from dvr import nb
    from dvr.neutron import sync

    url, db = args.url, args.db
    if args.prefix:
        lab = Lab(args.prefix)
        url = url or lab.neutron_url()
        db = db or lab.nb_connection()
        if not url:
            raise LabError(f"lab {args.prefix} runs no Neutron (`dvr lab up --neutron`)")
    if not url or not db:
        raise LabError("neutron-sync: give --url and --db (or --prefix of a lab)")
    _tls_setup(args, db)
    try:
        return sync.main(url, db, args.mode, args.token)
    except (sync.SyncError, nb.NbError) as exc:
        print(f"dvr: error: {exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dvr", description="Distributed Virtual Router")
    parser.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    _lab_parser(sub)
    _trace_parser(sub)
    _nb_parser(sub)
    sc = sub.add_parser("scheduler", help="keep the routers' HA chains as network nodes live "
                        "and die (one acts at a time: the holder of the database's lock)")
    sc.add_argument("--db", default=os.environ.get("DVR_NB_DB"), required=False,
                    help="the northbound database (its members, comma-separated)")
    sc.add_argument("--agent-down-time", type=float, default=5.0, metavar="S",
                    help="seconds without a report after which an agent is dead (default 5)")
    sc.add_argument("--status-file", help="where to say whether this one holds the lock")
    _tls_arguments(sc)
    ns = sub.add_parser("neutron-sync", help="compare Neutron's resources with the northbound "
                        "database; report (log) or repair each difference")
    ns.add_argument("--mode", choices=("log", "repair"), default="log")
    ns.add_argument("--url", default=os.environ.get("OS_ENDPOINT"),
                    help="Neutron's API (default $OS_ENDPOINT; with --prefix, the lab's)")
    ns.add_argument("--token", default=os.environ.get("OS_TOKEN"), help="a Keystone token")
    ns.add_argument("--db", default=os.environ.get("DVR_NB_DB"),
                    help="the northbound database (default $DVR_NB_DB; with --prefix, the lab's)")
    ns.add_argument("--prefix", help="the lab whose Neutron and northbound database to use")
    _tls_arguments(ns)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="dvr: %(levelname)s: %(message)s")
    try:
        if args.cmd == "lab":
            return lab_main(args)
        if args.cmd == "scheduler":
            return scheduler_main(args)
        if args.cmd == "trace":
            return trace_main(args)
        if args.cmd == "nb":
            return nb_main(args)
        if args.cmd == "neutron-sync":
            return neutron_sync_main(args)
    except (LabError, TopologyError, NetlinkError) as exc:
        print(f"dvr: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader went away (`dvr lab status | head`)
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        print(f"dvr: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
