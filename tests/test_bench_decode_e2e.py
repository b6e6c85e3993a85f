"""bench/decode_e2e.py runs end to end on a tiny model and writes the JSON its README says."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "decode_e2e.py"
TINY = ["--hidden", "128", "--heads", "4", "--kv-heads", "2", "--intermediate", "256"]
TINY += ["--layers", "1", "--vocab", "128", "--threads", "1"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("decode_e2e", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_sane_figures(bench, tmp_path, capsys):
    out = tmp_path / "e2e.json"
    args = [*TINY, "--contexts", "256", "--batches", "1", "2", "--budget", "64"]
    args += ["--overhead-context", "128", "--overhead-budget", "64"]
    args += ["--steps", "2", "--warmup", "1", "--repeat", "2"]
    args += ["--generate-context", "96", "--generate-tokens", "2", "--out", str(out)]
    assert bench.main(args) == 0
    result = json.loads(out.read_text())
    assert (tmp_path / "e2e.png").is_file()
    assert result["timing"]["source"] == "measured" and result["threads"] == 1
    assert "StaticCache" in result["dense_baseline"]
    assert result["model"]["layers"] == 1 and result["model"]["vocab"] == 128

    rows = result["rows"]
    cases = {(r["context"], r["batch"]) for r in rows}
    assert cases == {(128, 1), (128, 2), (256, 1), (256, 2)}
    for context, batch in cases:
        modes = {
            (r["mode"], r["method"]) for r in rows if (r["context"], r["batch"]) == (context, batch)
        }
        want = {("dense", None)} | {(m, x) for m in ("torch", "emu") for x in bench.METHODS}
        assert want <= modes
        assert (("dense_dynamic", None) in modes) == (context == 128)
    for r in rows:
        assert r["rounds"] == 2 and r["tokens_per_s"]["source"] == "measured"
        low, high = r["tokens_per_s"]["iqr"]
        assert 0 < low <= r["tokens_per_s"]["value"] <= high
        assert r["held_bytes"]["tensor_bytes"] > 0
        if r["method"] is not None:
            # Every decode step ran sparse through hetmem (warm-up included), none dense.
            assert r["cache_stats"] == {"sparse_steps": 1 + 2 * 2, "dense_steps": 0}
            held = r["held_bytes"]
            assert held["kv_bytes"] > 0
            # DSA's default indexer is as wide as this tiny model's keys: folded, no index
            assert (held["index_bytes"] == 0) == (r["method"] == "dsa"), (r["method"], held)
            assert held["cache_bytes"] + held["method_weights_bytes"] == held["tensor_bytes"]
        if r["mode"] == "emu":
            assert r["card_s_per_step"]["source"] == "modeled"
            assert r["card_s_per_step"]["value"] > 0
            assert r["emulator_compute_s_per_step"]["value"] > 0
            assert r["emulator_compute_s_per_step"]["source"].startswith("measured")
            assert r["composite_tokens_per_s"]["source"] == "composite"
            assert r["composite_tokens_per_s"]["value"] > 0
            assert r["pcie_transactions_per_layer_step"]["value"] >= 0

    speedups = result["speedup"]
    assert len(speedups) == 4 * 2 * len(bench.METHODS)
    assert all(s["speedup"] > 0 and s["source"] == "measured" for s in speedups)
    overhead = result["dispatch_overhead"]
    assert {(o["batch"], o["mode"]) for o in overhead} == {
        (b, m) for b in (1, 2) for m in ("torch", "emu")
    }
    assert all(isinstance(o["us_per_layer_step"], float) for o in overhead)
    assert all(o["target_us"] == 100.0 for o in overhead if o["batch"] == 1)
    layer = result["layer_overhead"]  # update + attention of one layer, hetmem vs dense
    assert {(o["batch"], o["mode"], o["method"]) for o in layer} == {
        (b, m, x) for b in (1, 2) for m in ("torch", "emu") for x in bench.METHODS
    }
    for o in layer:
        assert o["dense_us"] > 0 and o["hetmem_us"] > 0 and o["source"] == "measured"
        assert o["us_per_layer_step"] == pytest.approx(o["hetmem_us"] - o["dense_us"])
        if o["mode"] == "torch":  # the layer-step split into its profiled steps and the rest
            assert set(o["steps_us"]) == {"append", "relevancy", "retrieval", "apply"}
            assert all(v > 0 for v in o["steps_us"].values())
            rest = o["hetmem_us"] - sum(o["steps_us"].values())
            assert o["outside_steps_us"] == pytest.approx(rest)
        else:
            assert o["steps_us"] == {} and o["outside_steps_us"] is None
    for group in (result["held_bytes_synthetic"], result["held_bytes_generate"]):
        assert {g["method"] for g in group} == set(bench.METHODS)
        assert all(g["ratio"] > 0 and g["dynamic_cache_bytes"] > 0 for g in group)
    assert result["wall_s"]["source"] == "measured"
    printed = capsys.readouterr().out
    assert "dispatch overhead" in printed and "generate()" in printed


def test_held_bytes_counts_shared_storage_once(bench):
    import torch

    base = torch.zeros(1000)
    view = base[10:20]

    class Holder:
        __slots__ = ("a", "b")

        def __init__(self):
            self.a, self.b = [base, {"v": view}], (torch.ones(3),)

    held = bench.held_bytes(Holder())
    assert held["tensor_bytes"] == 1000 * 4 + 3 * 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--contexts", "512", "--budget", "1024"], "exceeds the shortest context"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--hidden", "100", "--heads", "3"], "must divide"),
        (["--methods", "seer", "--overhead-budget", "32"], "64-token blocks"),
        (["--modes", "torch"], "must include dense"),
    ],
)
def test_bad_arguments_are_named(bench, argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse(argv)
    assert message in capsys.readouterr().err
