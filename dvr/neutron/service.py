"""A real Neutron API beside a lab: its own MariaDB, its configuration, its schema, and uWSGI.

Neutron runs from a venv of its own (`ensure_venv`, pinned by constraints.txt, with this dvr
project installed into it so that ML2 finds the dvr mechanism driver and L3 plugin by entry
point). `Neutron` keeps everything under one work directory:

    workdir/neutron.json        url, port and arguments (`Neutron.find` reads it)
    workdir/mysql/              MariaDB's datadir; mysql.sock (unix socket only), mariadbd.pid
    workdir/etc/                neutron.conf, ml2_conf.ini, api-paste.ini
    workdir/state/, lock/       Neutron's state_path and lock_path
    workdir/uwsgi.pid           the uWSGI master (its workers are its children)
    workdir/*.log               mariadbd.log, neutron-db-manage.log, uwsgi.log, neutron-api.log

The API is served without Keystone (`auth_strategy = noauth`: every request is an admin
request of project `fake_project_id`) and, unless given a `transport_url` (a RabbitMQ for
Neutron's own agents, see dvr.neutron.l2agent), without a message broker
(`transport_url = fake://`: messages to agents are dropped). Every process started here
mentions the work directory on its command line, and `stop` signals only processes whose pid
file is in the work directory and whose command line mentions it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dvr

NEUTRON_VENV = Path(os.environ.get("DVR_NEUTRON_VENV", "/opt/dvr/neutron-venv"))
CONSTRAINTS = Path(__file__).with_name("constraints.txt")

# What the venv holds besides this project (versions from CONSTRAINTS).
PACKAGES = ("neutron", "pymysql", "uwsgi", "python-openstackclient")
VENV_MARKER = ".dvr-neutron-installed"

STATE_FILE = "neutron.json"
DB_NAME = "neutron"
DB_HEADS_MARKER = ".neutron-db-at-heads"
WSGI_APP = "neutron.wsgi.api:application"
# A small MariaDB: Neutron's tables of a lab hold a few hundred rows.
MARIADB_OPTIONS = (
    "--innodb-buffer-pool-size=32M",
    "--innodb-log-file-size=16M",
    "--aria-pagecache-buffer-size=8M",
    "--key-buffer-size=1M",
    "--performance-schema=OFF",
    "--skip-name-resolve",
    # Without a my.cnf (--no-defaults) the server's default is latin1: Neutron's tables and its
    # connections (oslo.db asks for charset=utf8) use utf8.
    "--character-set-server=utf8mb3",
    "--collation-server=utf8mb3_general_ci",
)
PYTHON_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")
UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the final NUL


class NeutronError(Exception):
    """A Neutron API or its venv could not be set up, started or stopped (one-line reason)."""


# -- the venv -----------------------------------------------------------------------------------


def _project_root() -> Path | None:
    """The checkout holding this dvr project's pyproject.toml, or None for an installed dvr."""
    root = Path(dvr.__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def _dvr_requirement() -> str:
    try:
        return f"dvr=={importlib.metadata.version('dvr')}"
    except importlib.metadata.PackageNotFoundError as e:
        raise NeutronError("dvr is neither a checkout nor an installed distribution") from e


def _venv_stamp() -> str:
    """What the venv was installed from: the constraints, and this project (its pyproject.toml
    declares the entry points Neutron loads the driver by, read only when installing)."""
    digest = hashlib.sha256(CONSTRAINTS.read_bytes())
    root = _project_root()
    if root is not None:
        digest.update(str(root).encode())
        digest.update((root / "pyproject.toml").read_bytes())
    else:
        digest.update(_dvr_requirement().encode())
    return digest.hexdigest()


def _venv_ready(venv: Path) -> bool:
    marker = venv / VENV_MARKER
    return marker.is_file() and marker.read_text().strip() == _venv_stamp()


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what would point the venv's Python elsewhere."""
    env = {k: v for k, v in os.environ.items() if k not in PYTHON_ENV}
    env.update(extra)
    return env


def _run_logged(cmd: list[str], log: Path, what: str, timeout: float | None = None,
                env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    """Run cmd with its output appended to log; NeutronError with the end of the log if it fails."""
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        try:
            rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                timeout=timeout, env=env or _clean_env(), cwd=cwd,
                                check=False).returncode
        except subprocess.TimeoutExpired as e:
            raise NeutronError(f"{what}: no answer in {timeout:.0f} s (log: {log})") from e
        except OSError as e:
            raise NeutronError(f"{what}: {e}") from e
    if rc != 0:
        raise NeutronError(f"{what} failed (exit {rc}): {_tail(log)} (log: {log})")


def ensure_venv(venv: Path = NEUTRON_VENV, log: Path | None = None) -> Path:
    """Create the venv if missing and install, with `-c CONSTRAINTS`: neutron, pymysql, uwsgi,
    python-openstackclient; then this dvr project into it with `pip install --no-deps -e ROOT`
    where ROOT is the checkout holding pyproject.toml; if dvr is not a checkout,
    `pip install --no-deps dvr==<version>`. Idempotent and quick when already done (a marker
    file in the venv holds the hash of constraints.txt and of the project; redone when either
    changes). Concurrent calls for one venv wait for each other. Returns the venv."""
    venv = Path(venv).absolute()
    if _venv_ready(venv):
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = Path(log) if log is not None else venv.parent / f"{venv.name}-install.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _venv_ready(venv):  # done by whoever held the lock
            return venv
        python = venv / "bin" / "python"
        if not python.exists():
            _run_logged([sys.executable, "-m", "venv", str(venv)], log, f"creating venv {venv}")
        (venv / VENV_MARKER).unlink(missing_ok=True)
        pip = [str(python), "-m", "pip", "install", "--quiet", "--quiet", "-c", str(CONSTRAINTS)]
        _run_logged([*pip, *PACKAGES], log, f"installing Neutron into {venv}")
        root = _project_root()
        this = ["-e", str(root)] if root is not None else [_dvr_requirement()]
        _run_logged([*pip, "--no-deps", *this], log, f"installing dvr into {venv}")
        (venv / VENV_MARKER).write_text(_venv_stamp() + "\n")
    return venv


# -- processes ----------------------------------------------------------------------------------


def _tail(path: Path, lines: int = 3) -> str:
    """The last non-empty lines of a log, on one line."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(kept)[-600:] or "(empty log)"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_from(path: Path, offset: int) -> list[str]:
    """The lines of a log written after offset (what this start wrote)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace").splitlines()
    except OSError:
        return []


def _api_error(lines: list[str]) -> str:
    """The most telling line of neutron-api.log: its last CRITICAL, else ERROR line, from the
    level on ("2026-01-01 00:00:00.000 PID CRITICAL module [-] message")."""
    for level in (" CRITICAL ", " ERROR "):
        found = [line for line in lines if level in line]
        if found:
            return found[-1][found[-1].index(level) + 1:][:400]
    return ""


# uWSGI's lines when the app cannot load: the worker exits (Neutron calls sys.exit on a bad
# configuration) and the master respawns it in a loop, or gives up (--need-app).
UWSGI_APP_FAILED = ("DAMN ! worker", "GAME OVER", "OOPS ! failed loading app")
UWSGI_NOISE = ("Eventlet", "eventlet", "we strongly recommend", "framework.  For more",
               "If you are already using", "https://eventlet")


def _uwsgi_error(lines: list[str]) -> str:
    """The line before uWSGI's first word of a dead worker (what the app printed), if any."""
    for i, line in enumerate(lines):
        if any(mark in line for mark in UWSGI_APP_FAILED):
            before = [ln.strip() for ln in lines[:i]
                      if ln.strip() and not any(n in ln for n in UWSGI_NOISE)]
            return before[-1][:400] if before else line.strip()
    return ""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def _running(pid: int) -> bool:
    """pid is a live process (a zombie is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] not in ("Z", "X")


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
            out.append(int(entry))
    return sorted(out)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _ini(sections: dict[str, dict[str, str]]) -> str:
    out = []
    for section, options in sections.items():
        out.append(f"[{section}]")
        out.extend(f"{key} = {value}" for key, value in options.items())
        out.append("")
    return "\n".join(out)


class Neutron:
    """A Neutron API (ML2 + service plugins) on 127.0.0.1, with its own MariaDB, under workdir."""

    def __init__(self, workdir: Path, nb_connection: str, *, venv: Path = NEUTRON_VENV,
                 mechanism_drivers: Sequence[str] = ("dvr",),
                 service_plugins: Sequence[str] = ("dvr",),
                 extra_config: dict[str, dict[str, str]] | None = None,
                 port: int | None = None, transport_url: str | None = None) -> None:
        self.workdir = Path(workdir).absolute()
        self.nb_connection = nb_connection
        self.venv = Path(venv).absolute()
        self.mechanism_drivers = tuple(mechanism_drivers)
        self.service_plugins = tuple(service_plugins)
        self.extra_config = {s: dict(o) for s, o in (extra_config or {}).items()}
        self.port = port
        self.transport_url = transport_url  # None: fake:// (no broker)

    # -- paths

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT ("" before a port is chosen by start())."""
        return f"http://127.0.0.1:{self.port}" if self.port is not None else ""

    @property
    def etc(self) -> Path:
        return self.workdir / "etc"

    @property
    def db_socket(self) -> Path:
        return self.workdir / "mysql.sock"

    @property
    def db_connection(self) -> str:
        return f"mysql+pymysql://root@/{DB_NAME}?unix_socket={self.db_socket}"

    @property
    def api_log(self) -> Path:
        return self.workdir / "neutron-api.log"

    def _pid_file(self, name: str) -> Path:
        return self.workdir / f"{name}.pid"

    # -- state

    def _save(self) -> None:
        state = {
            "url": self.url, "port": self.port, "venv": str(self.venv),
            "nb_connection": self.nb_connection,
            "mechanism_drivers": list(self.mechanism_drivers),
            "service_plugins": list(self.service_plugins),
            "extra_config": self.extra_config,
            "transport_url": self.transport_url,
        }
        tmp = self.workdir / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.workdir / STATE_FILE)

    @classmethod
    def find(cls, workdir: Path) -> Neutron | None:
        """The Neutron started under workdir (from workdir/neutron.json), None if there is none."""
        path = Path(workdir) / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise NeutronError(f"unreadable {path}: {e}") from e
        return cls(Path(workdir), state["nb_connection"], venv=Path(state["venv"]),
                   mechanism_drivers=state["mechanism_drivers"],
                   service_plugins=state["service_plugins"],
                   extra_config=state.get("extra_config") or None, port=state["port"],
                   transport_url=state.get("transport_url"))

    def _pid(self, name: str) -> int | None:
        """The pid in workdir/NAME.pid if that process runs and its command line mentions
        workdir (a stale pid file, or a pid reused by another process, gives None)."""
        try:
            pid = int(self._pid_file(name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        if pid <= 1 or not _running(pid) or str(self.workdir) not in _cmdline(pid):
            return None
        return pid

    def _workers(self, master: int | None) -> list[int]:
        if master is None:
            return []
        return [pid for pid in _children(master) if str(self.workdir) in _cmdline(pid)]

    def _pids(self) -> dict[str, int]:
        pids: dict[str, int] = {}
        db = self._pid("mariadbd")
        if db is not None:
            pids["mariadbd"] = db
        master = self._pid("uwsgi")
        if master is not None:
            pids["uwsgi"] = master
            for i, worker in enumerate(self._workers(master), 1):
                pids[f"uwsgi-worker-{i}"] = worker
        return pids

    def _api_alive(self, timeout: float = 2.0) -> bool:
        if self.port is None:
            return False
        try:
            with urllib.request.urlopen(f"{self.url}/v2.0/networks", timeout=timeout) as reply:
                return reply.status == 200
        except (OSError, http.client.HTTPException, ValueError):
            return False

    def _db_alive(self) -> bool:
        if self._pid("mariadbd") is None:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            try:
                s.connect(str(self.db_socket))
                return len(s.recv(64)) > 4  # the server's greeting packet
            except OSError:
                return False

    def status(self) -> dict[str, Any]:
        """{"url": ..., "api": GET /v2.0/networks answers 200, "db": MariaDB answers on its
        socket, "pids": {"mariadbd": pid, "uwsgi": pid, "uwsgi-worker-1": pid, ...}} (the
        processes of this workdir that run)."""
        return {"url": self.url, "api": self._api_alive(), "db": self._db_alive(),
                "pids": self._pids()}

    # -- start

    def start(self, timeout: float = 120) -> str:
        """Start MariaDB, write the configuration, bring the schema to heads, start uWSGI and
        wait until GET /v2.0/networks answers 200. Returns the url. What runs already (from an
        earlier start on this workdir) is kept. On failure, what was started is stopped and
        NeutronError tells why, with the end of the log concerned."""
        deadline = time.monotonic() + timeout
        for tool in ("bin/uwsgi", "bin/neutron-db-manage"):
            if not (self.venv / tool).exists():
                raise NeutronError(f"no {tool} in {self.venv}: run ensure_venv() first")
        for tool in ("mariadbd", "mariadb-install-db", "mariadb"):
            if shutil.which(tool) is None:
                raise NeutronError(f"{tool} not found: install mariadb-server")
        if len(str(self.db_socket)) > UNIX_PATH_MAX:
            raise NeutronError(f"work directory path too long for a unix socket: {self.workdir}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = _free_port()
        self._save()
        try:
            self._start_db(deadline)
            self._write_config()
            self._upgrade_db(deadline)
            self._start_api(deadline)
        except BaseException:
            with contextlib.suppress(NeutronError):
                self.stop()
            raise
        return self.url

    def _remaining(self, deadline: float, what: str) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise NeutronError(f"timed out before {what}")
        return left

    def _spawn_daemon(self, cmd: list[str], output: Path, pid_file: Path,
                      env: dict[str, str] | None = None) -> int:
        """Start cmd in a session of its own, reparented to init (not a child of this process,
        so nothing here has to reap it); its pid goes into pid_file."""
        launcher = ["/bin/sh", "-c", '"$@" </dev/null >>"$OUT" 2>&1 & echo $!', "sh", *cmd]
        try:
            done = subprocess.run(launcher, capture_output=True, text=True, check=True,
                                  start_new_session=True,
                                  env=_clean_env(**(env or {}), OUT=str(output)))
            pid = int(done.stdout.split()[0])
        except (OSError, ValueError, IndexError, subprocess.CalledProcessError) as e:
            raise NeutronError(f"cannot start {cmd[0]}: {e}") from e
        pid_file.write_text(f"{pid}\n")
        return pid

    def _mariadb(self, sql: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["mariadb", "--no-defaults", f"--socket={self.db_socket}", "--user=root",
             "--connect-timeout=2", "--batch", "--execute", sql],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10, check=False)

    def _start_db(self, deadline: float) -> None:
        datadir = self.workdir / "mysql"
        log = self.workdir / "mariadbd.log"
        if self._pid("mariadbd") is None:
            if not (datadir / "mysql").is_dir():
                shutil.rmtree(datadir, ignore_errors=True)
                _run_logged(
                    ["mariadb-install-db", "--no-defaults", f"--datadir={datadir}", "--user=root",
                     "--auth-root-authentication-method=normal", "--skip-test-db",
                     *MARIADB_OPTIONS],
                    self.workdir / "mariadb-install-db.log", "mariadb-install-db",
                    timeout=self._remaining(deadline, "mariadb-install-db"))
            self.db_socket.unlink(missing_ok=True)
            self._spawn_daemon(
                ["mariadbd", "--no-defaults", "--user=root", f"--datadir={datadir}",
                 "--skip-networking", f"--socket={self.db_socket}",
                 f"--pid-file={self._pid_file('mariadbd')}", f"--log-error={log}",
                 *MARIADB_OPTIONS],
                self.workdir / "mariadbd.out", self._pid_file("mariadbd"))
        while True:
            if self._pid("mariadbd") is None:
                raise NeutronError(f"mariadbd exited: {_tail(log)} (log: {log})")
            done = self._mariadb(f"CREATE DATABASE IF NOT EXISTS {DB_NAME} CHARACTER SET utf8mb3")
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise NeutronError(f"MariaDB does not answer on {self.db_socket}: "
                                   f"{done.stderr.strip()} (log: {log})")
            time.sleep(0.1)

    def config(self) -> dict[str, dict[str, dict[str, str]]]:
        """The configuration files written to workdir/etc: {file name: {section: {key: value}}}."""
        neutron: dict[str, dict[str, str]] = {
            "DEFAULT": {
                "core_plugin": "ml2",
                "service_plugins": ",".join(self.service_plugins),
                "auth_strategy": "noauth",
                "transport_url": self.transport_url or "fake://",
                "state_path": str(self.workdir / "state"),
                "api_workers": "1",
                "rpc_workers": "1",
                "rpc_state_report_workers": "1",
                "debug": "false",
                "use_stderr": "false",
                "log_file": str(self.api_log),
                # No Nova and no DHCP agent beside this API: nothing to notify.
                "notify_nova_on_port_status_changes": "false",
                "notify_nova_on_port_data_changes": "false",
                "dhcp_agent_notification": "false",
            },
            "database": {"connection": self.db_connection},
            "oslo_concurrency": {"lock_path": str(self.workdir / "lock")},
            "dvr": {"northbound": self.nb_connection},
            # No agent applies security groups here (and dvr's dataplane does not filter): no
            # security-group API, and ports are created without agents.
            "securitygroup": {"enable_security_group": "false", "firewall_driver": "noop"},
        }
        ml2 = {
            "ml2": {
                "type_drivers": "flat,vlan,vxlan",
                "project_network_types": "vxlan",
                "mechanism_drivers": ",".join(self.mechanism_drivers),
                "extension_drivers": "port_security",
            },
            "ml2_type_vxlan": {"vni_ranges": "1000:1999"},
            "ml2_type_flat": {"flat_networks": "*"},
            "ml2_type_vlan": {"network_vlan_ranges": "physnet1:100:199"},
        }
        # extra_config goes into neutron.conf, but a section of ml2_conf.ini (read after it,
        # so it would win) is merged there.
        for section, options in self.extra_config.items():
            (ml2 if section in ml2 else neutron).setdefault(section, {}).update(options)
        return {"neutron.conf": neutron, "ml2_conf.ini": ml2}

    def _config_files(self) -> list[Path]:
        return [self.etc / "neutron.conf", self.etc / "ml2_conf.ini"]

    @property
    def config_files(self) -> list[Path]:
        """The configuration files start() writes, in the order Neutron reads them (another
        Neutron command on this database, e.g. neutron-rpc-server, reads the same)."""
        return self._config_files()

    def _write_config(self) -> None:
        self.etc.mkdir(parents=True, exist_ok=True)
        for sub in ("state", "lock"):
            (self.workdir / sub).mkdir(exist_ok=True)
        for name, sections in self.config().items():
            (self.etc / name).write_text(_ini(sections))
        # Neutron looks for api-paste.ini beside its configuration files.
        paste = self.venv / "etc" / "neutron" / "api-paste.ini"
        if not paste.is_file():
            raise NeutronError(f"no {paste}: the venv holds no Neutron, run ensure_venv()")
        shutil.copyfile(paste, self.etc / "api-paste.ini")

    def _upgrade_db(self, deadline: float) -> None:
        marker = self.workdir / DB_HEADS_MARKER
        venv_marker = self.venv / VENV_MARKER
        stamp = venv_marker.read_text().strip() if venv_marker.is_file() else str(self.venv)
        if marker.is_file() and marker.read_text().strip() == stamp:
            return
        files = [arg for path in self._config_files() for arg in ("--config-file", str(path))]
        _run_logged([str(self.venv / "bin" / "neutron-db-manage"), *files, "upgrade", "heads"],
                    self.workdir / "neutron-db-manage.log", "neutron-db-manage upgrade heads",
                    timeout=self._remaining(deadline, "neutron-db-manage"), cwd=self.workdir)
        marker.write_text(stamp + "\n")

    def _start_api(self, deadline: float) -> None:
        log = self.workdir / "uwsgi.log"
        pid_file = self._pid_file("uwsgi")
        uwsgi_from, api_from = _size(log), _size(self.api_log)
        if self._pid("uwsgi") is None:
            if _port_open(self.port or 0):
                raise NeutronError(f"port {self.port} on 127.0.0.1 is taken by another process")
            pid_file.unlink(missing_ok=True)
            env = {"OS_NEUTRON_CONFIG_DIR": str(self.etc),
                   "OS_NEUTRON_CONFIG_FILES": ";".join(p.name for p in self._config_files())}
            self._spawn_daemon(
                [str(self.venv / "bin" / "uwsgi"), "--home", str(self.venv),
                 "--chdir", str(self.workdir),
                 "--http-socket", f"127.0.0.1:{self.port}", "--module", WSGI_APP,
                 "--master", "--processes", "1", "--enable-threads", "--lazy-apps",
                 "--die-on-term", "--need-app", "--no-orphans", "--buffer-size", "65535",
                 "--add-header", "Connection: close",
                 "--worker-reload-mercy", "5", "--reload-mercy", "5",
                 "--pidfile", str(pid_file)],
                log, pid_file, env)
        while not self._api_alive():
            uwsgi_lines = _read_from(log, uwsgi_from)
            failed = any(mark in line for line in uwsgi_lines for mark in UWSGI_APP_FAILED)
            running = self._pid("uwsgi") is not None
            if failed or not running or time.monotonic() > deadline:
                reason = (_api_error(_read_from(self.api_log, api_from))
                          or _uwsgi_error(uwsgi_lines) or _tail(log))
                what = ("Neutron's API does not load" if failed or not running
                        else f"GET {self.url}/v2.0/networks: no 200 in time")
                raise NeutronError(f"{what}: {reason} (logs: {log}, {self.api_log})")
            time.sleep(0.2)

    # -- stop

    def _ours(self, pid: int) -> bool:
        return _running(pid) and str(self.workdir) in _cmdline(pid)

    def _terminate(self, pids: list[int], grace: float) -> None:
        """SIGTERM to pids[0] (the others are its workers: it stops them), SIGKILL to all that
        still run after grace seconds. Only processes whose command line mentions workdir;
        waited for until gone (an exiting process's command line reads empty before it is)."""
        pids = [pid for pid in pids if self._ours(pid)]
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            targets = pids[:1] if sig == signal.SIGTERM else pids
            for pid in targets:
                if self._ours(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
            end = time.monotonic() + wait
            while any(_running(pid) for pid in pids) and time.monotonic() < end:
                time.sleep(0.05)
            if not any(_running(pid) for pid in pids):
                return
        left = [pid for pid in pids if self._ours(pid)]
        if left:
            raise NeutronError(f"processes {left} of {self.workdir} survive SIGKILL")

    def stop_api(self) -> None:
        """Stop the API alone (uWSGI, master and workers); the database keeps running."""
        master = self._pid("uwsgi")
        if master is not None:
            self._terminate([master, *self._workers(master)], grace=10.0)
        self._pid_file("uwsgi").unlink(missing_ok=True)

    def restart_api(self, timeout: float = 120) -> str:
        """Stop the API and start it again (neutron-server restarted); returns its URL."""
        self.stop_api()
        return self.start(timeout)

    def stop(self) -> None:
        """Stop uWSGI (master and workers), then MariaDB: SIGTERM, SIGKILL after a grace time.
        Only processes named by the pid files in workdir whose command line mentions workdir.
        Safe to repeat; the work directory (database, logs) is kept."""
        self.stop_api()
        db = self._pid("mariadbd")
        if db is not None:
            self._terminate([db], grace=20.0)
        self._pid_file("mariadbd").unlink(missing_ok=True)


__all__ = ["CONSTRAINTS", "NEUTRON_VENV", "Neutron", "NeutronError", "ensure_venv"]
