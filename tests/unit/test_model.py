"""Unit tests of flows.model: the topology file's rules, allocation and helpers."""

from __future__ import annotations

import copy
import ipaddress
import uuid
from pathlib import Path

import pytest
import yaml

import dvr
from flows.model import (
    MAX_VNI,
    ROUTER_KEY_BASE,
    Topology,
    TopologyError,
    build_topology,
    load_topology,
    parse_topology,
    port_id_for,
    to_dict,
)

DELETE = object()

BASE = {
    "nodes": {
        "compute1": {"role": "compute"},
        "compute2": {"role": "compute"},
        "net1": {"role": "network"},
        "net2": {"role": "network"},
    },
    "external": {"cidr": "203.0.113.0/24", "gateway_ip": "203.0.113.1"},
    "networks": {
        "blue": {"cidr": "10.1.0.0/24"},
        "red": {"cidr": "10.2.0.0/24"},
        "green": {"cidr": "10.3.0.0/24"},
    },
    "routers": {
        "r1": {"interfaces": ["blue", "red"], "external_gateway": True},
        "r2": {"interfaces": ["green"]},
    },
    "vms": {
        "vm1": {
            "node": "compute1",
            "network": "blue",
            "ip": "10.1.0.11",
            "floating_ip": "203.0.113.50",
        },
        "vm2": {"node": "compute2", "network": "red"},
    },
}


def base() -> dict:
    return copy.deepcopy(BASE)


def edit(data: dict, changes: dict) -> dict:
    """Apply {"a.b.c": value} changes (DELETE removes the key) to a copy of `data`."""
    data = copy.deepcopy(data)
    for path, value in changes.items():
        *parents, last = path.split(".")
        d = data
        for p in parents:
            d = d.setdefault(p, {})
        if value is DELETE:
            del d[last]
        else:
            d[last] = value
    return data


def write(tmp_path: Path, data: dict | str, name: str = "topo.yaml") -> Path:
    path = tmp_path / name
    text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
    path.write_text(text)
    return path


def load(tmp_path: Path, data: dict | str, name: str = "topo.yaml") -> Topology:
    return load_topology(write(tmp_path, data, name))


def rejected(
    tmp_path: Path, data: dict | str, key: str, fragment: str = "", only: bool = True
) -> TopologyError:
    """Load `data` from a file, expect `key` among the errors; check the message format."""
    path = write(tmp_path, data)
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    exc = info.value
    reasons = [r for k, r in exc.errors if k == key]
    assert reasons, exc.errors
    assert any(fragment in r for r in reasons), (key, reasons)
    reason = reasons[0]
    assert reason
    if only:
        assert exc.errors == [(key, reason)]
        assert str(exc) == f"{path}: {key}: {reason}"
    msg = str(exc)
    assert msg.startswith(f"{path}: ")
    first_key, first_reason = exc.errors[0]
    assert first_key in msg and first_reason in msg
    assert exc.source == str(path)
    return exc


# ---------------------------------------------------------------------------------------------
# The base file itself is valid


def test_base_topology_loads(tmp_path):
    topo = load(tmp_path, base())
    assert set(topo.nodes) == {"compute1", "compute2", "net1", "net2"}
    assert set(topo.networks) == {"blue", "red", "green"}
    assert set(topo.routers) == {"r1", "r2"}
    assert set(topo.vms) == {"vm1", "vm2"}
    assert topo.source == str(tmp_path / "topo.yaml")
    assert topo.vms["vm1"].ip == ipaddress.IPv4Address("10.1.0.11")
    assert topo.vms["vm1"].floating_ip == ipaddress.IPv4Address("203.0.113.50")
    assert topo.vms["vm2"].floating_ip is None
    assert topo.routers["r1"].external_gateway
    assert topo.routers["r1"].snat_nodes == ("net1", "net2")  # default: all network nodes
    assert not topo.routers["r2"].external_gateway
    assert topo.routers["r2"].external_ip is None
    assert topo.routers["r2"].external_mac is None
    assert topo.routers["r2"].snat_nodes == ()
    assert topo.external.remote_ip == ipaddress.IPv4Address("198.51.100.10")


def test_defaults_for_networks(tmp_path):
    topo = load(tmp_path, base())
    blue = topo.networks["blue"]
    assert blue.gateway_ip == ipaddress.IPv4Address("10.1.0.1")
    assert blue.mtu == 1450
    itf = topo.routers["r1"].interface_on("blue")
    assert itf is not None and itf.ip == blue.gateway_ip
    assert topo.routers["r1"].interface_on("green") is None


def test_explicit_values_are_honoured(tmp_path):
    data = edit(base(), {
        "nodes.compute1.tunnel_ip": "192.0.2.11",
        "external.remote_ip": "192.0.2.200",
        "networks.blue.gateway_ip": "10.1.0.254",
        "networks.blue.mtu": 1400,
        "networks.blue.vni": 4242,
        "routers.r1.external_ip": "203.0.113.10",
        "routers.r1.snat_nodes": ["net2", "net1"],
        "vms.vm2.ip": "10.2.0.12",
        "vms.vm2.mac": "FA:16:3E:12:34:56",
    })
    topo = load(tmp_path, data)
    assert topo.nodes["compute1"].tunnel_ip == ipaddress.IPv4Address("192.0.2.11")
    assert topo.external.remote_ip == ipaddress.IPv4Address("192.0.2.200")
    blue = topo.networks["blue"]
    assert (str(blue.gateway_ip), blue.mtu, blue.vni) == ("10.1.0.254", 1400, 4242)
    assert topo.routers["r1"].interface_on("blue").ip == blue.gateway_ip
    assert topo.routers["r1"].external_ip == ipaddress.IPv4Address("203.0.113.10")
    assert topo.routers["r1"].snat_nodes == ("net2", "net1")
    assert str(topo.vms["vm2"].ip) == "10.2.0.12"
    assert topo.vms["vm2"].mac == "fa:16:3e:12:34:56"  # normalised to lower case


def test_node_role_defaults_to_compute(tmp_path):
    topo = load(tmp_path, edit(base(), {"nodes.compute2": {}}))
    assert topo.nodes["compute2"].role == "compute"
    assert [n.name for n in topo.network_nodes()] == ["net1", "net2"]
    assert [n.index for n in topo.nodes.values()] == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------
# Every rule: key path and reason


def test_vm_on_unknown_node(tmp_path):
    rejected(tmp_path, edit(base(), {"vms.vm2.node": "compute9"}), "vms.vm2.node",
             "unknown node 'compute9'")


def test_vm_without_node(tmp_path):
    rejected(tmp_path, edit(base(), {"vms.vm2.node": DELETE}), "vms.vm2.node", "required")


def test_vm_on_network_node(tmp_path):
    rejected(tmp_path, edit(base(), {"vms.vm2.node": "net1"}), "vms.vm2.node", "network node")


def test_vm_on_unknown_network(tmp_path):
    rejected(tmp_path, edit(base(), {"vms.vm2.network": "pink"}), "vms.vm2.network",
             "unknown network 'pink'")


def test_vm_without_network(tmp_path):
    rejected(tmp_path, edit(base(), {"vms.vm2.network": DELETE}), "vms.vm2.network",
             "required")


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("10.1.0.12", "outside network red 10.2.0.0/24"),
        ("10.2.0.1", "gateway_ip of network red"),
        ("10.2.0.0", "network or broadcast address"),
        ("10.2.0.255", "network or broadcast address"),
        ("10.2.0.300", "not an IPv4 address"),
        ("banana", "not an IPv4 address"),
    ],
    ids=["outside-cidr", "gateway", "network-address", "broadcast", "bad-octet", "garbage"],
)
def test_vm_ip_rules(tmp_path, value, fragment):
    rejected(tmp_path, edit(base(), {"vms.vm2.ip": value}), "vms.vm2.ip", fragment)


def test_vm_ip_equal_to_custom_gateway(tmp_path):
    data = edit(base(), {"networks.red.gateway_ip": "10.2.0.254", "vms.vm2.ip": "10.2.0.254"})
    rejected(tmp_path, data, "vms.vm2.ip", "gateway_ip")
    # the default gateway address is then an ordinary host
    topo = load(tmp_path, edit(data, {"vms.vm2.ip": "10.2.0.1"}))
    assert str(topo.vms["vm2"].ip) == "10.2.0.1"


def test_duplicate_ip_within_a_network(tmp_path):
    data = edit(base(), {
        "vms.vm2.ip": "10.2.0.12",
        "vms.vm3": {"node": "compute1", "network": "red", "ip": "10.2.0.12"},
    })
    rejected(tmp_path, data, "vms.vm3.ip", "already used by vms.vm2")


def test_same_ip_on_two_networks_is_fine(tmp_path):
    # green overlaps blue, but they share no router
    data = edit(base(), {
        "networks.green.cidr": "10.1.0.0/24",
        "vms.vm3": {"node": "compute2", "network": "green", "ip": "10.1.0.11"},
    })
    topo = load(tmp_path, data)
    assert topo.vms["vm1"].ip == topo.vms["vm3"].ip
    assert topo.vms["vm1"].network != topo.vms["vm3"].network


def test_duplicate_mac(tmp_path):
    data = edit(base(), {"vms.vm1.mac": "fa:16:3e:00:00:01", "vms.vm2.mac": "FA:16:3E:00:00:01"})
    rejected(tmp_path, data, "vms.vm2.mac", "already used by vms.vm1")


@pytest.mark.parametrize(
    "mac",
    [
        "fa:16:3e:00:00",
        "fa:16:3e:00:00:01:02",
        "fa-16-3e-00-00-01",
        "fa:16:3e:00:00:0g",
        "fa163e000001",
        "fa:16:3e:00:00:01\n",
        "01:00:5e:00:00:01",
        "ff:ff:ff:ff:ff:ff",
        "33:33:00:00:00:01",
    ],
    ids=["short", "long", "dashes", "not-hex", "no-colons", "trailing-newline",
         "multicast", "broadcast", "ipv6-multicast"],
)
def test_malformed_or_multicast_mac(tmp_path, mac):
    rejected(tmp_path, edit(base(), {"vms.vm2.mac": mac}), "vms.vm2.mac",
             "not a unicast MAC address")


def test_floating_ip_outside_external_cidr(tmp_path):
    rejected(tmp_path, edit(base(), {"vms.vm1.floating_ip": "198.51.100.50"}),
             "vms.vm1.floating_ip", "outside external.cidr 203.0.113.0/24")


@pytest.mark.parametrize("fip", ["203.0.113.0", "203.0.113.255"])
def test_floating_ip_network_or_broadcast(tmp_path, fip):
    rejected(tmp_path, edit(base(), {"vms.vm1.floating_ip": fip}), "vms.vm1.floating_ip",
             "network or broadcast")


def test_floating_ip_not_an_address(tmp_path):
    rejected(tmp_path, edit(base(), {"vms.vm1.floating_ip": "nope"}), "vms.vm1.floating_ip",
             "not an IPv4 address")


def test_floating_ip_given_twice(tmp_path):
    data = edit(base(), {"vms.vm2.floating_ip": "203.0.113.50"})
    rejected(tmp_path, data, "vms.vm2.floating_ip", "already the floating IP of vms.vm1")


def test_floating_ip_equal_to_external_gateway(tmp_path):
    rejected(tmp_path, edit(base(), {"vms.vm1.floating_ip": "203.0.113.1"}),
             "vms.vm1.floating_ip", "external gateway_ip")


def test_floating_ip_on_router_without_external_gateway(tmp_path):
    data = edit(base(), {
        "vms.vm3": {"node": "compute1", "network": "green", "floating_ip": "203.0.113.51"},
    })
    rejected(tmp_path, data, "vms.vm3.floating_ip", "router r2 of network green has no "
             "external_gateway")


def test_floating_ip_on_router_with_external_gateway_false(tmp_path):
    data = edit(base(), {"routers.r1.external_gateway": False})
    rejected(tmp_path, data, "vms.vm1.floating_ip", "has no external_gateway")


def test_floating_ip_on_network_without_router(tmp_path):
    data = edit(base(), {
        "networks.lone": {"cidr": "10.9.0.0/24"},
        "vms.vm3": {"node": "compute1", "network": "lone", "floating_ip": "203.0.113.51"},
    })
    rejected(tmp_path, data, "vms.vm3.floating_ip", "network lone is on no router")


def test_floating_ip_without_external_section(tmp_path):
    data = edit(base(), {"external": DELETE, "routers.r1.external_gateway": DELETE})
    exc = rejected(tmp_path, data, "vms.vm1.floating_ip", "needs an `external:`", only=False)
    assert exc.keys()[0] == "vms.vm1.floating_ip"


def test_external_gateway_without_external_section(tmp_path):
    data = edit(base(), {"external": DELETE, "vms.vm1.floating_ip": DELETE})
    rejected(tmp_path, data, "routers.r1.external_gateway", "needs an `external:`")


def test_external_gateway_must_be_boolean(tmp_path):
    rejected(tmp_path, edit(base(), {"routers.r2.external_gateway": "yes"}),
             "routers.r2.external_gateway", "true or false")


def test_overlapping_cidrs_on_one_router(tmp_path):
    data = edit(base(), {
        "networks.sky": {"cidr": "10.1.0.0/16"},
        "routers.r1.interfaces": ["blue", "sky"],
    })
    rejected(tmp_path, data, "routers.r1.interfaces[1]", "overlaps blue 10.1.0.0/24")


def test_identical_cidrs_on_one_router(tmp_path):
    data = edit(base(), {"networks.red.cidr": "10.1.0.0/24", "vms.vm2.ip": "10.1.0.12"})
    rejected(tmp_path, data, "routers.r1.interfaces[1]", "on the same router")


def test_overlapping_cidrs_on_different_routers_are_accepted(tmp_path):
    data = edit(base(), {"networks.green.cidr": "10.1.0.0/24"})
    topo = load(tmp_path, data)
    assert topo.networks["green"].cidr == topo.networks["blue"].cidr
    assert topo.router_of("green").name == "r2"
    assert topo.router_of("blue").name == "r1"
    assert "green" not in topo.reachable_networks(["blue"])
    assert "blue" not in topo.reachable_networks(["green"])


def test_overlapping_cidrs_without_router_are_accepted(tmp_path):
    data = edit(base(), {"networks.lone": {"cidr": "10.1.0.0/25"}})
    topo = load(tmp_path, data)
    assert topo.router_of("lone") is None


def test_network_on_two_routers(tmp_path):
    data = edit(base(), {"routers.r2.interfaces": ["green", "blue"]})
    rejected(tmp_path, data, "routers.r2.interfaces[1]", "already on router r1")


def test_network_listed_twice_on_one_router(tmp_path):
    data = edit(base(), {"routers.r1.interfaces": ["blue", "red", "blue"]})
    rejected(tmp_path, data, "routers.r1.interfaces[2]", "listed twice")


def test_unknown_network_in_router_interfaces(tmp_path):
    data = edit(base(), {"routers.r2.interfaces": ["green", "pink"]})
    rejected(tmp_path, data, "routers.r2.interfaces[1]", "unknown network 'pink'")


def test_router_interfaces_must_be_a_list(tmp_path):
    data = edit(base(), {"routers.r2.interfaces": "green"})
    rejected(tmp_path, data, "routers.r2.interfaces", "must be a list")


BAD_NAMES = {
    "uppercase": "Vm3",
    "too-long": "abcdefghijklm",  # 13 characters
    "digit-first": "3vm",
    "underscore": "vm_3",
    "empty": "",
    "trailing-newline": "vm3\n",
}

SECTION_ENTRIES = {
    "nodes": {"role": "compute"},
    "networks": {"cidr": "10.9.0.0/24"},
    "routers": {"interfaces": []},
    "vms": {"node": "compute1", "network": "blue"},
}


@pytest.mark.parametrize("section", list(SECTION_ENTRIES))
@pytest.mark.parametrize("name", list(BAD_NAMES.values()), ids=list(BAD_NAMES))
def test_invalid_names(tmp_path, section, name):
    data = base()
    data[section][name] = SECTION_ENTRIES[section]
    rejected(tmp_path, data, f"{section}.{name}", "invalid name")


def test_non_string_name(tmp_path):
    text = yaml.safe_dump(base(), sort_keys=False) + "  7: {node: compute1, network: blue}\n"
    rejected(tmp_path, text, "vms.7", "invalid name")


@pytest.mark.parametrize("section", list(SECTION_ENTRIES))
def test_twelve_character_names_are_valid(tmp_path, section):
    data = base()
    data[section]["a23456789-bc"] = SECTION_ENTRIES[section]
    topo = load(tmp_path, data)
    assert "a23456789-bc" in getattr(topo, section)


def test_duplicate_name_in_a_section(tmp_path):
    text = yaml.safe_dump(base(), sort_keys=False) + "  vm2: {node: compute1, network: blue}\n"
    path = write(tmp_path, text)
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    [(key, reason)] = info.value.errors
    assert key == f"line {len(text.splitlines())}"
    assert "duplicate key 'vm2'" in reason
    assert str(info.value).startswith(f"{path}: {key}: ")


def test_unknown_role(tmp_path):
    rejected(tmp_path, edit(base(), {"nodes.net2.role": "storage"}), "nodes.net2.role",
             "unknown role 'storage'")


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("netwrok", "netwrok"),
        ("nodes.compute1.rol", "nodes.compute1.rol"),
        ("external.gateway", "external.gateway"),
        ("networks.blue.gatway_ip", "networks.blue.gatway_ip"),
        ("routers.r2.interface", "routers.r2.interface"),
        ("vms.vm2.flaoting_ip", "vms.vm2.flaoting_ip"),
    ],
)
def test_unknown_keys(tmp_path, path, key):
    value = {} if path == "netwrok" else "x"
    rejected(tmp_path, edit(base(), {path: value}), key, "unknown key")


def test_unknown_key_typo_also_reports_the_missing_key(tmp_path):
    data = edit(base(), {"vms.vm2.netwrok": "red", "vms.vm2.network": DELETE})
    exc = rejected(tmp_path, data, "vms.vm2.netwrok", "unknown key", only=False)
    assert "vms.vm2.network" in exc.keys()


@pytest.mark.parametrize(
    ("cidr", "fragment"),
    [
        ("10.2.0.1/24", "not an IPv4 network"),  # host bits set
        ("10.2.0.0/33", "not an IPv4 network"),
        ("banana", "not an IPv4 network"),
        ("10.2.0.0/30", "too small"),
        ("10.2.0.0", "too small"),
    ],
    ids=["host-bits", "bad-prefix", "garbage", "slash-30", "no-prefix"],
)
def test_invalid_network_cidr(tmp_path, cidr, fragment):
    rejected(tmp_path, edit(base(), {"networks.red.cidr": cidr}), "networks.red.cidr", fragment)


def test_network_without_cidr(tmp_path):
    rejected(tmp_path, edit(base(), {"networks.red": {"mtu": 1400}}), "networks.red.cidr",
             "required")


def test_smallest_network_is_slash_29(tmp_path):
    topo = load(tmp_path, edit(base(), {"networks.red.cidr": "10.2.0.0/29"}))
    assert topo.networks["red"].cidr.prefixlen == 29


@pytest.mark.parametrize(
    ("gw", "fragment"),
    [
        ("10.1.0.1", "outside the network's cidr 10.2.0.0/24"),
        ("10.2.0.0", "network or broadcast"),
        ("10.2.0.255", "network or broadcast"),
        ("gateway", "not an IPv4 address"),
    ],
)
def test_network_gateway_ip(tmp_path, gw, fragment):
    rejected(tmp_path, edit(base(), {"networks.red.gateway_ip": gw}), "networks.red.gateway_ip",
             fragment)


@pytest.mark.parametrize("mtu", [575, 9001, "1400", True, 1400.0])
def test_invalid_mtu(tmp_path, mtu):
    rejected(tmp_path, edit(base(), {"networks.red.mtu": mtu}), "networks.red.mtu", "MTU")


def test_invalid_external_cidr(tmp_path):
    rejected(tmp_path, edit(base(), {"external.cidr": "203.0.113.7/24"}), "external.cidr",
             "not an IPv4 network", only=False)


def test_external_gateway_ip_outside_cidr(tmp_path):
    rejected(tmp_path, edit(base(), {"external.gateway_ip": "198.51.100.1"}),
             "external.gateway_ip", "outside external.cidr", only=False)


def test_external_requires_cidr_and_gateway(tmp_path):
    exc = rejected(tmp_path, edit(base(), {"external": {"remote_ip": "192.0.2.9"}}),
                   "external.cidr", "required", only=False)
    assert "external.gateway_ip" in exc.keys()


def test_external_remote_ip_inside_cidr(tmp_path):
    rejected(tmp_path, edit(base(), {"external.remote_ip": "203.0.113.9"}),
             "external.remote_ip", "outside external.cidr", only=False)


@pytest.mark.parametrize(
    ("eip", "fragment"),
    [
        ("198.51.100.20", "outside external.cidr"),
        ("203.0.113.50", "floating IP of vms.vm1"),
        ("203.0.113.1", "external gateway_ip"),
        ("203.0.113.255", "network or broadcast"),
        ("nope", "not an IPv4 address"),
    ],
    ids=["outside-cidr", "floating-ip", "gateway", "broadcast", "garbage"],
)
def test_router_external_ip(tmp_path, eip, fragment):
    rejected(tmp_path, edit(base(), {"routers.r1.external_ip": eip}), "routers.r1.external_ip",
             fragment)


def test_external_ip_without_external_gateway(tmp_path):
    rejected(tmp_path, edit(base(), {"routers.r2.external_ip": "203.0.113.20"}),
             "routers.r2.external_ip", "needs external_gateway: true")


def test_external_ip_of_two_routers(tmp_path):
    data = edit(base(), {
        "routers.r1.external_ip": "203.0.113.20",
        "routers.r2.external_gateway": True,
        "routers.r2.external_ip": "203.0.113.20",
    })
    rejected(tmp_path, data, "routers.r2.external_ip", "already the external_ip of routers.r1")


def test_snat_nodes_naming_a_compute_node(tmp_path):
    data = edit(base(), {"routers.r1.snat_nodes": ["net1", "compute1"]})
    rejected(tmp_path, data, "routers.r1.snat_nodes[1]", "role compute, not network")


def test_snat_nodes_naming_an_unknown_node(tmp_path):
    data = edit(base(), {"routers.r1.snat_nodes": ["ghost"]})
    rejected(tmp_path, data, "routers.r1.snat_nodes[0]", "unknown node 'ghost'")


def test_snat_nodes_listing_a_node_twice(tmp_path):
    data = edit(base(), {"routers.r1.snat_nodes": ["net1", "net1"]})
    rejected(tmp_path, data, "routers.r1.snat_nodes[1]", "listed twice")


def test_snat_nodes_must_be_a_list(tmp_path):
    data = edit(base(), {"routers.r1.snat_nodes": "net1"})
    rejected(tmp_path, data, "routers.r1.snat_nodes", "must be a list")


def test_empty_snat_nodes_are_the_default(tmp_path):
    """`snat_nodes: []` means what leaving it out means (every network node, rotated): what
    a driver writes that leaves the candidates to the registered network nodes."""
    given = load(tmp_path, edit(base(), {"routers.r1.snat_nodes": []}))
    left_out = load(tmp_path, base(), "b.yaml")
    assert given.routers["r1"].snat_nodes == left_out.routers["r1"].snat_nodes
    assert set(given.routers["r1"].snat_nodes) == {"net1", "net2"}


def test_snat_nodes_without_external_gateway(tmp_path):
    data = edit(base(), {"routers.r2.snat_nodes": ["net1"]})
    rejected(tmp_path, data, "routers.r2.snat_nodes", "needs external_gateway: true")


def test_external_gateway_without_network_nodes(tmp_path):
    data = edit(base(), {"nodes.net1": DELETE, "nodes.net2": DELETE})
    rejected(tmp_path, data, "routers.r1.external_gateway", "role network")


@pytest.mark.parametrize(
    ("path", "value", "key"),
    [
        ("vms.vm2.node", ["compute1"], "vms.vm2.node"),
        ("vms.vm2.network", {"red": 1}, "vms.vm2.network"),
        ("routers.r2.interfaces", [["green"]], "routers.r2.interfaces[0]"),
        ("routers.r1.snat_nodes", [["net1"]], "routers.r1.snat_nodes[0]"),
    ],
    ids=["vm-node", "vm-network", "interface", "snat-node"],
)
def test_references_of_the_wrong_type_are_errors(tmp_path, path, value, key):
    rejected(tmp_path, edit(base(), {path: value}), key, "unknown")


@pytest.mark.parametrize(
    ("section", "value"),
    [("nodes", ["compute1"]), ("networks", "blue"), ("routers", 3), ("vms", ["vm1"])],
)
def test_sections_must_be_mappings(tmp_path, section, value):
    exc = rejected(tmp_path, edit(base(), {section: value}), section, "must be a mapping",
                   only=False)
    assert exc.keys()[0] == section


def test_entry_must_be_a_mapping(tmp_path):
    exc = rejected(tmp_path, edit(base(), {"vms.vm2": "compute2"}), "vms.vm2",
                   "must be a mapping, not str", only=False)
    assert exc.keys()[0] == "vms.vm2"


def test_nodes_are_required(tmp_path):
    rejected(tmp_path, "networks: {blue: {cidr: 10.1.0.0/24}}\n", "nodes", "required")


def test_at_least_one_node(tmp_path):
    rejected(tmp_path, "nodes: {}\n", "nodes", "at least one node")


def test_duplicate_tunnel_ip(tmp_path):
    data = edit(base(), {
        "nodes.compute1.tunnel_ip": "192.0.2.1",
        "nodes.compute2.tunnel_ip": "192.0.2.1",
    })
    exc = rejected(tmp_path, data, "nodes.compute2.tunnel_ip", "already the tunnel_ip of "
                   "nodes.compute1", only=False)
    assert exc.keys()[0] == "nodes.compute2.tunnel_ip"


def test_malformed_yaml(tmp_path):
    text = "nodes:\n  compute1: {role: compute}\nnetworks: {blue: [\n"
    path = write(tmp_path, text)
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    [(key, reason)] = info.value.errors
    assert key == "line 4"  # the end of the file, where the flow collection is unclosed
    assert reason.startswith("not valid YAML")
    assert str(info.value) == f"{path}: {key}: {reason}"


def test_malformed_yaml_names_the_line(tmp_path):
    text = "nodes:\n  compute1: {role: compute}\n  bad: : :\n  - x\n"
    path = write(tmp_path, text)
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    [(key, reason)] = info.value.errors
    assert key.startswith("line ")
    assert 2 <= int(key.split()[1]) <= 4
    assert reason.startswith("not valid YAML")
    assert str(info.value).startswith(f"{path}: line ")


def test_tab_indentation_is_malformed_yaml(tmp_path):
    exc = rejected(tmp_path, "nodes:\n\tcompute1: {}\n", "line 2", "not valid YAML")
    assert len(exc.errors) == 1


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n", "", "# nothing\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    rejected(tmp_path, text, "(top)", "must be a YAML mapping")


def test_build_topology_rejects_non_mapping():
    with pytest.raises(TopologyError) as info:
        build_topology(["nodes"], "src")
    assert info.value.errors == [("(top)", "the file must be a YAML mapping")]
    assert str(info.value) == "src: (top): the file must be a YAML mapping"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    [(key, reason)] = info.value.errors
    assert key == "(file)"
    assert "cannot read" in reason
    assert str(info.value).startswith(f"{path}: (file): cannot read")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(TopologyError) as info:
        load_topology(tmp_path)
    assert info.value.keys() == ["(file)"]


def test_binary_file(tmp_path):
    path = tmp_path / "topo.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage\x80")
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    assert info.value.keys() == ["(file)"]
    assert str(info.value).startswith(f"{path}: ")


def test_parse_topology_uses_the_given_source():
    with pytest.raises(TopologyError) as info:
        parse_topology("nodes: {C1: {}}\n", "my-source")
    assert str(info.value).startswith("my-source: nodes.C1: invalid name")
    with pytest.raises(TopologyError) as info:
        parse_topology("nodes: {C1: {}}\n")
    assert str(info.value).startswith("<topology>: ")


def test_topology_error_is_a_value_error():
    exc = TopologyError("f", [("a.b", "bad"), ("c", "worse")])
    assert isinstance(exc, ValueError)
    assert exc.keys() == ["a.b", "c"]
    assert str(exc) == "f: a.b: bad (and 1 more)"


# ---------------------------------------------------------------------------------------------
# All errors are collected


def test_several_errors_are_all_reported(tmp_path):
    data = edit(base(), {
        "nodes.Bad": {"role": "compute"},
        "networks.red.cidr": "10.2.0.1/24",
        "routers.r2.interfaces": ["green", "pink"],
        "vms.vm1.floating_ip": "198.51.100.50",
        "vms.vm2.node": "ghost",
        "vms.vm3": {"node": "compute1", "network": "blue", "ip": "10.1.0.11",
                    "mac": "01:00:00:00:00:01"},
    })
    path = write(tmp_path, data)
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    exc = info.value
    expected = {
        "nodes.Bad", "networks.red.cidr", "routers.r2.interfaces[1]", "vms.vm1.floating_ip",
        "vms.vm2.node", "vms.vm3.ip", "vms.vm3.mac",
    }
    assert expected <= set(exc.keys())
    assert len(exc.errors) > 1
    first_key, first_reason = exc.errors[0]
    assert str(exc) == f"{path}: {first_key}: {first_reason} (and {len(exc.errors) - 1} more)"
    assert all(reason for _, reason in exc.errors)


def test_two_errors_say_and_1_more(tmp_path):
    data = edit(base(), {"vms.vm1.node": "ghost", "vms.vm2.node": "net1"})
    path = write(tmp_path, data)
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    assert info.value.keys() == ["vms.vm1.node", "vms.vm2.node"]
    assert str(info.value).endswith("(and 1 more)")


# ---------------------------------------------------------------------------------------------
# Deterministic allocation


def allocated(topo: Topology) -> dict:
    return {
        "vms": {n: (vm.ip, vm.mac, vm.port_id) for n, vm in topo.vms.items()},
        "vnis": {n: net.vni for n, net in topo.networks.items()},
        "routers": {
            n: (r.key, r.external_ip, r.external_mac, tuple((i.network, i.mac)
                                                            for i in r.interfaces))
            for n, r in topo.routers.items()
        },
    }


def many_vms(count: int, network: str = "blue", prefix: str = "vm") -> dict:
    return {
        f"{prefix}{i}": {"node": f"compute{1 + i % 2}", "network": network}
        for i in range(count)
    }


def test_same_text_gives_same_allocation(tmp_path):
    data = edit(base(), {"routers.r2.external_gateway": True})
    data["vms"].update(many_vms(20, "green", "g"))
    text = yaml.safe_dump(data, sort_keys=False)
    first = parse_topology(text, "a")
    second = load(tmp_path, text)
    assert allocated(first) == allocated(second)
    assert first.digest == second.digest
    assert len(first.digest) == 16
    assert parse_topology(text + "# comment\n").digest != first.digest


def test_allocation_does_not_depend_on_unrelated_sections(tmp_path):
    a = load(tmp_path, base(), "a.yaml")
    b = load(tmp_path, edit(base(), {"nodes.compute3": {"role": "compute"}}), "b.yaml")
    assert allocated(a) == allocated(b)


def test_adding_a_vm_does_not_move_existing_ones(tmp_path):
    data = base()
    data["vms"].update(many_vms(40))
    before = load(tmp_path, data, "before.yaml")
    more = copy.deepcopy(data)
    more["vms"].update(many_vms(60, "blue", "a"))  # names that sort before the others
    more["vms"].update(many_vms(10, "red", "z"))
    after = load(tmp_path, more, "after.yaml")
    for name, vm in before.vms.items():
        assert (after.vms[name].ip, after.vms[name].mac) == (vm.ip, vm.mac), name


def test_adding_a_vm_to_a_crowded_network_does_not_move_existing_ones(tmp_path):
    # a /29 has 5 free host addresses: a new VM's preferred address often collides
    data = edit(base(), {"networks.red.cidr": "10.2.0.0/29"})
    data["vms"] = {
        "vm2": {"node": "compute2", "network": "red"},
        "vm3": {"node": "compute1", "network": "red"},
    }
    before = load(tmp_path, data, "before.yaml")
    for candidate in [f"a{i}" for i in range(30)]:
        more = copy.deepcopy(data)
        more["vms"][candidate] = {"node": "compute1", "network": "red"}
        after = load(tmp_path, more, f"{candidate}.yaml")
        for name, vm in before.vms.items():
            assert (after.vms[name].ip, after.vms[name].mac) == (vm.ip, vm.mac), candidate


def test_adding_a_network_or_router_does_not_move_existing_ones(tmp_path):
    # a small external network: external IPs of routers are likely to collide
    data = edit(base(), {
        "external": {"cidr": "203.0.113.0/28", "gateway_ip": "203.0.113.1"},
        "vms.vm1.floating_ip": "203.0.113.5",
        "routers.r2.external_gateway": True,
    })
    before = load(tmp_path, data, "before.yaml")
    for i in range(12):
        more = copy.deepcopy(data)
        more["networks"][f"a{i}"] = {"cidr": f"10.{100 + i}.0.0/24"}
        more["routers"][f"a{i}"] = {"interfaces": [f"a{i}"], "external_gateway": True}
        after = load(tmp_path, more, f"more{i}.yaml")
        for name, net in before.networks.items():
            assert after.networks[name].vni == net.vni
        for name, router in before.routers.items():
            assert after.routers[name].external_ip == router.external_ip, (i, name)
            assert after.routers[name].key == router.key


def test_allocated_ips_are_valid_hosts_and_unique(tmp_path):
    data = edit(base(), {"networks.blue.gateway_ip": "10.1.0.77"})
    data["vms"].update(many_vms(150))
    topo = load(tmp_path, data)
    for net in topo.networks.values():
        ips = [vm.ip for vm in topo.vms.values() if vm.network == net.name]
        assert len(ips) == len(set(ips))
        for ip in ips:
            assert ip in net.cidr
            assert ip not in (net.gateway_ip, net.cidr.network_address,
                              net.cidr.broadcast_address)


def test_a_full_network_is_allocated_exactly(tmp_path):
    data = edit(base(), {"networks.red.cidr": "10.2.0.0/29",
                         "networks.red.gateway_ip": "10.2.0.6"})
    data["vms"].update(many_vms(4, "red", "r"))  # with vm2: 5 VMs for 5 free addresses
    topo = load(tmp_path, data)
    ips = {vm.ip for vm in topo.vms.values() if vm.network == "red"}
    assert ips == {ipaddress.IPv4Address(f"10.2.0.{i}") for i in (1, 2, 3, 4, 5)}


def test_a_network_without_free_addresses(tmp_path):
    data = edit(base(), {"networks.red.cidr": "10.2.0.0/29"})
    data["vms"].update(many_vms(5, "red", "r"))  # 6 VMs for 5 free addresses
    # addresses are handed out in file order: the last VM finds the network full
    rejected(tmp_path, data, "vms.r4.ip", "no free address left in network red")


def test_allocated_ips_avoid_explicit_ones(tmp_path):
    data = edit(base(), {"networks.red.cidr": "10.2.0.0/29"})
    data["vms"].update({
        "r1": {"node": "compute1", "network": "red", "ip": "10.2.0.2"},
        "r2": {"node": "compute1", "network": "red", "ip": "10.2.0.3"},
        "r3": {"node": "compute1", "network": "red"},
        "r4": {"node": "compute1", "network": "red", "ip": "10.2.0.5"},
    })
    topo = load(tmp_path, data)
    ips = sorted(vm.ip for vm in topo.vms.values() if vm.network == "red")
    assert ips == [ipaddress.IPv4Address(f"10.2.0.{i}") for i in (2, 3, 4, 5, 6)]


def test_allocated_macs_are_unique_unicast_and_neutron_like(tmp_path):
    data = edit(base(), {"routers.r2.external_gateway": True})
    data["vms"].update(many_vms(200))
    data["vms"]["x1"] = {"node": "compute1", "network": "red", "mac": "02:00:00:00:00:01"}
    topo = load(tmp_path, data)
    allocated_macs = [vm.mac for vm in topo.vms.values() if vm.name != "x1"]
    router_macs = [i.mac for r in topo.routers.values() for i in r.interfaces]
    router_macs += [r.external_mac for r in topo.routers.values() if r.external_mac]
    every = [*allocated_macs, *router_macs, "02:00:00:00:00:01"]
    assert len(every) == len(set(every))
    for mac in allocated_macs + router_macs:
        assert mac.startswith("fa:16:3e:")
        octets = mac.split(":")
        assert len(octets) == 6 and all(len(o) == 2 for o in octets)
        assert int(octets[0], 16) & 1 == 0
        assert mac == mac.lower()


def test_vnis_unique_and_in_range(tmp_path):
    data = base()
    data["networks"].update({f"n{i}": {"cidr": f"10.{100 + i}.0.0/24"} for i in range(50)})
    topo = load(tmp_path, data)
    vnis = [n.vni for n in topo.networks.values()]
    assert len(vnis) == len(set(vnis))
    assert all(1 <= v <= MAX_VNI for v in vnis)
    assert MAX_VNI == 2**24 - 1


def test_explicit_vni_is_honoured_and_avoided(tmp_path):
    auto = load(tmp_path, base(), "auto.yaml")
    red_vni = auto.networks["red"].vni
    data = edit(base(), {"networks.blue.vni": red_vni, "networks.green.vni": 1})
    topo = load(tmp_path, data, "explicit.yaml")
    assert topo.networks["blue"].vni == red_vni
    assert topo.networks["green"].vni == 1
    assert topo.networks["red"].vni not in (red_vni, 1)


@pytest.mark.parametrize("vni", [MAX_VNI, 1])
def test_vni_bounds_are_accepted(tmp_path, vni):
    topo = load(tmp_path, edit(base(), {"networks.red.vni": vni}))
    assert topo.networks["red"].vni == vni


def test_duplicate_explicit_vni(tmp_path):
    data = edit(base(), {"networks.blue.vni": 100, "networks.red.vni": 100})
    rejected(tmp_path, data, "networks.red.vni", "already used by network blue")


@pytest.mark.parametrize("vni", [0, -1, MAX_VNI + 1, "100", True])
def test_invalid_vni(tmp_path, vni):
    rejected(tmp_path, edit(base(), {"networks.red.vni": vni}), "networks.red.vni",
             "not a VNI")


def test_router_keys_unique_and_above_vnis(tmp_path):
    data = base()
    data["routers"].update({f"x{i}": {"interfaces": []} for i in range(30)})
    topo = load(tmp_path, data)
    keys = [r.key for r in topo.routers.values()]
    assert len(keys) == len(set(keys))
    assert all(k >= ROUTER_KEY_BASE for k in keys)
    vnis = {n.vni for n in topo.networks.values()}
    assert not vnis & set(keys)


def test_allocated_external_ips(tmp_path):
    data = edit(base(), {
        "external": {"cidr": "203.0.113.0/29", "gateway_ip": "203.0.113.1"},
        "vms.vm1.floating_ip": "203.0.113.2",
        "routers.r2.external_gateway": True,
        "routers.r3": {"interfaces": [], "external_gateway": True, "external_ip": "203.0.113.3"},
    })
    topo = load(tmp_path, data)
    eips = [r.external_ip for r in topo.routers.values()]
    assert len(eips) == len(set(eips))
    assert str(topo.routers["r3"].external_ip) == "203.0.113.3"
    for ip in eips:
        assert ip in topo.external.cidr
        assert str(ip) not in ("203.0.113.0", "203.0.113.1", "203.0.113.2", "203.0.113.7")


def test_external_network_without_free_address(tmp_path):
    data = edit(base(), {
        "external": {"cidr": "203.0.113.0/29", "gateway_ip": "203.0.113.1"},
        "vms.vm1.floating_ip": "203.0.113.2",
        "vms.vm2.floating_ip": "203.0.113.3",
        "vms.vm3": {"node": "compute1", "network": "blue", "floating_ip": "203.0.113.4"},
        "vms.vm4": {"node": "compute1", "network": "blue", "floating_ip": "203.0.113.5"},
        "vms.vm5": {"node": "compute1", "network": "blue", "floating_ip": "203.0.113.6"},
    })
    rejected(tmp_path, data, "routers.r1.external_ip", "no free address")


# ---------------------------------------------------------------------------------------------
# to_dict round trip


def assert_same_topology(a: Topology, b: Topology) -> None:
    assert dict(a.nodes) == dict(b.nodes)
    assert a.external == b.external
    assert set(a.networks) == set(b.networks)
    for name, net in a.networks.items():
        other = b.networks[name]
        assert (net.cidr, net.gateway_ip, net.mtu, net.vni) == (
            other.cidr, other.gateway_ip, other.mtu, other.vni)
    assert set(a.routers) == set(b.routers)
    for name, r in a.routers.items():
        other = b.routers[name]
        assert r.key == other.key
        assert r.interfaces == other.interfaces
        assert r.external_gateway == other.external_gateway
        assert r.external_ip == other.external_ip
        assert r.external_mac == other.external_mac
        assert r.snat_nodes == other.snat_nodes
    assert set(a.vms) == set(b.vms)
    for name, vm in a.vms.items():
        other = b.vms[name]
        assert (vm.node, vm.network, vm.ip, vm.mac, vm.floating_ip, vm.port_id) == (
            other.node, other.network, other.ip, other.mac, other.floating_ip, other.port_id)


def round_trip_topology(tmp_path: Path) -> Topology:
    data = edit(base(), {
        "nodes.compute1.tunnel_ip": "192.0.2.11",
        "external.remote_ip": "192.0.2.200",
        "networks.blue.mtu": 1400,
        "networks.red.gateway_ip": "10.2.0.254",
        "networks.lone": {"cidr": "10.1.0.0/24", "vni": 77},
        "routers.r1.snat_nodes": ["net2"],
        "routers.r3": {"interfaces": []},
    })
    data["vms"].update(many_vms(10, "red", "r"))
    data["vms"]["solo"] = {"node": "compute2", "network": "lone", "mac": "02:11:22:33:44:55"}
    return load(tmp_path, data)


def test_to_dict_round_trips(tmp_path):
    topo = round_trip_topology(tmp_path)
    again = build_topology(to_dict(topo), topo.source)
    assert_same_topology(topo, again)
    assert to_dict(again) == to_dict(topo)


def test_to_dict_round_trips_through_yaml(tmp_path):
    topo = round_trip_topology(tmp_path)
    text = yaml.safe_dump(to_dict(topo), sort_keys=False)
    again = load(tmp_path, text, "dumped.yaml")
    assert_same_topology(topo, again)


def test_to_dict_writes_allocated_values_out(tmp_path):
    topo = load(tmp_path, base())
    d = to_dict(topo)
    assert d["vms"]["vm2"]["ip"] == str(topo.vms["vm2"].ip)
    assert d["vms"]["vm2"]["mac"] == topo.vms["vm2"].mac
    assert d["networks"]["red"]["vni"] == topo.networks["red"].vni
    assert d["routers"]["r1"]["external_ip"] == str(topo.routers["r1"].external_ip)
    assert "external_gateway" not in d["routers"]["r2"]
    assert list(d["nodes"]) == ["compute1", "compute2", "net1", "net2"]


def test_to_dict_without_external(tmp_path):
    data = edit(base(), {"external": DELETE, "routers.r1.external_gateway": DELETE,
                         "vms.vm1.floating_ip": DELETE})
    topo = load(tmp_path, data)
    assert topo.external is None
    d = to_dict(topo)
    assert "external" not in d
    assert_same_topology(topo, build_topology(d))


# ---------------------------------------------------------------------------------------------
# Helpers


def helper_topology(tmp_path: Path) -> Topology:
    data = edit(base(), {
        "networks.lone": {"cidr": "10.9.0.0/24"},
        "vms.vm3": {"node": "compute1", "network": "green"},
        "vms.vm4": {"node": "compute1", "network": "lone"},
    })
    return load(tmp_path, data)


def test_router_of(tmp_path):
    topo = helper_topology(tmp_path)
    assert topo.router_of("blue") is topo.routers["r1"]
    assert topo.router_of("red") is topo.routers["r1"]
    assert topo.router_of("green") is topo.routers["r2"]
    assert topo.router_of("lone") is None
    assert topo.router_of("nonexistent") is None


def test_vm_by_port(tmp_path):
    topo = helper_topology(tmp_path)
    for vm in topo.vms.values():
        assert topo.vm_by_port(vm.port_id) is vm
    assert topo.vm_by_port(port_id_for("ghost")) is None
    assert topo.vm_by_port("") is None


def test_vms_on(tmp_path):
    topo = helper_topology(tmp_path)
    assert sorted(vm.name for vm in topo.vms_on("compute1")) == ["vm1", "vm3", "vm4"]
    assert [vm.name for vm in topo.vms_on("compute2")] == ["vm2"]
    assert topo.vms_on("net1") == []
    assert topo.vms_on("ghost") == []


def test_reachable_networks(tmp_path):
    topo = helper_topology(tmp_path)
    assert topo.reachable_networks(["blue"]) == {"blue", "red"}
    assert topo.reachable_networks(["red"]) == {"blue", "red"}
    assert topo.reachable_networks(["green"]) == {"green"}
    assert topo.reachable_networks(["lone"]) == {"lone"}
    assert topo.reachable_networks(["lone", "green"]) == {"lone", "green"}
    assert topo.reachable_networks(["blue", "lone"]) == {"blue", "red", "lone"}
    assert topo.reachable_networks([]) == set()


def test_network_nodes(tmp_path):
    topo = helper_topology(tmp_path)
    assert [n.name for n in topo.network_nodes()] == ["net1", "net2"]
    assert all(n.is_network for n in topo.network_nodes())
    assert not topo.nodes["compute1"].is_network


def test_port_id_for_is_stable(tmp_path):
    a = port_id_for("vm1")
    assert a == port_id_for("vm1")
    assert a != port_id_for("vm2")
    assert uuid.UUID(a).version == 5
    assert str(uuid.UUID(a)) == a
    topo = helper_topology(tmp_path)
    assert all(vm.port_id == port_id_for(vm.name) for vm in topo.vms.values())
    assert load(tmp_path, base(), "other.yaml").vms["vm1"].port_id == a


def test_model_is_immutable(tmp_path):
    topo = load(tmp_path, base())
    with pytest.raises(AttributeError):
        topo.vms["vm1"].ip = ipaddress.IPv4Address("10.1.0.99")
    with pytest.raises(AttributeError):
        topo.source = "x"


# ---------------------------------------------------------------------------------------------
# The built-in example


def test_builtin_example_loads():
    path = Path(dvr.__file__).parent / "examples" / "default.yaml"
    topo = load_topology(path)
    assert topo.source == str(path)
    assert {"compute1", "compute2", "net1"} <= set(topo.nodes)
    assert {"blue", "red"} <= set(topo.networks)
    assert topo.vms
    assert topo.digest
    for vm in topo.vms.values():
        assert not topo.nodes[vm.node].is_network
        assert vm.ip in topo.networks[vm.network].cidr
    r1 = topo.routers["r1"]
    assert r1.external_gateway
    assert r1.external_ip in topo.external.cidr
    assert r1.snat_nodes == tuple(n.name for n in topo.network_nodes())
    assert topo.reachable_networks(["blue"]) == {"blue", "red"}


UUID1 = "3f0c6a1e-5b7d-4c2a-9e8f-0a1b2c3d4e5f"
UUID2 = "a7e9d4c2-1b3f-4e5d-8c6a-9f0e1d2c3b4a"


def test_uuids_are_names(tmp_path):
    """A cloud's own identities (Neutron's UUIDs) name networks, routers and VMs; a VM named
    by a UUID is plugged with that UUID as its port id (Neutron's port id is the iface-id)."""
    data = base()
    data["networks"][UUID1] = data["networks"].pop("blue")
    data["routers"]["r1"]["interfaces"] = [UUID1, "red"]
    data["vms"][UUID2] = {**data["vms"].pop("vm1"), "network": UUID1}
    topo = load(tmp_path, data)
    assert topo.vms[UUID2].port_id == UUID2
    assert topo.vm_by_port(UUID2).name == UUID2
    assert topo.router_of(UUID1).name == "r1"
    assert to_dict(topo)["vms"][UUID2].get("port_id") is None  # the default, not written


def test_port_id_and_external_ids_round_trip(tmp_path):
    data = edit(base(), {"vms.vm2.port_id": UUID1,
                         "vms.vm2.external_ids": {"neutron:revision_number": "4"},
                         "networks.red.external_ids": {"neutron:network_name": "red"},
                         "routers.r1.external_ids": {"neutron:revision_number": 7}})
    topo = load(tmp_path, data)
    assert topo.vms["vm2"].port_id == UUID1
    assert topo.vm_by_port(UUID1).name == "vm2"
    assert topo.routers["r1"].external_ids == (("neutron:revision_number", "7"),)
    again = load(tmp_path, to_dict(topo), "again.yaml")
    assert again.vms == topo.vms and again.networks == topo.networks
    assert again.routers == topo.routers


@pytest.mark.parametrize("change, key, fragment", [
    ({"vms.vm2.port_id": "not-a-uuid"}, "vms.vm2.port_id", "not a UUID"),
    ({"vms.vm2.port_id": UUID1.upper()}, "vms.vm2.port_id", "not a UUID"),
    ({"vms.vm2.external_ids": ["a"]}, "vms.vm2.external_ids", "mapping of strings"),
    ({"networks.red.external_ids": {"a b": "x"}}, "networks.red.external_ids.a b",
     "invalid key"),
    ({"routers.r1.external_ids": {"k": None}}, "routers.r1.external_ids.k", "a string"),
])
def test_port_id_and_external_ids_checked(tmp_path, change, key, fragment):
    rejected(tmp_path, edit(base(), change), key, fragment)


def test_port_id_given_twice(tmp_path):
    data = edit(base(), {"vms.vm1.port_id": UUID1, "vms.vm2.port_id": UUID1})
    rejected(tmp_path, data, "vms.vm2.port_id", "already the port of vms.vm1")
