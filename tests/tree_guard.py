"""Tests never write into the repository tree: bench/ scripts own bench/results, and a test
writes under tmp_path. Two guards, wired in by conftest.py, neither active outside a git
checkout:

- In every test process an audit hook (`sys.addaudithook`) refuses, with `TreeWriteError`,
  opening a tracked file for writing, renaming or replacing onto or from it, truncating or
  removing it, or removing a tree that holds one. The test that tries fails at once, naming
  the file, and the file is untouched: the refusal comes before the write.
- The session compares the tracked files `git status` reports changed before and after it
  (their content hashes), for writes the hook cannot see (simulators and other
  subprocesses). A tracked file the session found clean and left changed, or whose pending
  change it altered, fails the session when CI or HETMEM_STRICT_TREE is set. Otherwise it is
  reported, not failed: in a working tree several people edit at once, someone else may
  have saved it meanwhile.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class TreeWriteError(PermissionError):
    """A test tried to change a file git tracks in the repository."""


def git(repo: Path, *args: str) -> str | None:
    """`git -C repo args` stdout, or None when git or the checkout is missing."""
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def tracked_files(repo: Path) -> frozenset[str] | None:
    """Real paths of the files git tracks in `repo`; None outside a git checkout."""
    if git(repo, "rev-parse", "--is-inside-work-tree") is None:
        return None
    out = git(repo, "ls-files", "-z")
    if out is None:
        return None
    root = os.path.realpath(repo)
    return frozenset(os.path.join(root, p) for p in out.split("\0") if p)


def changed_tracked(repo: Path) -> dict[str, str] | None:
    """Tracked files that differ from HEAD or the index -> a hash of their content now
    ("deleted" when gone); None outside a git checkout."""
    out = git(repo, "status", "--porcelain=v1", "-z", "--untracked-files=no")
    if out is None:
        return None
    entries = out.split("\0")
    changed: dict[str, str] = {}
    i = 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if not entry:
            continue
        status, path = entry[:2], entry[3:]
        if "R" in status or "C" in status:
            i += 1  # the source path of a rename or copy follows
        file = repo / path
        try:
            changed[path] = hashlib.sha256(file.read_bytes()).hexdigest()
        except FileNotFoundError:
            changed[path] = "deleted"
        except (IsADirectoryError, PermissionError):
            changed[path] = "unreadable"
    return changed


def session_changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Tracked files a session changed: clean before and changed after, or changed before
    and changed differently after."""
    return sorted(p for p, digest in after.items() if before.get(p) != digest)


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _real(path: object) -> str | None:
    if path is None or isinstance(path, int):
        return None
    try:
        return os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return None


def make_hook(tracked: frozenset[str], active: Callable[[], bool]) -> Callable:
    """The audit hook that refuses writes to `tracked` while `active()`."""
    dirs = {os.path.dirname(p) for p in tracked}

    def refuse(path: str, what: str) -> None:
        raise TreeWriteError(
            f"tests never write into the repository tree: {what} {path}, tracked by git "
            "(write under tmp_path; bench/ scripts own bench/results)"
        )

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if mode is not None:
                writing = any(c in mode for c in "wax+")
            else:
                writing = isinstance(flags, int) and bool(flags & _WRITE_FLAGS)
            if writing and active():
                real = _real(path)
                if real in tracked:
                    refuse(real, "opened for writing")
        elif event in ("os.rename", "os.remove", "os.truncate", "shutil.rmtree"):
            if not active():
                return
            paths = args[:2] if event == "os.rename" else args[:1]
            for path in paths:
                real = _real(path)
                if real is None:
                    continue
                if real in tracked:
                    refuse(real, f"{event} of")
                if event == "shutil.rmtree" and any(
                    d == real or d.startswith(real + os.sep) for d in dirs
                ):
                    refuse(real, "shutil.rmtree of a directory holding files")

    return hook


class Guard:
    """The two guards for one pytest process (see the module's docstring)."""

    def __init__(self, repo: Path = REPO):
        self.repo = repo
        self.on = False
        self.before: dict[str, str] | None = None
        self.changes: list[str] = []

    def install_hook(self) -> None:
        tracked = tracked_files(self.repo)
        if tracked is None:
            return
        self.on = True
        sys.addaudithook(make_hook(tracked, lambda: self.on))  # cannot be removed: switched off

    def start(self) -> None:
        self.before = changed_tracked(self.repo)

    def finish(self) -> list[str]:
        self.on = False
        if self.before is None:
            return []
        after = changed_tracked(self.repo)
        self.changes = [] if after is None else session_changes(self.before, after)
        return self.changes

    @staticmethod
    def strict() -> bool:
        return bool(os.environ.get("CI") or os.environ.get("HETMEM_STRICT_TREE"))
