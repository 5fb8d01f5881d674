"""The output of `dvr trace`: one report model for every engine, and its renderers.

A `Report` holds the hops (node, bridge, table, the flow that matched and the object behind
it, what it changed), the crossings between nodes (tunnels, the provider network) and the
outcomes. Renderers print it at four levels: `minimal` (header changes, crossings and
outcomes only: the stable form for regression tests, the same from every engine), `summary`
(each table with the object that put the flow there), `detailed` (with the flows themselves)
and `json`; `svg()` draws the path. The engines: `offline.py` (the planned flows, through the
simulator) and `live.py` (the switches, through `ofproto/trace`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from dvr.trace import expr
from flows.simulator import CrossingKind, EndKind

# headers shown for a packet at its end, in this order (OXM name -> expression name)
SHOWN = {v[0]: k for k, v in expr.FIELDS.items()}


@dataclass
class Hop:
    node: str
    bridge: str
    table: str
    table_number: int
    priority: int | None  # None: no flow matched (table miss)
    flow: str  # the flow as ovs-ofctl prints it
    source: str  # which object put the flow there (router, network, VM, floating IP, node)
    changes: list[str] = field(default_factory=list)
    cookie: int = 0


@dataclass
class Crossing:
    after_hop: int  # index of the hop after which the packet left the node
    kind: CrossingKind
    src: str
    dst: str  # a node, or "ext" for the external host
    carried: str  # the VNI, or the destination MAC on the provider network
    endpoints: str = ""  # a tunnel's underlay addresses, "A -> B", when known


@dataclass
class Outcome:
    kind: EndKind
    node: str
    to: str | None  # a VM, "external host", or None when dropped
    reason: str
    headers: dict[str, Any]


@dataclass
class Report:
    engine: str
    sender: str
    packet: dict[str, Any]
    hops: list[Hop]
    crossings: list[Crossing]
    outcomes: list[Outcome]
    divergence: str | None = None  # where the switches part from the plan (live engine)
    # --verify: what a real packet did differently from the prediction ([] when nothing)
    verify: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)



def headers(pkt: dict[str, Any]) -> dict[str, Any]:
    return {SHOWN[k]: pkt[k] for k in SHOWN if k in pkt}



def compare(planned: Report, live: Report) -> str | None:
    """Where `live` parts from `planned`: the first integration-bridge hop (node, table, the
    flow's origin) that differs, or the outcomes; None when they agree."""
    a = [(h.node, h.table, h.source) for h in planned.hops if h.bridge == "br-int"]
    b = [(h.node, h.table, h.source) for h in live.hops if h.bridge == "br-int"]
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            if x[:2] == y[:2]:
                return (f"at {x[0]}, table {x[1]}: the plan has {x[2] or 'no flow'}; the "
                        f"switch matched {y[2] or 'no flow (table miss)'}")
            return (f"after {a[i - 1][0]} table {a[i - 1][1]}: the plan goes to {x[0]} table "
                    f"{x[1]}, the switch to {y[0]} table {y[1]}") if i else (
                f"at the first table: plan {x}, switch {y}")
    if len(a) != len(b):
        where = a[len(b)] if len(a) > len(b) else b[len(a)]
        return (f"at {where[0]}, table {where[1]}: the "
                f"{'plan goes on' if len(a) > len(b) else 'switch goes on'} "
                f"({where[2] or 'no flow'}), the other stops")
    ends_a = sorted((o.kind, o.node, o.to or "") for o in planned.outcomes)
    ends_b = sorted((o.kind, o.node, o.to or "") for o in live.outcomes)
    if ends_a != ends_b:
        return f"the plan ends {ends_a}, the switch {ends_b}"
    return None



# --- rendering ----------------------------------------------------------------------------
def render(report: Report, level: str = "summary") -> str:
    if level == "json":
        return json.dumps(report.to_dict(), indent=2, sort_keys=False)
    out: list[str] = []
    if level != "minimal":  # minimal: crossings and outcomes, the same from every engine
        shown = ", ".join(f"{k}={v}" for k, v in report.packet.items())
        out.append(f"{report.sender} sends: {shown}   [{report.engine}]")
    by_hop: dict[int, list[Crossing]] = {}
    for c in report.crossings:
        by_hop.setdefault(c.after_hop, []).append(c)
    node = None
    out += [_crossing_line(c) for c in report.crossings if c.after_hop < 0]
    for i, hop in enumerate(report.hops):
        if level != "minimal" and hop.node != node:
            out.append(f"{hop.node} ({hop.bridge})")
            node = hop.node
        if level != "minimal":
            miss = " (table miss)" if hop.priority is None else ""
            out.append(f"  {hop.table_number:>2} {hop.table}{miss}: {hop.source}")
            if level == "detailed":
                out.append(f"       {hop.flow}")
            out += [f"       {c}" for c in hop.changes]
        for c in by_hop.get(i, []):
            out.append(_crossing_line(c))
            node = None
    for o in report.outcomes:
        hdr = " ".join(f"{k}={v}" for k, v in o.headers.items()
                       if k in ("eth.src", "eth.dst", "ip.src", "ip.dst", "ip.ttl", "arp.op",
                                "arp.spa", "arp.sha"))
        if o.kind == "delivered":
            out.append(f"delivered to {o.to} on {o.node}: {hdr}")
        else:
            out.append(f"dropped on {o.node}: {o.reason}")
    if report.divergence:
        out.append(f"DIFFERS FROM THE PLAN {report.divergence}")
    if report.verify == []:
        out.append("verified: a real packet went exactly where the trace says")
    for line in report.verify or []:
        out.append(f"VERIFY: {line}")
    return "\n".join(out)


def _crossing_line(c: Crossing) -> str:
    dst = "the external host" if c.dst == "ext" else c.dst
    src = "the external host" if c.src == "ext" else c.src
    if c.kind == "tunnel":
        where = f", {c.endpoints}" if c.endpoints else ""
        return f"  -> tunnel {src} => {dst} (VNI {c.carried}{where})"
    return f"  -> provider network {src} => {dst} (to {c.carried})"


# --- a picture ----------------------------------------------------------------------------
def svg(report: Report) -> str:
    """The path as an SVG drawing: one box per node crossed (and the external host), the
    tables the packet went through listed in each, numbered in order; the crossings as
    numbered arrows over the underlay (tunnels) or the provider network; the outcome."""
    from xml.sax.saxutils import escape

    order: list[str] = []
    for h in report.hops:
        if h.node not in order:
            order.append(h.node)
    if report.sender == "ext" or any(c.dst == "ext" for c in report.crossings):
        order = (["ext"] if report.sender == "ext" else []) + order + (
            ["ext"] if report.sender != "ext" else [])
    col_w, top, line_h = 260, 70, 16
    rows: dict[str, list[str]] = {n: [] for n in order}
    n = 0
    for i, h in enumerate(report.hops):
        n += 1
        rows[h.node].append(f"{n}. {h.table}" + ("" if h.priority is not None else " (miss)"))
        for c in report.crossings:
            if c.after_hop == i:
                n += 1
    height = top + max([len(r) for r in rows.values()] + [1]) * line_h + 160
    header = ", ".join(f"{k}={v}" for k, v in report.packet.items())
    width = max(max(1, len(order)) * col_w + 40, int(len(header) * 7.4) + 120)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="monospace" font-size="12">',
           f'<text x="20" y="24" font-size="14">{escape(report.sender)}: '
           f'{escape(header)}</text>']
    x_of = {name: 20 + i * col_w for i, name in enumerate(order)}
    box_h = max([len(r) for r in rows.values()] + [1]) * line_h + 30
    for name in order:
        x = x_of[name]
        label = "external host" if name == "ext" else f"{name} (br-int)"
        out.append(f'<rect x="{x}" y="{top - 24}" width="{col_w - 40}" height="{box_h}" '
                   f'fill="#f4f6fa" stroke="#345"/>')
        out.append(f'<text x="{x + 8}" y="{top - 8}" font-weight="bold">{escape(label)}</text>')
        for j, row in enumerate(rows[name]):
            out.append(f'<text x="{x + 8}" y="{top + 12 + j * line_h}">{escape(row)}</text>')
    y_wire = top + box_h + 20
    out.append(f'<line x1="10" y1="{y_wire}" x2="{width - 10}" y2="{y_wire}" stroke="#999" '
               'stroke-dasharray="4 3"/>')
    out.append(f'<text x="12" y="{y_wire + 14}" fill="#777">underlay / provider network'
               '</text>')
    n = 0
    arrows = []
    for i, _ in enumerate(report.hops):
        n += 1
        for c in report.crossings:
            if c.after_hop == i:
                n += 1
                arrows.append((n, c))
    for c in report.crossings:
        if c.after_hop < 0:
            arrows.insert(0, (0, c))
    for k, (num, c) in enumerate(arrows):
        if c.src not in x_of or c.dst not in x_of:
            continue
        x1, x2 = x_of[c.src] + (col_w - 40) // 2, x_of[c.dst] + (col_w - 40) // 2
        y = y_wire + 30 + k * 22
        what = f"VNI {c.carried}" if c.kind == "tunnel" else f"to {c.carried}"
        out.append(f'<line x1="{x1}" y1="{y}" x2="{x2}" y2="{y}" stroke="#c33" '
                   'stroke-width="2" marker-end="url(#arrow)"/>')
        out.append(f'<text x="{min(x1, x2) + 6}" y="{y - 4}" fill="#c33">{num}. {c.kind} '
                   f'{escape(what)}</text>')
    out.insert(1, '<defs><marker id="arrow" markerWidth="10" markerHeight="8" refX="9" '
               'refY="4" orient="auto"><path d="M0,0 L10,4 L0,8 z" fill="#c33"/></marker>'
               '</defs>')
    y_end = height - 14
    for o in report.outcomes:
        text = (f"delivered to {o.to} on {o.node}" if o.kind == "delivered"
                else f"dropped on {o.node}: {o.reason}")
        out.append(f'<text x="20" y="{y_end}" font-weight="bold">{escape(text)}</text>')
        y_end -= 16
    out.append("</svg>")
    return "\n".join(out)
