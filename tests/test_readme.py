"""The README's Python snippets run verbatim, each as a script of its own, and print what the
README says they print; warnings name the snippet's own line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

README = Path(__file__).parents[1] / "README.md"


def snippets() -> dict[str, str]:
    """The ```python blocks of the README, by the heading above each."""
    out: dict[str, str] = {}
    heading = ""
    lines = iter(README.read_text().splitlines())
    for line in lines:
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.strip() == "```python":
            block = []
            for body in lines:
                if body.strip() == "```":
                    break
                block.append(body)
            assert heading not in out, f"two snippets under {heading!r}"
            out[heading] = "\n".join(block) + "\n"
    return out


def run_snippet(name: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "snippet.py"
    script.write_text(snippets()[name])
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return done


def test_every_snippet_has_a_test():
    assert set(snippets()) == {
        "Quick start in Python",
        "A Hugging Face model",
        "Does GPU+FPGA pay off?",
    }


def test_quick_start_prints_the_profile_table(tmp_path):
    done = run_snippet("Quick start in Python", tmp_path)
    out = done.stdout
    assert "<rich" not in out and "object at 0x" not in out
    rows = {
        line.strip("│┃ ").split()[0]: line
        for line in out.splitlines()
        if line.startswith("│") and line.strip("│ ")
    }
    for step in ("relevancy", "retrieval", "apply"):  # one row per step, its source beside
        assert "measured" in rows[step] and ("gpu" in rows[step] or "cpu" in rows[step])
    assert "total (measured)" in out
    assert "append" not in rows  # the step's profile, printed before the append
    if not torch.cuda.is_available():  # the no-GPU warning names the line that placed steps
        script = snippets()["Quick start in Python"].splitlines()
        line = next(i for i, s in enumerate(script, 1) if "pipe = Pipeline(" in s)
        assert f"snippet.py:{line}: RuntimeWarning: hetmem: no CUDA or ROCm GPU" in done.stderr


def test_hugging_face_snippet_prints_the_answer(tmp_path):
    pytest.importorskip("transformers")
    from hetmem.run import bundled_dir

    try:
        bundled_dir()
    except Exception as exc:
        pytest.skip(f"needs the bundled model: {exc}")
    done = run_snippet("A Hugging Face model", tmp_path)
    assert done.stdout.strip().startswith("12345")  # what the README says it prints
    if not torch.cuda.is_available():
        script = snippets()["A Hugging Face model"].splitlines()
        line = next(i for i, s in enumerate(script, 1) if "model.generate(" in s)
        assert f"snippet.py:{line}: RuntimeWarning: hetmem: no CUDA or ROCm GPU" in done.stderr
        assert "modeling_" not in done.stderr  # not transformers' own line


def test_system_snippet_prints_the_ratios_and_the_ranked_placements(tmp_path):
    done = run_snippet("Does GPU+FPGA pay off?", tmp_path)
    first, *rest = done.stdout.strip().splitlines()
    speedup, energy = (float(v) for v in first.split())
    assert speedup > 0 and energy > 0
    explanation = "\n".join(rest)
    assert re.match(r"objective: energy; chosen \S+/\S+/\S+/\S+ \(", explanation)
    assert "gpu/fpga/fpga/gpu" in explanation  # every placement, ranked
