"""The agent's northbound source keeps its model row by row: a real ovsdb-server with the
project's schema (no lab, no root), random changes written into it as `dvr nb` writes them
(every allocated value written out), and after each one the source's model equals
`build_topology()` of the database's document, a refused one leaves the last model, and the
change the source reports covers what differs. The copy is read whole once.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.source import NbSource, document_of
from dvr.nb import NbError, Northbound
from flows import northbound
from flows.incremental import Change
from flows.model import Topology, TopologyError, build_topology
from tests.nbserver import AVAILABLE, northbound_server
from tests.unit.changes import Cloud, copy, shapes

pytestmark = pytest.mark.skipif(not AVAILABLE, reason="needs ovsdb-server")


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[str]:
    with northbound_server(tmp_path) as remote:
        yield remote


def write(conn: Northbound, old: dict | None, new: dict) -> None:
    """The database from `old` into `new`, row by row (what `dvr nb` sends)."""
    uuids, generation = northbound.uuids_of(conn.transact(northbound.dump_ops()))
    conn.transact(northbound.diff_ops(old, new, uuids, generation))


def settle(source: NbSource) -> bool:
    """Poll until the source has news (True) or a moment passed without (False)."""
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        if source.poll():
            return True
        time.sleep(0.005)
    return False


def model(doc: dict) -> Topology | None:
    try:
        return build_topology(doc, "northbound")
    except TopologyError:
        return None


def test_the_source_s_model_follows_the_database_row_by_row(db: str) -> None:
    rng = random.Random(11)
    cloud = Cloud(copy(shapes()["mixed"]), rng)
    conn = Northbound(db)
    source = NbSource(db)
    try:
        write(conn, None, cloud.doc)
        assert settle(source)
        last = source.load()
        assert {**last.vms} == build_topology(cloud.doc).vms
        refused = steps = 0
        while steps < 60:
            before = copy(cloud.doc)
            cloud.mutate()
            want = model(cloud.doc)
            try:
                write(conn, before, cloud.doc)
            except NbError:  # the database's own integrity refused it
                cloud.doc = before
                continue
            steps += 1
            assert settle(source)
            try:
                got = source.load()
            except TopologyError:
                assert want is None
                refused += 1
                back = model(before)
                assert back is not None
                write(conn, cloud.doc, before)  # undone, as an operator would
                cloud.doc = before
                assert settle(source)
                got = source.load()
                want = back
            assert want is not None
            assert got.nodes == want.nodes and got.networks == want.networks
            assert got.routers == want.routers and dict(got.vms) == want.vms
            assert got.external == want.external
            # the small tables' document, patched row by row, is the whole copy's
            whole = document_of(source.idl)
            assert source._infra == {k: v for k, v in whole.items() if k != "vms"}
            change = source.delta()
            if change is not None:
                real = Change.between(last, got)
                assert real.vms <= change.vms and real.networks <= change.networks
                assert real.routers <= change.routers
            last = got
        assert refused > 2
        assert source.rebuilds == 1  # read whole once, then row by row
        assert source.patched > 10  # the small tables' rows too
    finally:
        source.close()
        conn.close()
