"""The `hetmem` command: methods and demo."""

import pytest

from hetmem import cli
from hetmem.methods import REGISTRY, method_class


@pytest.fixture
def run(capsys, monkeypatch):
    monkeypatch.setattr(cli.console, "width", 160)

    def _run(*argv):
        code = cli.main(list(argv))
        return code, capsys.readouterr().out

    return _run


def test_methods_lists_every_method_with_its_steps_and_devices(run):
    code, out = run("methods")
    assert code == 0
    for name in REGISTRY:
        assert name in out
        cls = method_class(name)
        assert cls.describe["relevancy"].split()[0] in out
        if cls.kernel:
            assert f"kernel {cls.kernel}" in out
    for step in ("prepare", "relevancy", "retrieval", "apply"):
        assert out.count(step) >= len(REGISTRY)


@pytest.mark.parametrize("method", ["dsa", "seer", "quest", "dense_rag", "bm25_rag"])
def test_demo_prints_a_profile_per_step_with_sources(run, method):
    code, out = run("demo", "--method", method, "--context", "1024", "--budget", "128")
    assert code == 0
    assert f"{method}: per-step profile" in out
    for step in ("relevancy", "retrieval", "apply"):
        row = next(line for line in out.splitlines() if line.strip("│┃ ").startswith(step))
        assert "measured" in row
    assert "total (measured)" in out
    if method in ("dense_rag", "bm25_rag"):
        assert "holds the source document: True" in out
    else:
        assert "attention recall" in out


def test_demo_reports_a_bad_budget_as_an_error(run):
    code, out = run("demo", "--method", "quest", "--context", "1024", "--budget", "0")
    assert code == 2
    assert "budget" in out


# -- every argument checked before a model loads or training starts -------------------------------


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if a model loads, calibration starts or a demo runs."""

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    import hetmem.demo
    import hetmem.selectors.calibrate

    monkeypatch.setattr(hetmem.selectors.calibrate, "load_local", refuse)
    monkeypatch.setattr(hetmem.selectors.calibrate, "calibrate_dir", refuse)
    monkeypatch.setattr(hetmem.demo, "run_demo", refuse)


BAD_ARGUMENTS = [
    (("demo", "--fpga", "bogus"), "--fpga: unknown FPGA target 'bogus'"),
    (("demo", "--context", "0"), "--context: expected an integer >= 2, got 0"),
    (("demo", "--context", "-5"), "--context"),
    (("demo", "--k", "0"), "--k: expected an integer >= 1"),
    (("demo", "--budget", "-1"), "--budget"),
    (("demo", "--method", "nope"), "--method: unknown method 'nope'"),
    (("demo", "--placement", "gpu/fpga/gpu/gpu"), "relevancy and retrieval are one fused"),
    (("demo", "--placement", "gpu/gpu"), "expected 4 devices"),
    (("calibrate", "--block-size", "0"), "--block-size: expected an integer >= 1, got 0"),
    (("calibrate", "--out", "{missing}/x.safetensors"), "the directory {missing} does not"),
    (("calibrate", "--tokens", "100000"), "exceed the model's 16384 positions"),
    (("calibrate", "--queries", "900", "--tokens", "512"), "--queries: 900 query positions"),
    (("calibrate", "--block-size", "2048", "--tokens", "1024"), "--block-size: 2048 exceeds"),
    (("calibrate", "--steps", "0"), "--steps"),
    (("calibrate", "--indexer-heads", "0"), "--indexer-heads"),
    (("calibrate", "--model", "/no/such/model"), "is not a transformers model directory"),
    (("run", "--context", "100000000"), "exceed the model's 16384 positions"),
    (("run", "--context", "0"), "context"),
    (("run", "--context", "10"), "10 tokens cannot hold the passkey task"),
    (("run", "--fpga", "bogus"), "unknown FPGA target 'bogus'"),
    (("run", "--method", "bm25_rag"), "expected one of dsa, seer, quest"),
    (("run", "--budget", "0"), "budget"),
    (("run", "--prompts", "0"), "prompts"),
    (("run", "--placement", "fpga/fpga/fpga/gpu"), "'prepare' runs on a torch device"),
    (("run", "--model", "/no/such/model"), "is not a transformers model directory"),
    (("profile-device", "--out", "{missing}/p.json"), "the directory {missing} does not"),
    (("profile-device", "--repeat", "0"), "--repeat"),
    (("profile-device", "--device", "bogus"), "unknown device 'bogus'"),
    (("compare", "--json", "{missing}/c.json"), "the directory {missing} does not"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_ARGUMENTS, ids=lambda v: " ".join(v)[:40])
def test_a_bad_argument_is_an_error_before_any_work(run, nothing_loads, tmp_path, argv, message):
    from hetmem.run import bundled_dir

    missing = str(tmp_path / "missing" / "dir")
    argv = tuple(a.replace("{missing}", missing) for a in argv)
    message = message.replace("{missing}", missing)

    if "--model" not in argv and argv[0] in ("run", "calibrate"):
        try:
            bundled_dir()
        except Exception:
            pytest.skip("needs the bundled model's config")
    code, out = run(*argv)
    assert code == 2
    assert "error:" in out and message in " ".join(out.split())
    assert "Traceback" not in out


def test_an_unparsable_number_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--context", "lots"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid int value: 'lots'" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["demo", "run"])
def test_help_lists_every_fpga_target(capsys, command):
    from hetmem.fpga.targets import TARGETS

    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "xrt_emu" in out
    for target in TARGETS:
        assert target in out


def test_demo_says_when_fpga_has_no_effect(run):
    code, out = run("demo", "--method", "bm25_rag", "--fpga", "emu", "--k", "3")
    assert code == 0
    assert "--fpga emu has no effect" in out


def test_selectors_of_another_shape_are_refused_before_loading(run, nothing_loads, tmp_path):
    """The bundled model's selectors (4 layers, 2 KV heads x 32) beside a model of another
    shape: the message says what does not match and how to regenerate."""
    import shutil

    from hetmem.run import bundled_dir
    from hetmem.selectors.weights import SELECTORS_FILE
    from tiny_lm import make_tiny_lm

    try:
        selectors = bundled_dir() / SELECTORS_FILE
    except Exception:
        pytest.skip("needs the bundled model")
    if not selectors.is_file():
        pytest.skip("the bundled model has no selectors")
    model = make_tiny_lm(tmp_path / "tiny", layers=2, heads=4, kv_heads=2, hidden=64)
    shutil.copy(selectors, model / SELECTORS_FILE)
    code, out = run("run", "--model", str(model), "--method", "dsa", "--context", "256")
    text = " ".join(out.split())
    assert code == 2
    assert "4 layers of selectors, the model has 2" in text
    assert "the model's keys have 2 KV heads x 16 = 32" in text
    assert f"hetmem calibrate --model {model}" in text
    # quest uses no selectors: the same model is not refused for them (it loads: refused here)
    with pytest.raises(AssertionError, match="work started"):
        run("run", "--model", str(model), "--method", "quest", "--context", "256")
