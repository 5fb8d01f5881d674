"""Where the agent reads the desired state from: one small interface, several backends."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod

from dvr.model import Topology, load_topology


class Source(ABC):
    """The desired state of the cloud. `poll()` is cheap and says whether it changed."""

    @abstractmethod
    def poll(self) -> bool:
        """True when `load()` may now return something new."""

    @abstractmethod
    def load(self) -> Topology:
        """The current desired state; raises on an invalid one (the agent keeps the last)."""


class FileSource(Source):
    """A topology file, re-read when its size, mtime or inode change."""

    def __init__(self, path: str):
        self.path = path
        self._seen: tuple[int, int, int] | None = None

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def poll(self) -> bool:
        return self._stamp() != self._seen

    def load(self) -> Topology:
        stamp = self._stamp()
        topo = load_topology(self.path)
        self._seen = stamp
        return topo
