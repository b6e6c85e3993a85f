"""bench/decode_floor.py: DSA's B=1 layer-step dense, through hetmem (its native ops and its
Python path), and by hand over a hetmem layer's memory; the three give one output to the
bit."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from hetmem import native

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("decode_floor", BENCH / "decode_floor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_floor_bench_splits_the_overhead_and_checks_the_outputs(tmp_path, capsys):
    out = tmp_path / "floor.json"
    argv = ["--shape", "512", "4", "2", "256", "--rounds", "2", "--steps", "3"]
    assert load().main([*argv, "--dtype", "float32", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["outputs_equal"] is True and result["source"] == "measured"
    med = result["us_per_layer_step"]
    ways = {"dense", "hetmem", "hetmem, Python path", "by hand"}
    assert set(med) == ways and all(v > 0 for v in med.values())
    assert result["method_work_us"] == med["by hand"] - med["dense"]
    assert result["code_around_us"] == med["hetmem"] - med["by hand"]
    python_path = med["hetmem, Python path"] - med["by hand"]
    assert result["python_path_code_around_us"] == python_path
    assert result["native_ops"] is (native.library() is not None)
    assert all(len(v) == 2 for v in result["rounds_us"].values())
    assert "the three equal: True" in capsys.readouterr().out
