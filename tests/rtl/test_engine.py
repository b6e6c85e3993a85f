"""Top-level bench of the engine (hm_engine): every kernel bit-exact with its golden model in
hetmem.kernels, through AXI4 (AxiRam as HBM) and AXI4-Lite (ap_ctrl_hs), with random idle and
backpressure, back-to-back calls without reset."""

from __future__ import annotations

import json

import pytest
import sim

from hetmem.kernels import engine
from hetmem.kernels.engine import KERNEL_IDS

pytestmark = pytest.mark.rtl

#: Engine parameters per simulator: the defaults on Verilator; Icarus (an interpreter) gets a
#: smaller NMAX so its largest-n edge stays quick.
PARAMS = {
    "verilator": {},
    "icarus": {"NMAX": 2048},
}
DEFAULTS = dict(engine.PARAMS)


def assert_passes(simulator: str, testcase: str, **env: str) -> None:
    """Run one cocotb test of tb_engine and assert it passed: it fails on any output that
    differs from the kernel's golden model, and on a protocol error."""
    params = PARAMS[simulator]
    env = {"HM_PARAMS": json.dumps({**DEFAULTS, **params}), **env}
    assert sim.run(simulator, "hm_engine", "tb_engine", testcase, parameters=params, env=env) == [
        testcase
    ]


@pytest.mark.parametrize("kernel", list(KERNEL_IDS))
def test_edges(simulator: str, kernel: str) -> None:
    """k = 1, k = n, ties, all equal, negative scores, n not a multiple of LANES, dim = DMAX,
    queries > SLOTS, heads > LANES, threshold bitmaps."""
    assert_passes(
        simulator,
        "engine_matches_golden",
        HM_SUITE="edges",
        HM_KERNELS=kernel,
        HM_SEED=str(11 + KERNEL_IDS[kernel]),
    )


@pytest.mark.parametrize("kernel", list(KERNEL_IDS))
def test_largest_n_on_icarus(kernel: str) -> None:
    """The largest n the build allows, on the Icarus build (NMAX = 2048). On Verilator
    (NMAX = 65536) it is tests/rtl/test_cycles.py's n = 64k call of every kernel, outputs
    checked the same way, so it is not simulated twice. (A test of its own, not a case of
    test_edges: the suite's two workers then share the long Icarus calls.)"""
    reason = sim.missing("icarus")
    if reason:
        pytest.skip(f"icarus: {reason}")
    assert_passes(
        "icarus",
        "engine_matches_golden",
        HM_SUITE="largest",
        HM_KERNELS=kernel,
        HM_SEED=str(31 + KERNEL_IDS[kernel]),
    )


#: Random shapes per simulator: Icarus interprets the RTL (about 500 cycles/s with the AXI
#: models), so it gets fewer and smaller calls than Verilator.
RANDOM = {
    "verilator": {"HM_COUNT": "24", "HM_RANDOM_N": "2000"},
    "icarus": {"HM_COUNT": "12", "HM_RANDOM_N": "200", "HM_RANDOM_DIMS": "1,7,16,33,64,100,130"},
}


def test_random_shapes(simulator: str) -> None:
    assert_passes(
        simulator, "engine_matches_golden", HM_SUITE="random", HM_SEED="21", **RANDOM[simulator]
    )


#: Multi-segment calls: slots of up to this many rows (Icarus gets smaller ones).
SEGMENT_ROWS = {"verilator": "300", "icarus": "90"}


def test_segments(simulator: str) -> None:
    """Multi-segment calls of every kernel (several slots at different bases of one memory,
    different rows per query, k close to rows, bitmaps of different rows), bit-exact."""
    assert_passes(
        simulator,
        "engine_matches_golden",
        HM_SUITE="segments",
        HM_SEED="41",
        HM_SEGMENT_ROWS=SEGMENT_ROWS[simulator],
    )


def test_staged_beats(simulator: str) -> None:
    """Calls with staged memory beats (the pre-phase): every beat lands in memory port A or B
    (checked in the RAM after the call), the scan sees them (outputs bit-exact with the golden
    model, which applies the stage), one memory and several slots, random backpressure on the
    write channels too. staged = 0 is every other test's calls."""
    assert_passes(
        simulator,
        "engine_matches_golden",
        HM_SUITE="staged",
        HM_SEED="51",
        HM_SEGMENT_ROWS=SEGMENT_ROWS[simulator],
    )


def test_invalid_scalars(simulator: str) -> None:
    assert_passes(simulator, "invalid_scalars_end_the_call", HM_BACKPRESSURE="0")
