"""Warnings that point at the caller: the first frame outside the hetmem package, however
deep inside hetmem the warning was raised (Python 3.12's `skip_file_prefixes`, for 3.11)."""

from __future__ import annotations

import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def caller_stacklevel() -> int:
    """The `stacklevel` of `warnings.warn` called from `warn` that names the first frame
    outside hetmem."""
    frame = sys._getframe(1)  # warn()
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame = frame.f_back
        level += 1
    return level


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn(message, category)` attributed to the code that called into hetmem."""
    warnings.warn(message, category, stacklevel=caller_stacklevel())
