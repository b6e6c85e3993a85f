"""hetmem's native one-row decode ops for the tests: the library built here, calls counted,
and the one-row step's way (native or Python) chosen for a test."""

from __future__ import annotations

import shutil

import pytest

from hetmem import native


def native_library():
    """hetmem's native ops (`hetmem.native`), built here: a test that needs them fails where
    a C++ compiler is on PATH and the build failed, and skips only where there is none."""
    library = native.library()
    if library is None:
        if not native.enabled():
            pytest.fail("HETMEM_NATIVE=0 is set: the native-path tests need the native ops")
        if shutil.which("c++") is None and shutil.which("g++") is None:
            pytest.skip("no C++ compiler: hetmem's native ops cannot be built here")
        pytest.fail(f"hetmem's native ops did not build: {native.reason()}")
    return library


class Counted:
    """hetmem's native ops, each call counted by name."""

    def __init__(self, library):
        self.library, self.calls = library, []

    def __getattr__(self, name):
        op = getattr(self.library, name)

        def counted(*args):
            self.calls.append(name)
            return op(*args)

        return counted


def one_row_path(path: str, monkeypatch) -> Counted | None:
    """The one-row step's way for a test: "python" (the native ops off) or "native" (built
    here, each call counted)."""
    if path == "python":
        monkeypatch.setattr(native, "library", lambda: None)
        return None
    counted = Counted(native_library())
    monkeypatch.setattr(native, "library", lambda: counted)
    return counted
