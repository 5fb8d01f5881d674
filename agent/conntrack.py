"""The one module that reads the switch's connection tracker: `ovs-appctl
dpctl/dump-conntrack` on ovs-vswitchd's control socket (a network node publishes the
translations of the routers it serves that did not keep their port: flows.nat)."""

from __future__ import annotations

import logging
import os
import subprocess

LOG = logging.getLogger(__name__)
TIMEOUT = 5.0


class ConntrackError(Exception):
    """ovs-vswitchd could not be asked (not running, or refused the command)."""


class Conntrack:
    def __init__(self, rundir: str):
        self.rundir = rundir

    def _target(self) -> str:
        try:
            with open(os.path.join(self.rundir, "ovs-vswitchd.pid")) as f:
                pid = int(f.read().split()[0])
        except (OSError, ValueError, IndexError) as exc:
            raise ConntrackError(f"no ovs-vswitchd pid in {self.rundir}: {exc}") from None
        return os.path.join(self.rundir, f"ovs-vswitchd.{pid}.ctl")

    def _appctl(self, *args: str) -> str:
        try:
            res = subprocess.run(["ovs-appctl", "-t", self._target(), *args],
                                 capture_output=True, text=True, timeout=TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConntrackError(f"ovs-appctl {args[0]}: {exc}") from None
        if res.returncode != 0:
            raise ConntrackError(f"ovs-appctl {args[0]}: "
                                 f"{(res.stderr.strip().splitlines() or ['failed'])[-1]}")
        return res.stdout

    def dump(self, zone: int | None = None) -> list[str]:
        """The entries of one zone (or of all), as `dpctl/dump-conntrack` lists them."""
        args = [f"zone={zone}"] if zone is not None else []
        return self._appctl("dpctl/dump-conntrack", *args).splitlines()
