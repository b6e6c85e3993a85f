"""`hetmem compare`, `hetmem plan` and `hetmem profile-device` on tiny grids (seconds)."""

from __future__ import annotations

import json

import pytest

from hetmem import cli
from hetmem.system import System, get_device


@pytest.fixture
def run(capsys, monkeypatch):
    monkeypatch.setattr(cli.console, "width", 200)

    def _run(*argv):
        code = cli.main(list(argv))
        return code, capsys.readouterr().out

    return _run


def test_compare_prints_sources_the_paper_check_and_the_crossover(run, tmp_path):
    out_json = tmp_path / "cmp.json"
    code, out = run("compare", "--method", "quest", "--method", "seer", "--contexts", "4k,64k",
                    "--batches", "1,8", "--json", str(out_json), "--png", str(tmp_path / "png"))  # fmt: skip
    assert code == 0
    assert "MI210 + U55C" in out and "modeled" in out
    assert "check against the paper" in out and "1.2-1.8x" in out and "1.04-2.2x" in out
    assert "crossover" in out and ("never in the grid" in out or "pays" in out)
    assert "overlapped schedule's gain" in out
    data = json.loads(out_json.read_text())
    assert len(data["rows"]) == 2 * 2 * 2 and all(r["source"] == "modeled" for r in data["rows"])
    assert {c["method"] for c in data["crossovers"]} == {"quest", "seer"}
    assert data["paper"]["check"] and data["overlap_gain"]
    pngs = sorted(p.name for p in (tmp_path / "png").glob("*.png"))
    assert pngs == ["system_energy_llama-3-1-8b.png", "system_memory_share_llama-3-1-8b.png",
                    "system_speedup_llama-3-1-8b.png"]  # fmt: skip


def test_compare_with_a_local_config_and_another_pair(run, tmp_path):
    config = {"name": "my-model", "hidden_size": 1024, "num_hidden_layers": 4,
              "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 2048,
              "vocab_size": 1000}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, out = run("compare", "--model", str(tmp_path / "config.json"), "--method", "dsa",
                    "--contexts", "8k", "--batches", "2", "--gpu", "A100-80GB", "--card", "U280")  # fmt: skip
    assert code == 0 and "my-model on A100-80GB + U280" in out
    assert "check against the paper" not in out  # the paper's pair is not in the grid


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "--gpu", "MI999"], "unknown device"),
        (["compare", "--card", "MI210"], "is a gpu"),
        (["compare", "--contexts", "4q"], "contexts"),
        (["compare", "--batches", "0"], "batches"),
        (["compare", "--method", "nope"], "unknown method"),
        (["compare", "--model", "no-such-model"], "unknown model"),
        (["compare", "--link", "pcie9"], "unknown link"),
        (["plan", "--context", "lots"], "contexts"),
        (["plan", "--gpu", "nope.json"], "cannot read"),
    ],
)
def test_bad_input_is_an_error_not_a_traceback(run, argv, message):
    code, out = run(*argv)
    assert code == 2 and "error:" in out and message in out and "Traceback" not in out


def test_argparse_errors_exit_cleanly(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["plan", "--objective", "cheapest"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["compare", "--budget", "-1"])
    assert "positive integer" in capsys.readouterr().err


def test_bad_profile_file_is_named(run, tmp_path):
    bad = tmp_path / "gpu.json"
    bad.write_text("{oops")
    code, out = run("plan", "--gpu", str(bad))
    assert code == 2 and "not valid json" in out


def test_plan_ranks_every_placement(run):
    code, out = run("plan", "--method", "seer", "--context", "4k", "--batch", "1")
    assert code == 0
    assert "gpu/gpu/gpu/gpu" in out and "gpu/fpga/fpga/gpu" in out
    assert "fused kernel" in out and "objective: latency; chosen" in out
    code, out = run("plan", "--method", "quest", "--objective", "energy", "--sequential")
    assert code == 0 and "objective: energy" in out and "sequential" in out


def test_profile_device_writes_a_measured_profile(run, tmp_path):
    path = tmp_path / "dev.json"
    code, out = run("profile-device", "--device", "cpu", "--quick", "--out", str(path))
    assert code == 0 and "measured" in out and str(path) in out
    data = json.loads(path.read_text())
    assert data["source"] == "measured" and data["efficiency"]["source"] == "measured"
    for key in ("mem_bw", "fp16", "topk_rate", "hbm_bytes"):
        assert data["figures"][key]["source"] == "measured" and data["figures"][key]["value"] > 0
    profile = get_device(str(path))
    assert profile.kind == "gpu" and profile.source == "measured" and profile.name
    system = System.of(str(path), "U55C")
    assert system.label.endswith("+ U55C")
    code, out = run("compare", "--gpu", str(path), "--method", "quest", "--contexts", "4k",
                    "--batches", "1")  # fmt: skip
    assert code == 0 and "composite" in out
    code, out = run("profile-device", "--device", "cpu", "--quick", "--repeat", "0",
                    "--out", str(path))  # fmt: skip
    assert code == 2 and "repeat" in out
    code, out = run("profile-device", "--device", "tpu", "--quick", "--out", str(path))
    assert code == 2 and "device" in out


def test_run_with_placement_auto_says_what_the_planner_chose(tmp_path, capsys):
    """`hetmem run --placement auto` on a tiny model: the planner's choice and why (on a
    machine without a known GPU the assumed CPU profile and a U55C), then the usual run."""
    pytest.importorskip("transformers")
    from tiny_lm import make_tiny_lm

    model_dir = make_tiny_lm(tmp_path / "tiny")
    rc = cli.main(["run", "--model", str(model_dir), "--context", "200", "--prompts", "1",
                   "--budget", "64", "--fpga", "emu", "--placement", "auto", "--method", "quest"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "placement auto ->" in out and "objective: latency; chosen" in out
    assert "context 200, batch 1" in out and "passkey answers" in out
