"""Warnings that point at the caller: the first frame that is neither hetmem's nor an
installed library's (site-packages, the standard library) through which the call came,
however deep the warning was raised (Python 3.12's `skip_file_prefixes`, for 3.11). A
wrapped model's warning thus names the user's `model.generate(...)` line, not hetmem's,
transformers' or torch's internals."""

from __future__ import annotations

import functools
import os
import sys
import sysconfig
import warnings


@functools.cache
def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    return tuple(os.path.join(os.path.realpath(d), "") for d in dirs)


def _skipped(frame) -> bool:
    module = frame.f_globals.get("__name__", "")
    if module == "hetmem" or module.startswith("hetmem."):
        return True
    filename = frame.f_code.co_filename
    if filename.startswith("<"):  # frozen importlib, exec'd strings of libraries
        return module != "__main__"
    return os.path.realpath(filename).startswith(_library_dirs())


def caller_stacklevel() -> int:
    """The `stacklevel` that makes `warnings.warn`, called from `warn`, name the first
    frame outside hetmem and the installed libraries."""
    frame = sys._getframe(1)  # warn()
    level = 1
    while frame is not None and _skipped(frame):
        frame = frame.f_back
        level += 1
    return level


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn(message, category)` attributed to the code that called into hetmem."""
    warnings.warn(message, category, stacklevel=caller_stacklevel())
