"""The agent's options: declared once, read from an ini file, listed for the generator."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from oslo_config import cfg

from agent import config
from agent.main import main as agent_main


def test_options_are_read_from_the_config_file(tmp_path: Path) -> None:
    ini = tmp_path / "agent.ini"
    ini.write_text("[DEFAULT]\nnode = compute7\n[ovs]\ndatapath_type = netdev\n"
                   "tunnel_type = geneve\nlocal_ip = 198.18.0.7\n"
                   "[topology]\nfile = /tmp/topo.yaml\n[agent]\nresync_interval = 2.5\n")
    conf = config.make_conf(["--config-file", str(ini)])
    assert conf.node == "compute7"
    assert conf.ovs.datapath_type == "netdev"
    assert conf.ovs.tunnel_type == "geneve"
    assert conf.ovs.integration_bridge == "br-int"
    assert conf.topology.file == "/tmp/topo.yaml"
    assert conf.agent.resync_interval == 2.5


def test_invalid_choice_is_refused(tmp_path: Path) -> None:
    ini = tmp_path / "agent.ini"
    ini.write_text("[DEFAULT]\nnode = c1\n[ovs]\ntunnel_type = gre\n")
    conf = config.make_conf(["--config-file", str(ini)])
    with pytest.raises(cfg.ConfigFileValueError):
        _ = conf.ovs.tunnel_type


def test_every_option_is_listed_for_the_generator() -> None:
    listed = {(group, opt.name) for group, opts in config.list_opts() for opt in opts}
    assert (None, "node") in listed
    assert ("ovs", "ovsdb_connection") in listed and ("agent", "status_file") in listed
    gen = Path(sys.executable).parent / "oslo-config-generator"
    if not gen.exists():
        pytest.skip("oslo-config-generator is not installed beside this Python")
    out = subprocess.run([str(gen), "--namespace", "dvr-agent"], capture_output=True,
                         text=True, check=True).stdout
    for group, name in listed:
        assert f"#{name} =" in out, name
        if group:
            assert f"[{group}]" in out


def test_agent_without_a_topology_file_exits_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ini = tmp_path / "agent.ini"
    ini.write_text("[DEFAULT]\nnode = c1\n")
    assert agent_main(["--config-file", str(ini)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dvr-agent:") and "file" in err and len(err.splitlines()) == 1
