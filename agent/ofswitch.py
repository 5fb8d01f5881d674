"""The one module that speaks OpenFlow: os-ken as the codec, on a socket of our own.

A `Switch` talks OpenFlow 1.3 to one bridge's management socket (`<rundir>/<bridge>.mgmt`,
or `tcp:HOST:PORT`). It offers the flows that carry this project's cookie (`dump_owned`),
an atomic change (`with switch.bundle() as b: b.delete(...); b.add(...)`: one ONF bundle,
every reply checked, committed only if OVS accepted every message and discarded otherwise,
or when the body raises) and packets out. It never reads or writes a flow of another
cookie. `flow_mod()` is the one encoding of a planned flow (the unit tests encode every
planned flow through it).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from os_ken.ofproto import ofproto_parser, ofproto_protocol
from os_ken.ofproto import ofproto_v1_3 as ofp
from os_ken.ofproto import ofproto_v1_3_parser as parser

from agent import ofencode
from agent.ofencode import NAT_FLAGS, NX_IN_PORT
from flows.ofp import (
    CT,
    FIELDS,
    OWNER_COOKIE,
    OWNER_MASK,
    Action,
    Bucket,
    DecTTL,
    Flow,
    Goto,
    Group,
    GroupAction,
    Move,
    Output,
    Resubmit,
    SetField,
    SetTTL,
    owned_group,
)
from flows.pipeline import BY_NUMBER, TABLES

LOG = logging.getLogger(__name__)
ALL_ONES64 = (1 << 64) - 1
SEND_BATCH = 1 << 16  # bytes of encoded messages written at once


class OpenFlowError(Exception):
    """The switch refused a message, or could not be reached."""


@dataclass(frozen=True)
class InstalledFlow:
    """A flow as the switch reports it: enough to recognise and delete it."""

    cookie: int
    table_id: int
    priority: int
    match: Any  # os-ken OFPMatch, re-usable for a strict delete (None: made from `flow`)
    packet_count: int = 0
    flow: Flow | None = field(default=None, compare=False, repr=False)

    def ofp_match(self) -> Any:
        if self.match is None:
            assert self.flow is not None
            return to_ofp_match(self.flow)
        return self.match


def installed(flow: Flow) -> InstalledFlow:
    """The flow as the switch will report it once added (without a dump); its os-ken
    match is made only if it is ever deleted."""
    return InstalledFlow(flow.cookie, TABLES[flow.table].number, flow.priority, None,
                         flow=flow)


def _match_value(fld: str, value: Any) -> Any:
    kind, _ = FIELDS[fld]
    if kind == "ip" and "/" in str(value):
        net = ipaddress.IPv4Network(value)
        return (str(net.network_address), str(net.netmask))
    return value


def to_ofp_match(flow: Flow) -> Any:
    return parser.OFPMatch(**{k: _match_value(k, v) for k, v in flow.match.fields})


def _ofp_action(a: Action) -> Any:
    """One action of the flow model as os-ken's (not `goto`: an instruction)."""
    if isinstance(a, Output):
        return parser.OFPActionOutput(a.port, 0xFFFF)
    if isinstance(a, SetField) and a.field == "in_port":
        # OVS refuses an OpenFlow 1.3 set_field on in_port; a Nicira load is accepted
        return parser.NXActionRegLoad(ofs_nbits=31, dst="in_port", value=a.value)
    if isinstance(a, SetField):
        return parser.OFPActionSetField(**{a.field: a.value})
    if isinstance(a, Move):
        return parser.NXActionRegMove(src_field=a.src, dst_field=a.dst, n_bits=a.n_bits)
    if isinstance(a, DecTTL):
        return parser.OFPActionDecNwTtl()
    if isinstance(a, SetTTL):
        return parser.OFPActionSetNwTtl(a.ttl)
    if isinstance(a, CT):
        return _ct_action(a)
    if isinstance(a, Resubmit):
        return parser.NXActionResubmitTable(in_port=NX_IN_PORT,
                                            table_id=TABLES[a.table].number)
    if isinstance(a, GroupAction):
        return parser.OFPActionGroup(a.group.group_id)
    raise TypeError(f"no OpenFlow encoding for {a!r}")  # the pipeline check prevents it


def to_ofp_instructions(flow: Flow) -> list[Any]:
    actions: list[Any] = []
    instructions: list[Any] = []
    for a in flow.actions:
        if not isinstance(a, Goto):
            actions.append(_ofp_action(a))
            continue
        if actions:
            instructions.append(parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS, actions))
            actions = []
        instructions.append(parser.OFPInstructionGotoTable(TABLES[a.table].number))
    if actions:
        instructions.insert(0, parser.OFPInstructionActions(ofp.OFPIT_APPLY_ACTIONS, actions))
    return instructions




class _NatToPort(parser.NXActionNAT):  # type: ignore[misc]
    """os-ken's NAT action with a port range: it writes four bytes less than the length it
    declares (the padding), which shifts whatever follows; this one pads."""

    def serialize(self, buf: bytearray, offset: int) -> None:
        super().serialize(buf, offset)
        buf += bytes(max(0, offset + self.len - len(buf)))


def _ct_action(a: CT) -> Any:
    nat = []
    if a.nat is not None:
        if a.nat.ip and a.nat.port is not None:
            nat.append(_NatToPort(NAT_FLAGS[a.nat.kind], range_ipv4_min=a.nat.ip,
                                  range_ipv4_max=a.nat.ip, range_proto_min=a.nat.port,
                                  range_proto_max=a.nat.port))
        elif a.nat.ip:
            nat.append(parser.NXActionNAT(NAT_FLAGS[a.nat.kind], range_ipv4_min=a.nat.ip,
                                          range_ipv4_max=a.nat.ip))
        else:
            nat.append(parser.NXActionNAT(0))
    return parser.NXActionCT(flags=1 if a.commit else 0, zone_src="",
                             zone_ofs_nbits=a.zone, recirc_table=TABLES[a.table].number,
                             alg=0, actions=nat)


def flow_mod(dp: Any, flow: Flow) -> Any:
    """The OpenFlow 1.3 message that adds `flow` (with its cookie) to the switch."""
    return parser.OFPFlowMod(
        dp, cookie=flow.cookie, table_id=TABLES[flow.table].number, command=ofp.OFPFC_ADD,
        priority=flow.priority, match=to_ofp_match(flow), instructions=to_ofp_instructions(flow))


GROUP_TYPES = {"ff": ofp.OFPGT_FF}


def group_mod(dp: Any, group: Group, command: int = ofp.OFPGC_ADD) -> Any:
    """The message that adds (or modifies) `group`."""
    buckets = [parser.OFPBucket(
        watch_port=ofp.OFPP_ANY if b.watch_port is None else b.watch_port,
        watch_group=ofp.OFPG_ANY, actions=[_ofp_action(a) for a in b.actions])
        for b in group.buckets]
    return parser.OFPGroupMod(dp, command, GROUP_TYPES[group.kind], group.group_id, buckets)


def delete_group_mod(dp: Any, gid: int) -> Any:
    return parser.OFPGroupMod(dp, ofp.OFPGC_DELETE, ofp.OFPGT_ALL, gid, [])


def group_of(desc: Any) -> Group | None:
    """A group as the switch describes it (OFPGroupDescStats), read back into the flow
    model; None when it holds something the model has no word for (it then differs from
    any planned group)."""
    kinds = {v: k for k, v in GROUP_TYPES.items()}
    if desc.type not in kinds:
        return None
    buckets = []
    for b in desc.buckets:
        actions: list[Output | SetField | Resubmit] = []
        for a in b.actions:
            if isinstance(a, parser.OFPActionOutput):
                actions.append(Output(a.port))
            elif isinstance(a, parser.OFPActionSetField):
                actions.append(SetField(a.key, a.value))
            elif isinstance(a, parser.NXActionResubmitTable) and a.table_id in BY_NUMBER:
                actions.append(Resubmit(BY_NUMBER[a.table_id].name))
            else:
                return None
        buckets.append(Bucket(tuple(actions),
                              None if b.watch_port == ofp.OFPP_ANY else b.watch_port))
    return Group(desc.group_id, tuple(buckets), kinds[desc.type])


def delete_mod(dp: Any, inst: InstalledFlow) -> Any:
    """The message that deletes exactly this flow: its table, priority, match and cookie."""
    return parser.OFPFlowMod(
        dp, cookie=inst.cookie, cookie_mask=ALL_ONES64, table_id=inst.table_id,
        command=ofp.OFPFC_DELETE_STRICT, priority=inst.priority, out_port=ofp.OFPP_ANY,
        out_group=ofp.OFPG_ANY, match=inst.ofp_match())


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

    @property
    def connected(self) -> bool:
        return self._sock is not None

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

    def _send_bytes(self, data: bytes | bytearray) -> None:
        """Messages already encoded (with their xids), in one write."""
        assert self._sock is not None
        try:
            self._sock.sendall(data)
        except OSError as exc:
            self.close()
            raise OpenFlowError(f"{self.target}: send failed: {exc}") from None

    def _drain(self) -> None:
        """Take in what the switch has sent so far, without waiting (parsed later): a switch
        answering many refusals must never block on us while we block on it."""
        assert self._sock is not None
        self._sock.setblocking(False)
        try:
            while True:
                chunk = self._sock.recv(1 << 20)
                if not chunk:
                    break  # closed: the next receive says so
                self._buf += chunk
        except BlockingIOError:
            pass
        except OSError as exc:
            self.close()
            raise OpenFlowError(f"{self.target}: receive failed: {exc}") from None
        finally:
            if self._sock is not None:
                self._sock.settimeout(self.timeout)

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

    def _until_barrier(self, sent: dict[int, InstalledFlow | Flow | str]
                       ) -> tuple[list[str], dict[int, Any]]:
        """Send a barrier and read up to its reply: the errors naming what was refused, and
        the other replies to the messages in `sent`, by xid."""
        barrier = self._send(parser.OFPBarrierRequest(self.dp))
        errors: list[str] = []
        replies: dict[int, Any] = {}
        while True:
            msg = self._recv()
            if msg.msg_type == ofp.OFPT_BARRIER_REPLY and msg.xid == barrier:
                return errors, replies
            if msg.msg_type == ofp.OFPT_ERROR:
                what = _describe(sent.get(msg.xid, f"xid {msg.xid}"))
                errors.append(f"{what}: {_error(msg)}")
            elif msg.xid in sent:
                replies[msg.xid] = msg

    def _reply_to(self, xid: int) -> Any:
        """The switch's answer to request `xid` (a reply or an error)."""
        while True:
            msg = self._recv()
            if msg.xid == xid:
                return msg

    # --- queries ------------------------------------------------------------------------
    def dump_owned(self, planned: Mapping[int, Flow] | None = None) -> list[InstalledFlow]:
        """Every flow whose cookie carries this project's owner bits. A flow whose cookie
        `planned` holds (a cookie names a flow's content) is returned as that planned flow,
        without os-ken's parsed match (about 1 KB a flow, for nothing: its match is the
        planned one's); a second flow of the same cookie keeps its own."""
        planned = planned or {}
        seen: set[int] = set()
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
                    flow = planned.get(st.cookie) if st.cookie not in seen else None
                    seen.add(st.cookie)
                    if flow is not None and TABLES[flow.table].number == st.table_id \
                            and flow.priority == st.priority:
                        out.append(InstalledFlow(st.cookie, st.table_id, st.priority, None,
                                                 st.packet_count, flow=flow))
                    else:
                        out.append(InstalledFlow(st.cookie, st.table_id, st.priority,
                                                 st.match, st.packet_count))
                if not msg.flags & ofp.OFPMPF_REPLY_MORE:
                    return out

    def count_owned(self) -> int:
        """How many flows carry this project's owner bits: one aggregate-statistics round
        trip, whatever their number (the switch counts; nothing is sent back per flow)."""
        with self._lock:
            self._connect()
            xid = self._send(parser.OFPAggregateStatsRequest(
                self.dp, 0, ofp.OFPTT_ALL, ofp.OFPP_ANY, ofp.OFPG_ANY,
                OWNER_COOKIE << 48, OWNER_MASK, parser.OFPMatch()))
            msg = self._reply_to(xid)
            if msg.msg_type == ofp.OFPT_ERROR:
                raise OpenFlowError(f"{self.target}: flow count refused: {_error(msg)}")
            return int(msg.body.flow_count)

    def dump_groups(self) -> dict[int, Group | None]:
        """Every group whose id carries this project's owner bits (None: a group of ours
        holding what the flow model cannot say)."""
        with self._lock:
            self._connect()
            xid = self._send(parser.OFPGroupDescStatsRequest(self.dp, 0))
            out: dict[int, Group | None] = {}
            while True:
                msg = self._recv()
                if msg.xid != xid:
                    continue
                if msg.msg_type == ofp.OFPT_ERROR:
                    raise OpenFlowError(f"{self.target}: group dump refused: {_error(msg)}")
                for desc in msg.body:
                    if owned_group(desc.group_id):
                        out[desc.group_id] = group_of(desc)
                if not msg.flags & ofp.OFPMPF_REPLY_MORE:
                    return out

    def packet_out(self, port: int, frame: bytes) -> None:
        """Send one frame out of `port` (as if from the controller)."""
        self._packet_out(frame, [parser.OFPActionOutput(port, 0)], f"packet out to {port}")

    def _packet_out(self, frame: bytes, actions: list[Any], what: str) -> None:
        with self._lock:
            try:
                self._connect()
                self._send(parser.OFPPacketOut(
                    self.dp, buffer_id=ofp.OFP_NO_BUFFER, in_port=ofp.OFPP_CONTROLLER,
                    actions=actions, data=frame))
                errors, _ = self._until_barrier({})
            except OSError as exc:
                self.close()
                raise OpenFlowError(f"{self.target}: {exc}") from None
        if errors:
            raise OpenFlowError(f"{what}: {errors[0]}")

    # --- changes ------------------------------------------------------------------------
    @contextlib.contextmanager
    def bundle(self) -> Iterator[Bundle]:
        """One atomic change: what the body deletes and adds is committed together when it
        returns, or not at all (OVS refused a message, or the body raised: discarded).
        An OpenFlowError names the first refused flow and the error."""
        with self._lock:
            b = Bundle(self)
            try:
                yield b
                b.commit()
            except OSError as exc:
                self.close()
                raise OpenFlowError(f"{self.target}: {exc}") from None
            except BaseException:
                b.discard()
                raise

    def _next_bundle(self) -> int:
        self._bundle = (self._bundle + 1) & 0xFFFFFFFF or 1
        return self._bundle


class Bundle:
    """The messages of one ONF bundle (`Switch.bundle()`). The bundle is opened on the
    first message; each message is remembered by its xid, so a refusal names its flow."""

    FLAGS = ofp.ONF_BF_ATOMIC | ofp.ONF_BF_ORDERED

    def __init__(self, switch: Switch):
        self.switch = switch
        self.id = 0  # 0: not opened yet
        self.sent: dict[int, InstalledFlow | Flow | str] = {}
        self.deleted = 0
        self.added = 0

    def _ctrl(self, type_: int) -> int:
        sw = self.switch
        return sw._send(parser.ONFBundleCtrlMsg(sw.dp, bundle_id=self.id, type_=type_,
                                                flags=self.FLAGS, properties=[]))

    def _open(self) -> None:
        if not self.id:
            self.switch._connect()
            self.id = self.switch._next_bundle()
            self.sent[self._ctrl(ofp.ONF_BCT_OPEN_REQUEST)] = "bundle open"

    def _add_msg(self, mod: Any, what: InstalledFlow | Flow | str) -> None:
        sw = self.switch
        self.sent[sw._send(parser.ONFBundleAddMsg(sw.dp, self.id, self.FLAGS, mod, []))] = what

    def add_groups(self, groups: Iterable[Group], modify: bool = False) -> None:
        """Add groups (or change ones the switch has), before the flows that apply them."""
        command = ofp.OFPGC_MODIFY if modify else ofp.OFPGC_ADD
        for group in groups:
            self._open()
            self._add_msg(group_mod(self.switch.dp, group, command),
                          f"{'modify' if modify else 'add'} group {group.to_ofctl()}")

    def delete_groups(self, ids: Iterable[int]) -> None:
        """Delete groups, after the flows that applied them (OpenFlow deletes the flows
        that apply a deleted group)."""
        for gid in ids:
            self._open()
            self._add_msg(delete_group_mod(self.switch.dp, gid), f"delete group {gid}")

    def delete(self, flows: Iterable[InstalledFlow]) -> None:
        for inst in flows:
            self._open()
            self._add_msg(delete_mod(self.switch.dp, inst), inst)
            self.deleted += 1

    def add(self, flows: Iterable[Flow]) -> None:
        """Add flows: encoded by agent.ofencode (os-ken's very bytes, many times faster)
        and written in large batches."""
        sw = self.switch
        out = bytearray()
        for flow in flows:
            self._open()
            xid = sw._next_xid()
            out += ofencode.bundle_add(self.id, self.FLAGS, ofencode.flow_mod(flow, xid), xid)
            self.sent[xid] = flow
            self.added += 1
            if len(out) >= SEND_BATCH:
                sw._send_bytes(out)
                sw._drain()
                out = bytearray()
        if out:
            sw._send_bytes(out)

    def commit(self) -> None:
        """Check every reply up to a barrier (the open acknowledged, no message refused),
        then commit; on any refusal discard the bundle and raise."""
        if not self.id:
            return  # nothing to change
        sw = self.switch
        errors, replies = sw._until_barrier(self.sent)
        opened = any(getattr(m, "type", None) == ofp.ONF_BCT_OPEN_REPLY
                     for m in replies.values())
        if not errors and not opened:
            errors = ["bundle open: no reply from the switch"]
        if errors:
            self.discard()
            raise OpenFlowError(f"{sw.target}: bundle discarded: {errors[0]}"
                                + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
        commit = self._ctrl(ofp.ONF_BCT_COMMIT_REQUEST)
        # a message the switch refuses at commit (a table full, say) gets its own error
        # before the commit's: name its flow
        refused: list[str] = []
        while True:
            msg = sw._recv()
            if msg.xid == commit:
                break
            if msg.msg_type == ofp.OFPT_ERROR and msg.xid in self.sent:
                refused.append(f"{_describe(self.sent[msg.xid])}: {_error(msg)}")
        if msg.msg_type == ofp.OFPT_ERROR:
            self.id = 0  # the switch discarded it
            raise OpenFlowError(f"{sw.target}: bundle commit failed: {_error(msg)}"
                                + (f"; refused: {refused[0]}" if refused else "")
                                + (f" (and {len(refused) - 1} more)" if len(refused) > 1
                                   else ""))
        if getattr(msg, "type", None) != ofp.ONF_BCT_COMMIT_REPLY:
            raise OpenFlowError(f"{sw.target}: bundle commit: unexpected reply {msg}")
        self.id = 0

    def discard(self) -> None:
        """Drop the bundle on the switch (best effort: a closed connection drops it too)."""
        if not self.id or self.switch._sock is None:
            return
        try:
            self.switch._reply_to(self._ctrl(ofp.ONF_BCT_DISCARD_REQUEST))
        except (OpenFlowError, OSError):
            LOG.debug("bundle discard failed", exc_info=True)
        self.id = 0


# OpenFlow error types and, per type, the prefix of its codes' names (OpenFlow 1.3, 7.4.4)
_ERROR_CODES = {"OFPET_BAD_REQUEST": "OFPBRC_", "OFPET_BAD_ACTION": "OFPBAC_",
                "OFPET_BAD_INSTRUCTION": "OFPBIC_", "OFPET_BAD_MATCH": "OFPBMC_",
                "OFPET_FLOW_MOD_FAILED": "OFPFMFC_", "OFPET_GROUP_MOD_FAILED": "OFPGMFC_",
                "OFPET_TABLE_FEATURES_FAILED": "OFPTFFC_"}


def _error(msg: Any) -> str:
    """An OpenFlow error message in words: `OFPET_BAD_ACTION/OFPBAC_BAD_SET_ARGUMENT`."""
    if msg.type == ofp.OFPET_EXPERIMENTER:  # ONF bundles report their errors so
        exp_type = getattr(msg, "exp_type", None)
        names = {v: n for n, v in vars(ofp).items() if n.startswith("ONFERR_ET_")}
        return (f"OpenFlow experimenter error {names.get(exp_type, exp_type)} "
                f"(experimenter={getattr(msg, 'experimenter', None)})")
    kind = next((n for n in dir(ofp) if n.startswith("OFPET_") and getattr(ofp, n) == msg.type),
                None)
    prefix = _ERROR_CODES.get(kind or "")
    code = next((n for n in dir(ofp) if prefix and n.startswith(prefix)
                 and getattr(ofp, n) == msg.code), None)
    return (f"OpenFlow error {kind or f'type={msg.type}'}/{code or f'code={msg.code}'} "
            f"(type={msg.type} code={msg.code})")
