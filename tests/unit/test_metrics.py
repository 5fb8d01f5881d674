"""The agent's Prometheus metrics and JSON log lines (agent/metrics.py, agent/main.py)."""

from __future__ import annotations

import json
import logging
import urllib.request

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.main import JsonFormatter
from agent.metrics import Metrics


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(m.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_a_sync_and_a_failure_are_counted():
    m = Metrics("compute1", "0.2.0")
    m.synced(True, 120, 120, 0, {"ovsdb": 2.0, "plan": 5.0, "dump": 1.0, "apply": 12.0})
    m.synced(False, 121, 3, 2, {"ovsdb": 1.0, "plan": 2.0, "apply": 4.0})
    m.failed("bundle")
    got = samples(m)
    assert got[("dvr_agent_flows_installed", ())] == 121
    assert got[("dvr_agent_syncs_total", (("kind", "full"),))] == 1
    assert got[("dvr_agent_syncs_total", (("kind", "incremental"),))] == 1
    assert got[("dvr_agent_flow_changes_total", (("change", "added"),))] == 123
    assert got[("dvr_agent_flow_changes_total", (("change", "deleted"),))] == 2
    assert got[("dvr_agent_sync_errors_total", (("kind", "bundle"),))] == 1
    assert got[("dvr_agent_sync_errors_total", (("kind", "ovsdb"),))] == 0
    assert got[("dvr_agent_converged", ())] == 0  # the last sync failed
    assert got[("dvr_agent_sync_seconds_count", ())] == 2
    assert abs(got[("dvr_agent_sync_seconds_sum", ())] - 0.027) < 1e-9
    assert got[("dvr_agent_sync_phase_seconds_count", (("phase", "dump"),))] == 1
    assert got[("dvr_agent_info", (("node", "compute1"), ("version", "0.2.0")))] == 1


def test_bfd_sessions_and_snat_roles_follow_the_reports():
    m = Metrics("net1", "0.2.0")
    m.state(1000.0, True, {"compute1": "up", "net2": "down"}, ["r1", "r2"])
    got = samples(m)
    assert got[("dvr_agent_bfd_session_up", (("peer", "compute1"),))] == 1
    assert got[("dvr_agent_bfd_session_up", (("peer", "net2"),))] == 0
    assert got[("dvr_agent_snat_active", (("router", "r2"),))] == 1
    assert got[("dvr_agent_northbound_connected", ())] == 1
    m.state(1001.0, False, {"compute1": "up"}, ["r1"])
    got = samples(m)
    assert ("dvr_agent_bfd_session_up", (("peer", "net2"),)) not in got
    assert ("dvr_agent_snat_active", (("router", "r2"),)) not in got
    assert got[("dvr_agent_northbound_connected", ())] == 0
    assert got[("dvr_agent_heartbeat_timestamp_seconds", ())] == 1001.0


def test_the_endpoint_serves_them():
    m = Metrics("compute1", "0.2.0")
    m.synced(True, 7, 7, 0, {"apply": 1.0})
    url = m.serve("127.0.0.1", _free_port())
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert "dvr_agent_flows_installed 7.0" in text


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_json_log_lines():
    record = logging.LogRecord("agent.main", logging.INFO, __file__, 1,
                               "node %s: +%d flows", ("compute1", 3), None)
    line = json.loads(JsonFormatter("compute1").format(record))
    assert line["message"] == "node compute1: +3 flows"
    assert line["level"] == "INFO" and line["node"] == "compute1"
    assert line["time"].endswith("+00:00")
