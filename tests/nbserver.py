"""A real ovsdb-server holding an empty northbound database (the project's schema) in a
directory of the test's own, for the tests that talk to the database without a lab."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from dvr import nb
from flows import northbound

AVAILABLE = shutil.which("ovsdb-server") is not None and shutil.which("ovsdb-tool") is not None


@contextlib.contextmanager
def northbound_server(directory: Path, timeout: float = 20.0) -> Iterator[str]:
    """Start ovsdb-server on a new database in `directory`; yield its `unix:` remote once
    it answers (the socket's file exists before the server listens); kill it at the end."""
    path, sock = directory / "nb.db", directory / "nb.sock"
    subprocess.run(["ovsdb-tool", "create", str(path), str(northbound.SCHEMA)], check=True)
    server = subprocess.Popen(
        ["ovsdb-server", str(path), f"--remote=punix:{sock}", f"--unixctl={directory}/ctl",
         "--no-chdir", f"--log-file={directory}/log"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                nb.Northbound(f"unix:{sock}", timeout=1).close()
                break
            except nb.NbError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"ovsdb-server did not start in {directory}") from None
                time.sleep(0.05)
        yield f"unix:{sock}"
    finally:
        server.kill()
        server.wait()
