"""pytest hooks and fixtures of the tests that build a real lab (the helpers are in
harness.py): every test here is marked `lab`, and skipped where a lab cannot be built."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.lab.harness import TOPOLOGIES, LabHandle, lab_available, running_lab


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = lab_available()
    # under xdist (`-n 2 --dist loadgroup`), every test but those marked `alongside` is in one
    # group, run one after another on one worker: the lab tests' timings (gaps, losses) are
    # measured on a machine that runs one lab at a time, and a test that mostly waits (the
    # northbound down for a minute) runs beside them on the other worker
    grouped = getattr(config.option, "dist", "no") != "no"
    for item in items:
        if "tests/lab/" in str(item.fspath):
            item.add_marker(pytest.mark.lab)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
        if grouped and item.get_closest_marker("alongside") is None:
            item.add_marker(pytest.mark.xdist_group("one-at-a-time"))


@pytest.fixture(scope="module")
def eastwest_lab() -> Iterator[LabHandle]:
    with running_lab(TOPOLOGIES / "eastwest.yaml") as lab:
        yield lab
