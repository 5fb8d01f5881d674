"""The one module that speaks OpenFlow: os-ken as the codec, on a socket of our own.

A `Switch` talks OpenFlow 1.3 to one bridge's management socket (`<rundir>/<bridge>.mgmt`,
or `tcp:HOST:PORT`). It offers three things: the flows that carry this project's cookie
(`dump_owned`), an atomic change (`apply`: deletes then adds inside one ONF bundle that is
committed only if OVS accepted every message, otherwise discarded), and port statistics. It
never reads or writes a flow of another cookie.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from os_ken.ofproto import ofproto_parser, ofproto_protocol
from os_ken.ofproto import ofproto_v1_3 as ofp
from os_ken.ofproto import ofproto_v1_3_parser as parser

from flows.ofp import (
    CT,
    FIELDS,
    OWNER_COOKIE,
    OWNER_MASK,
    DecTTL,
    Flow,
    Goto,
    Move,
    Output,
    SetField,
    SetTTL,
)
from flows.pipeline import TABLES

LOG = logging.getLogger(__name__)
ALL_ONES64 = (1 << 64) - 1


class OpenFlowError(Exception):
    """The switch refused a message, or could not be reached."""


@dataclass(frozen=True)
class InstalledFlow:
    """A flow as the switch reports it: enough to recognise and delete it."""

    cookie: int
    table_id: int
    priority: int
    match: Any  # os-ken OFPMatch, re-usable for a strict delete
    packet_count: int = 0


def installed(flow: Flow) -> InstalledFlow:
    """The flow as the switch will report it once added (without a dump)."""
    return InstalledFlow(flow.cookie, TABLES[flow.table].number, flow.priority,
                         to_ofp_match(flow))


def _match_value(fld: str, value: Any) -> Any:
    kind, _ = FIELDS[fld]
    if kind == "ip" and "/" in str(value):
        net = ipaddress.IPv4Network(value)
        return (str(net.network_address), str(net.netmask))
    return value


def to_ofp_match(flow: Flow) -> Any:
    return parser.OFPMatch(**{k: _match_value(k, v) for k, v in flow.match.fields})


def to_ofp_instructions(flow: Flow) -> list[Any]:
    actions: list[Any] = []
    instructions: list[Any] = []
    for a in flow.actions:
        if isinstance(a, Output):
            actions.append(parser.OFPActionOutput(a.port, 0xFFFF))
        elif isinstance(a, SetField) and a.field == "in_port":
            # OVS refuses an OpenFlow 1.3 set_field on in_port; a Nicira load is accepted
            actions.append(parser.NXActionRegLoad(ofs_nbits=31, dst="in_port", value=a.value))
        elif isinstance(a, SetField):
            actions.append(parser.OFPActionSetField(**{a.field: a.value}))
        elif isinstance(a, Move):
            actions.append(parser.NXActionRegMove(src_field=a.src, dst_field=a.dst,
                                                  n_bits=a.n_bits))
        elif isinstance(a, DecTTL):
            actions.append(parser.OFPActionDecNwTtl())
        elif isinstance(a, SetTTL):
            actions.append(parser.OFPActionSetNwTtl(a.ttl))
        elif isinstance(a, CT):
            actions.append(_ct_action(a))
        elif isinstance(a, Goto):
            if actions:
                instructions.append(parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS,
                                                                 actions))
                actions = []
            instructions.append(parser.OFPInstructionGotoTable(TABLES[a.table].number))
        else:  # pragma: no cover - the pipeline check makes this unreachable
            raise TypeError(f"no OpenFlow encoding for {a!r}")
    if actions:
        instructions.insert(0, parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS, actions))
    return instructions


NAT_FLAGS = {"": 0, "src": 1, "dst": 2}  # NX_NAT_F_SRC, NX_NAT_F_DST


def _ct_action(a: CT) -> Any:
    nat = []
    if a.nat is not None:
        if a.nat.ip:
            nat.append(parser.NXActionNAT(NAT_FLAGS[a.nat.kind], range_ipv4_min=a.nat.ip,
                                          range_ipv4_max=a.nat.ip))
        else:
            nat.append(parser.NXActionNAT(0))
    return parser.NXActionCT(flags=1 if a.commit else 0, zone_src="",
                             zone_ofs_nbits=a.zone, recirc_table=TABLES[a.table].number,
                             alg=0, actions=nat)


def _describe(item: InstalledFlow | Flow | str) -> str:
    if isinstance(item, InstalledFlow):
        return f"delete cookie={item.cookie:#x}"
    if isinstance(item, Flow):
        return f"add {item.to_ofctl()}"
    return item


class Switch:
    """One OpenFlow connection to one bridge. Thread-safe; reconnects on demand."""

    def __init__(self, target: str, timeout: float = 10.0):
        self.target = target
        self.timeout = timeout
        self.dp = ofproto_protocol.ProtocolDesc(ofp.OFP_VERSION)
        self._sock: socket.socket | None = None
        self.connections = 0  # a new connection may be to a restarted switch
        self._buf = b""
        self._xid = 0
        self._bundle = 0
        self._lock = threading.RLock()

    # --- connection -------------------------------------------------------------------
    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        try:
            if self.target.startswith("tcp:"):
                host, port = self.target[4:].rsplit(":", 1)
                sock = socket.create_connection((host, int(port)), timeout=self.timeout)
            else:
                path = self.target.removeprefix("unix:")
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                sock.connect(path)
        except OSError as exc:
            raise OpenFlowError(f"cannot connect to {self.target}: {exc}") from None
        self._sock, self._buf = sock, b""
        self.connections += 1
        try:
            self._send(parser.OFPHello(self.dp))
            hello = self._recv()
            if hello.msg_type != ofp.OFPT_HELLO:
                raise OpenFlowError(f"{self.target}: expected HELLO, got {hello}")
        except Exception:
            self.close()
            raise
        return sock

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                try:
                    self._sock.close()
                finally:
                    self._sock = None

    def _next_xid(self) -> int:
        self._xid = (self._xid + 1) & 0xFFFFFFFF or 1
        return self._xid

    def _send(self, msg: Any) -> int:
        assert self._sock is not None
        if msg.xid is None:
            msg.set_xid(self._next_xid())
        msg.serialize()
        try:
            self._sock.sendall(msg.buf)
        except OSError as exc:
            self.close()
            raise OpenFlowError(f"{self.target}: send failed: {exc}") from None
        return msg.xid

    def _recv(self) -> Any:
        assert self._sock is not None
        while True:
            if len(self._buf) >= 8:
                version, msg_type, length, xid = ofproto_parser.header(self._buf)
                if len(self._buf) >= length:
                    data, self._buf = self._buf[:length], self._buf[length:]
                    msg = ofproto_parser.msg(self.dp, version, msg_type, length, xid, data)
                    if msg_type == ofp.OFPT_ECHO_REQUEST:
                        self._send(parser.OFPEchoReply(self.dp, data=msg.data))
                        continue
                    return msg
            try:
                chunk = self._sock.recv(1 << 20)
            except OSError as exc:
                self.close()
                raise OpenFlowError(f"{self.target}: receive failed: {exc}") from None
            if not chunk:
                self.close()
                raise OpenFlowError(f"{self.target}: connection closed by the switch")
            self._buf += chunk

    def _until_barrier(self, sent: dict[int, InstalledFlow | Flow | str]) -> list[str]:
        """Send a barrier, read up to its reply, return errors naming what was refused."""
        barrier = self._send(parser.OFPBarrierRequest(self.dp))
        errors = []
        while True:
            msg = self._recv()
            if msg.msg_type == ofp.OFPT_BARRIER_REPLY and msg.xid == barrier:
                return errors
            if msg.msg_type == ofp.OFPT_ERROR:
                what = _describe(sent.get(msg.xid, f"xid {msg.xid}"))
                errors.append(f"{what}: OpenFlow error type={msg.type} code={msg.code}")

    # --- queries ------------------------------------------------------------------------
    def dump_owned(self) -> list[InstalledFlow]:
        """Every flow whose cookie carries this project's owner bits."""
        with self._lock:
            self._connect()
            req = parser.OFPFlowStatsRequest(
                self.dp, 0, ofp.OFPTT_ALL, ofp.OFPP_ANY, ofp.OFPG_ANY,
                OWNER_COOKIE << 48, OWNER_MASK, parser.OFPMatch(),
            )
            xid = self._send(req)
            out: list[InstalledFlow] = []
            while True:
                msg = self._recv()
                if msg.xid != xid:
                    continue
                if msg.msg_type == ofp.OFPT_ERROR:
                    raise OpenFlowError(f"{self.target}: flow dump refused: {msg}")
                for st in msg.body:
                    out.append(InstalledFlow(st.cookie, st.table_id, st.priority, st.match,
                                             st.packet_count))
                if not msg.flags & ofp.OFPMPF_REPLY_MORE:
                    return out

    def port_stats(self) -> dict[int, dict[str, int]]:
        with self._lock:
            self._connect()
            xid = self._send(parser.OFPPortStatsRequest(self.dp, 0, ofp.OFPP_ANY))
            out: dict[int, dict[str, int]] = {}
            while True:
                msg = self._recv()
                if msg.xid != xid:
                    continue
                for st in msg.body:
                    out[st.port_no] = {"rx_packets": st.rx_packets, "tx_packets": st.tx_packets,
                                       "rx_bytes": st.rx_bytes, "tx_bytes": st.tx_bytes}
                if not msg.flags & ofp.OFPMPF_REPLY_MORE:
                    return out

    def packet_out(self, port: int, frame: bytes) -> None:
        """Send one frame out of `port` (as if from the controller)."""
        with self._lock:
            try:
                self._connect()
                self._send(parser.OFPPacketOut(
                    self.dp, buffer_id=ofp.OFP_NO_BUFFER, in_port=ofp.OFPP_CONTROLLER,
                    actions=[parser.OFPActionOutput(port, 0)], data=frame))
                errors = self._until_barrier({})
            except OSError as exc:
                self.close()
                raise OpenFlowError(f"{self.target}: {exc}") from None
        if errors:
            raise OpenFlowError(f"packet out to port {port}: {errors[0]}")

    # --- changes ------------------------------------------------------------------------
    def apply(self, delete: Iterable[InstalledFlow], add: Iterable[Flow]) -> None:
        """Delete then add, atomically: all of it is committed or none of it."""
        delete, add = list(delete), list(add)
        if not delete and not add:
            return
        with self._lock:
            try:
                self._apply(delete, add)
            except OSError as exc:
                self.close()
                raise OpenFlowError(f"{self.target}: {exc}") from None

    def _apply(self, delete: list[InstalledFlow], add: list[Flow]) -> None:
        self._connect()
        self._bundle = (self._bundle + 1) & 0xFFFFFFFF or 1
        bid = self._bundle
        flags = ofp.ONF_BF_ATOMIC | ofp.ONF_BF_ORDERED
        # what each message was, to name it if OVS refuses it (formatted only then)
        sent: dict[int, InstalledFlow | Flow | str] = {}
        sent[self._send(parser.ONFBundleCtrlMsg(
            self.dp, bundle_id=bid, type_=ofp.ONF_BCT_OPEN_REQUEST, flags=flags,
            properties=[]))] = "bundle open"
        for inst in delete:
            mod = parser.OFPFlowMod(
                self.dp, cookie=inst.cookie, cookie_mask=ALL_ONES64, table_id=inst.table_id,
                command=ofp.OFPFC_DELETE_STRICT, priority=inst.priority,
                out_port=ofp.OFPP_ANY, out_group=ofp.OFPG_ANY, match=inst.match)
            sent[self._send(parser.ONFBundleAddMsg(self.dp, bid, flags, mod, []))] = inst
        for flow in add:
            mod = parser.OFPFlowMod(
                self.dp, cookie=flow.cookie, table_id=TABLES[flow.table].number,
                command=ofp.OFPFC_ADD, priority=flow.priority, match=to_ofp_match(flow),
                instructions=to_ofp_instructions(flow))
            sent[self._send(parser.ONFBundleAddMsg(self.dp, bid, flags, mod, []))] = flow
        errors = self._until_barrier(sent)
        if errors:
            self._send(parser.ONFBundleCtrlMsg(
                self.dp, bundle_id=bid, type_=ofp.ONF_BCT_DISCARD_REQUEST, flags=flags,
                properties=[]))
            self._until_barrier({})
            raise OpenFlowError(f"{self.target}: bundle discarded: {errors[0]}"
                                + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
        commit = self._send(parser.ONFBundleCtrlMsg(
            self.dp, bundle_id=bid, type_=ofp.ONF_BCT_COMMIT_REQUEST, flags=flags,
            properties=[]))
        while True:
            msg = self._recv()
            if msg.xid != commit:
                continue
            if msg.msg_type == ofp.OFPT_ERROR:
                raise OpenFlowError(f"{self.target}: bundle commit failed: type={msg.type} "
                                    f"code={msg.code}")
            return
