"""A real Neutron API (dvr.neutron.service) with its own MariaDB and uWSGI, without the dvr
driver: networks and subnets created and listed over REST, then everything stopped."""

from __future__ import annotations

import json
import shutil
import socket
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
def test_neutron_api_networks_and_subnets() -> None:
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
        if passed:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs kept in {workdir}")
