"""Cycle efficiency of the RTL engine and calibration of the cycle models.

The shapes, the summary and the results file are bench/rtl_cycles.py's, the only writer of
bench/results/rtl_cycles.json (source: simulated, RTL cycles). Here `test_rtl_cycle_counts`
runs the same engine calls (Verilator, default parameters, no backpressure; outputs checked
against the golden models in the cocotb bench) and checks what the bench would record,
writing only under tmp_path; `test_cycle_model_calibrated` checks every spec's `cycles`
within 5% of the counts; `test_recorded_counts_match_the_model` checks the committed file
against today's models without a simulator. The efficiency targets are reported in the
file, not asserted: speed targets live in bench/.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import sim

from hetmem import kernels

pytestmark = pytest.mark.rtl

SCRIPT = sim.ROOT / "bench" / "rtl_cycles.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_rtl_cycles", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


@pytest.fixture(scope="module")
def counts(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    reason = bench.missing()
    if reason:
        pytest.skip(f"verilator: {reason}")
    return bench.run_counts(tmp_path_factory.mktemp("cycles"))


def test_rtl_cycle_counts(counts: list[dict], tmp_path: Path) -> None:
    """Every shape ran (outputs checked bit-exact in the bench), and the document the bench
    writes holds every count with its model figures."""
    assert (
        len(counts)
        == len(bench.bench_shapes())
        == sum(n <= s.get("max_n", n) for s in bench.SHAPES for n in bench.SIZES)
        + len(bench.SEGMENT_SHAPES)
    )
    for r in counts:
        assert r["cycles"] > r["stream_cycles"] > 0
        assert r["score_rows"] == bench.rows_scored(r)
    out = tmp_path / "rtl_cycles.json"
    out.write_text(json.dumps(bench.document(counts, "test"), indent=1) + "\n")
    written = json.loads(out.read_text())
    assert written["source"] == "simulated"
    assert [r["cycles"] for r in written["counts"]] == [r["cycles"] for r in counts]
    assert set(written["met"]) == set(written["targets"])
    print(bench.table(counts))


def test_cycle_model_calibrated(counts: list[dict]) -> None:
    """spec.cycles(...) within 5% of the RTL's count for every bench shape."""
    off = [
        f"{r['kernel']} n={r['n']}: model {r['model_cycles']} vs RTL {r['cycles']}"
        for r in counts
        if abs(r["model_error"]) > bench.TOLERANCE
    ]
    assert not off, off


def test_recorded_counts_match_the_model() -> None:
    """The committed bench/results/rtl_cycles.json agrees with today's cycle models (a model
    change without re-running `python bench/rtl_cycles.py` fails here, without a simulator)."""
    if not bench.RESULTS.exists():
        pytest.skip("bench/results/rtl_cycles.json not written yet (python bench/rtl_cycles.py)")
    recorded = json.loads(Path(bench.RESULTS).read_text())
    assert recorded["source"] == "simulated"
    for r in recorded["counts"]:
        model = kernels.get(r["kernel"]).cycles(**bench.model_shape(r))
        assert abs(model / r["cycles"] - 1) <= bench.TOLERANCE, (
            r["kernel"],
            r["n"],
            model,
            r["cycles"],
        )
