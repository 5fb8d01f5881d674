"""Neutron's resources as dvr's desired state (dvr.neutron.translate: pure, no Neutron)."""

from __future__ import annotations

import copy
import uuid

import pytest

from dvr.neutron import translate as tr
from flows.model import build_topology
from flows.northbound import generation_of

NODES = {"compute1": {"role": "compute"}, "compute2": {"role": "compute"},
         "net1": {"role": "network"}}


def uid(label: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, label))


def network(name: str, vni: int, rev: int = 1, **more):
    return {"id": uid(name), "name": name, "mtu": 1450, "revision_number": rev,
            "provider:network_type": "vxlan", "provider:segmentation_id": vni, **more}


def subnet(net: str, cidr: str, gw: str, version: int = 4, rev: int = 0):
    return {"id": uid(f"{net}-{cidr}"), "network_id": uid(net), "cidr": cidr,
            "gateway_ip": gw, "ip_version": version, "revision_number": rev}


def port(name: str, net: str, ip: str, host: str | None = "compute1",
         owner: str = "compute:nova", rev: int = 3, device: str = ""):
    return {"id": uid(name), "name": name, "network_id": uid(net), "revision_number": rev,
            "mac_address": "FA:16:3E:00:00:%02x" % (sum(map(ord, name)) % 256),
            "fixed_ips": [{"subnet_id": "s", "ip_address": ip}], "device_owner": owner,
            "device_id": device, "binding:host_id": host or ""}


def cloud() -> tr.NeutronState:
    r1 = {"id": uid("r1"), "name": "r1", "revision_number": 5,
          "external_gateway_info": {"network_id": uid("public"), "enable_snat": True,
                                    "external_fixed_ips": [{"ip_address": "203.0.113.10"}]}}
    return tr.NeutronState(
        networks=[network("blue", 1001), network("red", 1002),
                  {"id": uid("public"), "name": "public", "router:external": True,
                   "provider:network_type": "flat"}],
        subnets=[subnet("blue", "10.1.0.0/24", "10.1.0.1"),
                 subnet("red", "10.2.0.0/24", "10.2.0.1"),
                 subnet("red", "fd00::/64", "fd00::1", version=6),
                 subnet("public", "203.0.113.0/24", "203.0.113.1")],
        ports=[port("vm1", "blue", "10.1.0.11"), port("vm2", "red", "10.2.0.12", "compute2"),
               port("ri-blue", "blue", "10.1.0.254", None, "network:router_interface",
                    device=uid("r1")),
               port("ri-red", "red", "10.2.0.1", None, "network:router_interface",
                    device=uid("r1")),
               port("dhcp", "blue", "10.1.0.2", "net1", "network:dhcp"),
               port("unbound", "blue", "10.1.0.30", None)],
        routers=[r1],
        floating_ips=[{"id": uid("fip1"), "floating_ip_address": "203.0.113.50",
                       "port_id": uid("vm1"), "revision_number": 2}])


def test_a_cloud_becomes_a_valid_dvr_topology_keyed_by_neutron_ids():
    doc = tr.desired(cloud(), NODES)
    topo = build_topology(copy.deepcopy(doc))
    blue, red, r1 = uid("blue"), uid("red"), uid("r1")
    assert set(topo.networks) == {blue, red}
    assert topo.networks[blue].vni == 1001  # Neutron's segmentation id
    # the router's address on a network is its gateway (Neutron may give it any address)
    assert str(topo.networks[blue].gateway_ip) == "10.1.0.254"
    assert str(topo.networks[red].gateway_ip) == "10.2.0.1"
    assert set(topo.vms) == {uid("vm1"), uid("vm2")}  # not DHCP, not unbound
    vm1 = topo.vms[uid("vm1")]
    assert vm1.port_id == uid("vm1") and vm1.node == "compute1"
    assert str(vm1.floating_ip) == "203.0.113.50" and vm1.mac == vm1.mac.lower()
    assert str(topo.external.cidr) == "203.0.113.0/24"
    assert {i.network for i in topo.routers[r1].interfaces} == {blue, red}
    assert str(topo.routers[r1].external_ip) == "203.0.113.10"
    assert topo.routers[r1].snat_nodes == ("net1",)  # the registered network nodes
    assert doc["routers"][r1]["snat_nodes"] == []
    assert doc["vms"][uid("vm1")]["external_ids"][tr.REVISION] == "3"
    assert doc["vms"][uid("vm1")]["external_ids"]["neutron:fip_revision"] == "2"


def test_what_is_not_dvrs_is_left_out():
    assert tr.network_entry({**network("v", 5), "provider:network_type": "vlan"},
                            [subnet("v", "10.9.0.0/24", "10.9.0.1")]) is None
    assert tr.network_entry(network("v6", 7), [subnet("v6", "fd01::/64", "fd01::1", 6)]) is None
    assert tr.vm_entry(port("x", "blue", "10.1.0.5", "net1"), nodes=NODES) is None
    assert tr.vm_entry(port("x", "blue", "10.1.0.5", "elsewhere"), nodes=NODES) is None
    assert tr.vm_entry(port("x", "blue", "10.1.0.5"), nodes=NODES)["node"] == "compute1"


def test_a_router_without_gateway_has_no_snat():
    entry = tr.router_entry({"id": "r", "external_gateway_info": None}, ["a"])
    assert entry["interfaces"] == ["a"] and "external_gateway" not in entry
    no_snat = tr.router_entry({"id": "r", "external_gateway_info": {
        "enable_snat": False, "external_fixed_ips": [{"ip_address": "203.0.113.9"}]}}, [])
    assert "external_gateway" not in no_snat


def test_a_stale_entry_is_refused_a_newer_or_equal_one_taken():
    doc = tr.desired(cloud(), NODES)
    vm1 = uid("vm1")
    old = tr.vm_entry(port("vm1", "blue", "10.1.0.99", rev=2), nodes=NODES)
    before = copy.deepcopy(doc)
    with pytest.raises(tr.Stale, match="revision_number 2 is older than the 3 held"):
        tr.put(doc, "vms", vm1, old)
    assert doc == before
    newer = tr.vm_entry(port("vm1", "blue", "10.1.0.99", rev=4), nodes=NODES)
    assert tr.put(doc, "vms", vm1, newer) is True
    assert doc["vms"][vm1]["ip"] == "10.1.0.99"
    assert tr.put(doc, "vms", vm1, newer) is False  # the same again: nothing changes
    assert tr.put(doc, "vms", vm1, None) is True and vm1 not in doc["vms"]


def test_differences_name_each_drift_and_repair_removes_them():
    want = tr.desired(cloud(), NODES)
    held = copy.deepcopy(want)
    del held["vms"][uid("vm2")]                      # deleted by hand in the northbound
    held["vms"]["0c2b3a4d-0000-4000-8000-000000000001"] = dict(want["vms"][uid("vm1")],
                                                               ip="10.1.0.77")  # a leftover
    held["networks"][uid("red")]["mtu"] = 1400       # changed behind Neutron's back
    held["routers"][uid("r1")]["snat_nodes"] = []
    diffs = {str(d) for d in tr.differences(want, held)}
    assert diffs == {
        f"vms.{uid('vm2')}: in Neutron, missing from the northbound",
        "vms.0c2b3a4d-0000-4000-8000-000000000001: in the northbound, not in Neutron",
        f"networks.{uid('red')}: differs: mtu"}
    fixed = tr.repaired(want, held)
    assert tr.differences(want, fixed) == []
    assert fixed["nodes"] == held["nodes"]
    build_topology(copy.deepcopy(fixed))
    assert generation_of(fixed) == generation_of(tr.repaired(want, fixed))  # idempotent


def test_an_explicit_snat_candidacy_is_kept_by_the_repair():
    want = tr.desired(cloud(), NODES)
    held = copy.deepcopy(want)
    held["routers"][uid("r1")]["snat_nodes"] = ["net1"]
    assert tr.differences(want, held) == [
        tr.Difference("routers", uid("r1"), "different", "snat_nodes")]


def test_the_provider_network_is_neutrons_only_once_it_has_an_external_network():
    state = cloud()
    state.networks = [n for n in state.networks if not n.get("router:external")]
    state.routers[0]["external_gateway_info"] = None
    state.floating_ips = []
    want = tr.desired(state, NODES)
    held = copy.deepcopy(want)
    held["external"] = {"cidr": "203.0.113.0/24", "gateway_ip": "203.0.113.1",
                        "remote_ip": "198.51.100.10", "gateway_mac": "02:00:00:00:00:01"}
    assert tr.differences(want, held) == []
    assert tr.repaired(want, held)["external"] == held["external"]
    with_ext = tr.desired(cloud(), NODES, held["external"])
    assert with_ext["external"]["gateway_mac"] == "02:00:00:00:00:01"  # the operator's, kept
    assert tr.differences(with_ext, held) != []  # routers and VMs now differ, not external
    assert all(d.section != "external" for d in tr.differences(with_ext, held))
