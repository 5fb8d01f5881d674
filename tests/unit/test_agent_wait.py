"""How long the agent's loop sleeps when nothing happens: until its first due timer."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from agent import config
from agent.main import MAX_SLEEP, DvrAgent
from agent.source import FileSource
from flows.model import load_topology


def agent(tmp_path: Path, data: dict[str, Any], gateway_mac: str | None,
          external_bridge: str = "br-ex") -> DvrAgent:
    """compute1's agent over `data` (the built-in topology's document), read from a file."""
    if gateway_mac:
        data["external"]["gateway_mac"] = gateway_mac
    topo = tmp_path / "topo.yaml"
    topo.write_text(yaml.safe_dump(data))
    ini = tmp_path / "agent.ini"
    ini.write_text(f"[DEFAULT]\nnode = compute1\n[ovs]\nexternal_bridge = {external_bridge}\n"
                   f"ovs_rundir = {tmp_path}\n[topology]\nfile = {topo}\n"
                   "[agent]\nheartbeat_interval = 1\n")
    a = DvrAgent(config.make_conf(["--config-file", str(ini)]), FileSource(str(topo)))
    a.topo = load_topology(topo)
    return a


def test_a_gateway_mac_given_by_the_topology_is_no_timer(tmp_path: Path, topology_doc) -> None:
    """Nothing to resolve (the MAC is given, or no provider bridge): the loop sleeps until
    its heartbeat, not 0 s again and again."""
    now = time.monotonic()
    for a in (agent(tmp_path, topology_doc("example"), "02:00:00:00:00:01"),
              agent(tmp_path, topology_doc("example"), None, external_bridge="")):
        a._last_report = now
        assert a._sleep(now, now + 5, None, polled=False) == MAX_SLEEP


def test_a_gateway_to_resolve_and_the_other_timers_wake_it(tmp_path: Path,
                                                          topology_doc) -> None:
    a = agent(tmp_path, topology_doc("example"), None)
    now = time.monotonic()
    a._last_report = now
    assert a._sleep(now, now + 5, None, polled=False) == 0.0  # never resolved: due now
    a._gateway_next = now + 0.3
    assert abs(a._sleep(now, now + 5, None, polled=False) - 0.3) < 1e-6
    assert abs(a._sleep(now, now + 5, 0.1, polled=False) - 0.1) < 1e-6  # a retry
    assert abs(a._sleep(now, now + 5, None, polled=True) - 0.05) < 1e-6  # a file: polled
    a._garps = [(now + 0.02, "203.0.113.50", "fa:16:3e:00:00:01", 1)]
    assert abs(a._sleep(now, now + 5, None, polled=False) - 0.02) < 1e-6
