"""The one module that talks to OVSDB (ovsdbapp on the `ovs` IDL, monitor-based).

It creates what the agent owns (the integration bridge, one tunnel port per peer node, marked
`external_ids:dvr-peer`) and reads what is plugged: VM interfaces carrying
`external_ids:iface-id`, as Nova/os-vif set them. Every change to the monitored tables sets
`changed`, so the agent wakes without polling the server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Mapping
from typing import Any

# the ovs bindings import eventlet when it is installed, which warns about itself
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")

import ovs.db.idl as ovs_idl  # noqa: E402
from ovsdbapp.backend.ovs_idl import connection, idlutils  # noqa: E402
from ovsdbapp.schema.open_vswitch import impl_idl  # noqa: E402

from flows.ports import PEER_KEY, PROVIDER_PATCH, PROVIDER_PEER, Interface, Plugged  # noqa: E402
from flows.ports import plugged as read_plugged  # noqa: E402

LOG = logging.getLogger(__name__)
TABLES = ("Open_vSwitch", "Bridge", "Port", "Interface")
# columns ovs-vswitchd rewrites every few seconds (`other_config:stats-update-interval`) and
# that tell the agent nothing: an update of these alone does not wake it
COUNTERS = frozenset({"statistics", "rstp_statistics"})


class OvsdbError(Exception):
    """OVSDB could not be reached or refused a change."""


class Wakeup:
    """An event the agent's loop can also wait for with poll(): a flag and a pipe."""

    def __init__(self) -> None:
        self._flag = threading.Event()
        self.fd, self._w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._w, False)

    def set(self) -> None:
        self._flag.set()
        with contextlib.suppress(BlockingIOError):
            os.write(self._w, b"!")

    def is_set(self) -> bool:
        return self._flag.is_set()

    def clear(self) -> None:
        self._flag.clear()
        with contextlib.suppress(BlockingIOError):
            while os.read(self.fd, 4096):
                pass

    def close(self) -> None:
        for fd in (self.fd, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)


class _WatchingIdl(connection.OvsdbIdl):
    changed: Wakeup
    changes = 0  # counts every change of a monitored row but of its counters alone

    def notify(self, event: str, row: Any, updates: Any = None) -> None:
        if event == ovs_idl.ROW_UPDATE and updates is not None and COUNTERS.issuperset(
                getattr(updates, "_data", None) or ("?",)):
            return  # a port's counters, every few seconds: nothing to sync
        self.changes += 1
        self.changed.set()


class Ovsdb:
    def __init__(self, target: str, timeout: float = 10.0):
        self.target = target
        self.changed = Wakeup()
        try:
            helper = idlutils.get_schema_helper(target, "Open_vSwitch")
            for table in TABLES:
                helper.register_table(table)
            idl = _WatchingIdl(target, helper)
            idl.changed = self.changed
            self._idl = idl
            self._conn = connection.Connection(idl=idl, timeout=timeout)
            self.api = impl_idl.OvsdbIdl(self._conn, start=True)
        except Exception as exc:  # ovsdbapp raises several types here
            raise OvsdbError(f"cannot connect to OVSDB at {target}: {exc}") from None

    @property
    def changes(self) -> int:
        """How many times a monitored row has changed (what is plugged is the same while
        this is)."""
        return self._idl.changes

    def close(self) -> None:
        try:
            self._conn.stop(timeout=2)
        except Exception:  # pragma: no cover - best effort at shutdown
            LOG.debug("OVSDB connection stop failed", exc_info=True)
        self.changed.close()

    def _execute(self, what: str, commands: list[Any]) -> None:
        try:
            with self.api.transaction(check_error=True) as txn:
                for cmd in commands:
                    txn.add(cmd)
        except Exception as exc:
            raise OvsdbError(f"{what}: {exc}") from None

    def flow_restore_wait(self) -> bool:
        """Whether ovs-vswitchd holds its datapath still (`other_config:flow-restore-wait`,
        set by whoever restarted it: it forwards nothing until the flows are back)."""
        rows = list(self.api.tables["Open_vSwitch"].rows.values())
        return bool(rows) and str(rows[0].other_config.get("flow-restore-wait", "")).lower() \
            == "true"

    def clear_flow_restore_wait(self) -> None:
        """Let ovs-vswitchd forward again: every flow is installed."""
        self._execute("clear flow-restore-wait", [
            self.api.db_remove("Open_vSwitch", ".", "other_config", "flow-restore-wait",
                               if_exists=True)])

    def ensure_bridge(self, bridge: str, datapath_type: str) -> None:
        """The integration bridge, secure fail mode (no NORMAL when no flows), may exist."""
        self._execute(f"create bridge {bridge}", [
            self.api.add_br(bridge, may_exist=True, datapath_type=datapath_type),
            self.api.db_set("Bridge", bridge, ("fail_mode", "secure"),
                            ("protocols", ["OpenFlow10", "OpenFlow13", "OpenFlow14",
                                           "OpenFlow15"])),
        ])

    def ensure_tunnels(
        self, bridge: str, peers: Mapping[str, str], tunnel_type: str, local_ip: str | None,
        current: Plugged | None = None, bfd: Mapping[str, Mapping[str, str]] | None = None,
    ) -> bool:
        """One tunnel port per peer node; stale ones (ours only) are removed. `current`:
        what `plugged()` just read; `bfd`: each peer's BFD settings ({}: none), changed in
        place (the tunnel stays). True when something was changed."""
        bfd = bfd or {}
        current = current or self.plugged(bridge)
        commands: list[Any] = []
        for peer, port in self._tunnel_ports(bridge).items():
            if peer not in peers or current.tunnel_config.get(peer) != (
                tunnel_type, peers[peer]
            ):
                commands.append(self.api.del_port(port, bridge=bridge, if_exists=True))
        for peer, remote_ip in sorted(peers.items()):
            name = tunnel_port_name(tunnel_type, peer)
            want_bfd = dict(bfd.get(peer, {}))
            if current.tunnel_config.get(peer) == (tunnel_type, remote_ip):
                if dict(current.tunnel_bfd.get(peer, {})) != want_bfd:
                    commands.append(self.api.db_set("Interface", name, ("bfd", want_bfd)))
                continue
            options = {"remote_ip": remote_ip, "key": "flow"}
            if local_ip:
                options["local_ip"] = local_ip
            commands.append(self.api.add_port(bridge, name, may_exist=True))
            commands.append(self.api.db_set(
                "Interface", name, ("type", tunnel_type), ("options", options),
                ("bfd", want_bfd), ("external_ids", {PEER_KEY: peer})))
        if commands:
            self._execute(f"tunnels on {bridge}", commands)
        return bool(commands)

    def _tunnel_ports(self, bridge: str) -> dict[str, str]:
        out = {}
        for iface in self._interfaces(bridge):
            peer = iface.external_ids.get(PEER_KEY)
            if peer:
                out[peer] = iface.name
        return out

    def _interfaces(self, bridge: str) -> list[Any]:
        with self._conn.lock:
            for br in self._conn.idl.tables["Bridge"].rows.values():
                if br.name == bridge:
                    return [i for p in br.ports for i in p.interfaces]
        return []

    def interfaces(self, bridge: str) -> list[Interface]:
        """The Interface rows of `bridge`, as plain data."""
        out = []
        with self._conn.lock:
            for iface in self._interfaces(bridge):
                out.append(Interface(iface.name, iface.ofport[0] if iface.ofport else -1,
                                     dict(iface.external_ids), iface.type,
                                     dict(iface.options), dict(iface.bfd),
                                     dict(iface.bfd_status)))
        return out

    def plugged(self, bridge: str) -> Plugged:
        return read_plugged(self.interfaces(bridge))

    def has_bridge(self, bridge: str) -> bool:
        with self._conn.lock:
            return any(br.name == bridge
                       for br in self._conn.idl.tables["Bridge"].rows.values())

    def ensure_provider_patch(self, bridge: str, provider_bridge: str) -> bool:
        """Patch the integration bridge to the provider bridge (which the operator creates,
        with its uplink, as for Neutron's bridge_mappings), if that bridge exists. True
        when the patch was created now."""
        if not self.has_bridge(provider_bridge):
            return False
        names = {i.name for i in self._interfaces(bridge)}
        peer_names = {i.name for i in self._interfaces(provider_bridge)}
        if PROVIDER_PATCH in names and PROVIDER_PEER in peer_names:
            return False
        self._execute(f"patch {bridge} to {provider_bridge}", [
            self.api.add_port(bridge, PROVIDER_PATCH, may_exist=True),
            self.api.db_set("Interface", PROVIDER_PATCH, ("type", "patch"),
                            ("options", {"peer": PROVIDER_PEER})),
            self.api.add_port(provider_bridge, PROVIDER_PEER, may_exist=True),
            self.api.db_set("Interface", PROVIDER_PEER, ("type", "patch"),
                            ("options", {"peer": PROVIDER_PATCH})),
        ])
        return True


def tunnel_port_name(tunnel_type: str, peer: str) -> str:
    return f"{'vx' if tunnel_type == 'vxlan' else 'gnv'}-{peer}"[:15]
