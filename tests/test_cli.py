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
