"""`hetmem run` end to end on a tiny model directory: answers, accuracy, profile."""

import pytest

pytest.importorskip("transformers")

from rich.console import Console

from hetmem.cli import main
from hetmem.run import run
from tiny_lm import make_tiny_lm

CONTEXT = 400


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_lm(tmp_path_factory.mktemp("tiny_lm_run"))


def quiet() -> Console:
    return Console(file=open("/dev/null", "w"), width=160)


def test_cli_prints_answers_accuracy_and_profile(model_dir, capsys):
    rc = main(
        [
            "run",
            "--model",
            str(model_dir),
            "--context",
            str(CONTEXT),
            "--prompts",
            "2",
            "--budget",
            "64",
            "--fpga",
            "emu",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "passkey answers" in out
    assert "accuracy: hetmem dsa (budget 64/400)" in out and "dense" in out
    assert "per-step profile" in out and "fpga:emu" in out
    assert "modeled" in out and "measured" in out
    assert "prefill" in out and "decode" in out


def test_profile_places_relevancy_and_retrieval_on_the_fpga(model_dir):
    result = run(
        model_dir,
        method="quest",
        fpga="emu",
        context=CONTEXT,
        prompts=1,
        budget=128,
        console=quiet(),
    )
    assert result.fpga == "fpga:emu"
    by_step = {(phase, step): (device, source) for phase, step, device, source in result.profile}
    kernel = [key for key in by_step if key[0] == "decode" and "relevancy" in key[1]]
    assert kernel, sorted(by_step)
    assert all(by_step[k] == ("fpga:emu", "modeled") for k in kernel)
    assert by_step[("decode", "apply")][1] == "measured"
    assert by_step[("prefill", "prepare")][1] == "measured"
    # Every decode step of every layer ran the kernel once: 2 layers x (NEW_TOKENS - 1).
    calls = sum(v[1] for k, v in result.profile.items() if k[0] == "decode" and "relevancy" in k[1])
    assert calls == 2 * 7
    assert len(result.answers) == 1 and result.answers[0].expected.isdigit()


def test_full_budget_answers_exactly_as_dense(model_dir):
    """A budget that covers the context selects every token: decode equals dense."""
    result = run(
        model_dir,
        method="dsa",
        fpga="emu",
        context=CONTEXT,
        prompts=2,
        budget=4096,
        console=quiet(),
    )
    assert [a.sparse for a in result.answers] == [a.dense for a in result.answers]
    assert result.agreement == 1.0
    assert result.accuracy == result.dense_accuracy


def test_bad_input(model_dir, tmp_path, capsys):
    assert main(["run", "--model", str(model_dir), "--prompts", "0"]) == 2
    assert "prompts" in capsys.readouterr().out
    assert main(["run", "--model", str(tmp_path)]) == 2
    assert "model" in capsys.readouterr().out
    rc = main(["run", "--model", str(model_dir), "--context", str(CONTEXT), "--method", "bm25_rag"])
    assert rc == 2
    assert "method" in capsys.readouterr().out


def test_default_context_is_the_longest_the_card_says_works(tmp_path):
    import json
    from types import SimpleNamespace

    from hetmem.run import default_context

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=8192))
    assert default_context(tmp_path, model) == 2048  # no card
    card = {"tasks": {"passkey": {"1024": {"accuracy": 1.0}, "2048": {"accuracy": 0.9}}}}
    card["tasks"]["passkey"]["4096"] = {"accuracy": 0.5}
    (tmp_path / "eval.json").write_text(json.dumps(card))
    assert default_context(tmp_path, model) == 2048
    card["tasks"]["passkey"]["4096"]["accuracy"] = 0.85
    (tmp_path / "eval.json").write_text(json.dumps(card))
    assert default_context(tmp_path, model) == 4096
    small = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=1000))
    assert default_context(tmp_path, small) == 1000
