"""Every kernel's generated top level (fpga/gen.py: hm_<kernel>.v over the one parametrized
top, hm_top.vh) lints on Verilator and runs on Icarus with its own register map. That the
generated files are current and follow the specs is tests/test_generated_hw.py's."""

from __future__ import annotations

import json
import subprocess

import pytest
import sim

from hetmem.kernels.engine import KERNEL_IDS, PARAMS

pytestmark = pytest.mark.rtl


@pytest.mark.parametrize("kernel", list(KERNEL_IDS))
def test_wrapper_lints_on_verilator(kernel: str) -> None:
    reason = sim.missing("verilator")
    if reason:
        pytest.skip(f"verilator: {reason}")
    verilator = sim.verilator_bin() / "verilator"
    sources = [str(p) for p in sorted(sim.RTL_DIR.glob("hm_*.v"))]
    args = [a for a in sim.VERILATOR_ARGS if a.startswith("-Wno")]
    run = subprocess.run(
        [
            str(verilator),
            "--lint-only",
            "-Wall",
            *args,
            f"-I{sim.RTL_DIR}",
            "--top-module",
            f"hm_{kernel}",
            *sources,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "%Error" not in run.stderr and "%Warning" not in run.stderr, run.stderr[-3000:]


@pytest.mark.parametrize("kernel", list(KERNEL_IDS))
def test_wrapper_runs_on_icarus(kernel: str) -> None:
    """Each kernel's own top level (kernel id tied, its register map) on small calls."""
    reason = sim.missing("icarus")
    if reason:
        pytest.skip(f"icarus: {reason}")
    params = {"NMAX": 1024}
    ran = sim.run(
        "icarus",
        f"hm_{kernel}",
        "tb_engine",
        "engine_matches_golden",
        parameters=params,
        env={
            "HM_SUITE": "smoke",
            "HM_KERNELS": kernel,
            "HM_WRAPPER": "1",
            "HM_PARAMS": json.dumps({**PARAMS, **params}),
            "HM_SEED": str(31 + KERNEL_IDS[kernel]),
        },
    )
    assert ran == ["engine_matches_golden"]
