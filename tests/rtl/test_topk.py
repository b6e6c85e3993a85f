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
#: Parameter sets per simulator: one Verilator build of the unit; Icarus (cheap to build)
#: covers both scan widths.
SETS = {"verilator": ("W64",), "icarus": ("W64", "W32")}


def test_topk_unit_matches_golden(simulator: str) -> None:
    for name in SETS[simulator]:
        ran = sim.run(
            simulator, "hm_topk", "tb_topk", parameters=PARAMS[name], env={"HM_SEED": "3"}
        )
        assert ran == ["selections_match_golden"], name
