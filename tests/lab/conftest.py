"""pytest hooks and fixtures of the tests that build a real lab (the helpers are in
harness.py): every test here is marked `lab`, and skipped where a lab cannot be built."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.lab.harness import TOPOLOGIES, LabHandle, lab_available, running_lab


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = lab_available()
    for item in items:
        if "tests/lab/" in str(item.fspath):
            item.add_marker(pytest.mark.lab)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="module")
def eastwest_lab() -> Iterator[LabHandle]:
    with running_lab(TOPOLOGIES / "eastwest.yaml") as lab:
        yield lab
