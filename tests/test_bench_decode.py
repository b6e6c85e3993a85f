"""bench/decode_attention.py runs end to end on a tiny case and writes what its README says."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "decode_attention.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("decode_attention", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_writes_rows_with_samples_per_query(bench, tmp_path, capsys):
    out = tmp_path / "d.json"
    args = ["--contexts", "256", "512", "--batches", "1", "2", "--budget", "64"]
    args += ["--repeat", "2", "--queries", "3", "--device", "cpu", "--out", str(out)]
    assert bench.main(args) == 0
    result = json.loads(out.read_text())
    assert result["source"] == "measured"
    assert (result["repeat"], result["queries"]) == (2, 3)
    assert [(r["batch"], r["context"]) for r in result["rows"]] == [
        (1, 256),
        (1, 512),
        (2, 256),
        (2, 512),
    ]
    for row in result["rows"]:
        # Dense runs once per round; every sparse step once per query per round.
        assert row["dense_sdpa_samples"] == row["dense_grouped_samples"] == 2
        for name in bench.METHODS:
            assert row[f"{name}_apply_samples"] == row[f"{name}_select_samples"] == 6
            low, high = row[f"{name}_apply_iqr_s"]
            assert 0 < low <= row[f"{name}_apply_s"] <= high
            dense = min(row["dense_sdpa_s"], row["dense_grouped_s"])
            assert row[f"{name}_speedup"] == pytest.approx(dense / row[f"{name}_apply_s"])
            # Budget 64 tokens per row: DSA's selection is shared by the KV heads, Quest's
            # pages and Seer's blocks are chosen per KV head (8 of them).
            per_row = 64 if name == "dsa" else 64 * 8
            assert row[f"{name}_selected_tokens"] == per_row * row["batch"]
        assert row["dsa_token_copy_bytes"] > 0
    printed = capsys.readouterr().out
    assert "decode attention" in printed and str(out) in printed


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--repeat", "0"], "--repeat must be >= 1"),
        (["--queries", "0"], "--queries must be >= 1"),
        (["--contexts", "256", "--budget", "512"], "exceeds the shortest context 256"),
        (["--contexts", "0"], "--contexts and --batches must be >= 1"),
    ],
)
def test_rejects_bad_arguments(bench, capsys, bad, message):
    with pytest.raises(SystemExit) as err:
        bench.main([*bad, "--device", "cpu"])
    assert err.value.code == 2
    assert message in capsys.readouterr().err
