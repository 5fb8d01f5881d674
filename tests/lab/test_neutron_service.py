"""A real Neutron API (dvr.neutron.service) with its own MariaDB and uWSGI, without the dvr
driver: networks and subnets created and listed over REST, then everything stopped."""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from dvr.neutron.service import Neutron, ensure_venv


def _call(url: str, method: str = "GET", body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              "Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert reply.status in (200, 201), (method, url, reply.status)
        return json.loads(reply.read())


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _pid_runs(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] not in ("Z", "X")


@pytest.mark.timeout(900)  # the first run installs the Neutron venv (about a minute)
def test_neutron_api_networks_and_subnets(tmp_path: Path) -> None:
    if shutil.which("mariadbd") is None:
        pytest.skip("mariadbd is not installed (Debian: apt-get install mariadb-server)")
    venv = ensure_venv()
    workdir = Path(f"/run/dvrnt-{uuid.uuid4().hex[:8]}")
    neutron = Neutron(workdir, f"unix:{workdir}/nb-unused.sock", venv=venv,
                      mechanism_drivers=(), service_plugins=("router",))
    passed = False
    try:
        url = neutron.start()
        assert url == neutron.url and url.startswith("http://127.0.0.1:")
        status = neutron.status()
        assert status["api"] and status["db"], status
        assert {"mariadbd", "uwsgi", "uwsgi-worker-1"} <= set(status["pids"]), status
        for pid in status["pids"].values():
            assert str(workdir) in Path(f"/proc/{pid}/cmdline").read_text(), pid

        found = Neutron.find(workdir)
        assert found is not None and found.url == url

        api = f"{url}/v2.0"
        network = _call(f"{api}/networks", "POST", {"network": {"name": "dvrnt-сеть"}})["network"]
        assert network["provider:network_type"] == "vxlan"
        assert 1000 <= network["provider:segmentation_id"] <= 1999
        subnet = _call(f"{api}/subnets", "POST", {"subnet": {
            "network_id": network["id"], "cidr": "10.77.0.0/24", "ip_version": 4,
            "name": "dvrnt-subnet"}})["subnet"]
        assert subnet["cidr"] == "10.77.0.0/24" and subnet["gateway_ip"] == "10.77.0.1"

        networks = _call(f"{api}/networks")["networks"]
        assert [(n["id"], n["name"]) for n in networks] == [(network["id"], "dvrnt-сеть")]
        assert networks[0]["subnets"] == [subnet["id"]]
        subnets = _call(f"{api}/subnets?network_id={network['id']}")["subnets"]
        assert [(s["id"], s["cidr"]) for s in subnets] == [(subnet["id"], "10.77.0.0/24")]
        router = _call(f"{api}/routers", "POST", {"router": {"name": "dvrnt-router"}})["router"]
        assert _call(f"{api}/routers/{router['id']}")["router"]["name"] == "dvrnt-router"

        found.stop()  # a later process stops it from workdir/neutron.json alone
        for name, pid in status["pids"].items():
            assert not _pid_runs(pid), (name, pid)
        assert not _port_open(neutron.port or 0)
        after = neutron.status()
        assert after["pids"] == {} and not after["api"] and not after["db"], after
        neutron.stop()  # safe to repeat
        passed = True
    finally:
        neutron.stop()
        _clean_up(workdir, passed, tmp_path)


def _clean_up(workdir: Path, passed: bool, keep: Path) -> None:
    """Remove the test's run directory, failed or not; on failure its logs (not the
    database files) go to pytest's own temporary directory first."""
    if not passed and workdir.exists():
        shutil.copytree(workdir, keep / workdir.name, ignore=shutil.ignore_patterns("mysql"),
                        dirs_exist_ok=True)
        print(f"logs kept in {keep / workdir.name}")
    shutil.rmtree(workdir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(900)
def test_the_dvr_driver_writes_over_tls_with_its_own_certificate(tmp_path: Path) -> None:
    """Neutron's dvr driver given only a TLS remote of the northbound database and its own
    certificate (`[dvr] northbound = ssl:...`, `nb_private_key`, `nb_certificate`,
    `nb_ca_cert`): a network and subnet created through the API are in the database, and
    the server logged the driver's transactions on a TLS session (the unix socket is the
    test's own)."""
    import subprocess

    from dvr import nb
    from dvr.lab.pki import Pki
    from flows import northbound
    from flows.model import load_topology

    if shutil.which("mariadbd") is None:
        pytest.skip("mariadbd is not installed (Debian: apt-get install mariadb-server)")
    venv = ensure_venv()
    workdir = Path(f"/run/dvrnt-{uuid.uuid4().hex[:8]}")
    workdir.mkdir(parents=True)
    pki = Pki(workdir / "pki")
    pki.ensure(["server", "neutron"])
    db, sock, port = workdir / "nb.db", workdir / "nb.sock", _free_port()
    subprocess.run(["ovsdb-tool", "create", str(db), str(northbound.SCHEMA)], check=True)
    key, cert, ca = pki.files("server")
    subprocess.run(["ovsdb-server", str(db), f"--remote=punix:{sock}",
                    "--remote=db:DVR_Northbound,NB_Global,connections",
                    f"--private-key={key}", f"--certificate={cert}", f"--ca-cert={ca}",
                    f"--pidfile={workdir}/nb.pid", f"--unixctl={workdir}/nb.ctl",
                    f"--log-file={workdir}/nb.log", "-vjsonrpc:file:dbg", "--detach",
                    "--no-chdir", "-vconsole:off"], check=True)
    neutron = None
    passed = False
    try:
        admin = nb.Northbound(f"unix:{sock}")
        admin.set_connections([northbound.Remote(f"pssl:{port}:127.0.0.1")])
        topo = load_topology(Path(__file__).parents[2] / "dvr" / "examples" / "default.yaml")
        admin.load(dataclasses.replace(topo, networks={}, routers={}, vms={}, _router_of={},
                                       _by_port={}))   # the nodes, as `dvr lab` registers them
        key, cert, ca = pki.files("neutron")
        neutron = Neutron(workdir / "neutron", f"ssl:127.0.0.1:{port}", venv=venv,
                          extra_config={"dvr": {"nb_private_key": key,
                                                "nb_certificate": cert, "nb_ca_cert": ca}})
        api = f"{neutron.start()}/v2.0"
        network = _call(f"{api}/networks", "POST", {"network": {"name": "tlsnet"}})["network"]
        _call(f"{api}/subnets", "POST", {"subnet": {
            "network_id": network["id"], "cidr": "10.78.0.0/24", "ip_version": 4}})
        deadline = time.monotonic() + 30   # the driver writes in its own thread
        while not any(n["cidr"] == "10.78.0.0/24" for n in admin.dump()["networks"].values()):
            assert time.monotonic() < deadline, admin.dump()["networks"]
            time.sleep(0.2)
        log = (workdir / "nb.log").read_text()
        assert "ssl:127.0.0.1:" in log and "transact" in log, log[-2000:]
        admin.close()
        passed = True
    finally:
        if neutron is not None:
            neutron.stop()
        subprocess.run(["ovs-appctl", "-t", str(workdir / "nb.ctl"), "exit"], check=False,
                       capture_output=True)
        _clean_up(workdir, passed, tmp_path)
