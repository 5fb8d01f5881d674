"""Shared fixtures of the unit tests: the built-in and test topologies."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.model import Topology, load_topology

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "dvr" / "examples" / "default.yaml"


@pytest.fixture(scope="session")
def example() -> Topology:
    """The built-in example topology (`dvr lab up` without a file)."""
    return load_topology(EXAMPLE)
