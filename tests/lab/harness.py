"""What the lab tests share: a real lab under a unique prefix (`running_lab`, `LabHandle`),
the `dvr` command, captures in namespaces (`Sniffer`), what a lab leaves behind, and the
external host's pings.

Every lab gets a unique prefix (so tests can run in parallel and beside a developer's own
lab) and is torn down even when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "dvr" / "examples" / "default.yaml"  # the built-in topology
TOPOLOGIES = Path(__file__).parent / "topologies"


def lab_available() -> str | None:
    """Why a lab cannot be built here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ovs-vswitchd", "ovsdb-server", "ip", "ethtool"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


def unique_prefix() -> str:
    """A lab prefix no other test (nor xdist worker) uses."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw")[-1]
    return f"t{worker}{random.randrange(36**4):04x}"[:8]


def dvr(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """`dvr ARGS` from this checkout; with `check`, a failure is an AssertionError with its
    stderr."""
    res = subprocess.run([sys.executable, "-m", "dvr.cli", *args], capture_output=True,
                         text=True, cwd=ROOT, timeout=timeout,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if check and res.returncode != 0:
        raise AssertionError(f"dvr {' '.join(args)} failed ({res.returncode}): "
                             f"{res.stderr.strip()}")
    return res


class Sniffer:
    """A scapy capture running inside a namespace, started before the traffic is sent."""

    def __init__(self, ns: str, iface: str, seconds: float, proto: str | None,
                 host: str | None):
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.lab.pkttool", "sniff",
               iface, "--seconds", str(seconds)]
        if proto:
            cmd += ["--proto", proto]
        if host:
            cmd += ["--host", host]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "READY":
            self.proc.kill()
            raise AssertionError(f"sniffer in {ns} did not start: {line!r} "
                                 f"{self.proc.stderr.read() if self.proc.stderr else ''}")
        self.packets: list[dict[str, Any]] = []

    def wait(self) -> list[dict[str, Any]]:
        out, err = self.proc.communicate(timeout=60)
        lines = [ln for ln in out.splitlines() if ln.strip()]
        if self.proc.returncode != 0 or not lines:
            raise AssertionError(f"sniffer failed: {err}")
        self.packets = json.loads(lines[-1])
        return self.packets


class LabHandle:
    """A running lab, driven through `dvr lab --prefix PREFIX`."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.rundir = Path(os.environ.get("DVR_LAB_RUNDIR", "/run")) / f"{prefix}-lab"

    def dvr_nb(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`dvr nb --lab PREFIX ARGS`: a command on the lab's northbound database."""
        return dvr("nb", "--lab", self.prefix, *args, check=check)

    def dvr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return dvr("lab", "--prefix", self.prefix, *args, check=check)

    def status(self) -> dict[str, Any]:
        return json.loads(self.dvr("status", "--json").stdout)

    def vm_ns(self, vm: str) -> str:
        return f"{self.prefix}-v-{vm}"

    def node_ns(self, node: str) -> str:
        return f"{self.prefix}-n-{node}"

    @property
    def ul_ns(self) -> str:
        return f"{self.prefix}-ul"

    def topology(self) -> Any:
        from flows.model import load_topology

        return load_topology(self.rundir / "topology.yaml")

    def exec(self, vm: str, *cmd: str, check: bool = False) -> subprocess.CompletedProcess:
        return self.dvr("exec", vm, "--", *cmd, check=check)

    def node(self, node: str, *cmd: str) -> str:
        return self.dvr("node", node, "--", *cmd).stdout

    def ping(self, vm: str, ip: str, count: int = 1, ttl: int = 64, wait: float = 2) -> bool:
        res = self.exec(vm, "ping", "-n", "-c", str(count), "-i", "0.2", "-t", str(ttl),
                        "-W", str(wait), ip)
        return res.returncode == 0

    @contextlib.contextmanager
    def sniff(self, ns: str, iface: str = "eth0", seconds: float = 3.0,
              proto: str | None = None, host: str | None = None) -> Iterator[Sniffer]:
        s = Sniffer(ns, iface, seconds, proto, host)
        try:
            yield s
        finally:
            s.wait()

    def arp(self, vm: str, target: str) -> dict[str, Any] | None:
        res = subprocess.run(["ip", "netns", "exec", self.vm_ns(vm), sys.executable, "-m",
                              "tests.lab.pkttool", "arp", "eth0", target], capture_output=True,
                             text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                             timeout=30)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout.strip().splitlines()[-1])

    def ns(self, name: str) -> str:
        """The namespace of a VM, or of the external host (`ext`)."""
        return f"{self.prefix}-ext" if name == "ext" else self.vm_ns(name)

    def tcp_transfer(self, src: str, dst: str, dst_ip: str, nbytes: int = 1 << 20,
                     source: str | None = None, pace: float | None = None) -> dict[str, Any]:
        """Send nbytes over TCP from src to dst (VM names, or `ext`); assert they arrive
        intact; return what the receiver saw (bytes, sha256, peer address, max_gap)."""
        port = str(5000 + random.randrange(1000))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        server = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(dst), sys.executable, "-m", "tests.lab.pkttool",
             "tcp-server", port], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=ROOT, env=env)
        extra = (["--source", source] if source else []) + (
            ["--pace", str(pace)] if pace else [])
        try:
            assert server.stdout is not None
            assert server.stdout.readline().strip() == "READY"
            client = subprocess.run(
                ["ip", "netns", "exec", self.ns(src), sys.executable, "-m",
                 "tests.lab.pkttool", "tcp-client", dst_ip, port, str(nbytes), *extra],
                capture_output=True, text=True, cwd=ROOT, env=env, timeout=90)
            assert client.returncode == 0, client.stderr
            out, _ = server.communicate(timeout=60)
            sent = json.loads(client.stdout.strip().splitlines()[-1])
            got = json.loads(out.strip().splitlines()[-1])
            assert (got["bytes"], got["sha256"]) == (sent["bytes"], sent["sha256"]), (
                f"TCP {src}->{dst}: sent {sent}, received {got}")
            assert got["bytes"] == nbytes
            return got
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()

    def background(self, ns: str, *args: str, ready: bool = False) -> subprocess.Popen:
        """Start a pkttool command inside `ns`; with `ready`, wait for its READY line."""
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m",
                                 "tests.lab.pkttool", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        if ready:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.strip() == "READY", (line, proc.stderr.read() if proc.stderr else "")
        return proc

    @staticmethod
    def result(proc: subprocess.Popen, timeout: float = 60) -> Any:
        """The last line (JSON) a background pkttool command printed."""
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])

    def pkttool(self, ns: str, *args: str, timeout: float = 30) -> Any:
        res = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m",
                              "tests.lab.pkttool", *args], capture_output=True, text=True,
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                             timeout=timeout)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout.strip().splitlines()[-1])

    def port_packets(self, node: str) -> dict[str, int]:
        """rx+tx packets of every port of the node's br-int, live from OpenFlow."""
        out = self.node(node, "ovs-ofctl", "--names", "dump-ports", "br-int")
        counts: dict[str, int] = {}
        name = ""
        for line in out.splitlines():
            m = re.match(r'\s*port\s+"?([^":]+)"?:\s*rx pkts=(\d+)', line)
            if m:
                name = m.group(1).strip()
                counts[name] = int(m.group(2))
                continue
            m = re.match(r"\s*tx pkts=(\d+)", line)
            if m and name:
                counts[name] += int(m.group(1))
        return counts

    def tunnel_packets(self, node: str) -> int:
        """Packets the node received through its tunnels in a network's VNI: the packet
        counts of the flows that map a VNI to its network (table 5). Unlike the tunnel
        ports' counters (and table 0's), they leave out the tunnels' BFD packets, which
        carry no VNI."""
        out = self.node(node, "ovs-ofctl", "-O", "OpenFlow13", "dump-flows", "br-int",
                        "table=5")
        return sum(int(m.group(1)) for m in re.finditer(
            r"n_packets=(\d+),.*\btun_id=", out))

    def settled_tunnel_packets(self, nodes: tuple[str, ...]) -> dict[str, int]:
        """Tunnel counters once they stop moving: the userspace datapath credits tunnel
        ports when it revalidates its flows, up to a second or so after the packets."""
        last = {n: self.tunnel_packets(n) for n in nodes}
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            time.sleep(1.2)
            now = {n: self.tunnel_packets(n) for n in nodes}
            if now == last:
                return now
            last = now
        return last

    def flow_packets(self, node: str) -> int:
        """Packets the node's pipeline processed beyond classifying where they came from
        (tables after 0, but for table 5's miss): the tunnels' BFD packets, which OVS
        counts on those two flows, are left out."""
        out = self.node(node, "ovs-ofctl", "-O", "OpenFlow13", "dump-flows", "br-int")
        total = 0
        for line in out.splitlines():
            m = re.search(r"table=(\d+), n_packets=(\d+),.*priority=(\d+)", line)
            if m and m.group(1) != "0" and not (m.group(1) == "5" and m.group(3) == "0"):
                total += int(m.group(2))
        return total


def leftovers(prefix: str) -> list[str]:
    """Everything of lab `prefix` still on the machine: namespaces, processes, files."""
    found = []
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"netns {line.split()[0]}" for line in ns.splitlines()
              if line.startswith(f"{prefix}-")]
    rundir = Path(os.environ.get("DVR_LAB_RUNDIR", "/run")) / f"{prefix}-lab"
    if rundir.exists():
        found.append(f"dir {rundir}")
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if f"{rundir}/".encode() in cmd:
                found.append(f"process {entry}: {cmd.decode()[:80]}")
    return found


@contextlib.contextmanager
def running_lab(topology: Path | None, *up_args: str) -> Iterator[LabHandle]:
    """A lab up on `topology` (the built-in one for None) for the block, down after it."""
    lab = LabHandle(unique_prefix())
    try:
        t0 = time.monotonic()
        args = ["up", *up_args] + ([str(topology)] if topology else [])
        lab.dvr(*args)
        lab.up_seconds = time.monotonic() - t0  # type: ignore[attr-defined]
        yield lab
    finally:
        dvr("lab", "--prefix", lab.prefix, "down", check=False)


def neutron_cloud(lab: LabHandle) -> Any:
    """An openstacksdk connection to a lab's Neutron (`dvr lab up --neutron`, noauth)."""
    import openstack

    url = lab.status()["neutron"]["url"]
    return openstack.connection.Connection(auth_type="none", auth={"endpoint": url},
                                           network_endpoint_override=url)


def nb_cli(db: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`dvr nb --db DB ARGS`."""
    return dvr("nb", "--db", db, *args, check=check)


def ext_ping(lab: LabHandle, ip: str, count: int = 2, source: str | None = None,
             wait: float = 2) -> bool:
    """Whether the external host's pings to `ip` are answered (from `source`, when given)."""
    cmd = ["ping", "-n", "-c", str(count), "-i", "0.2", "-W", str(wait)]
    if source:
        cmd += ["-I", source]
    return lab.dvr("ext", "--", *cmd, ip, check=False).returncode == 0


def echo_requests(packets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ICMP echo requests of a capture."""
    return [p for p in packets if p.get("proto") == "icmp" and p.get("icmp_type") == 8]
