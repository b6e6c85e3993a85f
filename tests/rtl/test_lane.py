"""Module bench of one dot-product lane (hm_lane) on both simulators."""

from __future__ import annotations

import pytest
import sim

pytestmark = pytest.mark.rtl


def test_lane_matches_numpy(simulator: str) -> None:
    rows = "300" if simulator == "verilator" else "150"
    ran = sim.run(simulator, "hm_lane", "tb_lane", env={"HM_ROWS": rows, "HM_SEED": "7"})
    assert ran == ["random_rows"]
