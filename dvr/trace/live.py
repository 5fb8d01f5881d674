"""The live engine of `dvr trace`: `ovs-appctl ofproto/trace` on each node the packet crosses.

On the sender's node the packet is traced from its port; where the datapath actions push it
into a tunnel, the trace goes on at the node that owns the tunnel's destination address, from
its tunnel port, with the VNI and the headers of the trace's final flow; where the packet is
sent out on the provider network, it goes on at the node that owns its destination MAC (or
ends at the external host). Each recirculation after a `ct` meets `trk,new`, as a first
packet does, and OVS applies the NAT it simulates. Every matched flow is named by its cookie
against the node's own plan (made from the ports its OVSDB has), so a live hop says which
router, network, VM or floating IP put it there, and a flow that is not in the plan shows up
as such.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from dvr.lab import LabError, run
from dvr.lab.lab import Lab
from dvr.trace import expr
from dvr.trace import report as tracing
from dvr.trace.offline import explain_drop, offline
from flows.model import Topology
from flows.ofp import ETH_ARP, ETH_IP, OWNER_COOKIE, Flow, groups_of
from flows.pipeline import BY_NUMBER
from flows.planner import NodePorts, plan, snat_routers
from flows.ports import Interface, node_ports, plugged
from flows.simulator import BROADCAST, Cloud, Conn, NodePlan, bucket_note

MAX_NODES = 8  # a packet that crosses more nodes than this is looping
HOP_RE = re.compile(r"^\s*(\d+)\. (.*?),? ?priority (\d+)(?:, cookie (0x[0-9a-f]+))?$")
MISS_RE = re.compile(r"^\s*(\d+)\. No match\.?")
KV_RE = re.compile(r"([a-z_0-9]+)=([^,]+)")
# ovs-ofctl flow field -> OXM name, for reading a trace's "Final flow:"
OFCTL_TO_OXM = {
    "dl_src": "eth_src", "dl_dst": "eth_dst", "nw_src": "ipv4_src", "nw_dst": "ipv4_dst",
    "nw_ttl": "ip_ttl", "icmp_type": "icmpv4_type", "icmp_code": "icmpv4_code",
    "arp_spa": "arp_spa", "arp_tpa": "arp_tpa", "arp_sha": "arp_sha", "arp_tha": "arp_tha",
    "arp_op": "arp_op", "tun_id": "tunnel_id",
}


@dataclass
class NodeView:
    """What the live trace needs to know of one node."""

    name: str
    ports: NodePorts
    vm_ifaces: dict[str, str]  # VM -> its interface name
    dp_names: dict[int, str]  # datapath port -> interface name
    flows: dict[int, Flow]  # planned flows by cookie


class LiveTracer:
    def __init__(self, lab: Lab):
        if not lab.is_up():
            raise LabError(f"lab {lab.prefix} is not up (use --offline to trace a topology)")
        self.lab = lab
        self.topo: Topology = lab.topology(live=True)  # HA chains as the agents plan by
        self.views: dict[str, NodeView] = {}
        self.by_tunnel_ip = {str(n.tunnel_ip): n.name for n in self.topo.nodes.values()
                             if n.tunnel_ip}

    # --- talking to a node --------------------------------------------------------------
    def _run(self, node: str, *cmd: str) -> str:
        return self.lab.run_in("node", node, list(cmd), topo=self.topo, timeout=30).stdout

    def view(self, node: str) -> NodeView:
        if node in self.views:
            return self.views[node]
        rows = json.loads(self._run(node, "ovs-vsctl", "--format=json", "--columns=name,"
                                    "ofport,external_ids,type,options", "list", "Interface"))
        have = plugged(_interface(row) for row in rows["data"])
        status = self.lab.agent_status(node) or {}
        ext = self.topo.external
        ports = node_ports(self.topo, node, have,
                           gateway_mac=(ext.gateway_mac or status.get("gateway_mac"))
                           if ext else None,
                           snat=frozenset(status.get("snat", snat_routers(self.topo, node))))
        ifaces = {vm: have.names[self.topo.vms[vm].port_id] for vm in ports.vms}
        dp_names = {int(m.group(1)): m.group(2) for m in re.finditer(
            r"port (\d+): (\S+)", self._run(node, "ovs-appctl", "dpctl/show"))}
        flows = {f.cookie: f for f in plan(self.topo, node, ports)}
        self.views[node] = NodeView(node, ports, ifaces, dp_names, flows)
        return self.views[node]

    def planned(self) -> Cloud:
        """The simulator over the plan of every node, with the node's real ports: what the
        switches should do."""
        nodes = {}
        for name in self.topo.nodes:
            v = self.view(name)
            nodes[name] = NodePlan(name, v.ports, frozenset(v.flows.values()))
        return Cloud(self.topo, nodes)

    # --- the trace ----------------------------------------------------------------------
    def trace_and_compare(self, sender: str, packet_expr: str) -> tracing.Report:
        """The live trace, with where it parts from the plan (if it does). A packet of a
        connection the switches already track is followed by emulation (see
        `established()`), as ofproto/trace cannot apply an existing connection's NAT."""
        emulated = self.established(sender, packet_expr)
        if emulated is not None:
            return emulated
        live = self.trace(sender, packet_expr)
        self._compare(live, sender, packet_expr)
        return live

    # --- packets of connections the switches already track ----------------------------
    def installed(self, node: str) -> frozenset[int]:
        text = self._run(node, "ovs-ofctl", "-O", "OpenFlow13", "dump-flows", "br-int")
        return frozenset(int(c, 16) for c in re.findall(r"cookie=(0x[0-9a-f]+)", text))

    def conntrack(self, node: str) -> dict[tuple[str, int], list[Conn]]:
        """The node's real connection table, as the simulator keeps it."""
        out: dict[tuple[str, int], list[Conn]] = {}
        for line in self._run(node, "ovs-appctl", "dpctl/dump-conntrack").splitlines():
            conn = _parse_conn(line)
            if conn is not None:
                zone, c = conn
                out.setdefault((node, zone), []).append(c)
        return out

    def established(self, sender: str, packet_expr: str) -> tracing.Report | None:
        """When the packet belongs to a connection some node already tracks, emulate it:
        the simulator over the flows each node really has (the planned flows whose cookies
        are installed) and each node's real connection table. None for a new connection
        (the ofproto/trace engine then serves)."""
        nodes = {}
        table: dict[tuple[str, int], list[Conn]] = {}
        for name in self.topo.nodes:
            v = self.view(name)
            have = self.installed(name)
            nodes[name] = NodePlan(name, v.ports, frozenset(
                f for c, f in v.flows.items() if c in have))
            table.update(self.conntrack(name))
        cloud = Cloud(self.topo, nodes)
        cloud.gateway_mac = self.ext_mac
        cloud.conntrack = table
        report = offline(self.topo, sender, packet_expr, cloud)
        if not any(re.match(r"ct\(zone=\d+\): est", c) for h in report.hops
                   for c in h.changes):
            return None
        report.engine = "live: an established connection, emulated over the installed flows"
        planned = self.planned()
        planned.gateway_mac = cloud.gateway_mac
        planned.conntrack = {k: list(v) for k, v in table.items()}
        report.divergence = tracing.compare(
            offline(self.topo, sender, packet_expr, planned), report)
        self.packet = (expr.from_external(self.topo, packet_expr) if sender == "ext"
                       else expr.from_vm(self.topo, sender, packet_expr))
        self.packet_sender = sender
        return report

    def _compare(self, live: tracing.Report, sender: str, packet_expr: str) -> None:
        cloud = self.planned()
        cloud.gateway_mac = self.ext_mac
        planned = offline(self.topo, sender, packet_expr, cloud)
        live.divergence = tracing.compare(planned, live)

    def trace(self, sender: str, packet_expr: str) -> tracing.Report:
        topo = self.topo
        report = tracing.Report("live", sender, {}, [], [], [])
        self.packet_sender = sender
        if sender == "ext":
            pkt = expr.from_external(topo, packet_expr)
            pkt["eth_src"] = self.ext_mac
            report.packet = tracing.headers(pkt)
            self.packet = pkt
            self._on_provider(report, "ext", pkt, 0)
            return report
        pkt = expr.from_vm(topo, sender, packet_expr)
        report.packet = tracing.headers(pkt)
        self.packet = pkt
        node = next((n for n in topo.nodes if sender in self.view(n).ports.vms), None)
        if node is None:
            raise LabError(f"VM {sender} is plugged on no node")
        self._node(report, node, "br-int", f"in_port={self.view(node).ports.vms[sender]}",
                   pkt, 0)
        return report

    # --- --verify: the real packet ------------------------------------------------------
    def verify(self, report: tracing.Report, seconds: float = 2.5) -> list[str]:
        """Send the traced packet for real from its sender, capture it wherever the trace
        says it goes, and list every difference (an empty list: it did what was said)."""
        pkt = dict(self.packet)
        pkt["ip_id"] = random.randrange(1, 65536)
        mark = (f"arp:{pkt['arp_spa']}:{pkt['arp_tpa']}" if pkt.get("eth_type") == ETH_ARP
                else str(pkt["ip_id"]))
        ext_ns = f"{self.lab.prefix}-ext"
        points: dict[str, tuple[str, str]] = {}  # label -> (namespace, interface)
        for c in report.crossings:
            if c.kind == "tunnel":
                points[f"tunnel {c.src} => {c.dst}"] = (self.lab.node_ns(c.dst), "ul0")
            elif c.dst == "ext":
                points["external host"] = (ext_ns, "ext0")
            else:
                points[f"provider network => {c.dst}"] = (self.lab.node_ns(c.dst), "ex0")
        for o in report.outcomes:
            if o.kind == "delivered" and o.to == "external host":
                points["external host"] = (ext_ns, "ext0")
            elif o.kind == "delivered" and o.to:
                points[f"vm {o.to}"] = (self.lab.vm_ns(self.lab.vm_label(o.to)), "eth0")
        dst = pkt.get("ipv4_dst") or pkt.get("arp_tpa")
        target = next((v.name for v in self.topo.vms.values() if str(v.ip) == dst
                       and v.name != report.sender), None)
        if target and f"vm {target}" not in points:
            points[f"vm {target}"] = (self.lab.vm_ns(self.lab.vm_label(target)), "eth0")
        seen = self._capture(points, pkt, mark, seconds)
        return _differences(report, pkt, seen)

    def _capture(self, points: dict[str, tuple[str, str]], pkt: dict[str, Any], mark: str,
                 seconds: float) -> dict[str, list[dict[str, Any]]]:
        env = run.python_env()
        procs = {}
        for label, (ns, iface) in points.items():
            procs[label] = run.start(ns, run.python("-m", "dvr.lab.capture", "sniff", iface,
                                                    str(seconds), mark),
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            for label, proc in procs.items():
                assert proc.stdout is not None
                if proc.stdout.readline().strip() != "READY":
                    raise LabError(f"cannot capture at {label}: {proc.stderr.read().strip()}")
            sender_ns, iface = (
                (self.lab.ext_ns, "ext0") if self.packet_sender == "ext"
                else (self.lab.vm_ns(self.lab.vm_label(self.packet_sender)), "eth0"))
            run.run(sender_ns, run.python("-m", "dvr.lab.capture", "send", iface),
                    env=env, input=json.dumps(pkt), timeout=30)
            sent_at = time.time()
            seen = {}
            for label, proc in procs.items():
                out, _ = proc.communicate(timeout=seconds + 30)
                lines = [ln for ln in out.splitlines() if ln.strip()]
                seen[label] = [d for d in json.loads(lines[-1]) if d["time"] >= sent_at - 1]
            return seen
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

    @cached_property
    def ext_mac(self) -> str:
        """The external host's MAC (read once per tracer)."""
        out = self.lab.run_in("ext", "", ["ip", "-j", "link", "show", "ext0"], timeout=30)
        return json.loads(out.stdout)[0]["address"]

    def _node(self, report: tracing.Report, node: str, bridge: str, in_port: str,
              pkt: dict[str, Any], depth: int) -> None:
        if depth >= MAX_NODES:
            report.outcomes.append(tracing.Outcome("dropped", node, None,
                                                   "loop: too many nodes crossed", {}))
            return
        view = self.view(node)
        flow = ",".join([in_port, *_ofctl_fields(pkt)])
        text = self._run(node, "ovs-appctl", "ofproto/trace", bridge, flow)
        first_hop = len(report.hops)
        final, actions = self._parse(report, view, text)
        headers = {**pkt, **final}
        outputs = _split_actions(actions)
        delivered_any = False
        for action in outputs:
            if action.startswith("tnl_push("):
                dst = re.search(r"ipv4\(src=[^,]+,dst=([^,]+)", action)
                vni = re.search(r"vni=(0x[0-9a-f]+)", action)
                peer = self.by_tunnel_ip.get(dst.group(1)) if dst else None
                if peer is None or vni is None:
                    continue
                src = re.search(r"ipv4\(src=([^,]+)", action)
                report.crossings.append(tracing.Crossing(
                    len(report.hops) - 1, "tunnel", node, peer, str(int(vni.group(1), 16)),
                    f"{src.group(1) if src else '?'} -> {dst.group(1)}"))
                tunnel_port = self.view(peer).ports.tunnels.get(node)
                inner = {k: v for k, v in headers.items() if k != "tunnel_id"}
                if tunnel_port is None:
                    report.outcomes.append(tracing.Outcome(
                        "dropped", peer, None, f"{peer} has no tunnel from {node}",
                        tracing.headers(inner)))
                    continue
                self._node(report, peer, "br-int",
                           f"in_port={tunnel_port},tun_id={vni.group(1)}", inner, depth + 1)
                delivered_any = True
            elif action.isdigit():
                name = view.dp_names.get(int(action), "")
                vm = next((v for v, i in view.vm_ifaces.items() if i == name), None)
                if vm is not None:
                    report.outcomes.append(tracing.Outcome(
                        "delivered", node, vm, "", tracing.headers(headers)))
                    delivered_any = True
                elif name == "ex0":
                    self._on_provider(report, node, headers, depth + 1)
                    delivered_any = True
        if not delivered_any and not any(o.node == node for o in report.outcomes):
            last = report.hops[-1] if len(report.hops) > first_hop else None
            report.outcomes.append(tracing.Outcome(
                "dropped", node, None, self._drop_reason(report, view, last, pkt),
                tracing.headers(headers)))

    def _on_provider(self, report: tracing.Report, sender: str, pkt: dict[str, Any],
                     depth: int) -> None:
        dst = str(pkt.get("eth_dst", "")).lower()
        ext_mac = self.ext_mac
        targets: list[str]
        if dst == BROADCAST:
            targets = [n for n in self.topo.nodes if n != sender] + (
                ["ext"] if sender != "ext" else [])
        elif dst == ext_mac:
            targets = ["ext"]
        else:
            owner = next((n.name for n in self.topo.nodes.values() if n.external_mac == dst),
                         None)
            if owner is None:
                owner = next((n for n in self.topo.nodes for r in self.topo.routers.values()
                              if r.external_mac == dst and r.name in self.view(n).ports.snat),
                             None)
            targets = [owner] if owner and owner != sender else []
        if not targets:
            report.outcomes.append(tracing.Outcome(
                "dropped", sender, None, f"no host with MAC {dst} on the provider network",
                tracing.headers(pkt)))
        for target in targets:
            report.crossings.append(tracing.Crossing(len(report.hops) - 1, "provider", sender,
                                                     target, dst))
            if target == "ext":
                report.outcomes.append(tracing.Outcome("delivered", sender, "external host",
                                                       "", tracing.headers(pkt)))
            else:
                self._node(report, target, "br-ex", "in_port=ex0", pkt, depth)

    def _parse(self, report: tracing.Report, view: NodeView, text: str
               ) -> tuple[dict[str, Any], list[str]]:
        bridge = "br-int"
        final: dict[str, Any] = {}
        actions: list[str] = []
        hop: tracing.Hop | None = None
        state: dict[str, Any] = {}
        group = 0  # the group the last `group:` action applied
        for line in text.splitlines():
            m = re.match(r'^\s*bridge\("([^"]+)"\)', line)
            if m:
                bridge = m.group(1)
                continue
            if "Resuming from table" in line:
                bridge = "br-int"  # only br-int flows recirculate
                continue
            m = HOP_RE.match(line)
            miss = MISS_RE.match(line)
            if m or miss:
                number = int((m or miss).group(1))  # type: ignore[union-attr]
                cookie = int(m.group(4), 16) if m and m.group(4) else 0
                if m and not cookie and bridge == "br-int":
                    m, miss = None, m  # OVS's own table-miss rule: no flow of ours matched
                planned = view.flows.get(cookie)
                if bridge == "br-int" and number in BY_NUMBER:
                    table = BY_NUMBER[number].name
                else:
                    table = f"{bridge} table {number}"
                if planned is not None:
                    source = str(planned.hint)
                elif cookie >> 48 == OWNER_COOKIE:
                    source = "NOT IN THE PLAN: a stale or foreign flow with this project's cookie"
                else:
                    source = "not this project's flow" if m else ""
                hop = tracing.Hop(
                    node=view.name, bridge=bridge, table=table, table_number=number,
                    priority=int(m.group(3)) if m else None,
                    flow=(f"{m.group(2)}, priority {m.group(3)}, cookie {cookie:#x}" if m
                          else "(no flow: table miss, dropped)"),
                    source=source, changes=[], cookie=cookie)
                report.hops.append(hop)
                continue
            if line.startswith("Flow:"):
                state = _read_flow(line.split(":", 1)[1])
                continue
            if line.startswith(" Modified flow:") and report.hops:
                for fld, value in _read_flow(line.split(":", 1)[1]).items():
                    _change(report.hops[-1], state, fld, value)  # the NAT of the last ct
                continue
            m = re.match(r"\s*group:(\d+)$", line)
            if m:
                group = int(m.group(1))
            m = re.match(r"\s*-> using bucket (\d+)", line)
            if m and hop is not None:
                hop.changes.append(self._bucket(view, hop, group, int(m.group(1))))
                continue
            if hop is not None and line.startswith("    ") and not line.strip().startswith("->"):
                _apply(hop, state, line.strip())
            if line.startswith("Final flow:") and "unchanged" not in line:
                final.update(_read_flow(line.split(":", 1)[1]))
            if line.startswith("Datapath actions:"):
                actions.append(line.split(":", 1)[1].strip())
        return final, actions

    @staticmethod
    def _bucket(view: NodeView, hop: tracing.Hop, group: int, index: int) -> str:
        """The bucket a group used, said as the offline engine says it."""
        planned = view.flows.get(hop.cookie)
        groups = groups_of([planned]) if planned is not None else {}
        owner = None
        if group in groups and index < len(groups[group].buckets):
            port = groups[group].buckets[index].watch_port
            plan = NodePlan(view.name, view.ports, frozenset())
            owner = plan.port_owner(port) if port is not None else None
        return bucket_note(group, index, owner)

    def _drop_reason(self, report: tracing.Report, view: NodeView,
                     last: tracing.Hop | None, pkt: dict[str, Any]) -> str:
        if last is None:
            return "no flow matched"
        if last.priority is None:
            return f"table {last.table}: no flow"
        planned = view.flows.get(last.cookie)
        note = planned.hint.note if planned else ""
        end = _End(note or f"table {last.table}: drop", view.name)
        return explain_drop(self.topo, report.sender, pkt, end)  # type: ignore[arg-type]


def _interface(row: list[Any]) -> Interface:
    """An Interface row of `ovs-vsctl --format=json list Interface` (columns name, ofport,
    external_ids, type, options)."""
    name, ofport, ext_ids, kind, options = row
    return Interface(name, ofport if isinstance(ofport, int) else -1, dict(ext_ids[1]), kind,
                     dict(options[1]))


COMPARED = ("eth.src", "eth.dst", "ip.src", "ip.dst", "ip.ttl", "arp.op", "arp.spa",
            "arp.sha", "icmp.type")


def _differences(report: tracing.Report, pkt: dict[str, Any],
                 seen: dict[str, list[dict[str, Any]]]) -> list[str]:
    out = []
    for c in report.crossings:
        if c.kind == "tunnel":
            label = f"tunnel {c.src} => {c.dst}"
            got = [d for d in seen.get(label, []) if "vni" in d]
            if not got:
                out.append(f"predicted a tunnel {c.src} => {c.dst} (VNI {c.carried}): "
                           f"nothing crossed it")
            elif all(str(d["vni"]) != c.carried for d in got):
                out.append(f"tunnel {c.src} => {c.dst}: predicted VNI {c.carried}, seen "
                           f"{sorted({d['vni'] for d in got})}")
    for o in report.outcomes:
        if o.kind != "delivered":
            continue
        label = "external host" if o.to == "external host" else f"vm {o.to}"
        want = {k: v for k, v in o.headers.items() if k in COMPARED}
        got = seen.get(label, [])
        if not any(all(d.get(k) == v for k, v in want.items() if k in d) for d in got):
            if not got:
                out.append(f"predicted delivery to {o.to} on {o.node}: nothing arrived")
            else:
                diff = {k: (v, got[-1].get(k)) for k, v in want.items()
                        if got[-1].get(k) not in (None, v)}
                out.append(f"{o.to}: predicted {', '.join(f'{k}={v[0]}' for k, v in diff.items())}"
                           f"; seen {', '.join(f'{k}={v[1]}' for k, v in diff.items())}")
    if all(o.kind == "dropped" for o in report.outcomes):
        for label, got in seen.items():
            arrived = [d for d in got if d.get("eth.src") != pkt.get("eth_src")]
            if label.startswith("vm ") and arrived:
                out.append(f"predicted dropped on {report.outcomes[0].node}, but it reached "
                           f"{label[3:]}")
    return out


@dataclass
class _End:
    reason: str
    node: str


# field names in ofproto/trace's actions -> OXM names (registers and metadata are left out)
ACTION_FIELDS = {
    "eth_src": "eth_src", "eth_dst": "eth_dst", "ip_src": "ipv4_src", "ip_dst": "ipv4_dst",
    "nw_src": "ipv4_src", "nw_dst": "ipv4_dst", "tun_id": "tunnel_id", "arp_op": "arp_op",
    "arp_sha": "arp_sha", "arp_tha": "arp_tha", "arp_spa": "arp_spa", "arp_tpa": "arp_tpa",
    "icmp_type": "icmpv4_type", "icmpv4_type": "icmpv4_type",
    "NXM_OF_ETH_SRC": "eth_src", "NXM_OF_ETH_DST": "eth_dst", "NXM_OF_IP_SRC": "ipv4_src",
    "NXM_OF_IP_DST": "ipv4_dst", "NXM_NX_ARP_SHA": "arp_sha", "NXM_NX_ARP_THA": "arp_tha",
    "NXM_OF_ARP_SPA": "arp_spa", "NXM_OF_ARP_TPA": "arp_tpa",
}


def _change(hop: tracing.Hop, state: dict[str, Any], fld: str, value: Any) -> None:
    old = state.get(fld)
    state[fld] = value
    if old != value:
        hop.changes.append(f"{fld}: {old} -> {value}")


def _apply(hop: tracing.Hop, state: dict[str, Any], action: str) -> None:
    """Follow one action of ofproto/trace on the packet's headers, noting what it changes
    in the form the offline engine uses."""
    m = re.match(r"set_field:(.+)->(\w+)$", action)
    if m and m.group(2) in ACTION_FIELDS:
        fld, value = ACTION_FIELDS[m.group(2)], m.group(1)
        if fld in ("tunnel_id", "arp_op", "icmpv4_type"):
            value = int(value, 0)
        _change(hop, state, fld, value)
        return
    m = re.match(r"move:(\w+)\[\]->(\w+)\[\]$", action)
    if m and m.group(1) in ACTION_FIELDS and m.group(2) in ACTION_FIELDS:
        _change(hop, state, ACTION_FIELDS[m.group(2)], state.get(ACTION_FIELDS[m.group(1)]))
        return
    if action == "dec_ttl" and "ip_ttl" in state:
        _change(hop, state, "ip_ttl", int(state["ip_ttl"]) - 1)
    elif action.startswith("mod_nw_ttl:"):
        _change(hop, state, "ip_ttl", int(action.split(":")[1]))
    elif action.startswith("ct("):
        hop.changes.append(action)


CONN_RE = re.compile(r"^(icmp|tcp|udp),orig=\(([^)]*)\),reply=\(([^)]*)\),zone=(\d+)")
PROTO_NUM = {"icmp": 1, "tcp": 6, "udp": 17}


def _parse_conn(line: str) -> tuple[int, Conn] | None:
    """One `dpctl/dump-conntrack` line as (zone, Conn); None for what is not IPv4 in a
    zone."""
    m = CONN_RE.match(line.strip())
    if m is None:
        return None
    proto = PROTO_NUM[m.group(1)]

    def side(text: str) -> tuple[Any, Any, Any, Any, Any]:
        f = dict(kv.split("=", 1) for kv in text.split(","))
        if "sport" in f:
            ports: tuple[Any, Any] = (int(f["sport"]), int(f["dport"]))
        else:
            ports = (int(f["id"]), int(f["id"])) if "id" in f else (None, None)
        return (f["src"], f["dst"], proto, *ports)

    orig, reply = side(m.group(2)), side(m.group(3))
    xlat = (reply[1], reply[0], proto, reply[4], reply[3])
    return int(m.group(4)), Conn(orig, xlat)


def _ofctl_fields(pkt: dict[str, Any]) -> list[str]:
    out = [f"dl_src={pkt['eth_src']}", f"dl_dst={pkt['eth_dst']}"]
    if pkt.get("eth_type") == ETH_ARP:
        out.insert(0, "arp")
        out += [f"arp_op={pkt.get('arp_op', 1)}", f"arp_spa={pkt['arp_spa']}",
                f"arp_tpa={pkt['arp_tpa']}", f"arp_sha={pkt['arp_sha']}",
                f"arp_tha={pkt.get('arp_tha', '00:00:00:00:00:00')}"]
        return out
    if pkt.get("eth_type") != ETH_IP:
        return out
    proto = {1: "icmp", 6: "tcp", 17: "udp"}.get(pkt.get("ip_proto", 0), "ip")
    out.insert(0, proto)
    out += [f"nw_src={pkt['ipv4_src']}", f"nw_dst={pkt['ipv4_dst']}",
            f"nw_ttl={pkt.get('ip_ttl', 64)}"]
    if proto == "icmp":
        out += [f"icmp_type={pkt.get('icmpv4_type', 8)}", f"icmp_code={pkt.get('icmpv4_code', 0)}"]
    elif proto in ("tcp", "udp"):
        out += [f"{proto}_src={pkt.get(f'{proto}_src', 0)}",
                f"{proto}_dst={pkt.get(f'{proto}_dst', 0)}"]
    return out


def _read_flow(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in KV_RE.findall(text):
        oxm = OFCTL_TO_OXM.get(key)
        if oxm is None:
            continue
        if oxm in ("ip_ttl", "icmpv4_type", "icmpv4_code", "arp_op"):
            out[oxm] = int(value)
        elif oxm == "tunnel_id":
            out[oxm] = int(value, 16)
        else:
            out[oxm] = value
    return out


def _split_actions(lines: list[str]) -> list[str]:
    """Top-level datapath actions of every pass, recirculations and header sets left out."""
    out = []
    for line in lines:
        depth, cur = 0, ""
        for ch in line + ",":
            if ch == "," and depth == 0:
                if cur and not cur.startswith(("recirc(", "set(", "ct(", "drop")):
                    out.append(cur)
                cur = ""
                continue
            depth += ch == "("
            depth -= ch == ")"
            cur += ch
    return out
