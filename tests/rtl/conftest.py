"""RTL benches: every test here needs a simulator; parametrized over Verilator and Icarus,
each skipping with the reason when its simulator is missing."""

from __future__ import annotations

import os

import pytest
import sim


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/rtl/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.rtl)


@pytest.fixture(params=sim.SIMULATORS)
def simulator(request: pytest.FixtureRequest) -> str:
    """A simulator name; skips when it is not installed."""
    reason = sim.missing(request.param)
    if reason:
        pytest.skip(f"{request.param}: {reason}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return request.param
