"""The SNAT translations a standby must know in advance, so that connections survive a
failover (pure: parsing, the report's form, the packet that recreates one).

A router's SNAT keeps a connection's source port whenever it is free, and OVS conntrack picks
a connection up mid-stream: after a failover, the first packet of each connection through
the new node recreates the same translation there, by itself. Not when two connections
collide (two VMs behind one router, from the same source port to the same remote address and
port): the second got another port, and on the new node whichever packet comes first would
take the original one. These translations, the ones that did not keep their port, are what
the active node publishes (`Binding`, in its Agent row) and each standby holds ready as
flows of its own (the planner's, from `NodePorts.held`): a new connection of that tuple is
given that very port, whatever comes first, so that the new node translates every
connection exactly as the old one did. A node that takes a router over keeps holding them
for a while (its agent's HELD_GRACE), for the connections whose first packet comes late.
(A translation committed into the standby's conntrack in advance would not do: its made-up
sequence numbers put the real segments out of its window.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1}
_ENTRY = re.compile(r"^(icmp|tcp|udp),orig=\(([^)]*)\),reply=\(([^)]*)\),zone=(\d+)")


@dataclass(frozen=True, order=True)
class Binding:
    """One connection's translation: from `src:sport` (an ICMP echo's id for both ports)
    to `dst:dport`, SNATed by `router` to its external IP and `xport`."""

    router: str
    proto: int
    src: str
    sport: int
    dst: str
    dport: int
    xport: int

    def __str__(self) -> str:
        return (f"{self.router} {self.proto} {self.src}:{self.sport} {self.dst}:{self.dport} "
                f"{self.xport}")

    @classmethod
    def parse(cls, text: str) -> Binding | None:
        """The form `__str__` writes (None for anything else)."""
        try:
            router, proto, src, dst, xport = text.split()
            s_ip, s_port = src.rsplit(":", 1)
            d_ip, d_port = dst.rsplit(":", 1)
            return cls(router, int(proto), s_ip, int(s_port), d_ip, int(d_port), int(xport))
        except ValueError:
            return None


def moved_translations(router: str, ext_ip: str, lines: list[str]) -> list[Binding]:
    """The translations of `router` in a `dpctl/dump-conntrack zone=Z` listing that did not
    keep the source port (ICMP: the echo id): the SNATed connections (their replies go to
    the external IP) whose reply comes back to another port."""
    out = []
    for line in lines:
        m = _ENTRY.match(line.strip())
        if m is None:
            continue
        proto = PROTOCOLS[m.group(1)]
        orig = dict(kv.split("=", 1) for kv in m.group(2).split(","))
        reply = dict(kv.split("=", 1) for kv in m.group(3).split(","))
        if reply.get("dst") != ext_ip:
            continue
        if proto == 1:
            sport = dport = int(orig.get("id", -1))
            xport = int(reply.get("id", -1))
        else:
            sport, dport, xport = int(orig["sport"]), int(orig["dport"]), int(reply["dport"])
        if xport != sport and xport >= 0:
            out.append(Binding(router, proto, orig["src"], sport, orig["dst"], dport, xport))
    return sorted(out)
