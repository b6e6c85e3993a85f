"""The guard that keeps tests from writing into the repository tree (tests/tree_guard.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tree_guard import REPO, TreeWriteError, changed_tracked, session_changes, tracked_files


def _in_git_checkout() -> bool:
    return tracked_files(REPO) is not None


needs_checkout = pytest.mark.skipif(not _in_git_checkout(), reason="not a git checkout")


@needs_checkout
def test_a_test_cannot_write_a_tracked_file() -> None:
    """The hook is live in this process: a write to a tracked file is refused before the
    file is opened, so the file is untouched. The harmless attempts come first (append and
    write-only opens write nothing, a rename from a missing file fails): the destructive
    ones run only once the hook has refused those."""
    target = REPO / "pyproject.toml"
    before = target.read_bytes()
    for write in (
        lambda: open(target, "a").close(),
        lambda: os.open(target, os.O_WRONLY),
        lambda: os.replace(REPO / "no-such-file", target),
        lambda: target.write_text("x"),
        lambda: os.remove(target),
    ):
        with pytest.raises(TreeWriteError, match=r"pyproject\.toml"):
            write()
    with pytest.raises(TreeWriteError, match="bench"):
        shutil.rmtree(REPO / "bench")
    assert target.read_bytes() == before
    assert target.read_text()  # reading stays allowed


@needs_checkout
def test_writing_under_tmp_path_is_allowed(tmp_path: Path) -> None:
    out = tmp_path / "results" / "rtl_cycles.json"
    out.parent.mkdir()
    out.write_text("{}")
    os.replace(out, tmp_path / "results" / "moved.json")
    shutil.rmtree(tmp_path / "results")
    assert not (tmp_path / "results").exists()


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        check=True,
        capture_output=True,
    )


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_session_check_names_only_what_changed_during_the_session(tmp_path: Path) -> None:
    """Files changed before the session (someone's pending edits) are not the session's;
    a clean file changed, a pending edit altered, and a deletion are."""
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        (tmp_path / name).write_text(name)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "start")
    (tmp_path / "b.txt").write_text("pending edit")
    (tmp_path / "d.txt").write_text("pending edit kept")
    (tmp_path / "untracked.txt").write_text("new")
    before = changed_tracked(tmp_path)
    assert set(before) == {"b.txt", "d.txt"}
    (tmp_path / "a.txt").write_text("written by the session")
    (tmp_path / "b.txt").write_text("pending edit, then the session")
    (tmp_path / "c.txt").unlink()
    after = changed_tracked(tmp_path)
    assert session_changes(before, after) == ["a.txt", "b.txt", "c.txt"]
    assert after["c.txt"] == "deleted"


def test_outside_a_checkout_there_is_nothing_to_guard(tmp_path: Path) -> None:
    assert tracked_files(tmp_path) is None
    assert changed_tracked(tmp_path) is None
