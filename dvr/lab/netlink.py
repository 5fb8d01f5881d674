"""The one module that calls netlink (pyroute2): namespaces, veths, addresses, routes.

Operations are idempotent where the kernel allows it and raise `NetlinkError` naming the
object on failure.
"""

from __future__ import annotations

import ipaddress
import logging

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError as _PyrouteNetlinkError

LOG = logging.getLogger(__name__)


class NetlinkError(Exception):
    pass


def list_namespaces() -> list[str]:
    return list(netns.listnetns())


def ensure_namespace(name: str) -> None:
    if name not in netns.listnetns():
        try:
            netns.create(name)
        except OSError as exc:
            raise NetlinkError(f"namespace {name}: {exc}") from None


def delete_namespace(name: str) -> None:
    if name in netns.listnetns():
        try:
            netns.remove(name)
        except OSError as exc:
            raise NetlinkError(f"namespace {name}: {exc}") from None


class Netns:
    """Netlink operations inside one existing namespace."""

    def __init__(self, name: str):
        self.name = name
        try:
            self.ipr = IPRoute(netns=name, flags=0)
        except OSError as exc:
            raise NetlinkError(f"namespace {name}: {exc}") from None

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *_: object) -> None:
        self.ipr.close()

    def index(self, ifname: str) -> int:
        found = self.ipr.link_lookup(ifname=ifname)
        if not found:
            raise NetlinkError(f"{self.name}: no interface {ifname}")
        return found[0]

    def exists(self, ifname: str) -> bool:
        return bool(self.ipr.link_lookup(ifname=ifname))

    def _do(self, what: str, fn, *args, **kw):  # type: ignore[no-untyped-def]
        try:
            return fn(*args, **kw)
        except _PyrouteNetlinkError as exc:
            raise NetlinkError(f"{self.name}: {what}: {exc}") from None

    def add_veth(self, ifname: str, peer: str, peer_ns: str, mtu: int | None = None) -> None:
        """A veth pair: `ifname` here, `peer` in namespace `peer_ns`."""
        if self.exists(ifname):
            return
        self._do(f"add veth {ifname}/{peer}", self.ipr.link, "add", ifname=ifname,
                 kind="veth", peer={"ifname": peer, "net_ns_fd": peer_ns})
        if mtu:
            self.set_link(ifname, mtu=mtu)

    def add_bridge(self, ifname: str) -> None:
        if not self.exists(ifname):
            self._do(f"add bridge {ifname}", self.ipr.link, "add", ifname=ifname,
                     kind="bridge")
        self.set_link(ifname, up=True)

    def set_link(
        self,
        ifname: str,
        up: bool | None = None,
        mtu: int | None = None,
        mac: str | None = None,
        master: str | None = None,
    ) -> None:
        idx = self.index(ifname)
        kw: dict[str, object] = {}
        if mtu is not None:
            kw["mtu"] = mtu
        if mac is not None:
            kw["address"] = mac
        if master is not None:
            kw["master"] = self.index(master)
        if up is not None:
            kw["state"] = "up" if up else "down"
        if kw:
            self._do(f"set {ifname} {kw}", self.ipr.link, "set", index=idx, **kw)

    def add_address(self, ifname: str, cidr: str) -> None:
        iface = ipaddress.IPv4Interface(cidr)
        idx = self.index(ifname)
        for addr in self.ipr.get_addr(index=idx):
            if addr.get("IFA_ADDRESS") == str(iface.ip):
                return
        self._do(f"add address {cidr} to {ifname}", self.ipr.addr, "add", index=idx,
                 address=str(iface.ip), prefixlen=iface.network.prefixlen)

    def add_route(self, dst: str, gateway: str) -> None:
        try:
            self.ipr.route("replace", dst=dst, gateway=gateway)
        except _PyrouteNetlinkError as exc:
            raise NetlinkError(f"{self.name}: route {dst} via {gateway}: {exc}") from None

    def up_loopback(self) -> None:
        self.set_link("lo", up=True)
