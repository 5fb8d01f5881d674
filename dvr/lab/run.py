"""The one way the lab runs a program: on this host, or inside one of its namespaces.

Every command of the lab, the live tracer and the CLI goes through here, so that a command
inside a namespace is spelled once (`ip netns exec NS ...`), a Python program started inside
one imports this very installation (`python_env()`), and a failure reads the same everywhere:
one line naming where it ran, what and the last line of its error output (`LabError`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dvr.lab import LabError

ROOT = Path(__file__).resolve().parents[2]  # the directory that holds dvr/, flows/, agent/
TIMEOUT = 60.0


def argv(ns: str | None, cmd: Sequence[str]) -> list[str]:
    """`cmd` as run inside namespace `ns` (on this host when None)."""
    return ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)


def python_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment (`env`, or this process's) with this project first on PYTHONPATH,
    so that `python -m dvr...`/`agent...` inside a namespace runs this very code, from a
    source checkout as from an installation."""
    out = dict(os.environ if env is None else env)
    old = out.get("PYTHONPATH")
    out["PYTHONPATH"] = f"{ROOT}{os.pathsep}{old}" if old else str(ROOT)
    return out


def python(*args: str) -> list[str]:
    """A command line of this interpreter (`python(-m, dvr.lab.capture, ...)`)."""
    return [sys.executable, *args]


def failure(where: str, cmd: Sequence[str], stderr: str) -> LabError:
    err = (stderr.strip().splitlines() or ["failed"])[-1]
    return LabError(f"{where}: {' '.join(cmd[:3])}: {err}")


def run(ns: str | None, cmd: Sequence[str], *, env: Mapping[str, str] | None = None,
        check: bool = True, timeout: float = TIMEOUT, input: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    """Run `cmd` to its end, its output captured; with `check`, a non-zero exit raises
    LabError. Standard input is `input`, or nothing."""
    try:
        res = subprocess.run(argv(ns, cmd), env=None if env is None else dict(env), text=True,
                             capture_output=True, timeout=timeout, input=input,
                             stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise LabError(f"{ns or 'host'}: {' '.join(cmd[:3])}: no answer within "
                       f"{timeout:.0f}s") from None
    except OSError as exc:
        raise LabError(f"{ns or 'host'}: {cmd[0]}: {exc.strerror or exc}") from None
    if check and res.returncode != 0:
        raise failure(ns or "host", cmd, res.stderr)
    return res


def start(ns: str | None, cmd: Sequence[str], *, env: Mapping[str, str] | None = None,
          **popen: Any) -> subprocess.Popen[str]:
    """Start `cmd` in the background (`popen`: stdout, stderr, ... as for Popen)."""
    popen.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(argv(ns, cmd), env=None if env is None else dict(env), text=True,
                            **popen)


def call(ns: str | None, cmd: Sequence[str], *, env: Mapping[str, str] | None = None) -> int:
    """Run `cmd` with this process's standard input, output and error; its exit status."""
    return subprocess.call(argv(ns, cmd), env=None if env is None else dict(env))
