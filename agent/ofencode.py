"""The wire form of a planned flow, fast: OpenFlow 1.3 flow_mods (and their ONF bundle
wrapping) packed with `struct` straight from the flow model.

os-ken stays the codec of record (`agent.ofswitch.flow_mod` builds its message objects; it
decodes every reply), but its generic encoder spends about 0.1 ms a flow, which makes a
node's full reprogramming (an agent start, an OVS restart) ten times slower than the switch
takes flows. This module writes the same bytes for the subset of OpenFlow the pipeline
uses; `tests/unit/test_encoding.py` holds every planned flow of every test topology to be
byte for byte what os-ken writes. Encodings are kept per flow (a flow is immutable), so a
flow sent again (a retried bundle, an OVS restart) costs nothing to encode.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from functools import lru_cache
from typing import Any

from flows.ofp import (
    CT,
    FIELDS,
    Action,
    DecTTL,
    Flow,
    Goto,
    GroupAction,
    Move,
    Output,
    Resubmit,
    SetField,
    SetTTL,
)
from flows.pipeline import TABLES

OFP_VERSION = 4  # OpenFlow 1.3
OFPT_EXPERIMENTER, OFPT_FLOW_MOD = 4, 14
ONF_EXPERIMENTER_ID, ONF_ET_BUNDLE_ADD_MESSAGE = 0x4F4E4600, 2301
NX_VENDOR_ID = 0x2320
OFP_NO_BUFFER = 0xFFFFFFFF
NX_IN_PORT = 0xFFF8  # a Nicira resubmit's in_port (16 bits): keep the packet's own
NAT_FLAGS = {"": 0, "src": 1, "dst": 2}  # NX_NAT_F_SRC, NX_NAT_F_DST
NX_NAT_RANGE_IPV4_MIN, NX_NAT_RANGE_IPV4_MAX = 1 << 0, 1 << 1
NX_NAT_RANGE_PROTO_MIN, NX_NAT_RANGE_PROTO_MAX = 1 << 4, 1 << 5

OFPXMC_NXM_1, OFPXMC_OPENFLOW_BASIC = 0x0001, 0x8000
# field -> (OXM class, OXM field number)
OXM: dict[str, tuple[int, int]] = {
    "in_port": (OFPXMC_OPENFLOW_BASIC, 0),
    "metadata": (OFPXMC_OPENFLOW_BASIC, 2),
    "eth_dst": (OFPXMC_OPENFLOW_BASIC, 3),
    "eth_src": (OFPXMC_OPENFLOW_BASIC, 4),
    "eth_type": (OFPXMC_OPENFLOW_BASIC, 5),
    "ip_proto": (OFPXMC_OPENFLOW_BASIC, 10),
    "ipv4_src": (OFPXMC_OPENFLOW_BASIC, 11),
    "ipv4_dst": (OFPXMC_OPENFLOW_BASIC, 12),
    "tcp_src": (OFPXMC_OPENFLOW_BASIC, 13),
    "tcp_dst": (OFPXMC_OPENFLOW_BASIC, 14),
    "udp_src": (OFPXMC_OPENFLOW_BASIC, 15),
    "udp_dst": (OFPXMC_OPENFLOW_BASIC, 16),
    "icmpv4_type": (OFPXMC_OPENFLOW_BASIC, 19),
    "icmpv4_code": (OFPXMC_OPENFLOW_BASIC, 20),
    "arp_op": (OFPXMC_OPENFLOW_BASIC, 21),
    "arp_spa": (OFPXMC_OPENFLOW_BASIC, 22),
    "arp_tpa": (OFPXMC_OPENFLOW_BASIC, 23),
    "arp_sha": (OFPXMC_OPENFLOW_BASIC, 24),
    "arp_tha": (OFPXMC_OPENFLOW_BASIC, 25),
    "tunnel_id": (OFPXMC_OPENFLOW_BASIC, 38),
    **{f"reg{i}": (OFPXMC_NXM_1, i) for i in range(8)},
    "ct_state": (OFPXMC_NXM_1, 105),
}
assert set(OXM) == set(FIELDS), "every field of the flow model has its OXM number"


def _oxm_header(fld: str, masked: bool = False) -> int:
    cls, num = OXM[fld]
    size = FIELDS[fld][1] // 8
    return (cls << 16) | (num << 9) | (int(masked) << 8) | (size * 2 if masked else size)


_HEADER = {fld: struct.pack("!I", _oxm_header(fld)) for fld in OXM}
_HEADER_MASKED = {fld: struct.pack("!I", _oxm_header(fld, True)) for fld in OXM}
_ORDER = {fld: num | (cls << 7) for fld, (cls, num) in OXM.items()}  # os-ken's field order
_KIND = {fld: (kind, width // 8) for fld, (kind, width) in FIELDS.items()}


def _bytes(fld: str, value: Any) -> bytes:
    kind, size = _KIND[fld]
    if kind == "mac":
        return bytes.fromhex(value.replace(":", ""))
    if kind == "ip":
        return socket.inet_aton(str(value))
    return int(value).to_bytes(size, "big")


def _oxm(fld: str, value: Any) -> bytes:
    """One match field (value, or (value, mask); an IP network as its address and mask)."""
    if isinstance(value, tuple):
        value, mask = value
        return _HEADER_MASKED[fld] + _bytes(fld, value) + _bytes(fld, mask)
    if _KIND[fld][0] == "ip" and "/" in value:
        net = ipaddress.IPv4Network(value)
        return _HEADER_MASKED[fld] + net.network_address.packed + net.netmask.packed
    return _HEADER[fld] + _bytes(fld, value)


def _pad8(data: bytes) -> bytes:
    return data + bytes(-len(data) % 8)


_MATCH_HEADER = struct.Struct("!HH")


def encode_match(fields: tuple[tuple[str, Any], ...]) -> bytes:
    """An ofp_match (OXM), its fields in the order of their OXM numbers (as os-ken sorts)."""
    body = b"".join([_oxm(k, v) for k, v in sorted(fields, key=lambda kv: _ORDER[kv[0]])])
    n = 4 + len(body)
    return _MATCH_HEADER.pack(1, n) + body + bytes(-n % 8)


def _nx(subtype: int, body: bytes) -> bytes:
    """A Nicira vendor action: its header, subtype and body, padded to 8 bytes."""
    data = struct.pack("!IH", NX_VENDOR_ID, subtype) + body
    total = 4 + len(data)
    total += -total % 8
    return struct.pack("!HH", 0xFFFF, total) + data + bytes(total - 4 - len(data))


def _nat(a: CT) -> bytes:
    nat = a.nat
    assert nat is not None
    present, ranges = 0, b""
    if nat.ip:
        present |= NX_NAT_RANGE_IPV4_MIN | NX_NAT_RANGE_IPV4_MAX
        ranges += ipaddress.IPv4Address(nat.ip).packed * 2
        if nat.port is not None:
            present |= NX_NAT_RANGE_PROTO_MIN | NX_NAT_RANGE_PROTO_MAX
            ranges += struct.pack("!HH", nat.port, nat.port)
    return _nx(36, struct.pack("!2xHH", NAT_FLAGS[nat.kind], present) + ranges)


@lru_cache(maxsize=1 << 16)
def encode_action(a: Action) -> bytes:
    """One action of the flow model (not `goto`: an instruction)."""
    if isinstance(a, Output):
        return struct.pack("!HHIH6x", 0, 16, a.port, 0xFFFF)
    if isinstance(a, SetField) and a.field == "in_port":
        # OVS refuses an OpenFlow 1.3 set_field on in_port; a Nicira load is accepted
        return _nx(7, struct.pack("!HIQ", 31, _oxm_header("in_port"), a.value))
    if isinstance(a, SetField):
        field = struct.pack("!I", _oxm_header(a.field)) + _bytes(a.field, a.value)
        return _pad8(struct.pack("!HH", 25, 4 + len(field) + (-(4 + len(field)) % 8)) + field)
    if isinstance(a, Move):
        return _nx(6, struct.pack("!HHHII", a.n_bits, 0, 0, _oxm_header(a.src),
                                  _oxm_header(a.dst)))
    if isinstance(a, DecTTL):
        return struct.pack("!HH4x", 24, 8)
    if isinstance(a, SetTTL):
        return struct.pack("!HHB3x", 23, 8, a.ttl)
    if isinstance(a, CT):
        nested = _nat(a) if a.nat is not None else b""
        return _nx(35, struct.pack("!HIHB3xH", 1 if a.commit else 0, 0, a.zone,
                                   TABLES[a.table].number, 0) + nested)
    if isinstance(a, Resubmit):
        return _nx(14, struct.pack("!HB3x", NX_IN_PORT, TABLES[a.table].number))
    if isinstance(a, GroupAction):
        return struct.pack("!HHI", 22, 8, a.group.group_id)
    raise TypeError(f"no OpenFlow encoding for {a!r}")  # the pipeline check prevents it


_GOTO = struct.Struct("!HHB3x")
_TABLE_NUMBER = {name: t.number for name, t in TABLES.items()}


def encode_instructions(actions: tuple[Action, ...]) -> bytes:
    """apply_actions (the actions before the first goto, with those after it) and
    goto_table, in os-ken's order: apply-actions first."""
    out: list[bytes] = []
    pending: list[bytes] = []
    for a in actions:
        if type(a) is not Goto:
            pending.append(encode_action(a))
            continue
        if pending:
            out.append(_apply(pending))
            pending = []
        out.append(_GOTO.pack(1, 8, _TABLE_NUMBER[a.table]))  # type: ignore[attr-defined]
    if pending:
        out.insert(0, _apply(pending))
    return b"".join(out)


def _apply(actions: list[bytes]) -> bytes:
    body = b"".join(actions)
    return struct.pack("!HH4x", 4, 8 + len(body)) + body


# encoded flows by cookie (a cookie is a digest of the flow's table, priority, match and
# actions: its identity), dropped whole when it grows past BODY_CACHE
_bodies: dict[int, bytes] = {}
BODY_CACHE = 1 << 18
_FIXED = struct.Struct("!QQBBHHHIIIH2x")
_OF_HEADER = struct.Struct("!BBHI")


def flow_mod_body(flow: Flow) -> bytes:
    """What follows the OpenFlow header in the flow_mod that adds `flow`."""
    body = _bodies.get(flow.cookie)
    if body is None:
        fixed = _FIXED.pack(flow.cookie, 0, _TABLE_NUMBER[flow.table], 0, 0, 0,
                            flow.priority, OFP_NO_BUFFER, 0, 0, 0)
        body = fixed + encode_match(flow.match.fields) + encode_instructions(flow.actions)
        if len(_bodies) >= BODY_CACHE:
            _bodies.clear()
        _bodies[flow.cookie] = body
    return body


def flow_mod(flow: Flow, xid: int) -> bytes:
    """The whole OpenFlow 1.3 message that adds `flow`."""
    body = flow_mod_body(flow)
    return _OF_HEADER.pack(OFP_VERSION, OFPT_FLOW_MOD, 8 + len(body), xid) + body


def bundle_add(bundle_id: int, flags: int, message: bytes, xid: int) -> bytes:
    """An ONF bundle-add message (OpenFlow 1.3 experimenter) carrying `message`, with the
    same xid (as os-ken's ONFBundleAddMsg writes it)."""
    body = struct.pack("!III2xH", ONF_EXPERIMENTER_ID, ONF_ET_BUNDLE_ADD_MESSAGE, bundle_id,
                       flags)
    body += message
    body += bytes(-(8 + len(body)) % 8)  # the whole message a multiple of 8 bytes
    return struct.pack("!BBHI", OFP_VERSION, OFPT_EXPERIMENTER, 8 + len(body), xid) + body


def forget() -> None:
    """Drop every encoding kept (as a freshly started agent has none)."""
    _bodies.clear()
    encode_action.cache_clear()
