"""The daily changes in O(change) (`Northbound.vm_add()`, `fip_set()`, ...) against the
whole-document path they replace: on a real ovsdb-server with the northbound schema, random
sequences of changes (many of them refused) are applied both ways, and after every step the
database holds exactly what `build_topology()` of the edited document gives (`to_dict`),
a change is refused by one exactly when the other refuses it, with the same message, and a
refused or empty change writes nothing."""

from __future__ import annotations

import ipaddress
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dvr import nb
from flows import northbound
from flows.model import TopologyError, build_topology, to_dict, vm_mac
from tests.nbserver import AVAILABLE, northbound_server

pytestmark = pytest.mark.skipif(not AVAILABLE, reason="needs ovsdb-server")


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[str]:
    with northbound_server(tmp_path) as remote:
        yield remote


def cloud() -> dict[str, Any]:
    """A small cloud where changes collide often: a /29 network (five addresses), a small
    provider network, overlapping CIDRs, a network on no router, a router without an
    external gateway and one without interfaces."""
    return {
        "nodes": {"c1": {"role": "compute"}, "c2": {"role": "compute"},
                  "net1": {"role": "network"}},
        "external": {"cidr": "203.0.113.0/28", "gateway_ip": "203.0.113.1"},
        "networks": {"a": {"cidr": "10.1.0.0/24"}, "b": {"cidr": "10.2.0.0/29"},
                     "c": {"cidr": "10.1.0.0/24"}, "d": {"cidr": "10.4.0.0/24"},
                     "e": {"cidr": "10.5.0.0/29"}},
        "routers": {"r1": {"interfaces": ["a", "b"], "external_gateway": True},
                    "r2": {"interfaces": ["d"]},
                    "r3": {"interfaces": [], "external_gateway": True}},
        "vms": {"v1": {"node": "c1", "network": "a", "floating_ip": "203.0.113.5"},
                "v2": {"node": "c2", "network": "b"},
                "v3": {"node": "c1", "network": "c"},
                "v4": {"node": "c2", "network": "d"},
                "v5": {"node": "c1", "network": "a", "ip": "10.1.0.20"}},
    }


NAMES = [f"v{i}" for i in range(1, 25)] + ["Bad_Name"]
NETWORKS = ["a", "b", "c", "d", "e", "zz"]
NODES = ["c1", "c2", "net1", "nowhere"]
ROUTERS = ["r1", "r2", "r3", "r9"]


def random_change(rng: random.Random, doc: dict[str, Any]
                  ) -> tuple[str, Callable[[nb.Northbound], str], Callable[[Any], Any]]:
    """A change, as (what, the O(change) call, the whole-document edit)."""
    topo = build_topology(doc)
    vms = list(doc["vms"])
    held = [v["floating_ip"] for v in doc["vms"].values() if "floating_ip" in v]
    ext_ips = [str(r.external_ip) for r in topo.routers.values() if r.external_ip]
    fips = [f"203.0.113.{i}" for i in range(0, 17)] + held + ext_ips + ["203.0.113.x"]
    kind = rng.choice(["vm-add"] * 4 + ["vm-del", "fip-set", "fip-set", "fip-del",
                                        "router-if"])
    if kind == "vm-add":
        name = rng.choice(NAMES)
        node, net = rng.choice(NODES[:2] * 4 + NODES), rng.choice(NETWORKS[:5] * 3 + NETWORKS)
        ip = mac = fip = None
        r = rng.random()
        if r < 0.3 and net in doc["networks"]:
            hosts = list(ipaddress.IPv4Network(doc["networks"][net]["cidr"]))
            ip = str(rng.choice(hosts[:12]))  # the gateway, the network's, the VMs' ...
        elif r < 0.35:
            ip = rng.choice(["10.9.9.9", "not-an-ip", "10.1.0.300"])
        r = rng.random()
        infra = ([i.mac for rt in topo.routers.values() for i in rt.interfaces]
                 + [n.external_mac for n in topo.nodes.values()])
        if r < 0.1 and vms:
            mac = doc["vms"][rng.choice(vms)]["mac"]
        elif r < 0.15:
            mac = rng.choice(infra)
        elif r < 0.25:  # what another VM would get by default: a later default collides
            mac = vm_mac(rng.choice(NAMES), infra)
        elif r < 0.3:
            mac = rng.choice(["01:00:5e:00:00:01", "zz", "FA:16:3E:AA:BB:CC"])
        if rng.random() < 0.3:
            fip = rng.choice(fips)
        return (f"vm-add {name} {node} {net} ip={ip} mac={mac} fip={fip}",
                lambda c: c.vm_add(name, node, net, ip, mac, fip),
                northbound.vm_add(name, node, net, ip, mac, fip))
    if kind == "vm-del":
        name = rng.choice([*vms, "v42"])
        return f"vm-del {name}", lambda c: c.vm_del(name), northbound.vm_del(name)
    if kind == "fip-set":
        name, fip = rng.choice([*vms, "v42"]), rng.choice(fips)
        return (f"fip-set {name} {fip}", lambda c: c.fip_set(name, fip),
                northbound.fip_set(name, fip))
    if kind == "fip-del":
        name = rng.choice([*vms, "v42"])
        return f"fip-del {name}", lambda c: c.fip_del(name), northbound.fip_del(name)
    router, net, add = rng.choice(ROUTERS), rng.choice(NETWORKS), rng.random() < 0.5
    return (f"router-if {router} {net} add={add}", lambda c: c.router_if(router, net, add),
            northbound.router_if(router, net, add))


def reference(doc: dict[str, Any], edit: Callable[[Any], Any]) -> dict[str, Any] | str:
    """What the whole-document path makes of the edit: the new document, or the refusal."""
    try:
        return to_dict(build_topology(edit(json.loads(json.dumps(doc))), "<change>"))
    except (northbound.ChangeError, TopologyError) as exc:
        return str(exc)


def stored_macs(conn: nb.Northbound) -> dict[str, list[str]]:
    """Router.macs and Node.macs as the database holds them."""
    out = {}
    for table in ("Router", "Node"):
        for r in conn.transact([{"op": "select", "table": table, "where": [],
                                 "columns": ["name", "macs"]}])[0]["rows"]:
            out[f"{table}:{r['name']}"] = sorted(northbound.members(r["macs"]))
    return out


def model_macs(doc: dict[str, Any]) -> dict[str, list[str]]:
    """The same as the model derives them from the document."""
    topo = build_topology(doc)
    out = {f"Node:{n.name}": [n.external_mac] for n in topo.nodes.values()}
    for r in topo.routers.values():
        out[f"Router:{r.name}"] = sorted([i.mac for i in r.interfaces]
                                         + ([r.external_mac] if r.external_mac else []))
    return out


def generation(conn: nb.Northbound) -> tuple[str, int]:
    row = conn.transact([{"op": "select", "table": "NB_Global", "where": []}])[0]["rows"][0]
    return row["generation"], row["changes"]


@pytest.mark.parametrize("seed", range(int(__import__("os").environ.get("NB_SEEDS", "8"))))
def test_changes_in_o_change_equal_the_whole_document_path(db: str, seed: int) -> None:
    rng = random.Random(seed)
    conn = nb.Northbound(db)
    try:
        conn.load(build_topology(cloud()))
        kinds: dict[str, int] = {}
        for step in range(200):
            doc = conn.dump()
            what, call, edit = random_change(rng, doc)
            want = reference(doc, edit)
            before = generation(conn)
            try:
                got: str | None = call(conn)
                refusal = None
            except (northbound.ChangeError, TopologyError) as exc:
                got, refusal = None, str(exc)
            after = conn.dump()
            where = f"seed {seed} step {step}: {what}"
            if isinstance(want, str):
                assert refusal == want, where
                assert after == doc and generation(conn) == before, where
                kinds["refused"] = kinds.get("refused", 0) + 1
                continue
            assert refusal is None, f"{where}: refused ({refusal}), the whole path: accepted"
            assert after == want, where
            assert stored_macs(conn) == model_macs(want), where
            if want == doc:
                assert generation(conn) == before and got == before[0], where
            else:
                assert got == generation(conn)[0] != before[0], where
                assert generation(conn)[1] == before[1] + 1, where
            kinds[what.split()[0]] = kinds.get(what.split()[0], 0) + 1
        # the sequence exercised the changes, accepted and refused
        assert {"vm-add", "vm-del", "fip-set", "refused"} <= set(kinds), kinds
        # and what the database holds is a valid cloud, the same the model builds from it
        assert to_dict(conn.topology()) == conn.dump()
    finally:
        conn.close()


def test_a_default_mac_taken_by_another_vm_moves_on_as_the_model_does(db: str) -> None:
    doc = cloud()
    topo = build_topology(doc)
    infra = ([i.mac for r in topo.routers.values() for i in r.interfaces]
             + [n.external_mac for n in topo.nodes.values()])
    conn = nb.Northbound(db)
    try:
        conn.load(topo)
        conn.vm_add("v8", "c1", "a", mac=vm_mac("v9", infra))  # v9's first choice
        want = reference(conn.dump(), northbound.vm_add("v9", "c2", "a"))
        conn.vm_add("v9", "c2", "a")
        assert isinstance(want, dict) and conn.dump() == want
        assert want["vms"]["v9"]["mac"] not in (want["vms"]["v8"]["mac"], vm_mac("v9", infra))
    finally:
        conn.close()


def test_a_floating_ip_moves_in_two_writes_of_two_rows(db: str) -> None:
    conn = nb.Northbound(db)
    sent: list[list[dict[str, Any]]] = []
    original = conn.transact

    def counting(ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
        sent.append(ops)
        return original(ops)

    try:
        conn.load(build_topology(cloud()))
        conn.transact = counting  # type: ignore[method-assign]
        conn.fip_set("v5", "203.0.113.5")  # v1 holds it
        writes = [ops for ops in sent if any(op["op"] == "update" for op in ops)]
        # the first write is refused by the index on fip_key (naming v1), the second moves it
        assert len(writes) == 2
        assert sorted(op["table"] for op in writes[-1] if op["op"] == "update") == [
            "NB_Global", "Port", "Port"]
        assert all(op.get("where") != [] or op["table"] == "NB_Global"
                   for ops in sent for op in ops if op["op"] == "select"
                   and op["table"] == "Port")  # never a whole Port table
        vms = conn.dump()["vms"]
        assert vms["v5"]["floating_ip"] == "203.0.113.5" and "floating_ip" not in vms["v1"]
    finally:
        conn.close()


def test_a_full_network_refuses_a_vm_left_without_an_address(db: str) -> None:
    conn = nb.Northbound(db)
    try:
        conn.load(build_topology(cloud()))
        for i in range(5):  # 10.5.0.0/29: .2 to .6 (.1 is the gateway)
            doc = conn.dump()
            want = reference(doc, northbound.vm_add(f"f{i}", "c1", "e"))
            conn.vm_add(f"f{i}", "c1", "e")
            assert conn.dump() == want
        doc = conn.dump()
        want = reference(doc, northbound.vm_add("f5", "c2", "e"))
        assert want == "<change>: vms.f5.ip: no free address left in network e"
        with pytest.raises(TopologyError) as exc:
            conn.vm_add("f5", "c2", "e")
        assert str(exc.value) == want and conn.dump() == doc
    finally:
        conn.close()


@pytest.mark.parametrize("committed", [True, False])
def test_a_lost_answer_is_learnt_from_nb_global_and_never_written_twice(
        db: str, committed: bool) -> None:
    """The connection lost with the write: sent and committed, or never sent. The client
    reconnects, reads NB_Global alone, and writes again only when it must."""
    conn = nb.Northbound(db)
    sent: list[list[dict[str, Any]]] = []
    original = conn.transact
    lost = []

    def losing(ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
        sent.append(ops)
        if not lost and any(op["op"] == "wait" for op in ops):
            lost.append(ops)
            if committed:
                original(ops)
            raise nb.NbLost("the answer was lost")
        return original(ops)

    try:
        conn.load(build_topology(cloud()))
        _, changes = generation(conn)
        conn.transact = losing  # type: ignore[method-assign]
        got = conn.vm_add("v7", "c1", "a", ip="10.1.0.77")
        conn.transact = original  # type: ignore[method-assign]
        gen, after = generation(conn)
        assert (got, after) == (gen, changes + 1)
        assert conn.dump()["vms"]["v7"]["ip"] == "10.1.0.77"
        check = sent[sent.index(lost[0]) + 1]
        assert [op["table"] for op in check] == ["NB_Global"]  # what it read to know
        writes = [ops for ops in sent if any(op["op"] == "wait" for op in ops)]
        assert len(writes) == (1 if committed else 2)
    finally:
        conn.close()


def test_a_default_mac_a_router_holds_is_passed_over(db: str) -> None:
    """vm-add looks its first choice of MAC up in Router.macs and Node.macs; one held there
    is passed over for the model's next (the database made to say so here)."""
    conn = nb.Northbound(db)
    try:
        conn.load(build_topology(cloud()))
        first = vm_mac("v9", [])
        conn.transact([{"op": "mutate", "table": "Router", "where": [["name", "==", "r2"]],
                        "mutations": [["macs", "insert", ["set", [first]]]]}])
        conn.vm_add("v9", "c1", "a")
        assert conn.dump()["vms"]["v9"]["mac"] == vm_mac("v9", [first]) != first
    finally:
        conn.close()
