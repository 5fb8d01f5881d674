"""The northbound database: a real ovsdb-server with this project's schema."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from dvr import nb
from dvr.lab.generate import generate
from flows import northbound
from flows.model import build_topology, load_topology, to_dict
from tests.lab.harness import EXAMPLE, dvr
from tests.nbserver import northbound_server


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[str]:
    with northbound_server(tmp_path) as remote:
        yield remote


def nb_cli(target: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`dvr nb ARGS` against `target` through DVR_NB_DB, as the README shows it."""
    os.environ["DVR_NB_DB"] = target
    try:
        return dvr("nb", *args, check=check)
    finally:
        del os.environ["DVR_NB_DB"]


def test_load_then_dump_round_trips_the_built_in_topology(db: str, tmp_path: Path) -> None:
    nb_cli(db, "load", str(EXAMPLE))
    dumped = tmp_path / "dump.yaml"
    dumped.write_text(nb_cli(db, "dump").stdout)
    assert to_dict(load_topology(dumped)) == to_dict(load_topology(EXAMPLE))
    shown = nb_cli(db, "show").stdout
    assert "router r1: blue, red external 203.0.113.10 snat net1" in shown


def test_a_generated_1000_port_cloud_round_trips(db: str) -> None:
    doc = generate(1000, computes=10, networks=10, fip_every=10)
    fips = sum(1 for vm in doc["vms"].values() if "floating_ip" in vm)
    topo = build_topology(doc)
    conn = nb.Northbound(db)
    try:
        conn.load(topo)
        back = conn.topology()
    finally:
        conn.close()
    assert to_dict(back) == to_dict(topo)
    assert len(back.vms) == len(doc["vms"]) == 1000
    assert fips and len(back.floating_ips()) == fips


def test_a_refused_topology_writes_nothing(db: str, tmp_path: Path) -> None:
    nb_cli(db, "load", str(EXAMPLE))
    before = nb_cli(db, "dump").stdout
    data = yaml.safe_load(EXAMPLE.read_text())
    data["vms"]["vm2"]["ip"] = "10.1.0.11"  # red network: outside its CIDR
    data["vms"]["vm4"]["floating_ip"] = "192.0.2.9"  # outside the external CIDR
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    res = nb_cli(db, "load", str(bad), check=False)
    assert res.returncode != 0
    assert len(res.stderr.strip().splitlines()) == 1
    assert "vms.vm4.floating_ip" in res.stderr and "(and 1 more)" in res.stderr
    assert nb_cli(db, "dump").stdout == before


def test_the_database_holds_its_own_constraints(db: str) -> None:
    conn = nb.Northbound(db)
    try:
        conn.load(load_topology(EXAMPLE))
        with pytest.raises(nb.NbError, match="constraint violation"):
            conn.transact([{"op": "insert", "table": "Network", "row": {
                "name": "blue", "position": 9, "cidr": "10.9.0.0/24",
                "gateway_ip": "10.9.0.1", "mtu": 1450, "vni": 99}}])
        with pytest.raises(nb.NbError, match="referential integrity"):  # no such node
            conn.transact([{"op": "insert", "table": "Port", "row": {
                "name": "ghost", "node": ["uuid", "6a0c6b6e-0000-4000-8000-000000000000"],
                "network": ["uuid", "6a0c6b6e-0000-4000-8000-000000000001"],
                "ip": "10.1.0.99", "mac": "fa:16:3e:00:00:99"}}])
        assert "ghost" not in conn.dump()["vms"]
    finally:
        conn.close()


def test_no_or_dead_database_is_one_clear_line(tmp_path: Path) -> None:
    res = dvr("nb", "show", check=False)
    assert res.returncode != 0 and "no northbound database" in res.stderr
    res = nb_cli(f"unix:{tmp_path}/nothing.sock", "show", check=False)
    assert res.returncode != 0 and "cannot connect to the northbound database" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def port_uuids(conn: nb.Northbound) -> dict[str, str]:
    rows = conn.transact([{"op": "select", "table": "Port", "where": [],
                           "columns": ["_uuid", "name"]}])[0]["rows"]
    return {r["name"]: r["_uuid"][1] for r in rows}


def test_object_commands_change_only_their_rows(db: str) -> None:
    nb_cli(db, "load", str(EXAMPLE))
    conn = nb.Northbound(db)
    try:
        before = port_uuids(conn)
        gen = nb_cli(db, "fip-set", "vm1", "203.0.113.50").stdout.split()[-1]
        assert conn.dump()["vms"]["vm1"]["floating_ip"] == "203.0.113.50"
        nb_cli(db, "fip-set", "vm4", "203.0.113.50")  # a move
        vms = conn.dump()["vms"]
        assert "floating_ip" not in vms["vm1"] and vms["vm4"]["floating_ip"] == "203.0.113.50"
        assert port_uuids(conn) == before  # rows updated in place, nothing replaced
        nb_cli(db, "vm-add", "vm9", "--node", "compute1", "--network", "red")
        added = conn.topology().vms["vm9"]
        assert str(added.ip).startswith("10.2.0.") and added.node == "compute1"
        assert {k: v for k, v in port_uuids(conn).items() if k != "vm9"} == before
        nb_cli(db, "router-if-del", "r1", "red")
        assert conn.dump()["routers"]["r1"]["interfaces"] == ["blue"]
        nb_cli(db, "router-if-add", "r1", "red")
        nb_cli(db, "vm-del", "vm9")
        nb_cli(db, "fip-del", "vm4")
        assert to_dict(conn.topology()) == to_dict(load_topology(EXAMPLE))
        assert gen != northbound.generation_of(conn.dump())
    finally:
        conn.close()


@pytest.mark.parametrize("args,reason", [
    (("fip-set", "vm2", "192.0.2.7"), "vms.vm2.floating_ip: 192.0.2.7 is outside"),
    (("vm-add", "vm8", "--node", "net1", "--network", "red"), "vms.vm8.node"),
    (("vm-add", "vm8", "--node", "compute1", "--network", "red", "--ip", "10.2.0.12"),
     "vms.vm8.ip: 10.2.0.12 is already used by vms.vm2"),
    (("vm-del", "vm42"), "vms.vm42: no such vm"),
    (("router-if-add", "r1", "blue"), "blue is already on it"),
])
def test_a_refused_change_writes_nothing(db: str, args: tuple[str, ...], reason: str) -> None:
    nb_cli(db, "load", str(EXAMPLE))
    before = nb_cli(db, "dump").stdout
    res = nb_cli(db, *args, check=False)
    assert res.returncode != 0 and reason in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert nb_cli(db, "dump").stdout == before


def test_a_change_on_a_stale_read_is_refused_by_the_database(db: str) -> None:
    conn = nb.Northbound(db)
    try:
        conn.load(load_topology(EXAMPLE))
        results = conn.transact(northbound.dump_ops())
        uuids, generation = northbound.uuids_of(results)
        old = northbound.document(results)
        nb_cli(db, "fip-set", "vm1", "203.0.113.50")  # somebody else, meanwhile
        new = northbound.document(results)
        new["vms"]["vm2"]["floating_ip"] = "203.0.113.51"
        with pytest.raises(nb.NbError, match="wait"):
            conn.transact(northbound.diff_ops(old, new, uuids, generation))
        assert "floating_ip" not in conn.dump()["vms"]["vm2"]
        # through change(), the same edit reads again and lands on top of the other one
        conn.change(northbound.fip_set("vm2", "203.0.113.51"))
        vms = conn.dump()["vms"]
        assert (vms["vm1"]["floating_ip"], vms["vm2"]["floating_ip"]) == (
            "203.0.113.50", "203.0.113.51")
    finally:
        conn.close()


@pytest.fixture()
def big(db: str) -> Iterator[nb.Northbound]:
    """The database holding a generated cloud of 10,000 ports."""
    conn = nb.Northbound(db, timeout=120)
    try:
        conn.load(build_topology(generate(10_000, computes=50, networks=100, fip_every=10)))
        yield conn
    finally:
        conn.close()


def nb_global(conn: nb.Northbound) -> dict:
    return conn.transact([{"op": "select", "table": "NB_Global", "where": []}])[0]["rows"][0]


@pytest.mark.parametrize("args,reason", [
    (("vm-add", "dup-ip", "--node", "c1", "--network", "n7", "--ip", "10.0.7.12"),
     "vms.dup-ip.ip: 10.0.7.12 is already used by vms.v"),
    (("vm-add", "dup-mac", "--node", "c1", "--network", "n7", "--mac", "MAC-OF-V5"),
     "vms.dup-mac.mac: MAC-OF-V5 is already used by vms.v5"),
    (("vm-add", "lost", "--node", "c1", "--network", "n999"),
     "vms.lost.network: unknown network 'n999'"),
])
def test_at_10000_ports_a_duplicate_or_a_dangling_change_writes_nothing(
        big: nb.Northbound, db: str, args: tuple[str, ...], reason: str) -> None:
    doc = big.dump()
    mac = doc["vms"]["v5"]["mac"]
    args = tuple(a.replace("MAC-OF-V5", mac) for a in args)
    reason = reason.replace("MAC-OF-V5", mac)
    before = nb_global(big)
    res = nb_cli(db, *args, check=False)
    assert res.returncode != 0 and reason in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert nb_global(big) == before
    assert big.dump() == doc


def test_at_10000_ports_a_change_reads_and_writes_only_its_rows(big: nb.Northbound) -> None:
    """vm-add (addresses allocated), fip-set (a move), fip-del, vm-del: each reads a few
    rows (and vm-add the ports of its network when its first choice of address is taken),
    never a whole table of routers, networks or ports, and writes one or two ports; the
    result is what the whole document gives."""
    doc = big.dump()
    per_net = max(sum(1 for v in doc["vms"].values() if v["network"] == n)
                  for n in doc["networks"])
    sent: list[list[dict]] = []
    got: list[int] = []
    original = big.transact

    def counting(ops: list[dict]) -> list[dict]:
        sent.append(ops)
        results = original(ops)
        got.append(sum(len(r.get("rows", [])) for r in results if isinstance(r, dict)))
        return results

    big.transact = counting  # type: ignore[method-assign]
    holder = next(n for n, v in doc["vms"].items() if "floating_ip" in v)
    fip = doc["vms"][holder]["floating_ip"]
    for change, edit in (
            (lambda: big.vm_add("new1", "c3", "n42"), northbound.vm_add("new1", "c3", "n42")),
            (lambda: big.fip_set("new1", fip), northbound.fip_set("new1", fip)),
            (lambda: big.fip_del("new1"), northbound.fip_del("new1")),
            (lambda: big.vm_del("new1"), northbound.vm_del("new1"))):
        sent.clear()
        got.clear()
        change()
        assert sum(got) <= per_net + 20, got
        for ops in sent:
            for op in ops:
                assert op["op"] == "insert" or op["where"] or op["table"] in (
                    "NB_Global", "External"), op
        writes = [op for ops in sent for op in ops if op["op"] in ("insert", "update", "delete")
                  and op["table"] == "Port"]
        assert 1 <= len(writes) <= 3, writes  # a move: tried, then the holder cleared
        big.transact = original  # type: ignore[method-assign]
        doc = to_dict(build_topology(edit(doc)))
        assert big.dump() == doc
        big.transact = counting  # type: ignore[method-assign]
