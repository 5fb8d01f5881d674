"""A port's entry put whole in O(change) (`flows.northbound.vm_put_change()`, what the
Neutron driver's writer sends for a port or a floating IP) against the whole-document path
it replaces (`Northbound.change()` of the edited document, as written unchanged): two real
ovsdb-servers with the northbound schema, one written each way, take the same random puts
and deletes (new ports, replaced ones, stale revisions, entries the rules refuse), and after
every step both hold the same document, a put is refused by one exactly when the other
refuses it, with the same message, and a refused or empty put writes nothing. Then the
writer itself (`dvr.neutron.writer.NbWriter`): batches of ports, a refused one among them,
a floating IP moved in the wrong order, a stale one, a lost database; and at 10,000 ports a
put reads no whole table."""

from __future__ import annotations

import ipaddress
import json
import logging
import random
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dvr import nb
from dvr.lab.generate import generate
from dvr.neutron import translate as tr
from dvr.neutron.writer import NbWriter, Put, placed
from flows import northbound
from flows.model import TopologyError, build_topology
from tests.nbserver import AVAILABLE, northbound_server

pytestmark = pytest.mark.skipif(not AVAILABLE, reason="needs ovsdb-server")

REVISIONS = (tr.REVISION, "neutron:fip_revision")


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[str]:
    with northbound_server(tmp_path) as remote:
        yield remote


@pytest.fixture()
def db2(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "second").mkdir()
    with northbound_server(tmp_path / "second") as remote:
        yield remote


def port_name(i: int) -> str:
    """Ports named as Neutron's are (UUIDs), in a small pool so that puts meet held ones,
    before and after them in the document's order."""
    return str(uuid.UUID(int=(i * 0x9E3779B97F4A7C15) % (1 << 128)))


def cloud() -> dict[str, Any]:
    """A small cloud where puts collide often: a /29 network, a small provider network,
    overlapping CIDRs, a network on no router, a router without an external gateway."""
    doc: dict[str, Any] = {
        "nodes": {"c1": {"role": "compute"}, "c2": {"role": "compute"},
                  "net1": {"role": "network"}},
        "external": {"cidr": "203.0.113.0/28", "gateway_ip": "203.0.113.1",
                     "remote_ip": "198.51.100.10"},
        "networks": {"a": {"cidr": "10.1.0.0/24", "gateway_ip": "10.1.0.1", "mtu": 1450,
                           "vni": 11},
                     "b": {"cidr": "10.2.0.0/29", "gateway_ip": "10.2.0.1", "mtu": 1450,
                           "vni": 12},
                     "c": {"cidr": "10.1.0.0/24", "gateway_ip": "10.1.0.1", "mtu": 1450,
                           "vni": 13},
                     "d": {"cidr": "10.4.0.0/24", "gateway_ip": "10.4.0.1", "mtu": 1450,
                           "vni": 14}},
        "routers": {"r1": {"interfaces": ["a", "b"], "external_gateway": True,
                           "external_ip": "203.0.113.10", "snat_nodes": []},
                    "r2": {"interfaces": ["d"]}},
        "vms": {}}
    for i, (net, ip) in enumerate([("a", "10.1.0.5"), ("b", "10.2.0.3"), ("c", "10.1.0.5"),
                                   ("d", "10.4.0.9"), ("a", "10.1.0.7")]):
        doc["vms"][port_name(i)] = {
            "node": "c1" if i % 2 else "c2", "network": net, "ip": ip,
            "mac": f"fa:16:3e:00:00:{i:02x}",
            "external_ids": {tr.OWNER: "port", tr.REVISION: "3"}}
    doc["vms"][port_name(0)]["floating_ip"] = "203.0.113.5"
    doc["vms"][port_name(0)]["external_ids"]["neutron:fip_revision"] = "2"
    return doc


NODES = ["c1", "c2", "c1", "c2", "net1", "nowhere"]
NETWORKS = ["a", "a", "b", "c", "d", "a", "zz"]


def random_put(rng: random.Random, doc: dict[str, Any]) -> Put:
    """A put as the driver makes them (its entry from Neutron's port, floating IP and
    revision numbers): of a held port or a new one, often colliding with another."""
    vms = doc["vms"]
    name = rng.choice([port_name(i) for i in range(12)] + ["Bad_Name"])
    held = vms.get(name)
    if rng.random() < 0.12:
        return Put("vms", name, None, REVISIONS)
    if held is not None and rng.random() < 0.15:  # Neutron's event again, or a late one
        entry = json.loads(json.dumps(held))
        if rng.random() < 0.6:
            ids = entry["external_ids"]
            key = rng.choice(REVISIONS)
            ids[key] = str(max(0, int(ids.get(key, "0")) + rng.choice([-2, -1, 0, 1])))
        return Put("vms", name, entry, REVISIONS, unplaced=rng.random() < 0.5)
    net = rng.choice(NETWORKS)
    entry: dict[str, Any] = {"node": rng.choice(NODES), "network": net}
    if held is not None and rng.random() < 0.5:  # a replaced port: the same addresses
        entry["ip"], entry["mac"] = held["ip"], held["mac"]
        entry["network"] = held["network"] if rng.random() < 0.8 else net
    else:
        cidr = ipaddress.IPv4Network(doc["networks"].get(net, {"cidr": "10.9.0.0/24"})["cidr"])
        r = rng.random()
        entry["ip"] = (str(list(cidr)[rng.randrange(0, min(10, cidr.num_addresses))]) if r < 0.9
                       else rng.choice(["10.9.9.9", "not-an-ip"]))
        r = rng.random()
        held_macs = [v["mac"] for v in vms.values()]
        topo = build_topology(doc)
        infra = ([i.mac for rt in topo.routers.values() for i in rt.interfaces]
                 + [n.external_mac for n in topo.nodes.values()])
        entry["mac"] = (rng.choice(held_macs) if r < 0.25 and held_macs
                        else rng.choice(infra) if r < 0.3
                        else rng.choice(["01:00:5e:00:00:01", "zz"]) if r < 0.33
                        else f"fa:16:3e:00:01:{rng.randrange(0, 40):02x}")
    ids = {tr.OWNER: "port", tr.REVISION: str(rng.randrange(0, 6))}
    if rng.random() < 0.35:
        held_fips = [v["floating_ip"] for v in vms.values() if "floating_ip" in v]
        entry["floating_ip"] = rng.choice(
            [f"203.0.113.{i}" for i in range(0, 17)] + held_fips * 3 + ["203.0.113.10"])
        ids["neutron:fip_revision"] = str(rng.randrange(0, 4))
    if rng.random() < 0.03:
        ids["bad key!"] = "x"
    if rng.random() < 0.02:
        entry["colour"] = "blue"
    entry["external_ids"] = ids
    return Put("vms", name, entry, REVISIONS, unplaced=rng.random() < 0.5)


def outcome(call: Callable[[], Any]) -> str | None:
    try:
        call()
        return None
    except (northbound.ChangeError, TopologyError) as exc:
        return f"{type(exc).__name__}: {exc}"


def whole(put: Put) -> Callable[[Any], Any]:
    """The whole-document edit of the put (what the writer's `change()` applies), raising
    on a stale entry instead of logging it."""
    def edit(doc: dict[str, Any]) -> dict[str, Any]:
        entry = put.entry
        if put.unplaced and entry is not None and not placed(doc, entry):
            entry = None
        tr.put(doc, put.section, put.name, entry, put.revisions)
        return doc
    return edit


def state(conn: nb.Northbound) -> tuple[str, int]:
    row = conn.transact([{"op": "select", "table": "NB_Global", "where": []}])[0]["rows"][0]
    return row["generation"], row["changes"]


@pytest.mark.parametrize("seed", range(int(__import__("os").environ.get("NB_SEEDS", "4"))))
def test_a_put_in_o_change_equals_the_whole_document_path(db: str, db2: str,
                                                          seed: int) -> None:
    rng = random.Random(seed)
    fast, slow = nb.Northbound(db), nb.Northbound(db2)
    try:
        for conn in (fast, slow):
            conn.change(lambda _: cloud(), effective=False)
        seen: dict[str, int] = {}
        for step in range(150):
            doc = fast.dump()
            put = random_put(rng, doc)
            before = state(fast)
            got = outcome(lambda put=put: fast.apply(put.command()))
            want = outcome(lambda put=put: slow.change(whole(put), effective=False))
            where = f"seed {seed} step {step}: {put}"
            assert got == want, where
            assert fast.dump() == slow.dump(), where
            if got is not None or fast.dump() == doc:
                assert state(fast) == before, where  # nothing written
                kind = ("same" if got is None else "stale" if "Stale" in got
                        else "refused")
            else:
                assert state(fast)[1] == before[1] + 1, where
                kind = "deleted" if put.entry is None or put.name not in fast.dump()["vms"] \
                    else "replaced" if put.name in doc["vms"] else "created"
            seen[kind] = seen.get(kind, 0) + 1
        assert {"created", "replaced", "deleted", "refused", "stale", "same"} <= set(seen), seen
        assert build_topology(fast.dump())  # still a valid cloud
    finally:
        fast.close()
        slow.close()


def test_a_held_port_first_in_the_documents_order_refuses_the_later_one(db: str,
                                                                        db2: str) -> None:
    """A replaced port taking the floating IP, address and MAC of ports after it in the
    document: the model refuses the later ports, in their places; so does the put."""
    doc = cloud()
    names = sorted(doc["vms"])
    first, later = names[0], [n for n in names[1:] if doc["vms"][n]["network"] == "a"]
    entry = dict(doc["vms"][first], network="a", ip=doc["vms"][later[0]]["ip"],
                 mac=doc["vms"][names[-1]]["mac"])
    fip_holder = next(n for n, v in doc["vms"].items() if "floating_ip" in v)
    if fip_holder != first:
        entry["floating_ip"] = doc["vms"][fip_holder]["floating_ip"]
    fast, slow = nb.Northbound(db), nb.Northbound(db2)
    try:
        for conn in (fast, slow):
            conn.change(lambda _: cloud(), effective=False)
        put = Put("vms", first, entry, REVISIONS)
        got = outcome(lambda: fast.apply(put.command()))
        want = outcome(lambda: slow.change(whole(put), effective=False))
        assert got == want and got is not None and f"vms.{later[0]}.ip" in got
    finally:
        fast.close()
        slow.close()


# --- the writer ----------------------------------------------------------------------------
class Recorder:
    """A connection's transactions, recorded (the writer's own connections)."""

    def __init__(self, remote: str) -> None:
        self.remote = remote
        self.sent: list[list[dict[str, Any]]] = []
        self.connections = 0

    def connect(self) -> nb.Northbound:
        conn = nb.Northbound(self.remote)
        original = conn.transact
        self.connections += 1

        def recording(ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
            self.sent.append(ops)
            return original(ops)

        conn.transact = recording  # type: ignore[method-assign]
        return conn

    def whole_reads(self) -> list[str]:
        """The tables read whole (a select without a condition)."""
        return [op["table"] for ops in self.sent for op in ops
                if op["op"] == "select" and not op["where"]]


def vm(node: str, net: str, ip: str, mac: str, rev: int = 1, fip: str | None = None
       ) -> dict[str, Any]:
    entry: dict[str, Any] = {"node": node, "network": net, "ip": ip, "mac": mac}
    ids = {tr.OWNER: "port", tr.REVISION: str(rev)}
    if fip is not None:
        entry["floating_ip"] = fip
        ids["neutron:fip_revision"] = str(rev)
    entry["external_ids"] = ids
    return entry


def test_the_writer_puts_ports_one_by_one_and_leaves_out_only_a_refused_one(
        db: str, caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder(db)
    writer = NbWriter(rec.connect)
    conn = nb.Northbound(db)
    try:
        conn.change(lambda _: cloud(), effective=False)
        p = [port_name(20 + i) for i in range(4)]
        before = state(conn)
        caplog.set_level(logging.WARNING, logger="dvr.neutron.writer")
        outcome = writer.write([
            ("port 1", [Put("vms", p[0], vm("c1", "a", "10.1.0.40", "fa:16:3e:00:02:01"),
                            REVISIONS)]),
            ("port 2", [Put("vms", p[1], vm("c1", "a", "10.1.0.40", "fa:16:3e:00:02:02"),
                            REVISIONS)]),  # the address of port 1: refused
            ("port 3", [Put("vms", p[2], vm("c2", "zz", "10.1.0.41", "fa:16:3e:00:02:03"),
                            REVISIONS, unplaced=True)]),  # not dvr's network: none
            ("port 4", [Put("vms", p[3], vm("c2", "d", "10.4.0.41", "fa:16:3e:00:02:04"),
                            REVISIONS)])])
        vms = conn.dump()["vms"]
        assert outcome == "refused" and not writer.dirty
        assert p[0] in vms and p[3] in vms and p[1] not in vms and p[2] not in vms
        assert f"vms.{p[1]}.ip: 10.1.0.40 is already used by vms.{p[0]}" in caplog.text
        # together refused by the index on addresses, then one by one: port 1 alone, port
        # 2 refused, the rest from it as a whole document (refused: port 2 again), ports 3
        # and 4 together (port 3 nothing)
        assert state(conn)[1] == before[1] + 2
        # a stale entry: logged, nothing written
        caplog.clear()
        gen = state(conn)
        writer.write([("port 1 late", [Put("vms", p[0], vm("c2", "a", "10.1.0.42",
                                                           "fa:16:3e:00:02:01", rev=0),
                                           REVISIONS)])])
        assert state(conn) == gen and conn.dump()["vms"][p[0]]["ip"] == "10.1.0.40"
        assert "stale update refused" in caplog.text and "revision_number 0 is older" \
            in caplog.text
    finally:
        conn.close()


def test_a_floating_ip_move_queued_backwards_is_written(db: str) -> None:
    """The port that takes a floating IP put before the port that lets it go (two events
    queued in that order): alone the first is refused, together they hold. In one
    transaction of the two puts; and when a stale put among them has them written one by
    one, the rest of the batch from the refused one as one whole-document edit."""
    rec = Recorder(db)
    writer = NbWriter(rec.connect)
    conn = nb.Northbound(db)
    try:
        conn.change(lambda _: cloud(), effective=False)
        doc = conn.dump()
        holder = next(n for n, v in doc["vms"].items() if "floating_ip" in v)
        taker = next(n for n, v in doc["vms"].items() if v["network"] == "b")
        late = next(n for n in doc["vms"] if n not in (holder, taker))
        fip = doc["vms"][holder]["floating_ip"]

        def entries(rev: int, on: str) -> list[Put]:
            out = []
            for name in (taker, holder) if on == taker else (holder, taker):
                e = {k: v for k, v in doc["vms"][name].items() if k != "floating_ip"}
                e["external_ids"] = dict(e["external_ids"], **{tr.REVISION: str(rev)})
                if name == on:
                    e["floating_ip"] = fip
                out.append(Put("vms", name, e, REVISIONS))
            return out

        before = state(conn)
        assert writer.write([("floating IP moved", entries(4, taker))]) == "written"
        vms = conn.dump()["vms"]
        assert vms[taker]["floating_ip"] == fip and "floating_ip" not in vms[holder]
        assert state(conn)[1] == before[1] + 1  # one transaction
        assert set(rec.whole_reads()) <= {"NB_Global", "External"}, rec.whole_reads()
        stale = dict(doc["vms"][late])
        stale["external_ids"] = dict(stale["external_ids"], **{tr.REVISION: "0"})
        rec.sent.clear()
        assert writer.write([("port late", [Put("vms", late, stale, REVISIONS)]),
                             ("floating IP moved back", entries(5, holder))]) == "written"
        vms = conn.dump()["vms"]
        assert vms[holder]["floating_ip"] == fip and "floating_ip" not in vms[taker]
        assert vms[late] == doc["vms"][late]
        assert "Port" in rec.whole_reads()  # the whole document, after the refusal
    finally:
        conn.close()


def test_a_lost_database_marks_the_writer_dirty(tmp_path: Path) -> None:
    writer = NbWriter(lambda: nb.Northbound(f"unix:{tmp_path}/none.sock", timeout=0.2))
    assert writer.write([("port", [Put("vms", port_name(1), None)])]) == "lost"
    assert writer.dirty


def test_a_network_goes_whole_and_the_ports_beside_it_in_o_change(db: str) -> None:
    """A batch of a port, a network, a port on that network: the network is an edit of the
    whole document, the ports beside it are put in O(change), in the batch's order."""
    rec = Recorder(db)
    writer = NbWriter(rec.connect)
    conn = nb.Northbound(db)
    try:
        conn.change(lambda _: cloud(), effective=False)
        net = {"cidr": "10.7.0.0/24", "gateway_ip": "10.7.0.1", "mtu": 1450, "vni": 17,
               "external_ids": {tr.OWNER: "network", tr.REVISION: "1"}}
        first, port = port_name(31), port_name(30)
        before = state(conn)
        assert writer.write([
            ("port", [Put("vms", first, vm("c1", "a", "10.1.0.31", "fa:16:3e:00:03:02"),
                          REVISIONS, unplaced=True)]),
            ("network", [Put("networks", "g", net)]),
            ("port", [Put("vms", port, vm("c1", "g", "10.7.0.5", "fa:16:3e:00:03:01"),
                          REVISIONS, unplaced=True)])]) == "written"
        vms = conn.dump()["vms"]
        assert vms[port]["network"] == "g" and vms[first]["ip"] == "10.1.0.31"
        assert state(conn)[1] == before[1] + 3  # three writes, in order
        assert rec.whole_reads().count("Port") == 1  # the whole document read once
    finally:
        conn.close()


# --- at 10,000 ports ---------------------------------------------------------------------
def test_at_10000_ports_a_put_reads_no_whole_table(db: str) -> None:
    """A port created, its floating IP moved to it from another port, the port deleted,
    through the writer: no table read whole but NB_Global and External (one row each at
    most, by the schema; External for a floating IP only), ports looked up by their row
    UUIDs only, one transaction writing the ports' rows."""
    doc = generate(10_000, computes=50, networks=100, fip_every=10)
    for v in doc["vms"].values():
        v["external_ids"] = {tr.OWNER: "port", tr.REVISION: "1"}
    conn = nb.Northbound(db, timeout=120)
    try:
        conn.load(build_topology(doc))  # one transaction
        held = conn.dump()
        rec = Recorder(db)
        writer = NbWriter(rec.connect)
        holder = next(n for n, v in held["vms"].items() if "floating_ip" in v)
        fip = held["vms"][holder]["floating_ip"]
        net = held["vms"][holder]["network"]
        ip = str(ipaddress.IPv4Network(held["networks"][net]["cidr"])[250])
        new = port_name(99)
        loses = {k: v for k, v in held["vms"][holder].items() if k != "floating_ip"}
        loses["external_ids"] = {tr.OWNER: "port", tr.REVISION: "2"}
        for what, edits, changed in (
                ("port created", [Put("vms", new, vm("c3", net, ip, "fa:16:3e:10:00:01"),
                                      REVISIONS, unplaced=True)], 1),
                ("floating IP moved", [Put("vms", holder, loses, REVISIONS),
                                       Put("vms", new, vm("c3", net, ip, "fa:16:3e:10:00:01",
                                                          rev=2, fip=fip), REVISIONS)], 2),
                ("port deleted", [Put("vms", new, None, REVISIONS)], 1)):
            rec.sent.clear()
            before = state(conn)
            assert writer.write([(what, edits)]) == "written", what
            assert state(conn)[1] == before[1] + 1, what
            assert set(rec.whole_reads()) <= {"NB_Global", "External"}, (what, rec.sent)
            assert all(op["where"][0][0] == "_uuid" for ops in rec.sent for op in ops
                       if op["op"] == "select" and op["table"] == "Port"), what  # no scan
            writes = [op for ops in rec.sent for op in ops
                      if op["op"] in ("insert", "update", "delete") and op["table"] == "Port"]
            assert len(writes) == changed, (what, writes)
        vms = conn.dump()["vms"]
        assert new not in vms and "floating_ip" not in vms[holder]
    finally:
        conn.close()


@pytest.mark.parametrize("committed", [True, False])
def test_puts_in_one_transaction_are_written_once_across_a_lost_answer(
        db: str, committed: bool) -> None:
    """`apply_all()`'s write lost with its answer, committed or not: NB_Global read alone
    tells, and the puts are written again only when they must."""
    conn = nb.Northbound(db)
    sent: list[list[dict[str, Any]]] = []
    original = conn.transact
    lost: list[list[dict[str, Any]]] = []

    def losing(ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
        sent.append(ops)
        if not lost and any(op["op"] == "wait" for op in ops):
            lost.append(ops)
            if committed:
                original(ops)
            raise nb.NbLost("the answer was lost")
        return original(ops)

    try:
        conn.change(lambda _: cloud(), effective=False)
        _, changes = state(conn)
        a, b = port_name(40), port_name(41)
        conn.transact = losing  # type: ignore[method-assign]
        got = conn.apply_all([
            Put("vms", a, vm("c1", "a", "10.1.0.60", "fa:16:3e:00:04:01"), REVISIONS).command(),
            Put("vms", b, vm("c2", "d", "10.4.0.60", "fa:16:3e:00:04:02"), REVISIONS).command()])
        conn.transact = original  # type: ignore[method-assign]
        assert state(conn) == (got, changes + 1)
        vms = conn.dump()["vms"]
        assert vms[a]["ip"] == "10.1.0.60" and vms[b]["ip"] == "10.4.0.60"
        assert [op["table"] for op in sent[sent.index(lost[0]) + 1]] == ["NB_Global"]
        writes = [ops for ops in sent if any(op["op"] == "wait" for op in ops)]
        assert len(writes) == (1 if committed else 2)
    finally:
        conn.close()


def test_a_row_from_before_names_gave_uuids_is_found_by_name(db: str) -> None:
    """A port's row under a UUID not derived from its name (a database written before they
    were): the put's insert is refused by the index on names, and the put starts over
    with the row found by name, replacing it."""
    conn = nb.Northbound(db)
    try:
        conn.change(lambda _: cloud(), effective=False)
        name = port_name(1)
        row = conn.transact([{"op": "select", "table": "Port",
                              "where": [["name", "==", name]]}])[0]["rows"][0]
        copy = {k: v for k, v in row.items() if k not in ("_uuid", "_version")}
        conn.transact([{"op": "delete", "table": "Port", "where": [["name", "==", name]]},
                       {"op": "insert", "table": "Port", "row": copy}])
        entry = dict(conn.dump()["vms"][name], ip="10.2.0.6")
        entry["external_ids"] = dict(entry["external_ids"], **{tr.REVISION: "9"})
        conn.apply(Put("vms", name, entry, REVISIONS).command())
        assert conn.dump()["vms"][name] == entry
        # deleted: found by name too
        conn.apply(Put("vms", name, None, REVISIONS).command())
        assert name not in conn.dump()["vms"]
    finally:
        conn.close()
