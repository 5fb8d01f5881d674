"""A small, pure model of OpenFlow 1.3 flows as this project uses them.

Field names are the OXM names os-ken uses (`eth_dst`, `ipv4_dst`, `tunnel_id`, `reg0`, ...).
Values are canonical: MAC and IPv4 addresses as lowercase strings (an IPv4 prefix as
`a.b.c.d/len`), everything else as ints; an int field may carry a mask as `(value, mask)`.

A `Flow`'s cookie is derived from the whole flow as the switch holds it (table number,
priority, match, actions), so a changed flow is a new flow: the agent's diff keys on the
cookie, deleting a flow whose content changed and adding its successor in the same bundle.
Its identity (table, priority, match) is what OpenFlow itself keys flows on: two planned flows
never share one (a unit test checks), or the switch would keep only one of them.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from functools import cached_property, lru_cache
from typing import Literal

from flows.pipeline import TABLES

OWNER_COOKIE = 0xD7A5  # top 16 bits of every cookie this project installs
OWNER_MASK = 0xFFFF << 48
IN_PORT = 0xFFFFFFF8  # OFPP_IN_PORT

ETH_IP = 0x0800
ETH_ARP = 0x0806
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17

# field -> (kind, width in bits)
FIELDS: dict[str, tuple[str, int]] = {
    "in_port": ("int", 32),
    "metadata": ("int", 64),
    "tunnel_id": ("int", 64),
    "eth_src": ("mac", 48),
    "eth_dst": ("mac", 48),
    "eth_type": ("int", 16),
    "ip_proto": ("int", 8),
    "ipv4_src": ("ip", 32),
    "ipv4_dst": ("ip", 32),
    "icmpv4_type": ("int", 8),
    "icmpv4_code": ("int", 8),
    "tcp_src": ("int", 16),
    "tcp_dst": ("int", 16),
    "udp_src": ("int", 16),
    "udp_dst": ("int", 16),
    "arp_op": ("int", 16),
    "arp_spa": ("ip", 32),
    "arp_tpa": ("ip", 32),
    "arp_sha": ("mac", 48),
    "arp_tha": ("mac", 48),
    **{f"reg{i}": ("int", 32) for i in range(8)},
    "ct_state": ("int", 32),
}

# conntrack state bits (ct_state)
CT_NEW, CT_EST, CT_REL, CT_RPL, CT_INV, CT_TRK = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
# the packet's addresses were translated by the connection's NAT (source, destination)
CT_SNAT, CT_DNAT = 0x40, 0x80
CT_STATE_NAMES = {CT_NEW: "new", CT_EST: "est", CT_REL: "rel", CT_RPL: "rpl", CT_INV: "inv",
                  CT_TRK: "trk", CT_SNAT: "snat", CT_DNAT: "dnat"}


def ct_state(*, on: int = 0, off: int = 0) -> tuple[int, int]:
    """A ct_state match: the bits in `on` set, those in `off` clear, the rest ignored."""
    return (on, on | off)

# what a field needs matched before it may be matched (OpenFlow prerequisites)
PREREQS: dict[str, tuple[tuple[str, int], ...]] = {
    "ip_proto": (("eth_type", ETH_IP),),
    "ipv4_src": (("eth_type", ETH_IP),),
    "ipv4_dst": (("eth_type", ETH_IP),),
    "icmpv4_type": (("eth_type", ETH_IP), ("ip_proto", PROTO_ICMP)),
    "icmpv4_code": (("eth_type", ETH_IP), ("ip_proto", PROTO_ICMP)),
    "tcp_src": (("eth_type", ETH_IP), ("ip_proto", PROTO_TCP)),
    "tcp_dst": (("eth_type", ETH_IP), ("ip_proto", PROTO_TCP)),
    "udp_src": (("eth_type", ETH_IP), ("ip_proto", PROTO_UDP)),
    "udp_dst": (("eth_type", ETH_IP), ("ip_proto", PROTO_UDP)),
    "arp_op": (("eth_type", ETH_ARP),),
    "arp_spa": (("eth_type", ETH_ARP),),
    "arp_tpa": (("eth_type", ETH_ARP),),
    "arp_sha": (("eth_type", ETH_ARP),),
    "arp_tha": (("eth_type", ETH_ARP),),
}

# ovs-ofctl spelling of each field
OFCTL_NAMES = {
    "tunnel_id": "tun_id",
    "eth_src": "dl_src",
    "eth_dst": "dl_dst",
    "eth_type": "dl_type",
    "ip_proto": "nw_proto",
    "ipv4_src": "nw_src",
    "ipv4_dst": "nw_dst",
    "icmpv4_type": "icmp_type",
    "icmpv4_code": "icmp_code",
    "tcp_src": "tp_src",
    "tcp_dst": "tp_dst",
    "udp_src": "tp_src",
    "udp_dst": "tp_dst",
}

Value = int | str | tuple[int, int]


def canonical(fld: str, value: Value) -> Value:
    """Normalise a field value; raises ValueError for a value the field cannot hold."""
    if fld not in FIELDS:
        raise ValueError(f"unknown field {fld!r}")
    kind, width = FIELDS[fld]
    if kind == "mac":
        return str(value).lower()
    if kind == "ip":
        return _canonical_ip(str(value))
    if isinstance(value, tuple):
        v, m = value
        if m == (1 << width) - 1:
            return int(v)
        return (int(v) & int(m), int(m))
    if not 0 <= int(value) < (1 << width):
        raise ValueError(f"{fld}={value} does not fit {width} bits")
    return int(value)


@lru_cache(maxsize=65536)
def _canonical_ip(text: str) -> str:
    net = ipaddress.IPv4Network(text, strict=True)
    return str(net.network_address) if net.prefixlen == 32 else str(net)


def value_matches(fld: str, want: Value, have: Value | None) -> bool:
    """Does a packet's field value `have` satisfy the match value `want`?"""
    if have is None:
        return False
    kind, _ = FIELDS[fld]
    if kind == "ip":
        return ipaddress.IPv4Address(str(have)) in ipaddress.IPv4Network(str(want))
    if kind == "mac":
        return str(have).lower() == want
    if isinstance(want, tuple):
        v, m = want
        return (int(have) & m) == v
    return int(have) == want


def format_value(fld: str, value: Value) -> str:
    if fld == "ct_state" and isinstance(value, tuple):
        v, m = value
        return "".join(("+" if v & bit else "-") + name
                       for bit, name in sorted(CT_STATE_NAMES.items()) if m & bit)
    if isinstance(value, tuple):
        return f"{value[0]:#x}/{value[1]:#x}"
    if FIELDS[fld][0] == "int" and fld not in ("in_port", "eth_type") and value > 9:  # type: ignore[operator]
        return f"{value:#x}"
    if fld == "eth_type":
        return f"{value:#06x}"
    return str(value)


@dataclass(frozen=True)
class Match:
    fields: tuple[tuple[str, Value], ...] = ()

    @classmethod
    def of(cls, **kw: Value | None) -> Match:
        items = [(k, canonical(k, v)) for k, v in kw.items() if v is not None]
        return cls(tuple(sorted(items)))

    def get(self, fld: str) -> Value | None:
        for k, v in self.fields:
            if k == fld:
                return v
        return None

    def as_dict(self) -> dict[str, Value]:
        return dict(self.fields)

    def missing_prereqs(self) -> list[str]:
        have = self.as_dict()
        out = []
        for fld in have:
            for pre, val in PREREQS.get(fld, ()):
                if have.get(pre) != val:
                    out.append(f"{fld} needs {pre}={val:#x}")
        return out

    def to_ofctl(self) -> str:
        return ",".join(
            f"{OFCTL_NAMES.get(k, k)}={format_value(k, v)}" for k, v in self.fields
        )


# --- actions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Output:
    port: int

    def to_ofctl(self) -> str:
        return "IN_PORT" if self.port == IN_PORT else f"output:{self.port}"


@dataclass(frozen=True)
class SetField:
    field: str
    value: Value

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", canonical(self.field, self.value))

    def to_ofctl(self) -> str:
        name = OFCTL_NAMES.get(self.field, self.field)
        return f"set_field:{format_value(self.field, self.value)}->{name}"


@dataclass(frozen=True)
class Move:
    """Copy a whole field into another of the same width (NXAST_REG_MOVE)."""

    src: str
    dst: str

    def __post_init__(self) -> None:
        if FIELDS[self.src][1] != FIELDS[self.dst][1]:
            raise ValueError(f"move {self.src}->{self.dst}: widths differ")

    @property
    def n_bits(self) -> int:
        return FIELDS[self.src][1]

    def to_ofctl(self) -> str:
        s, d = OFCTL_NAMES.get(self.src, self.src), OFCTL_NAMES.get(self.dst, self.dst)
        return f"move:{s}[]->{d}[]"


@dataclass(frozen=True)
class DecTTL:
    def to_ofctl(self) -> str:
        return "dec_ttl"


@dataclass(frozen=True)
class SetTTL:
    ttl: int

    def to_ofctl(self) -> str:
        return f"mod_nw_ttl:{self.ttl}"


@dataclass(frozen=True)
class Goto:
    """goto_table (an instruction: always the last step of a flow)."""

    table: str

    def to_ofctl(self) -> str:
        return f"goto_table:{TABLES[self.table].number}"


NatKind = Literal["", "src", "dst"]  # "": apply an existing connection's translation
ObjectKind = Literal["", "router", "network", "vm", "node"]  # "": the pipeline itself


@dataclass(frozen=True)
class NAT:
    """The NAT of a ct action: `src` or `dst` to one address, or bare (`kind=""`): apply the
    translation of an existing connection (un-NAT replies)."""

    kind: NatKind = ""
    ip: str = ""
    port: int | None = None  # one translated port (for TCP and UDP), or any

    def to_ofctl(self) -> str:
        if not self.kind:
            return "nat"
        return f"nat({self.kind}={self.ip}{'' if self.port is None else f':{self.port}'})"


@dataclass(frozen=True)
class CT:
    """Send the packet through the connection tracker in `zone` (optionally committing it and
    NATing it), then continue in `table` with ct_state set (a recirculation)."""

    zone: int
    table: str
    commit: bool = False
    nat: NAT | None = None

    def to_ofctl(self) -> str:
        parts = ["commit"] if self.commit else []
        parts += [f"zone={self.zone}", f"table={TABLES[self.table].number}"]
        if self.nat is not None:
            parts.append(self.nat.to_ofctl())
        return f"ct({','.join(parts)})"


@dataclass(frozen=True)
class Resubmit:
    """Go on in `table` (NXAST_RESUBMIT_TABLE): how a group's bucket continues the pipeline
    (a bucket holds actions, not instructions, so it cannot `goto`)."""

    table: str

    def to_ofctl(self) -> str:
        return f"resubmit(,{TABLES[self.table].number})"


GROUP_OWNER = 0xD7A5  # top 16 bits of the ids of every group this project installs
GROUP_OWNER_SHIFT = 16
GroupKind = Literal["ff"]


@dataclass(frozen=True)
class Bucket:
    """One bucket of a group: its actions (none: drop) and, in a fast-failover group, the
    port whose liveness makes it usable (None: always live)."""

    actions: tuple[Output | SetField | Resubmit, ...] = ()
    watch_port: int | None = None

    def to_ofctl(self) -> str:
        watch = f"watch_port:{self.watch_port}," if self.watch_port is not None else ""
        return f"bucket={watch}actions={','.join(a.to_ofctl() for a in self.actions) or 'drop'}"


@dataclass(frozen=True)
class Group:
    """An OpenFlow group. A fast-failover group (`ff`) applies its first live bucket: the
    switch itself moves to the next one when a watched port goes down (a tunnel whose BFD
    session fails), without waiting for any agent."""

    group_id: int
    buckets: tuple[Bucket, ...]
    kind: GroupKind = "ff"
    hint: Hint | None = field(default=None, compare=False, hash=False)

    def to_ofctl(self) -> str:
        buckets = ",".join(b.to_ofctl() for b in self.buckets)
        return f"group_id={self.group_id},type={self.kind},{buckets}"


def group_id(number: int) -> int:
    """The id of this project's group number `number` (16 bits), with the owner bits."""
    if not 0 < number < 1 << GROUP_OWNER_SHIFT:
        raise ValueError(f"group number {number} out of range")
    return (GROUP_OWNER << GROUP_OWNER_SHIFT) | number


def owned_group(gid: int) -> bool:
    return gid >> GROUP_OWNER_SHIFT == GROUP_OWNER


@dataclass(frozen=True)
class GroupAction:
    """Apply group `group` (its definition travels with the flow that uses it; the switch
    knows it by its id)."""

    group: Group

    def to_ofctl(self) -> str:
        return f"group:{self.group.group_id}"


Action = Output | SetField | Move | DecTTL | SetTTL | Goto | CT | Resubmit | GroupAction


class Purpose(IntEnum):
    """What a flow is for: the second byte of its cookie."""

    DEFAULT = 1
    PORT_SECURITY = 2
    TUNNEL = 3
    GATEWAY = 4
    ROUTE = 5
    DELIVERY_LOCAL = 6
    DELIVERY_REMOTE = 7
    DST_KEY = 8
    FLOATING_IP = 9
    SNAT = 10
    EXTERNAL = 11


@dataclass(frozen=True)
class Hint:
    """Where a flow comes from: the builder and the model object behind it."""

    purpose: Purpose
    kind: ObjectKind = ""  # the kind of model object behind the flow
    name: str = ""
    note: str = ""  # what the flow does, in words (drops say why)

    def __str__(self) -> str:
        obj = f"{self.kind} {self.name}" if self.kind else "pipeline"
        return f"{self.purpose.name.lower()} [{obj}]" + (f": {self.note}" if self.note else "")


@dataclass(frozen=True)
class Flow:
    table: str
    priority: int
    match: Match
    actions: tuple[Action, ...]
    hint: Hint = field(compare=False, hash=False, default=Hint(Purpose.DEFAULT))

    @property
    def identity(self) -> tuple[str, int, Match]:
        return (self.table, self.priority, self.match)

    @cached_property
    def cookie(self) -> int:
        """Owner bits, purpose byte and a hash of the flow as the switch holds it (table
        number, priority, match, actions: renaming a table changes no cookie), computed
        once per flow."""
        text = (f"{TABLES[self.table].number}|{self.priority}|{self.match.to_ofctl()}|"
                f"{self.actions_ofctl()}")
        h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=5).digest(), "big")
        return (OWNER_COOKIE << 48) | (int(self.hint.purpose) << 40) | h

    def actions_ofctl(self) -> str:
        return ",".join(a.to_ofctl() for a in self.actions) or "drop"

    def to_ofctl(self) -> str:
        m = self.match.to_ofctl()
        return (
            f"cookie={self.cookie:#x},table={TABLES[self.table].number},"
            f"priority={self.priority}{',' + m if m else ''} actions={self.actions_ofctl()}"
        )


def groups_of(flows: Iterable[Flow]) -> dict[int, Group]:
    """The groups the flows use, by id (a plan's groups are those its flows apply)."""
    out: dict[int, Group] = {}
    for flow in flows:
        for action in flow.actions:
            if isinstance(action, GroupAction):
                have = out.setdefault(action.group.group_id, action.group)
                if have != action.group:
                    raise ValueError(f"two definitions of group {action.group.group_id}")
    return out


def purpose_of_cookie(cookie: int) -> Purpose | None:
    if cookie >> 48 != OWNER_COOKIE:
        return None
    try:
        return Purpose((cookie >> 40) & 0xFF)
    except ValueError:
        return None
