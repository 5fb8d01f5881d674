"""ARP on the provider network, from the node itself: frames the agent sends and parses.

The agent resolves the upstream gateway's MAC (when the topology does not give it) through
the provider bridge's own (LOCAL) interface: an ARP probe (sender address 0.0.0.0, so no
neighbour learns anything from it), answered by the gateway to the interface's MAC. The
gratuitous ARPs that announce a floating IP are built here too and sent by OpenFlow.
"""

from __future__ import annotations

import fcntl
import ipaddress
import select
import socket
import struct
import time

ETH_P_ARP = 0x0806
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1  # <linux/sockios.h>, <net/if.h>
BROADCAST = b"\xff" * 6
ARP_HEADER = b"\x00\x01\x08\x00\x06\x04"  # Ethernet, IPv4, 6-byte MACs, 4-byte addresses


class ArpError(Exception):
    """The interface to resolve through is missing or unusable."""


def _mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def arp_frame(op: int, sha: str, spa: str, tha: str, tpa: str, dst: bytes = BROADCAST
              ) -> bytes:
    return (dst + _mac_bytes(sha) + struct.pack("!H", ETH_P_ARP) + ARP_HEADER
            + struct.pack("!H", op) + _mac_bytes(sha) + ipaddress.IPv4Address(spa).packed
            + _mac_bytes(tha) + ipaddress.IPv4Address(tpa).packed)


def gratuitous_arp(ip: str, mac: str) -> bytes:
    """A broadcast gratuitous ARP request: `ip` is at `mac`."""
    return arp_frame(1, mac, ip, "00:00:00:00:00:00", ip)


def unicast_reply(sha: str, spa: str, tha: str, tpa: str) -> bytes:
    """An ARP reply sent to `tha` alone: `spa` is at `sha`."""
    return arp_frame(2, sha, spa, tha, tpa, dst=_mac_bytes(tha))


def parse_reply(frame: bytes) -> tuple[str, str] | None:
    """(sender IP, sender MAC) of an ARP reply frame, or None for anything else."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x06" or frame[14:20] != ARP_HEADER:
        return None
    if struct.unpack("!H", frame[20:22])[0] != 2:
        return None
    return str(ipaddress.IPv4Address(frame[28:32])), _mac_text(frame[22:28])


def link_up(ifname: str) -> None:
    """Bring `ifname` up if it is down: the interface's flags read and set by ioctl
    (SIOCGIFFLAGS, SIOCSIFFLAGS), which costs the agent no netlink library (pyroute2 alone
    is 23 MB of a process's memory)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", ifname.encode()[:15], 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
        if not flags & IFF_UP:
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", ifname.encode()[:15],
                                                     flags | IFF_UP))


def resolve(ifname: str, target: str, timeout: float = 0.3) -> str | None:
    """The MAC of `target` on the segment of `ifname` (brought up if down), or None when
    nothing answers within `timeout`. Raises ArpError if the interface is unusable."""
    try:
        socket.if_nametoindex(ifname)
    except OSError:
        raise ArpError(f"no interface {ifname}") from None
    try:
        link_up(ifname)
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    except OSError as exc:
        raise ArpError(f"{ifname}: {exc}") from None
    with sock:
        try:
            sock.bind((ifname, ETH_P_ARP))
            mac = _mac_text(sock.getsockname()[4][:6])
            sock.send(arp_frame(1, mac, "0.0.0.0", "00:00:00:00:00:00", target))
        except OSError as exc:
            raise ArpError(f"{ifname}: {exc}") from None
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                break
            reply = parse_reply(sock.recv(2048))
            if reply and reply[0] == target:
                return reply[1]
    return None
