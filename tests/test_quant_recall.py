"""The integer formats keep recall on heavy-tailed inputs with outlier channels: over 200
random cases per kernel and distribution (bench/quant_recall.py's generator, smaller
memories), the integer top-k against the float64 top-k at k = 64 and 256 has mean
>= 0.985, 5th percentile >= 0.95 and worst case >= 0.90, for Gaussian inputs, Student-t
keys with outlier channels, and Student-t keys and queries with outlier channels; half the
cases append rows up to the headroom after the fit. vector_search's mean is at least faiss's
8-bit scalar quantizer's on the same cases."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from hetmem import kernels
from hetmem.kernels import spec as kspec

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "quant_recall.py"
CASES = 200
#: Smaller memories than the bench's (2048-8192 candidates, pages of 8-32 keys, 4-16 indexer
#: heads), so that the 2400 cases take about a minute of CPU.
SIZES = {
    "candidates": (1024, 4096),
    "pages": (512, 2048),
    "page_sizes": (4, 8),
    "indexer_heads": (4, 8),
}
MEAN, P5, WORST = 0.985, 0.95, 0.90


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("quant_recall", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dist", ["gauss", "t_keys", "t_both"])
@pytest.mark.parametrize("kernel", ["token_indexer", "page_indexer", "block_gate", "vector_search"])
def test_recall_targets(bench, kernel, dist):
    (row64, row256) = bench.run([kernel], [dist], CASES, base=1, with_faiss=False, sizes=SIZES)
    for row in (row64, row256):
        assert row["cases"] == CASES
        assert row["mean"] >= MEAN, row
        assert row["p5"] >= P5, row
        assert row["worst"] >= WORST, row
    # appended rows were part of the cases; within 4x of the fitted per-channel range a
    # page never saturates (its scales keep 4x in every channel) and an int8 row hardly
    # ever (its 8x holds in the rotated basis, where a row within 4x per channel lands
    # beyond 8x only when most of its channels are at their extremes together)
    assert row64["appended_rows"] > 0
    if kernel == "page_indexer":
        assert row64["saturated_rows"] == 0
    else:
        assert row64["saturated_rows"] <= 1e-4 * row64["appended_rows"]


@pytest.mark.parametrize("dist", ["gauss", "t_keys", "t_both"])
def test_vector_search_at_least_faiss_sq8(bench, dist):
    """faiss IndexScalarQuantizer(QT_8bit, inner product) trained on the same fitted rows
    and holding the same rows; compared on the same cases (with and without appends)."""
    pytest.importorskip("faiss")
    rows = bench.run(["vector_search"], [dist], 100, base=2, sizes=SIZES)
    for row in rows:
        assert row["mean"] >= row["faiss_sq8"]["mean"], row["k"]


def test_recall_harness_detects_a_bad_format(bench, monkeypatch):
    """The harness is not blind: with the query rounded to 3 bits instead of 8 the same
    cases miss the targets."""
    coarse = kspec.fold_query

    def three_bits(*args, **kwargs):
        q, t = coarse(*args, **kwargs)
        return (np.rint(q / 32) * 32).astype(np.int8), t

    for module in ("vector_search",):
        monkeypatch.setattr(f"hetmem.kernels.{module}.fold_query", three_bits)
    (row64, _) = bench.run(["vector_search"], ["t_both"], 30, base=1, sizes=SIZES, with_faiss=False)
    assert row64["mean"] < MEAN


def test_saturation_is_counted(bench):
    """A row appended far beyond the headroom is counted as saturated."""
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((300, 16))
    keys[250:] *= 50  # 50x the fitted range, beyond the 8x of the stored basis
    case = {"memory": {"keys": keys}, "fitted": 250}
    assert bench.saturated_rows("vector_search", case) == 50
    pages = {"mins": -np.abs(keys), "maxs": np.abs(keys)}
    assert bench.saturated_rows("page_indexer", {"memory": pages, "fitted": 250}) == 50
    assert kernels.get("vector_search").candidates(case["memory"]) == 300


def test_bench_writes_its_table_and_compares_runs(bench, tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["--cases", "3", "--kernels", "block_gate", "--dists", "gauss", "--no-faiss"]
    assert bench.main([*args, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["source"] == "measured" and len(result["rows"]) == 2
    assert [len(r["recalls"]) for r in result["rows"]] == [3, 3]
    assert "| block_gate | gauss | 64 |" in capsys.readouterr().out
    assert bench.main(["--compare", str(out), str(out)]) == 0
    assert "+0.0000 +- 0.0000" in capsys.readouterr().out
