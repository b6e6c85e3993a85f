"""The engine swept over its parameters (LANES, SLOTS, SCAN, NMAX, DMAX), as verilog-axi sweeps
its cores': each set is its own build, and every kernel's output must stay bit-exact with the
golden model through AXI RAMs with random idle cycles and backpressure on every channel (the
edge cases scale with the set: n not a multiple of LANES, queries > SLOTS, heads > LANES,
dim = DMAX, k = n). The default set is tests/rtl/test_engine.py's. Verilator runs the sweep;
Icarus (an interpreter) one set on one kernel."""

from __future__ import annotations

import json

import pytest
import sim

from hetmem.kernels.engine import KERNEL_IDS

pytestmark = pytest.mark.rtl

#: Parameter sets besides the default (LANES 8, SLOTS 8, NMAX 65536, DMAX 512, SCAN 64): two
#: LANES values, two SLOTS values (one not a power of two), two scan widths; small NMAX and
#: DMAX keep each build and its calls short.
SETS = {
    "L4S2": {"LANES": 4, "SLOTS": 2, "NMAX": 1024, "DMAX": 128, "SCAN": 32},
    "L16S3": {"LANES": 16, "SLOTS": 3, "NMAX": 2048, "DMAX": 192, "SCAN": 64},
}


def _run(simulator: str, params: dict[str, int], suite: str, kernels: str, seed: int) -> list:
    """The cocotb tests that passed: `engine_matches_golden` compares every kernel's output
    with the golden model, bit for bit, and fails on the first difference."""
    env = {
        "HM_PARAMS": json.dumps(params),
        "HM_SUITE": suite,
        "HM_KERNELS": kernels,
        "HM_SEED": str(seed),
        "HM_COUNT": "10",
        "HM_RANDOM_N": "400",
        "HM_RANDOM_DIMS": f"1,7,33,64,100,{params['DMAX']}",
    }
    return sim.run(
        simulator, "hm_engine", "tb_engine", "engine_matches_golden", parameters=params, env=env
    )


def _verilator() -> None:
    reason = sim.missing("verilator")
    if reason:
        pytest.skip(f"verilator: {reason}")


@pytest.mark.parametrize("name", list(SETS))
@pytest.mark.parametrize("suite", ["edges", "random"])
def test_parameter_set_on_verilator(name: str, suite: str) -> None:
    _verilator()
    seed = 50 + len(name) + len(suite)
    ran = _run("verilator", SETS[name], suite, ",".join(KERNEL_IDS), seed)
    assert ran == ["engine_matches_golden"], (name, suite)


def test_parameter_set_on_icarus() -> None:
    """One set, one kernel on Icarus (an interpreter: L16S3's edges of every kernel take 6
    minutes there; Verilator runs those above)."""
    reason = sim.missing("icarus")
    if reason:
        pytest.skip(f"icarus: {reason}")
    ran = _run("icarus", SETS["L4S2"], "edges", "vector_search", 61)
    assert ran == ["engine_matches_golden"]
