"""Module benches of the engine's building blocks, in the manner of verilog-axi: each module
on its own, pytest-parametrized over its parameters (each set its own build), cocotbext-axi
sources, sinks and AXI RAMs with idle insertion and backpressure, every output against a
model. Verilator runs every parameter set; Icarus the first set of each module."""

from __future__ import annotations

import json

import pytest
import sim

pytestmark = pytest.mark.rtl

#: module -> (bench, cocotb test, parameter sets (the first also runs on Icarus), env).
BENCHES: dict[str, tuple[str, str, list[dict[str, int]], dict[str, str]]] = {
    "hm_fifo": (
        "tb_fifo",
        "stream_matches_model",
        [{"WIDTH": 517, "DEPTH": 32}, {"WIDTH": 64, "DEPTH": 2}],
        {"HM_WORDS": "600"},
    ),
    "hm_axil_ctrl": ("tb_axil_ctrl", "registers_and_handshake", [{}], {}),
    "hm_row_aligner": ("tb_row_aligner", "rows_match_model", [{}], {"HM_STREAMS": "40"}),
    "hm_index_packer": (
        "tb_index_packer",
        "packing_matches_model",
        [{"W": 64}, {"W": 16}],
        {"HM_CALLS": "30"},
    ),
    "hm_histogram": (
        "tb_histogram",
        "counts_match_model",
        [{"NMAX": 1024, "XW": 10}, {"NMAX": 64, "XW": 6}],
        {"HM_BATCHES": "4"},
    ),
    "hm_score_mem": (
        "tb_score_mem",
        "stores_match_model",
        [
            {"SLOTS": 3, "NMAX": 256, "W": 32, "XW": 8},
            {"SLOTS": 1, "NMAX": 128, "W": 64, "XW": 7},
            {"SLOTS": 2, "NMAX": 512, "W": 16, "XW": 9},
            {"SLOTS": 8, "NMAX": 1024, "W": 64, "XW": 10},
        ],
        {"HM_CALLS": "3"},
    ),
    "hm_axi_reader": (
        "tb_axi_reader",
        "streams_match_ram",
        [{"DEPTH": 128, "MAX_BURST": 64}, {"DEPTH": 8, "MAX_BURST": 4}],
        {"HM_STREAMS": "25"},
    ),
    "hm_axi_writer": (
        "tb_axi_writer",
        "writes_match_items",
        [{"DEPTH": 32, "MAX_BURST": 16}, {"DEPTH": 4, "MAX_BURST": 4}],
        {"HM_CALLS": "25"},
    ),
}


def cases() -> list:
    out = []
    for module, (_, _, sets, _) in BENCHES.items():
        for i, p in enumerate(sets):
            tag = "-".join(f"{k}{v}" for k, v in p.items())
            out.append(pytest.param("verilator", module, p, id=f"{module}-{tag}-verilator"))
            if i == 0:
                out.append(pytest.param("icarus", module, p, id=f"{module}-{tag}-icarus"))
    return out


@pytest.mark.parametrize(("simulator_name", "module", "params"), cases())
def test_module(simulator_name: str, module: str, params: dict[str, int]) -> None:
    reason = sim.missing(simulator_name)
    if reason:
        pytest.skip(f"{simulator_name}: {reason}")
    bench, testcase, _, env = BENCHES[module]
    ran = sim.run(
        simulator_name,
        module,
        bench,
        testcase,
        parameters=params,
        env={"HM_PARAMS": json.dumps(params), "HM_SEED": "5", **env},
    )
    assert ran == [testcase]
