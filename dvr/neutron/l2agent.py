"""Neutron's own L2 agent beside dvr's on a lab node: RabbitMQ, neutron-rpc-server and
neutron-openvswitch-agent, each started, watched and stopped here.

The control plane lives in the lab's controller namespace `<prefix>-ctl` (`create_ctl_namespace`):
a veth `u-ctl` on the lab's underlay bridge `ul` (inside `<prefix>-ul`) whose peer `eth0` has
CTL_ADDRESS, so that the agents inside the nodes' namespaces reach it over the underlay.

- `RabbitMQ`: Debian's server (`/usr/lib/rabbitmq/bin/rabbitmq-server`, run as root, not the
  wrapper in /usr/sbin that switches user), everything under its work directory: node name
  `dvr-<namespace>@localhost`, mnesia, logs, configuration, enabled plugins (none) and HOME
  (the Erlang cookie). It listens on the namespace's address only; `guest` may log in from
  there (`loopback_users.guest = false`). Erlang starts an `epmd` of its own inside the
  namespace, whose command line names nothing of the lab: its pid is recorded at start and it
  is stopped by that pid, once checked to be an `epmd` inside the namespace.
- `RpcServer`: `neutron-rpc-server` of a `service.Neutron`'s venv, on that Neutron's
  configuration files plus one of its own (`transport_url`, log file), run inside the
  controller namespace (the database's unix socket is a file: it crosses namespaces).
- `OvsAgent`: `neutron-openvswitch-agent` inside a node's namespace, on the node's own
  ovsdb-server, with an integration bridge of its own (`br-l2`: it deletes every flow of a
  foreign cookie on its integration bridge and claims every VIF there, so never dvr's br-int),
  no tunnels, and the provider bridge the node already has (`physnet1:br-ex`).

Messaging: only the rpc-server and the agents use RabbitMQ. The API (uWSGI on 127.0.0.1 of the
root namespace, which has no route to the controller namespace) keeps `transport_url =
fake://`: with a broker it cannot reach, its first request that notifies agents (a port
create with a binding) blocks for good, oslo.messaging retrying the connection every 30 s, and
its single worker with it. Without notifications nothing is lost for ports: the API binds by
the agents table (which the rpc-server writes from the agents' reports), an agent finds a
plugged VIF through its ovsdb monitor and asks the rpc-server for its details, and reports it
up, which makes it ACTIVE. (What the API would cast to agents, port_update or network_delete,
is not sent: an agent learns of such changes when it resyncs, at its next start.)

Every process started here names its work directory (or configuration file, inside it) on its
command line, but epmd; a pid file names each, and nothing is signalled that is not running
with that command line (and in the expected namespace).
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dvr.lab import run
from dvr.lab.netlink import Netns, delete_namespace, ensure_namespace, list_namespaces
from dvr.neutron import service
from dvr.neutron.service import NeutronError

LOG = logging.getLogger(__name__)

CTL_ADDRESS = "198.18.251.1"  # on the lab's underlay (198.18.0.0/16)
CTL_VETH = "u-ctl"  # the controller's veth on the underlay bridge
RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
RABBITMQ_READY = "Server startup complete"
INTEGRATION_BRIDGE = "br-l2"
BRIDGE_MAPPINGS = "physnet1:br-ex"
OVS_AGENT_TYPE = "Open vSwitch agent"
RPC_READY_STABLE = 3.0  # s the same workers stay connected (a refused login drops them)
# the sections whose helper_command starts a privsep daemon (no sudo, no rootwrap: root here)
PRIVSEP_SECTIONS = ("privsep", "privsep_dhcp_release", "privsep_ovs_vsctl", "privsep_namespace",
                    "privsep_conntrack", "privsep_link")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# -- the controller namespace -------------------------------------------------------------------


def ctl_namespace(prefix: str) -> str:
    return f"{prefix}-ctl"


def create_ctl_namespace(prefix: str, prefixlen: int, mtu: int) -> str:
    """The lab's controller namespace `<prefix>-ctl` on its underlay (CTL_ADDRESS/`prefixlen`
    on `eth0`, its veth `u-ctl` enslaved to the bridge `ul` of `<prefix>-ul`, both `mtu`);
    idempotent. Returns the namespace's name."""
    ns, ul_ns = ctl_namespace(prefix), f"{prefix}-ul"
    if ul_ns not in list_namespaces():
        raise NeutronError(f"no namespace {ul_ns}: the lab {prefix} is not up")
    ensure_namespace(ns)
    with Netns(ul_ns) as ul:
        ul.add_veth(CTL_VETH, "eth0", ns, mtu=mtu)
        ul.set_link(CTL_VETH, master="ul", up=True, mtu=mtu)
    with Netns(ns) as ctl:
        ctl.up_loopback()  # the Erlang node and its epmd talk over 127.0.0.1
        ctl.set_link("eth0", up=True, mtu=mtu)
        ctl.add_address("eth0", f"{CTL_ADDRESS}/{prefixlen}")
    # TCP to the nodes crosses their userspace datapath: no partial checksums
    run.run(ns, ["ethtool", "-K", "eth0", "tx", "off"], check=False)
    return ns


def delete_ctl_namespace(prefix: str) -> None:
    """Remove the controller namespace (its veth goes with it). What still runs inside it (it
    runs nothing but what this module starts) is killed first, or the namespace would outlive
    its name. Idempotent."""
    ns = ctl_namespace(prefix)
    if ns not in list_namespaces():
        return
    left = processes_in(ns)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _wait_gone(left, lambda pid: _netns_of(pid) == _netns_id(ns), 10.0)
    delete_namespace(ns)


# -- processes ----------------------------------------------------------------------------------


def _netns_id(ns: str) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/run/netns/{ns}")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _netns_of(pid: int) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _all_pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def processes_in(ns: str) -> list[int]:
    """The live processes inside namespace `ns` ([] when there is no such namespace)."""
    target = _netns_id(ns)
    if target is None:
        return []
    me = os.getpid()
    return [pid for pid in _all_pids()
            if pid != me and service._running(pid) and _netns_of(pid) == target]


def pids_mentioning(text: str) -> list[int]:
    """The live processes whose command line contains `text`."""
    me = os.getpid()
    return [pid for pid in _all_pids()
            if pid != me and service._running(pid) and text in service._cmdline(pid)]


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for child in service._children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def _wait_gone(pids: list[int], ours: Callable[[int], bool], timeout: float) -> list[int]:
    """Wait until none of pids runs as ours; the ones left."""
    end = time.monotonic() + timeout
    while True:
        left = [pid for pid in pids if service._running(pid) and ours(pid)]
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.05)


def _signal(pids: list[int], sig: int, ours: Callable[[int], bool]) -> None:
    for pid in pids:
        if service._running(pid) and ours(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


class AgentExited(NeutronError):
    """The agent started exited before it was up."""


def _stop(pids: list[int], ours: Callable[[int], bool], grace: float, what: str) -> None:
    """SIGTERM to pids[0] (the others are its workers or helpers: it stops them; none with a
    grace of 0), SIGKILL to all still running after grace seconds; only to the processes
    `ours` accepts."""
    if grace > 0:
        _signal(pids[:1], signal.SIGTERM, ours)
        if not _wait_gone(pids, ours, grace):
            return
    _signal(pids, signal.SIGKILL, ours)
    left = _wait_gone(pids, ours, 10.0)
    if left:
        raise NeutronError(f"{what}: processes {left} survive SIGKILL")


def _read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if pid > 1 else None


def _spawn(cmd: list[str], output: Path, pid_file: Path, env: dict[str, str]) -> int:
    """Start cmd in a session of its own, reparented to init (nothing here has to reap it),
    in the directory of pid_file, its output appended to `output`; its pid goes into
    pid_file. (`ip netns exec` runs its command in its own process: the pid stays that of
    the command.)"""
    launcher = ["/bin/sh", "-c", '"$@" </dev/null >>"$OUT" 2>&1 & echo $!', "sh", *cmd]
    try:
        done = subprocess.run(launcher, capture_output=True, text=True, check=True,
                              start_new_session=True, env={**env, "OUT": str(output)},
                              cwd=pid_file.parent)
        pid = int(done.stdout.split()[0])
    except (OSError, ValueError, IndexError, subprocess.CalledProcessError) as e:
        raise NeutronError(f"cannot start {cmd[0]}: {e}") from e
    pid_file.write_text(f"{pid}\n")
    return pid


def _kill_spawned(pid: int | None, mark: str) -> None:
    """SIGKILL a process this module just spawned and its descendants, if it still runs with
    `mark` on its command line (a failed start: it may not be what stop() recognizes yet)."""
    if pid is None or not service._running(pid) or mark not in service._cmdline(pid):
        return
    pids = [pid, *_descendants(pid)]
    _signal(pids, signal.SIGKILL, lambda _: True)
    _wait_gone(pids, lambda _: True, 10.0)


def _connected_to(pid: int, host: str, port: int) -> bool:
    """Whether process pid holds an established TCP connection to host:port (an IPv4
    address; read from its namespace's /proc/PID/net/tcp and its file descriptors)."""
    try:
        packed = socket.inet_aton(host)
    except OSError:
        return False
    remote = f"{int.from_bytes(packed, 'little'):08X}:{port:04X}"
    inodes = set()
    try:
        for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[2] == remote and fields[3] == "01":  # ESTABLISHED
                inodes.add(fields[9])
        fds = os.listdir(f"/proc/{pid}/fd")
    except (OSError, IndexError):
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return True
    return False


def _write_ini(path: Path, sections: dict[str, dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(service._ini(sections))
    tmp.replace(path)


def _log_lines(path: Path, offset: int) -> list[str]:
    return service._read_from(path, offset)


# ERROR lines every neutron-rpc-server writes at start (ML2 without the L3 plugin)
KNOWN_ERRORS = ("Unable to process extensions (auto-allocated-topology)",)


def _error_line(lines: list[str]) -> str:
    """The last CRITICAL, else ERROR line of an oslo.log file that says something, from the
    level on ("2026-01-01 00:00:00.000 PID ERROR logger [context] message"; a traceback's
    lines come as "... PID ERROR logger text", the last one often empty), but the ones every
    start writes."""
    for level in (" CRITICAL ", " ERROR "):
        found = []
        for line in lines:
            if level not in line or any(k in line for k in KNOWN_ERRORS):
                continue
            text = line[line.index(level) + 1:].strip()
            if len(text.split(None, 2)) == 3:  # level, logger, something
                found.append(text)
        if found:
            return found[-1][:400]
    return ""


def _crash(lines: list[str]) -> str:
    """The exception of the last Python traceback in a process's output ("" if none)."""
    last = max((i for i, ln in enumerate(lines) if ln.startswith("Traceback (")), default=None)
    if last is None:
        return ""
    told = [ln.strip() for ln in lines[last + 1:] if ln.strip() and not ln[:1].isspace()]
    return (told[-1] if told else "a Python traceback")[:400]


def _api_get(url: str, timeout: float = 10.0) -> Any:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return json.loads(reply.read())


# -- RabbitMQ -----------------------------------------------------------------------------------


class RabbitMQ:
    """A RabbitMQ node inside namespace `netns`, listening on address:port, under workdir:

        workdir/rabbitmq.conf, enabled_plugins    its configuration (no plugins)
        workdir/home/                             HOME (.erlang.cookie)
        workdir/mnesia/, log/                     its database, RABBITMQ_LOG_BASE
        workdir/rabbitmq.log, rabbitmq.out        its log, its console output
        workdir/rabbitmq.pid, epmd.pid            beam.smp, and the epmd it started
    """

    def __init__(self, workdir: Path, netns: str, address: str, port: int = 5672) -> None:
        self.workdir = Path(workdir).absolute()
        self.netns = netns
        self.address = address
        self.port = port

    @property
    def nodename(self) -> str:
        return f"dvr-{self.netns}@localhost"  # localhost: /etc/hosts, in every namespace

    @property
    def transport_url(self) -> str:
        return f"rabbit://guest:guest@{self.address}:{self.port}/"

    @property
    def log(self) -> Path:
        return self.workdir / "rabbitmq.log"

    @property
    def pid_file(self) -> Path:
        return self.workdir / "rabbitmq.pid"

    @property
    def epmd_pid_file(self) -> Path:
        return self.workdir / "epmd.pid"

    def env(self) -> dict[str, str]:
        """The environment of rabbitmq-server: nothing of /etc/rabbitmq, all under workdir."""
        w = self.workdir
        return {
            "PATH": SYSTEM_PATH, "HOME": str(w / "home"), "LC_ALL": "C.UTF-8",
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": self.address,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_MNESIA_BASE": str(w / "mnesia"),
            "RABBITMQ_LOG_BASE": str(w / "log"),
            "RABBITMQ_LOGS": str(self.log),
            "RABBITMQ_CONFIG_FILE": str(w / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(w / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(w / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(w / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(w / "plugins-expand"),
            "RABBITMQ_PID_FILE": str(w / "rabbitmq-server.pid"),
            # Without it the script stays a shell that waits for a child beam.smp (and names
            # nothing of workdir): with it, it execs the VM, whose command line names HOME.
            # -noinput as the script would give it otherwise.
            "RABBITMQ_ALLOW_INPUT": "true",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-noinput",
        }

    def config(self) -> str:
        return "\n".join([
            f"listeners.tcp.default = {self.address}:{self.port}",
            # the agents log in as guest from other hosts (the nodes' namespaces)
            "loopback_users.guest = false",
            "log.console = false",
            "",
        ])

    # -- processes

    def _ours(self, pid: int) -> bool:
        return (str(self.workdir) in service._cmdline(pid)
                and _netns_of(pid) == _netns_id(self.netns))

    def _epmd_ours(self, pid: int) -> bool:
        return _comm(pid) == "epmd" and _netns_of(pid) == _netns_id(self.netns)

    def _pid(self) -> int | None:
        pid = _read_pid(self.pid_file)
        return pid if pid and service._running(pid) and self._ours(pid) else None

    def _epmd_pid(self) -> int | None:
        pid = _read_pid(self.epmd_pid_file)
        return pid if pid and service._running(pid) and self._epmd_ours(pid) else None

    def pids(self) -> dict[str, int]:
        """{"beam.smp": pid, "epmd": pid} of what runs."""
        out = {}
        beam, epmd = self._pid(), self._epmd_pid()
        if beam is not None:
            out["beam.smp"] = beam
        if epmd is not None:
            out["epmd"] = epmd
        return out

    def alive(self) -> bool:
        return self._pid() is not None

    def start(self, timeout: float = 60) -> str:
        """Start the node (kept if it runs already) and wait until it has started its
        listener; returns the transport url. On failure, what was started is stopped."""
        if not RABBITMQ_SERVER.exists():
            raise NeutronError(f"{RABBITMQ_SERVER} not found: install rabbitmq-server")
        if _netns_id(self.netns) is None:
            raise NeutronError(f"no namespace {self.netns}")
        if self.alive():
            return self.transport_url
        deadline = time.monotonic() + timeout
        for sub in ("home", "mnesia", "log"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        (self.workdir / "rabbitmq.conf").write_text(self.config())
        (self.workdir / "enabled_plugins").write_text("[].\n")
        offset = service._size(self.log)
        pid = None
        try:
            # a shell script until it execs erl, then beam.smp: one pid
            pid = _spawn(run.argv(self.netns, [str(RABBITMQ_SERVER)]),
                         self.workdir / "rabbitmq.out", self.pid_file, self.env())
            while not any(RABBITMQ_READY in line for line in _log_lines(self.log, offset)):
                if not service._running(pid):
                    raise NeutronError(
                        f"rabbitmq-server exited: {service._tail(self.workdir / 'rabbitmq.out')}"
                        f" (logs: {self.log}, {self.workdir / 'rabbitmq.out'})")
                if time.monotonic() > deadline:
                    raise NeutronError(f"RabbitMQ did not start within {timeout:.0f} s: "
                                       f"{service._tail(self.log)} (log: {self.log})")
                time.sleep(0.1)
            epmd = [pid for pid in processes_in(self.netns) if self._epmd_ours(pid)]
            if epmd:
                self.epmd_pid_file.write_text(f"{epmd[0]}\n")
        except BaseException:
            with contextlib.suppress(NeutronError):
                _kill_spawned(pid, "rabbit")
                self.stop()
            raise
        return self.transport_url

    def stop(self) -> None:
        """Stop beam.smp (SIGTERM: a clean shutdown, SIGKILL after 20 s), then its epmd.
        Safe to repeat; the work directory is kept."""
        beam = self._pid()
        if beam is not None:
            # its children (erl_child_setup, inet_gethost) name nothing: in the namespace
            target = _netns_id(self.netns)
            _stop([beam, *_descendants(beam)],
                  lambda pid: self._ours(pid) if pid == beam else _netns_of(pid) == target,
                  20.0, "RabbitMQ")
        self.pid_file.unlink(missing_ok=True)
        epmd = self._epmd_pid()
        if epmd is not None:
            _stop([epmd], self._epmd_ours, 5.0, "epmd")
        self.epmd_pid_file.unlink(missing_ok=True)


# -- neutron-rpc-server -------------------------------------------------------------------------


class RpcServer:
    """`neutron-rpc-server` of `neutron`'s venv inside namespace `netns`, on that Neutron's
    configuration and database, with RabbitMQ at transport_url. Its files are in Neutron's
    work directory: etc/rpc-server.conf, neutron-rpc-server.{log,out,pid}."""

    def __init__(self, neutron: service.Neutron, netns: str, transport_url: str) -> None:
        self.neutron = neutron
        self.netns = netns
        self.transport_url = transport_url

    @property
    def workdir(self) -> Path:
        return self.neutron.workdir

    @property
    def config_file(self) -> Path:
        return self.neutron.etc / "rpc-server.conf"

    @property
    def log(self) -> Path:
        return self.workdir / "neutron-rpc-server.log"

    @property
    def pid_file(self) -> Path:
        return self.workdir / "neutron-rpc-server.pid"

    def config(self) -> dict[str, dict[str, str]]:
        """What rpc-server.conf holds (read after Neutron's own files: it wins)."""
        return {"DEFAULT": {"transport_url": self.transport_url, "log_file": str(self.log),
                            "use_stderr": "false"}}

    def command(self) -> list[str]:
        files = [*self.neutron.config_files, self.config_file]
        return [str(self.neutron.venv / "bin" / "neutron-rpc-server"),
                *(arg for path in files for arg in ("--config-file", str(path)))]

    def _ours(self, pid: int) -> bool:
        return str(self.config_file) in service._cmdline(pid)

    def _pid(self) -> int | None:
        pid = _read_pid(self.pid_file)
        return pid if pid and service._running(pid) and self._ours(pid) else None

    def pids(self) -> list[int]:
        """The server and its workers."""
        main = self._pid()
        if main is None:
            return []
        return [main, *(pid for pid in _descendants(main) if self._ours(pid))]

    def alive(self) -> bool:
        return self._pid() is not None

    def workers(self) -> list[int]:
        main = self._pid()
        return [p for p in _descendants(main) if self._ours(p)] if main is not None else []

    def start(self, timeout: float = 120) -> None:
        """Start the server (kept if it runs already) and wait until its RPC workers run and
        have connected to RabbitMQ. On failure, what was started is stopped."""
        exe = self.neutron.venv / "bin" / "neutron-rpc-server"
        if not exe.exists():
            raise NeutronError(f"no {exe}: run ensure_venv() first")
        missing = [p for p in self.neutron.config_files if not p.is_file()]
        if missing:
            raise NeutronError(f"no {missing[0]}: start the Neutron API first")
        if self.alive():
            return
        deadline = time.monotonic() + timeout
        _write_ini(self.config_file, self.config())
        out = self.workdir / "neutron-rpc-server.out"
        offset, out_offset = service._size(self.log), service._size(out)
        connected: frozenset[int] = frozenset()
        since = 0.0
        try:
            _spawn(run.argv(self.netns, self.command()), out, self.pid_file,
                   service._clean_env())
            while True:
                lines = _log_lines(self.log, offset)
                if self._pid() is None or any(" CRITICAL " in line for line in lines):
                    raise NeutronError(
                        "neutron-rpc-server exited: "
                        f"{_error_line(lines) or service._tail(out)} (log: {self.log})")
                # a worker that dies is forked again by the server: its traceback is on the
                # server's output, not in its log
                crash = _crash(_log_lines(out, out_offset))
                if crash:
                    raise NeutronError(f"neutron-rpc-server's workers fail: {crash} "
                                       f"(output: {out})")
                now = time.monotonic()
                workers = self._connected_workers()
                if workers != connected:
                    connected, since = workers, now
                elif connected and now - since >= RPC_READY_STABLE:
                    return
                if now > deadline:
                    url = urllib.parse.urlsplit(self.transport_url)
                    raise NeutronError(
                        f"neutron-rpc-server: its workers hold no connection to RabbitMQ at "
                        f"{url.hostname}:{url.port} after {timeout:.0f} s: "
                        f"{_error_line(lines) or service._tail(self.log)} (log: {self.log})")
                time.sleep(0.2)
        except BaseException:
            with contextlib.suppress(NeutronError):
                self.stop()
            raise

    def _connected_workers(self) -> frozenset[int]:
        """The workers, when each has a TCP connection to RabbitMQ (oslo.messaging logs none
        at INFO); empty otherwise."""
        url = urllib.parse.urlsplit(self.transport_url)
        workers = self.workers()
        if workers and all(_connected_to(pid, url.hostname or "", url.port or 5672)
                           for pid in workers):
            return frozenset(workers)
        return frozenset()

    def stop(self) -> None:
        """SIGTERM to the server (it stops its workers), SIGKILL to all after 15 s."""
        pids = self.pids()
        if pids:
            _stop(pids, self._ours, 15.0, "neutron-rpc-server")
        self.pid_file.unlink(missing_ok=True)


# -- neutron-openvswitch-agent ------------------------------------------------------------------


class OvsAgent:
    """`neutron-openvswitch-agent` for `host` inside namespace `netns` (a lab node's), on the
    ovsdb-server at ovsdb_socket, with RabbitMQ at transport_url, reporting to `neutron`
    (whose API tells when it is alive). Its files are under workdir: ovs-agent.ini,
    neutron-openvswitch-agent.{log,out,pid}, state/, lock/."""

    def __init__(self, workdir: Path, netns: str, host: str, ovsdb_socket: Path,
                 transport_url: str, neutron: service.Neutron, of_port: int = 6633) -> None:
        self.workdir = Path(workdir).absolute()
        self.netns = netns
        self.host = host
        self.ovsdb_socket = Path(ovsdb_socket).absolute()
        self.transport_url = transport_url
        self.neutron = neutron
        self.of_port = of_port

    @property
    def config_file(self) -> Path:
        return self.workdir / "ovs-agent.ini"

    @property
    def log(self) -> Path:
        return self.workdir / "neutron-openvswitch-agent.log"

    @property
    def pid_file(self) -> Path:
        return self.workdir / "neutron-openvswitch-agent.pid"

    def config(self) -> dict[str, dict[str, str]]:
        """What ovs-agent.ini holds."""
        venv = self.neutron.venv
        helper = f"{venv / 'bin' / 'privsep-helper'} --config-file {self.config_file}"
        sections: dict[str, dict[str, str]] = {
            "DEFAULT": {
                "host": self.host,
                "transport_url": self.transport_url,
                "state_path": str(self.workdir / "state"),
                "log_file": str(self.log),
                "use_stderr": "false",
                "debug": "false",
            },
            "oslo_concurrency": {"lock_path": str(self.workdir / "lock")},
            "agent": {
                "tunnel_types": "",
                "l2_population": "false",
                # no sudo here (root already): privsep daemons by helper_command below
                "root_helper": "",
            },
            "ovs": {
                "integration_bridge": INTEGRATION_BRIDGE,
                "datapath_type": "netdev",
                "of_listen_address": "127.0.0.1",
                "of_listen_port": str(self.of_port),
                # absolute: a bare unix: path would be taken under OVS_RUNDIR
                "ovsdb_connection": f"unix:{self.ovsdb_socket}",
                "bridge_mappings": BRIDGE_MAPPINGS,
            },
            "securitygroup": {"firewall_driver": "noop"},
        }
        for section in PRIVSEP_SECTIONS:
            sections[section] = {"helper_command": helper}
        return sections

    def command(self) -> list[str]:
        return [str(self.neutron.venv / "bin" / "neutron-openvswitch-agent"),
                "--config-file", str(self.config_file)]

    def env(self) -> dict[str, str]:
        """The OVS tools the agent and its privsep daemons run (ovs-vsctl, ovsdb-client) talk
        to the node's OVS."""
        d = str(self.ovsdb_socket.parent)
        return service._clean_env(OVS_RUNDIR=d, OVS_DBDIR=d, OVS_LOGDIR=d, OVS_SYSCONFDIR=d)

    def _ours(self, pid: int) -> bool:
        return str(self.config_file) in service._cmdline(pid)

    def _pid(self) -> int | None:
        pid = _read_pid(self.pid_file)
        return pid if pid and service._running(pid) and self._ours(pid) else None

    def pids(self) -> list[int]:
        """The agent, its privsep daemons (their command lines name its configuration file),
        and the agent's other children (ovsdb-client monitor)."""
        main = self._pid()
        found = set(pids_mentioning(str(self.config_file)))
        if main is not None:
            found.add(main)
            found.update(_descendants(main))
        return sorted(found)

    def alive(self) -> bool:
        return self._pid() is not None

    def agent(self) -> dict[str, Any] | None:
        """Neutron's record of this host's Open vSwitch agent (None if it has none)."""
        query = urllib.parse.urlencode({"agent_type": OVS_AGENT_TYPE, "host": self.host})
        agents = _api_get(f"{self.neutron.url}/v2.0/agents?{query}")["agents"]
        return agents[0] if agents else None

    def start(self, timeout: float = 120) -> None:
        """Start the agent (kept if it runs already) and wait until Neutron's API lists it
        alive, started by this start. On failure, what was started is stopped."""
        exe = self.neutron.venv / "bin" / "neutron-openvswitch-agent"
        if not exe.exists():
            raise NeutronError(f"no {exe}: run ensure_venv() first")
        if not self.ovsdb_socket.exists():
            raise NeutronError(f"no ovsdb-server socket {self.ovsdb_socket}")
        if self.alive():
            return
        deadline = time.monotonic() + timeout
        for sub in ("state", "lock"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        _write_ini(self.config_file, self.config())
        offset = service._size(self.log)
        # Neutron's started_at has whole seconds (UTC)
        since = (datetime.datetime.now(datetime.UTC).replace(tzinfo=None, microsecond=0)
                 - datetime.timedelta(seconds=1))
        try:
            _spawn(run.argv(self.netns, self.command()),
                   self.workdir / "neutron-openvswitch-agent.out", self.pid_file, self.env())
            while True:
                lines = _log_lines(self.log, offset)
                if self._pid() is None:
                    out = self.workdir / "neutron-openvswitch-agent.out"
                    raise AgentExited(
                        f"neutron-openvswitch-agent on {self.host} exited: "
                        f"{_error_line(lines) or service._tail(out) or service._tail(self.log)}"
                        f" (log: {self.log}, output: {out})")
                if self._started(since):
                    return
                if time.monotonic() > deadline:
                    raise NeutronError(
                        f"Neutron lists no live {OVS_AGENT_TYPE} on {self.host} started within "
                        f"{timeout:.0f} s: {_error_line(lines) or service._tail(self.log)} "
                        f"(log: {self.log})")
                time.sleep(0.5)
        except BaseException:
            with contextlib.suppress(NeutronError):
                self.stop()
            raise

    def _started(self, since: datetime.datetime) -> bool:
        try:
            agent = self.agent()
        except (OSError, http.client.HTTPException, ValueError, KeyError):
            return False
        if agent is None or not agent.get("alive"):
            return False
        try:
            started = datetime.datetime.fromisoformat(str(agent.get("started_at")))
        except ValueError:
            return False
        return started >= since

    def stop(self) -> None:
        """SIGKILL to the agent, its privsep daemons and its children (it ignores SIGTERM for
        longer than anyone waits). Its flows stay in OVS; safe to repeat."""
        pids = self.pids()
        main = self._pid()
        if pids:
            # children found by parentage are checked to be still in the node's namespace
            target = _netns_id(self.netns)
            _stop(pids, lambda pid: self._ours(pid) or (pid != main and _netns_of(pid) == target),
                  0, f"neutron-openvswitch-agent on {self.host}")
        self.pid_file.unlink(missing_ok=True)

    def restart(self, timeout: float = 120) -> None:
        """Stop and start again; started once more if the new agent exits at once (as its
        service manager would), which it rarely does while the old one's helpers go."""
        self.stop()
        try:
            self.start(timeout)
        except AgentExited as exc:
            LOG.warning("%s; starting it again", exc)
            time.sleep(1)
            self.start(timeout)


__all__ = ["CTL_ADDRESS", "INTEGRATION_BRIDGE", "OvsAgent", "RabbitMQ", "RpcServer",
           "create_ctl_namespace", "ctl_namespace", "delete_ctl_namespace", "processes_in"]
