"""The northbound database's access control, as data: the remotes operators give, the
roles and the operations that write them; the TLS identity of a client; the lab's PKI."""

from __future__ import annotations

import json
import ssl
import subprocess
from pathlib import Path

import pytest

from agent import tls
from dvr.lab.pki import Pki, subject_cn
from flows import northbound
from flows.northbound import ChangeError, Remote, access_ops, parse_remotes, roles


def test_remotes_take_the_role_before_them() -> None:
    got = parse_remotes(["role=dvr-agent", "pssl:6641", "role=dvr-scheduler", "pssl:6642",
                         "role=", "read-only", "pssl:6644:127.0.0.1", "punix:/run/x.sock"])
    assert got == [Remote("pssl:6641", "dvr-agent"), Remote("pssl:6642", "dvr-scheduler"),
                   Remote("pssl:6644:127.0.0.1", "", read_only=True),
                   Remote("punix:/run/x.sock", "")]


@pytest.mark.parametrize("words, why", [
    (["role=root", "pssl:6641"], "role 'root': not one of dvr-agent, dvr-scheduler"),
    (["ssl:1.2.3.4:6641"], "not a passive remote"),
    (["pssl:6641", "pssl:6641"], "given twice"),
])
def test_bad_remotes_are_refused_with_the_reason(words: list[str], why: str) -> None:
    with pytest.raises(ChangeError, match=why):
        parse_remotes(words)


def test_an_agent_may_write_every_column_of_its_report_but_its_name() -> None:
    schema = json.loads(northbound.SCHEMA.read_text())
    agent = roles()["dvr-agent"]
    assert list(agent) == ["Agent"]
    perm = agent["Agent"]
    assert perm["authorization"] == ["node"] and perm["insert_delete"] is True
    assert set(perm["update"]) == set(schema["tables"]["Agent"]["columns"]) - {"node"}
    # ovsdb-server compares the authorization column with the CN: a string, not a set
    assert schema["tables"]["Agent"]["columns"]["node"]["type"] == "string"
    sched = roles()["dvr-scheduler"]
    assert sched == {"Router": {"authorization": [""], "insert_delete": False,
                                "update": ["snat_chain"]}}


def test_the_schema_has_what_ovsdb_server_reads_for_roles_and_remotes() -> None:
    tables = json.loads(northbound.SCHEMA.read_text())["tables"]
    assert {"name", "permissions"} <= set(tables["RBAC_Role"]["columns"])
    assert {"table", "authorization", "insert_delete", "update"} <= set(
        tables["RBAC_Permission"]["columns"])
    assert {"target", "role", "read_only", "inactivity_probe", "max_backoff"} <= set(
        tables["Connection"]["columns"])
    ref = tables["NB_Global"]["columns"]["connections"]["type"]["key"]
    assert ref == {"type": "uuid", "refTable": "Connection"}
    assert set(northbound.ACCESS_TABLES) == {"Connection", "RBAC_Role", "RBAC_Permission"}


def test_access_ops_replace_only_the_projects_roles() -> None:
    existing = [
        {"_uuid": ["uuid", "r1"], "name": "dvr-agent",
         "permissions": ["map", [["Agent", ["uuid", "p1"]]]]},
        {"_uuid": ["uuid", "r2"], "name": "someone-elses",
         "permissions": ["map", [["Port", ["uuid", "p2"]]]]},
    ]
    ops = access_ops([Remote("pssl:6641", "dvr-agent")], existing, global_exists=True)
    deleted = [(o["table"], o["where"][0][2][1]) for o in ops if o["op"] == "delete"]
    assert deleted == [("RBAC_Permission", "p1"), ("RBAC_Role", "r1")]
    inserted = {o["row"]["name"] for o in ops if o["op"] == "insert"
                and o["table"] == "RBAC_Role"}
    assert inserted == set(roles())
    conn = [o for o in ops if o["table"] == "Connection"]
    assert conn[0]["row"] == {"target": "pssl:6641", "role": "dvr-agent", "read_only": False}
    assert ops[-1] == {"op": "update", "table": "NB_Global", "where": [],
                       "row": {"connections": ["set", [["named-uuid", "conn0"]]]}}
    # on a database with nothing loaded: its NB_Global row, with no generation
    first = access_ops([], [], global_exists=False)[-1]
    assert first["op"] == "insert" and first["row"]["generation"] == ""


def test_a_chain_names_network_nodes_only() -> None:
    """A router's chain is written by the schedulers' role: a compute node put in it
    by a forged write is not where SNAT goes."""
    nodes = [{"_uuid": ["uuid", "n1"], "name": "compute1", "role": "compute", "position": 0,
              "tunnel_ip": ["set", []]},
             {"_uuid": ["uuid", "n2"], "name": "net1", "role": "network", "position": 1,
              "tunnel_ip": ["set", []]}]
    router = {"_uuid": ["uuid", "r"], "name": "r1", "position": 0,
              "interfaces": ["map", []], "external_gateway": True,
              "external_ip": "203.0.113.10", "snat_nodes": ["map", [[0, ["uuid", "n2"]]]],
              "snat_chain": ["map", [[0, ["uuid", "n1"]], [1, ["uuid", "n2"]]]],
              "external_ids": ["map", []]}
    doc = northbound.document([{"rows": []}, {"rows": nodes}, {"rows": []}, {"rows": []},
                               {"rows": [router]}, {"rows": []}], live=True)
    assert doc["routers"]["r1"]["snat_nodes"] == ["net1"]


def test_the_pki_issues_named_certificates_valid_or_expired(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    pki.ensure(["compute1", "admin"])
    assert subject_cn(pki.cert("compute1")) == "compute1"
    assert subject_cn(pki.cert("admin")) == "admin"
    assert oct(pki.key("compute1").stat().st_mode & 0o777) == "0o600"
    assert oct(pki.cakey.stat().st_mode & 0o777) == "0o600"
    verify = lambda cert: subprocess.run(  # noqa: E731
        ["openssl", "verify", "-CAfile", str(pki.cacert), str(cert)],
        capture_output=True, text=True)
    assert verify(pki.cert("compute1")).returncode == 0
    before = pki.cert("compute1").read_bytes(), pki.key("compute1").read_bytes()
    pki.issue("compute1", days=-1)
    assert (pki.cert("compute1").read_bytes(), pki.key("compute1").read_bytes()) != before
    res = verify(pki.cert("compute1"))
    assert res.returncode != 0 and "expired" in res.stdout + res.stderr
    pki.ensure(["compute1"])  # present: left as it is
    assert verify(pki.cert("compute1")).returncode != 0


def test_a_clients_identity_all_three_files_or_none(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    pki.ensure(["compute1"])
    try:
        with pytest.raises(tls.TlsError, match="all three"):
            tls.configure(str(pki.key("compute1")), None, None)
        with pytest.raises(tls.TlsError, match="cannot read"):
            tls.configure(str(pki.key("compute1")), str(tmp_path / "none"), str(pki.cacert))
        assert tls.configure(None, None, None) is None
        with pytest.raises(tls.TlsError, match="needs a private key"):
            tls.require("tcp:1.2.3.4:6641,ssl:1.2.3.5:6641")
        tls.require("tcp:1.2.3.4:6641")   # plain TCP needs none
        ident = tls.configure(*pki.files("compute1"))
        assert ident is not None and tls.identity() == ident
        ctx = tls.client_context()
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        watch = tls.Watch(ident)
        assert not watch.changed()
        pki.issue("compute1")
        assert watch.changed() and not watch.changed()
    finally:
        tls.configure(None, None, None)
