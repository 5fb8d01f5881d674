"""Neutron drives dvr: a real Neutron API (MariaDB, the dvr ML2 driver and L3 plugin) on the
lab's northbound database, driven through openstacksdk as operators' tools do, and real
packets checking what each API call did."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from tests.lab.harness import (
    TOPOLOGIES,
    LabHandle,
    echo_requests,
    ext_ping,
    neutron_cloud,
    running_lab,
)

REMOTE = "198.51.100.10"
FIP = "203.0.113.50"
R1_EXT = "203.0.113.10"

pytestmark = pytest.mark.skipif(shutil.which("mariadbd") is None,
                                reason="mariadb-server is not installed")


@pytest.fixture(scope="module")
def lab() -> Iterator[LabHandle]:
    with running_lab(TOPOLOGIES / "neutron.yaml", "--neutron", "--timeout", "600") as handle:
        yield handle


@pytest.fixture(scope="module")
def cloud(lab: LabHandle) -> Any:
    return neutron_cloud(lab)


def until(what: str, check: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.1)


def port(cloud: Any, name: str) -> Any:
    return next(cloud.network.ports(name=name))


def nb_doc(lab: LabHandle) -> dict[str, Any]:
    return yaml.safe_load(lab.dvr_nb("dump").stdout)


def converged(lab: LabHandle) -> bool:
    st = lab.status()
    return all(n["agent"]["converged"] for n in st["nodes"].values())


def test_ports_and_floating_ip_active_and_dvr_agents_listed(lab: LabHandle, cloud: Any) -> None:
    for vm, host in (("vm1", "compute1"), ("vm2", "compute2"), ("vm3", "compute2")):
        until(f"{vm} ACTIVE", lambda vm=vm: port(cloud, vm).status == "ACTIVE")
        p = port(cloud, vm)
        assert p.binding_host_id == host and p.binding_vif_type == "ovs"
        assert p.binding_vif_details["bridge_name"] == "br-int"
    fip = next(cloud.network.ips(floating_ip_address=FIP))
    until("floating IP ACTIVE", lambda: cloud.network.get_ip(fip.id).status == "ACTIVE")
    agents = {a.host: a for a in cloud.network.agents()}
    assert set(agents) == {"compute1", "compute2", "net1"}
    assert all(a.agent_type == "dvr agent" and a.is_alive for a in agents.values())
    # the northbound holds Neutron's ids, and its revision numbers
    doc = nb_doc(lab)
    p1 = port(cloud, "vm1")
    assert doc["vms"][p1.id]["external_ids"]["neutron:revision_number"] == str(
        p1.revision_number)
    assert doc["networks"][p1.network_id]["vni"] == cloud.network.get_network(
        p1.network_id).provider_segmentation_id
    # and after all that (bindings, status changes), the two databases agree
    res = _sync(lab, "log")
    assert res.returncode == 0 and "; 0 differences;" in res.stdout, res.stdout


def test_trace_by_the_lab_names_verified_by_a_real_packet(lab: LabHandle, cloud: Any) -> None:
    from dvr.lab.lab import Lab
    from dvr.trace.live import LiveTracer

    tracer = LiveTracer(Lab(lab.prefix))
    vm1, vm2 = port(cloud, "vm1").id, port(cloud, "vm2").id
    report = tracer.trace(Lab(lab.prefix).vm_id("vm1"), "icmp, ip.dst=10.2.0.12")
    assert report.sender == vm1
    assert [(o.kind, o.to) for o in report.outcomes] == [("delivered", vm2)]
    assert tracer.verify(report) == []
    from tests.lab.harness import dvr

    out = dvr("trace", "--prefix", lab.prefix, "vm1", "icmp, ip.dst=10.2.0.12").stdout
    assert vm2 in out


def test_east_west_routed_on_the_source_node(lab: LabHandle) -> None:
    with lab.sniff(lab.vm_ns("vm2"), proto="icmp") as cap:
        assert lab.ping("vm1", "10.2.0.12", count=2)
    requests = echo_requests(cap.packets)
    assert requests and all(p["ttl"] == 63 for p in requests)
    assert {p["src"] for p in requests} == {"10.1.0.11"}


def test_floating_ip_from_the_external_host_and_snat_out(lab: LabHandle) -> None:
    with lab.sniff(lab.vm_ns("vm1"), proto="icmp", host=REMOTE) as cap:
        assert ext_ping(lab, FIP, source=REMOTE)
    assert {(p["src"], p["dst"]) for p in echo_requests(cap.packets)} == {(REMOTE, "10.1.0.11")}
    with lab.sniff(f"{lab.prefix}-ext", "ext0", proto="icmp", host=REMOTE) as ext_cap:
        assert lab.ping("vm2", REMOTE, count=2)
    assert {p["src"] for p in echo_requests(ext_cap.packets)} == {R1_EXT}


def test_floating_ip_moved_with_the_api_and_traffic_follows(lab: LabHandle, cloud: Any) -> None:
    fip = next(cloud.network.ips(floating_ip_address=FIP))
    vm3 = port(cloud, "vm3")
    cloud.network.update_ip(fip, port_id=vm3.id)
    until("the floating IP on vm3", lambda: nb_doc(lab)["vms"][vm3.id].get("floating_ip") == FIP)
    until("agents converged", lambda: converged(lab))
    with lab.sniff(lab.vm_ns("vm3"), proto="icmp", host=REMOTE) as cap:
        assert ext_ping(lab, FIP, source=REMOTE)
    assert {p["dst"] for p in echo_requests(cap.packets)} == {"10.1.0.13"}
    until("floating IP ACTIVE again", lambda: cloud.network.get_ip(fip.id).status == "ACTIVE")
    cloud.network.update_ip(fip, port_id=port(cloud, "vm1").id)  # back where it was
    until("the floating IP back on vm1", lambda: ext_ping(lab, FIP, count=1, wait=1))


def test_a_port_unplugged_turns_down_and_plugged_again_active(lab: LabHandle,
                                                              cloud: Any) -> None:
    """The VIF leaves br-int (the VM stopped): the agent stops reporting it wired and Neutron
    shows the port DOWN; plugged again, ACTIVE, and the VM reachable again."""
    p = port(cloud, "vm3")
    lab.node("compute2", "ovs-vsctl", "--timeout=20", "del-port", "br-int", "tapvm3")
    until("vm3 DOWN", lambda: cloud.network.get_port(p.id).status == "DOWN")
    assert not lab.ping("vm1", "10.1.0.13", wait=1)
    lab.node("compute2", "ovs-vsctl", "--timeout=20", "add-port", "br-int", "tapvm3", "--",
             "set", "Interface", "tapvm3", f"external_ids:iface-id={p.id}",
             f"external_ids:attached-mac={p.mac_address}", "external_ids:iface-status=active")
    until("vm3 ACTIVE", lambda: cloud.network.get_port(p.id).status == "ACTIVE")
    until("vm3 reachable", lambda: lab.ping("vm1", "10.1.0.13", wait=1))


def test_a_stale_update_is_refused(lab: LabHandle, cloud: Any) -> None:
    """A northbound entry newer than Neutron's update (a higher revision, as a late or
    replayed event would meet) is not overwritten; the sync names the difference and the
    repair puts Neutron's state back."""
    p = port(cloud, "vm3")
    doc = nb_doc(lab)
    entry = doc["vms"][p.id]
    entry["external_ids"]["neutron:revision_number"] = "1000"
    entry["ip"] = "10.1.0.99"
    path = lab.rundir / "stale.yaml"  # written whole, as a newer writer would
    path.write_text(yaml.safe_dump(doc))
    lab.dvr_nb("load", str(path))
    cloud.network.update_port(p, name="vm3")  # a new revision, far below 1000
    time.sleep(1.0)
    held = nb_doc(lab)["vms"][p.id]
    assert held["ip"] == "10.1.0.99", "a stale update overwrote a newer entry"
    res = _sync(lab, "log")
    assert res.returncode == 1 and f"vms.{p.id}: differs: external_ids, ip" in res.stdout
    assert _sync(lab, "repair").returncode == 0
    assert nb_doc(lab)["vms"][p.id]["ip"] == "10.1.0.13"
    assert _sync(lab, "log").returncode == 0
    until("agents converged", lambda: converged(lab))
    assert lab.ping("vm1", "10.1.0.13")


def _sync(lab: LabHandle, mode: str) -> Any:
    from tests.lab.harness import dvr

    return dvr("neutron-sync", "--prefix", lab.prefix, "--mode", mode, check=False)


def test_drift_found_by_the_sync_and_repaired(lab: LabHandle, cloud: Any) -> None:
    router = next(cloud.network.routers(name="r1"))
    red = next(cloud.network.networks(name="red"))
    lab.dvr_nb("router-if-del", router.id, red.id)  # behind Neutron's back
    until("red unreachable from blue", lambda: not lab.ping("vm1", "10.2.0.12", wait=1))
    res = _sync(lab, "log")
    assert res.returncode == 1
    assert f"routers.{router.id}: differs: interfaces" in res.stdout
    assert red.id not in nb_doc(lab)["routers"][router.id]["interfaces"], "log mode wrote"
    assert _sync(lab, "repair").returncode == 0
    until("red reachable again", lambda: lab.ping("vm1", "10.2.0.12", wait=1))
    assert _sync(lab, "log").returncode == 0


def test_a_change_made_while_the_northbound_is_down_is_not_lost(lab: LabHandle,
                                                                 cloud: Any) -> None:
    """The floating IP moved while the northbound database is down: Neutron answers, the
    driver remembers the lost write, and repairs once the database is back."""
    fip = next(cloud.network.ips(floating_ip_address=FIP))
    vm1, vm3 = port(cloud, "vm1"), port(cloud, "vm3")
    lab.dvr("kill-nb")
    try:
        cloud.network.update_ip(fip, port_id=vm3.id)
    finally:
        lab.dvr("start-nb")
    until("the move written by the repair",
          lambda: nb_doc(lab)["vms"][vm3.id].get("floating_ip") == FIP, timeout=30)
    until("agents converged", lambda: converged(lab))
    with lab.sniff(lab.vm_ns("vm3"), proto="icmp", host=REMOTE) as cap:
        assert ext_ping(lab, FIP, source=REMOTE)
    assert {p["dst"] for p in echo_requests(cap.packets)} == {"10.1.0.13"}
    cloud.network.update_ip(fip, port_id=vm1.id)
    until("the floating IP back on vm1",
          lambda: nb_doc(lab)["vms"][vm1.id].get("floating_ip") == FIP)


def test_neutron_restarted_changes_nothing(lab: LabHandle, cloud: Any) -> None:
    """neutron-server restarted mid-scenario: its repair at start finds nothing to do, the
    desired state keeps its generation, traffic flows on, and the API serves again."""
    generation = lab.status()["generation"]
    ping = lab.background(lab.ns("vm1"), "ping", "10.2.0.12", "300", "0.02")
    lab.dvr("restart-neutron")
    assert next(cloud.network.ips(floating_ip_address=FIP)).status == "ACTIVE"
    time.sleep(2)  # the new worker's status thread has looked, and repaired (nothing)
    res = lab.result(ping)
    assert res["received"] == res["sent"], f"traffic lost while Neutron restarted: {res}"
    assert lab.status()["generation"] == generation, "the restart changed the desired state"
    assert "0 differences repaired" in (lab.rundir / "neutron" / "neutron-api.log"
                                        ).read_text().rsplit("dvr mechanism driver", 1)[-1]


def test_bad_requests_get_neutrons_errors_and_write_nothing(lab: LabHandle, cloud: Any) -> None:
    import openstack

    before = lab.dvr_nb("dump").stdout
    lone = cloud.network.create_network(name="lone")
    cloud.network.create_subnet(network_id=lone.id, ip_version=4, cidr="10.9.0.0/24",
                                name="lone-v4")
    lp = cloud.network.create_port(network_id=lone.id, name="lonely",
                                   binding_host_id="compute1", device_owner="compute:nova")
    public = next(cloud.network.networks(name="public"))
    with pytest.raises(openstack.exceptions.HttpException) as info:
        cloud.network.create_ip(floating_network_id=public.id, port_id=lp.id)
    assert info.value.status_code in (400, 404)  # Neutron: the external network is unreachable
    # a port on a host without a dvr agent: Neutron's binding failure
    nowhere = cloud.network.create_port(network_id=lone.id, name="nowhere",
                                        binding_host_id="compute9", device_owner="compute:nova")
    assert cloud.network.get_port(nowhere.id).binding_vif_type == "binding_failed"
    # a second IPv4 subnet on a dvr network
    with pytest.raises(openstack.exceptions.BadRequestException):
        cloud.network.create_subnet(network_id=lone.id, ip_version=4, cidr="10.9.1.0/24")
    doc = nb_doc(lab)
    assert nowhere.id not in doc["vms"]
    for p in (lp, nowhere):
        cloud.network.delete_port(p)
    cloud.network.delete_network(lone)
    until("the northbound as before", lambda: lab.dvr_nb("dump").stdout == before)


def test_router_interface_removed_then_everything_deleted(lab: LabHandle, cloud: Any) -> None:
    router = next(cloud.network.routers(name="r1"))
    red_subnet = next(cloud.network.subnets(name="red-v4"))
    cloud.network.remove_interface_from_router(router, subnet=red_subnet.id)
    until("east-west to red stops", lambda: not lab.ping("vm1", "10.2.0.12", wait=1))
    macs = {port(cloud, v).mac_address for v in ("vm1", "vm2", "vm3")}
    for fip in list(cloud.network.ips()):
        cloud.network.delete_ip(fip)
    for vm in ("vm1", "vm2", "vm3"):
        cloud.network.delete_port(port(cloud, vm))
    blue_subnet = next(cloud.network.subnets(name="blue-v4"))
    cloud.network.remove_interface_from_router(router, subnet=blue_subnet.id)
    cloud.network.update_router(router, external_gateway_info={})
    cloud.network.delete_router(router)
    for name in ("blue", "red"):
        cloud.network.delete_network(next(cloud.network.networks(name=name)))
    doc = until("the northbound emptied", lambda: (lambda d: d if not d["vms"] and not
                                                   d["networks"] and not d["routers"]
                                                   else None)(nb_doc(lab)))
    assert set(doc["nodes"]) == {"compute1", "compute2", "net1"}
    until("agents converged", lambda: converged(lab))
    for node in ("compute1", "compute2", "net1"):
        flows = lab.node(node, "ovs-ofctl", "-O", "OpenFlow15", "dump-flows", "br-int")
        for mac in macs:
            assert mac not in flows, f"{node} keeps a flow of a deleted port ({mac})"
        for addr in ("10.1.0.", "10.2.0.", FIP, R1_EXT):
            assert addr not in flows, f"{node} keeps a flow of a deleted object ({addr})"
