"""Module bench of the Retrieval unit (hm_topk): exact top-k and threshold bitmaps against
hetmem.kernels.topk over the edges and random shapes, with input gaps and output backpressure."""

from __future__ import annotations

import pytest
import sim

pytestmark = pytest.mark.rtl

PARAMS = {
    "W64": {"SLOTS": 2, "NMAX": 1024, "W": 64},
    "W32": {"SLOTS": 3, "NMAX": 512, "W": 32},
}


@pytest.mark.parametrize("params", list(PARAMS))
def test_topk_unit_matches_golden(simulator: str, params: str) -> None:
    if simulator == "verilator" and params != "W64":
        pytest.skip("one Verilator build of the unit is enough; Icarus covers the other W")
    sim.run(simulator, "hm_topk", "tb_topk", parameters=PARAMS[params], env={"HM_SEED": "3"})
