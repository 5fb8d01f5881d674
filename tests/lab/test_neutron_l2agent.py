"""Neutron's own neutron-openvswitch-agent beside dvr's agent on a real lab (dvr.neutron.l2agent):
RabbitMQ and neutron-rpc-server in the lab's controller namespace, a Neutron API with ML2's
openvswitch driver (not dvr's), an OVS agent on compute1 and compute2 with its own integration
bridge br-l2. A VLAN network on physnet1 (br-ex, the lab's provider segment): two ports bound
by the API, plugged as os-vif would, ACTIVE, and pinging each other across the nodes; dvr's
flows on br-int untouched; an agent restarted without losing the path; nothing left after."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from dvr.lab.netlink import Netns, ensure_namespace
from dvr.neutron import l2agent
from dvr.neutron.service import Neutron, ensure_venv
from tests.lab.harness import dvr, leftovers, unique_prefix

NODES = ("compute1", "compute2")
VMS = {"l2a": "compute1", "l2b": "compute2"}
VLAN = 101
CIDR = "10.50.0.0/24"
STATS = re.compile(r"\b(duration|n_packets|n_bytes|idle_age|hard_age|idle_timeout)=[^,\s]+,?\s*")


def _call(url: str, method: str = "GET", body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              "Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert reply.status in (200, 201, 204), (method, url, reply.status)
        raw = reply.read()
        return json.loads(raw) if raw else None


def _ovs(prefix: str, node: str, *cmd: str) -> str:
    d = f"/run/{prefix}-lab/nodes/{node}"
    env = {**os.environ, "OVS_RUNDIR": d, "OVS_DBDIR": d, "OVS_LOGDIR": d}
    res = subprocess.run(["ip", "netns", "exec", f"{prefix}-n-{node}", *cmd], env=env,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, (cmd, res.stderr)
    return res.stdout


def _dvr_flows(prefix: str, node: str) -> list[str]:
    """br-int's flows without their counters: cookie, table, priority, match, actions."""
    out = _ovs(prefix, node, "ovs-ofctl", "-O", "OpenFlow13", "dump-flows", "br-int")
    flows = [STATS.sub("", line.strip()) for line in out.splitlines()
             if line.strip().startswith("cookie=")]
    return sorted(flows)


def _cookies(flows: list[str]) -> set[str]:
    return {line.split(",", 1)[0] for line in flows}


def _ping(ns: str, ip: str, count: int = 3) -> bool:
    res = subprocess.run(["ip", "netns", "exec", ns, "ping", "-n", "-c", str(count), "-i", "0.2",
                          "-W", "2", ip], capture_output=True, text=True, timeout=60)
    return res.returncode == 0


def _plug(prefix: str, name: str, node: str, port: dict[str, Any]) -> None:
    """A VM namespace on br-l2 of `node`, as Nova/os-vif plug one: a veth whose host end is
    an OVS port carrying the Neutron port's id, MAC and status."""
    vm_ns, node_ns = f"{prefix}-v-{name}", f"{prefix}-n-{node}"
    tap = f"tap{port['id']}"[:14]
    ensure_namespace(vm_ns)
    with Netns(node_ns) as n:
        n.add_veth(tap, "eth0", vm_ns)
        n.set_link(tap, up=True)
    with Netns(vm_ns) as vm:
        vm.up_loopback()
        vm.set_link("eth0", mac=port["mac_address"], up=True)
        vm.add_address("eth0", f"{port['fixed_ips'][0]['ip_address']}/24")
    for ns, dev in ((node_ns, tap), (vm_ns, "eth0")):
        subprocess.run(["ip", "netns", "exec", ns, "ethtool", "-K", dev, "tx", "off"],
                       capture_output=True, check=True)
    _ovs(prefix, node, "ovs-vsctl", "--timeout=20", "--", "--may-exist", "add-port",
         l2agent.INTEGRATION_BRIDGE, tap, "--", "set", "Interface", tap,
         f"external_ids:iface-id={port['id']}",
         f"external_ids:attached-mac={port['mac_address']}",
         "external_ids:iface-status=active", f"external_ids:vm-uuid={port['device_id']}")


def _rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def _ours_left(prefix: str, recorded: list[int]) -> list[str]:
    """Processes of this test still running: beam.smp, epmd, neutron-* naming the prefix, or
    any process recorded while the test ran."""
    found = []
    for pid in l2agent._all_pids():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if not l2agent.service._running(pid):
            continue
        if (f"/run/{prefix}-lab/" in cmd or f"dvr-{prefix}-ctl" in cmd) and any(
                word in cmd for word in ("beam.smp", "epmd", "neutron-", "privsep-helper")):
            found.append(f"{pid}: {cmd[:100]}")
        elif pid in recorded and (l2agent._comm(pid) == "epmd" or prefix in cmd):
            found.append(f"{pid} (recorded): {cmd[:100]}")
    return found


@pytest.mark.timeout(900)
def test_neutron_ovs_agent_beside_dvr() -> None:
    if not l2agent.RABBITMQ_SERVER.exists():
        pytest.skip(f"{l2agent.RABBITMQ_SERVER} missing (Debian: apt-get install rabbitmq-server)")
    if shutil.which("mariadbd") is None:
        pytest.skip("mariadbd is not installed (Debian: apt-get install mariadb-server)")
    venv = ensure_venv()
    prefix = unique_prefix()
    rundir = Path(f"/run/{prefix}-lab")
    ctl = l2agent.ctl_namespace(prefix)
    rabbit = l2agent.RabbitMQ(rundir / "rabbitmq", ctl, l2agent.CTL_ADDRESS)
    neutron: Neutron | None = None
    rpc: l2agent.RpcServer | None = None
    agents: dict[str, l2agent.OvsAgent] = {}
    recorded: list[int] = []
    timings: dict[str, float] = {}
    left_in_ctl: list[int] = []
    try:
        dvr("lab", "--prefix", prefix, "up", timeout=300)
        flows_before = {node: _dvr_flows(prefix, node) for node in NODES}
        assert all(flows_before.values()), flows_before
        br_int_ports = {node: _ovs(prefix, node, "ovs-vsctl", "list-ports", "br-int").split()
                        for node in NODES}

        assert l2agent.create_ctl_namespace(prefix) == ctl
        assert l2agent.create_ctl_namespace(prefix) == ctl  # idempotent
        t0 = time.monotonic()
        url = rabbit.start()
        timings["rabbitmq start"] = time.monotonic() - t0
        assert url == f"rabbit://guest:guest@{l2agent.CTL_ADDRESS}:5672/"
        pids = rabbit.pids()
        assert set(pids) == {"beam.smp", "epmd"}, pids
        recorded += pids.values()
        beam_cmd = Path(f"/proc/{pids['beam.smp']}/cmdline").read_bytes().decode(errors="replace")
        assert str(rabbit.workdir) in beam_cmd  # the lab's clean-up finds it
        for pid in pids.values():
            assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{ctl}").st_ino

        # the API stays on fake:// (it cannot reach the controller's namespace from here; with
        # an unreachable broker its port requests block); the agents table binds the ports
        neutron = Neutron(rundir / "neutron", f"unix:{rundir}/nb.sock", venv=venv,
                          mechanism_drivers=("openvswitch",), service_plugins=())
        api = f"{neutron.start()}/v2.0"
        rpc = l2agent.RpcServer(neutron, ctl, url)
        t0 = time.monotonic()
        rpc.start()
        timings["rpc-server start"] = time.monotonic() - t0
        assert rpc.alive() and len(rpc.pids()) >= 2, rpc.pids()
        recorded += rpc.pids()
        for pid in rpc.pids():
            assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{ctl}").st_ino

        for node in NODES:
            agents[node] = l2agent.OvsAgent(
                rundir / "nodes" / node / "neutron-ovs-agent", f"{prefix}-n-{node}", node,
                rundir / "nodes" / node / "db.sock", url, neutron)
            t0 = time.monotonic()
            agents[node].start()
            timings[f"ovs agent start {node}"] = time.monotonic() - t0
            recorded += agents[node].pids()
        listed = _call(f"{api}/agents?agent_type=Open%20vSwitch%20agent")["agents"]
        assert sorted((a["host"], a["alive"]) for a in listed) == [(n, True) for n in NODES]
        for a in listed:
            assert a["configurations"]["integration_bridge"] == "br-l2", a
            assert a["configurations"]["bridge_mappings"] == {"physnet1": "br-ex"}, a
            assert a["configurations"]["tunnel_types"] == [], a

        network = _call(f"{api}/networks", "POST", {"network": {
            "name": f"{prefix}-vlan", "provider:network_type": "vlan",
            "provider:physical_network": "physnet1", "provider:segmentation_id": VLAN}})["network"]
        assert network["provider:segmentation_id"] == VLAN
        _call(f"{api}/subnets", "POST", {"subnet": {
            "network_id": network["id"], "cidr": CIDR, "ip_version": 4}})
        ports = {}
        for name, node in VMS.items():
            t0 = time.monotonic()
            ports[name] = _call(f"{api}/ports", "POST", {"port": {
                "network_id": network["id"], "name": name, "binding:host_id": node,
                "device_owner": "compute:nova", "device_id": f"{prefix}-{name}"}})["port"]
            timings[f"port create {name}"] = time.monotonic() - t0
        for port in ports.values():
            assert port["binding:vif_type"] == "ovs", port
            assert port["binding:vif_details"]["bridge_name"] == "br-l2", port
            assert port["status"] == "DOWN", port

        t0 = time.monotonic()
        for name, node in VMS.items():
            _plug(prefix, name, node, ports[name])
        deadline = time.monotonic() + 60
        while True:
            status = {n: _call(f"{api}/ports/{p['id']}")["port"]["status"]
                      for n, p in ports.items()}
            if all(s == "ACTIVE" for s in status.values()):
                break
            assert time.monotonic() < deadline, f"ports not ACTIVE within 60 s: {status}"
            time.sleep(0.5)
        timings["ports ACTIVE after plugging"] = time.monotonic() - t0

        ip_b = ports["l2b"]["fixed_ips"][0]["ip_address"]
        ip_a = ports["l2a"]["fixed_ips"][0]["ip_address"]
        assert _ping(f"{prefix}-v-l2a", ip_b), "no reply from l2b across the nodes"
        assert _ping(f"{prefix}-v-l2b", ip_a), "no reply from l2a across the nodes"
        # across the provider segment, tagged with the network's VLAN
        provider = _ovs(prefix, "compute1", "ovs-ofctl", "dump-flows", "br-ex")
        assert f"mod_vlan_vid:{VLAN}" in provider, provider

        for node in NODES:
            after = _dvr_flows(prefix, node)
            assert _cookies(after) == _cookies(flows_before[node]), node
            assert len(after) == len(flows_before[node]), node
            assert after == flows_before[node], node
            bridges = _ovs(prefix, node, "ovs-vsctl", "list-br").split()
            assert {"br-int", "br-l2", "br-ex", "br-phy"} <= set(bridges), bridges
            # the VMs on br-l2, br-int as dvr left it
            assert _ovs(prefix, node, "ovs-vsctl", "list-ports", "br-int").split() == (
                br_int_ports[node])

        old = agents["compute1"].pids()
        t0 = time.monotonic()
        agents["compute1"].restart()
        timings["ovs agent restart compute1"] = time.monotonic() - t0
        assert not any(l2agent.service._running(pid) for pid in old
                       if pid not in agents["compute1"].pids()), old
        recorded += agents["compute1"].pids()
        assert _ping(f"{prefix}-v-l2a", ip_b), "no reply after restarting compute1's agent"
        time.sleep(3)  # past the restarted agent's first full sync (stale flows removed)
        assert _ping(f"{prefix}-v-l2a", ip_b), "no reply once compute1's agent resynced"
        assert _call(f"{api}/ports/{ports['l2a']['id']}")["port"]["status"] == "ACTIVE"
        assert _dvr_flows(prefix, "compute1") == flows_before["compute1"]

        memory = {
            "rabbitmq": _rss_mb(list(rabbit.pids().values())),
            "rpc-server": _rss_mb(rpc.pids()),
            **{f"ovs agent {n} (+privsep)": _rss_mb(a.pids()) for n, a in agents.items()},
        }
        print("timings (s):", {k: round(v, 2) for k, v in timings.items()})
        print("memory (MB RSS):", {k: round(v) for k, v in memory.items()})
    finally:
        for agent in agents.values():
            agent.stop()
        if rpc is not None:
            rpc.stop()
        rabbit.stop()
        if neutron is not None:
            neutron.stop()
        left_in_ctl = l2agent.processes_in(ctl)
        l2agent.delete_ctl_namespace(prefix)
        dvr("lab", "--prefix", prefix, "down", check=False, timeout=300)
    assert left_in_ctl == [], f"processes left in {ctl} after stop(): {left_in_ctl}"
    assert ctl not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                     text=True).stdout
    assert _ours_left(prefix, recorded) == []
    assert leftovers(prefix) == []
