"""hetmem's native operators: the one-row decode step (`one_row.cpp`) compiled against the
installed torch on first use (`torch.utils.cpp_extension`, ninja and a C++ compiler; a few
seconds, once per source version: `make setup` builds it ahead), kept in
`$HETMEM_NATIVE_DIR` (default `~/.cache/hetmem/native`).

Every op equals the Python path it replaces to the bit (tests/test_native.py); where the
library cannot be built (no compiler) or is switched off (`HETMEM_NATIVE=0`), `library()`
is None and the Python path runs, with one warning saying why when a build failed.

    python -m hetmem.native      # build (or find) the library and say where it is
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("one_row.cpp")
NAME = "hetmem_native"
OPS = ("dsa_one_row", "quest_one_row", "seer_one_row", "one_row_attend")

_lock = threading.Lock()
_state: dict[str, Any] = {}  # "ops": the op namespace or None once settled; "why": the reason


def enabled() -> bool:
    """Whether the native ops may be used (`HETMEM_NATIVE=0` switches them off)."""
    return os.environ.get("HETMEM_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def build_dir() -> Path:
    root = os.environ.get("HETMEM_NATIVE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "hetmem" / "native"


def library() -> Any:
    """`torch.ops.hetmem_native` once built and loaded, None where it cannot be (the reason
    in `reason()`); loaded once per process."""
    ops = _state.get("ops", _state)
    if ops is not _state:
        return ops
    with _lock:
        if "ops" not in _state:
            _state["ops"] = _load()
    return _state["ops"]


def reason() -> str | None:
    """Why `library()` is None (None when it is not, or has not been asked for)."""
    return _state.get("why")


def reset() -> None:
    """Forget the settled state: the next `library()` looks again (tests, HETMEM_NATIVE)."""
    with _lock:
        _state.clear()


def _load() -> Any:
    if not enabled():
        _state["why"] = "switched off (HETMEM_NATIVE=0)"
        return None
    import torch

    try:
        return torch.ops.hetmem_native if _registered(torch) else _build(torch)
    except Exception as exc:  # no compiler, no ninja, a failed build: the Python path runs
        from ..warn import warn

        lines = str(exc).strip().splitlines()
        _state["why"] = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
        warn(
            f"hetmem's native one-row decode step could not be built ({_state['why']}); "
            "decode runs the Python path (the same results, ~100 us more a layer-step at "
            "batch 1)",
            RuntimeWarning,
        )
        return None


def _registered(torch: Any) -> bool:
    ops = getattr(torch.ops, NAME, None)
    return ops is not None and all(hasattr(ops, op) for op in OPS)


def _build(torch: Any) -> Any:
    from torch.utils import cpp_extension

    directory = build_dir()
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / f"{NAME}.so").exists():  # (a first build: say why this call waits)
        print(
            f"hetmem: building the native one-row decode step into {directory} (once, ~10 s)",
            file=sys.stderr,
        )
    if shutil.which("ninja") is None:  # the ninja wheel's, where its scripts are not on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    cpp_extension.load(
        name=NAME,
        sources=[str(SOURCE)],
        extra_cflags=["-O3"],
        build_directory=str(directory),
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.hetmem_native


def main() -> int:
    """`python -m hetmem.native`: build (or find) the library; 1 when it is not available."""
    ops = library()
    if ops is None:
        print(f"hetmem native ops: not available ({reason()})", file=sys.stderr)
        return 1
    print(f"hetmem native ops: built and loaded from {build_dir()}")
    return 0
