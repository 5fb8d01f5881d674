"""dvr beside Neutron's own OVS agent on the same Open vSwitch (`dvr lab up --neutron
--l2-agent compute1,compute2`): ML2's openvswitch driver binds the ports of a VLAN network,
neutron-openvswitch-agent wires them on its own integration bridge br-l2 (RabbitMQ and
neutron-rpc-server in the lab's controller namespace); dvr's driver binds the VXLAN ones on
br-int; both agents share the provider bridge br-ex, where only the L2 agent installs flows.
Real packets on both paths while each agent is restarted; neither agent's flows change when
the other restarts and resyncs (docs/neutron.md: which bridges, tables and priorities are
whose)."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dvr.neutron import l2agent
from flows.ofp import OWNER_COOKIE
from tests.lab.harness import TOPOLOGIES, LabHandle, ext_ping, neutron_cloud, running_lab
from tests.lab.test_ha import gaps

STATS = re.compile(r"\b(duration|n_packets|n_bytes|idle_age|hard_age)=[^,\s]+,?\s*")
NODES = ("compute1", "compute2")
VLAN = 101
INTERVAL = 0.01

pytestmark = pytest.mark.skipif(
    shutil.which("mariadbd") is None or not l2agent.RABBITMQ_SERVER.exists(),
    reason="mariadb-server or rabbitmq-server is not installed")


@pytest.fixture(scope="module")
def lab() -> Iterator[LabHandle]:
    with running_lab(TOPOLOGIES / "neutron.yaml", "--neutron", "--l2-agent",
                     ",".join(NODES), "--timeout", "600") as handle:
        yield handle


@pytest.fixture(scope="module")
def cloud(lab: LabHandle) -> Any:
    return neutron_cloud(lab)


@pytest.fixture(scope="module")
def vlan(lab: LabHandle, cloud: Any) -> dict[str, Any]:
    """A VLAN network on physnet1 with a VM on each compute node, plugged as Nova would."""
    net = cloud.network.create_network(name="vlan101", provider_network_type="vlan",
                                       provider_physical_network="physnet1",
                                       provider_segmentation_id=VLAN)
    cloud.network.create_subnet(network_id=net.id, ip_version=4, cidr="10.50.0.0/24",
                                gateway_ip=None, name="vlan101-v4")
    ports = {}
    for name, node in (("l2a", "compute1"), ("l2b", "compute2")):
        p = cloud.network.create_port(network_id=net.id, name=name, binding_host_id=node,
                                      device_owner="compute:nova")
        assert p.binding_vif_type == "ovs" and p.binding_vif_details["bridge_name"] == "br-l2"
        assert p.binding_vif_details["bound_drivers"] == {"0": "openvswitch"}
        lab.dvr("plug", name)
        ports[name] = p
    deadline = time.monotonic() + 60
    while not all(cloud.network.get_port(p.id).status == "ACTIVE" for p in ports.values()):
        assert time.monotonic() < deadline, "the L2 agent did not wire the VLAN ports"
        time.sleep(0.3)
    return {name: p.fixed_ips[0]["ip_address"] for name, p in ports.items()}


def flows(lab: LabHandle, node: str, bridge: str) -> list[str]:
    """A bridge's flows without counters: cookie, table, priority, match, actions."""
    out = lab.node(node, "ovs-ofctl", "-O", "OpenFlow13", "dump-flows", bridge)
    return sorted(STATS.sub("", ln.strip()) for ln in out.splitlines()
                  if ln.strip().startswith("cookie="))


def cookies(lines: list[str]) -> set[int]:
    return {int(ln.split(",", 1)[0].removeprefix("cookie="), 16) for ln in lines}


def dvrs(cookie: int) -> bool:
    """A cookie dvr installs under (its owner bits, flows.ofp.OWNER_COOKIE)."""
    return cookie >> 48 == OWNER_COOKIE


def stream(lab: LabHandle, src: str, dst: str, dst_ip: str, port: int, seconds: float
           ) -> Any:
    sink = lab.background(lab.ns(dst), "udp-sink", str(port), "--seconds", str(seconds + 2),
                          ready=True)
    source = lab.background(lab.ns(src), "udp-stream", dst_ip, str(port), "--interval",
                            str(INTERVAL), "--seconds", str(seconds))
    return sink, source


def finish(lab: LabHandle, sink: Any, source: Any) -> tuple[int, int, float]:
    """Datagrams sent, received, and the longest silence (s)."""
    sent = lab.result(source)["sent"]
    got = lab.result(sink)
    return sent, len(got), gaps(got)[1]


def test_both_agents_wire_their_ports_on_one_open_vswitch(lab: LabHandle, cloud: Any,
                                                          vlan: dict[str, Any]) -> None:
    agents = {(a.agent_type, a.host): a for a in cloud.network.agents()}
    for node in NODES:
        assert agents[("Open vSwitch agent", node)].is_alive
        assert agents[("dvr agent", node)].is_alive
    assert lab.ping("l2a", vlan["l2b"], count=3), "the VLAN network does not carry traffic"
    assert lab.ping("vm1", "10.2.0.12", count=2), "dvr's east-west stopped"
    assert ext_ping(lab, "203.0.113.50"), "dvr's floating IP stopped"
    assert lab.ping("vm2", "198.51.100.10", count=2), "dvr's SNAT stopped"
    for node in NODES:
        # each agent's flows on its own bridge, and on br-ex only the L2 agent's
        l2, ex = cookies(flows(lab, node, "br-l2")), cookies(flows(lab, node, "br-ex"))
        dvr_int = cookies(flows(lab, node, "br-int"))
        assert l2 and ex and dvr_int
        assert all(dvrs(c) for c in dvr_int), "br-int holds a flow not dvr's"
        assert not any(dvrs(c) for c in l2 | ex), "dvr installed a flow on the L2 agent's"
        tag = f"{VLAN | 0x1000}->vlan_vid"  # OpenFlow 1.3's set_field of VLAN 101 (present)
        assert any(tag in f for f in flows(lab, node, "br-ex")), flows(lab, node, "br-ex")
        ports = lab.node(node, "ovs-vsctl", "list-ports", "br-int").split()
        assert not any(p.startswith("tapl2") for p in ports), "a VLAN VM on dvr's bridge"


def test_dvr_restarted_the_l2_path_loses_nothing_and_its_flows_stay(
        lab: LabHandle, vlan: dict[str, Any]) -> None:
    before = {(n, b): flows(lab, n, b) for n in NODES for b in ("br-l2", "br-ex")}
    sink, source = stream(lab, "l2a", "l2b", vlan["l2b"], 7101, seconds=5)
    time.sleep(1)
    for node in NODES:
        lab.dvr("restart-agent", node)
    sent, got, gap = finish(lab, sink, source)
    assert got == sent, f"the VLAN path lost {sent - got} of {sent} while dvr restarted " \
        f"(longest gap {gap * 1000:.0f} ms)"
    for key, lines in before.items():
        assert flows(lab, *key) == lines, f"{key}: the L2 agent's flows changed"


def test_the_l2_agent_restarted_dvr_loses_nothing_and_its_flows_stay(
        lab: LabHandle, vlan: dict[str, Any]) -> None:
    before = {n: flows(lab, n, "br-int") for n in NODES}
    sink, source = stream(lab, "vm1", "vm2", "10.2.0.12", 7102, seconds=8)
    time.sleep(1)
    lab.dvr("restart-l2-agent", "compute1")
    lab.dvr("restart-l2-agent", "compute2")
    time.sleep(3)  # past the restarted agents' full resync (their stale-flow clean-up)
    sent, got, gap = finish(lab, sink, source)
    assert got == sent, f"dvr's east-west lost {sent - got} of {sent} while the L2 agent " \
        f"restarted (longest gap {gap * 1000:.0f} ms)"
    for node in NODES:
        assert flows(lab, node, "br-int") == before[node], f"{node}: dvr's flows changed"
    assert lab.ping("l2a", vlan["l2b"], count=3), "the VLAN path did not come back"
