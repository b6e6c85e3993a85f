"""Argument checks shared by every public entry point.

They run before any device work and raise `InputError` naming the argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import InputError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: int | None = None,
    dims: Sequence[str] | None = None,
    floating: bool | None = None,
    finite: bool = False,
) -> torch.Tensor:
    """Check that `value` is a tensor of the given rank and kind; return it.

    `dims` names the axes for the message, e.g. ("batch", "heads", "tokens", "dim").
    `finite=True` rejects NaN and Inf.
    """
    if not isinstance(value, torch.Tensor):
        raise InputError(name, f"expected a torch.Tensor, got {type(value).__name__}")
    if dims is not None:
        ndim = len(dims)
    if ndim is not None and value.dim() != ndim:
        layout = f" [{', '.join(dims)}]" if dims else ""
        raise InputError(
            name, f"expected {ndim} dimensions{layout}, got shape {tuple(value.shape)}"
        )
    if floating is True and value.dtype not in FLOAT_DTYPES:
        raise InputError(name, f"expected a floating dtype, got {value.dtype}")
    if floating is False and (
        value.is_floating_point() or value.is_complex() or value.dtype == torch.bool
    ):
        raise InputError(name, f"expected an integer dtype, got {value.dtype}")
    if finite and value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise InputError(name, "contains NaN or Inf")
    return value


def check_dim(name: str, value: torch.Tensor, axis: int, expected: int, what: str) -> None:
    """Check one axis length, naming what it should match."""
    if value.shape[axis] != expected:
        raise InputError(
            name, f"axis {axis} has length {value.shape[axis]}, expected {expected} ({what})"
        )


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(name, f"expected an int, got {type(value).__name__}")
    if value <= 0:
        raise InputError(name, f"expected a positive integer, got {value}")
    return value


def check_k(name: str, k: object, candidates: int) -> int:
    """Top-k budget: 1 <= k <= candidates. Larger k is an error, never a silent clip."""
    k = check_positive_int(name, k)
    if candidates <= 0:
        raise InputError("memory", "is empty: there is nothing to select from")
    if k > candidates:
        raise InputError(name, f"k={k} exceeds the {candidates} candidates in the memory")
    return k


def check_divides(name: str, divisor: int, total: int, total_name: str) -> None:
    if divisor <= 0 or total % divisor:
        raise InputError(name, f"{divisor} must divide {total_name}={total}")


def check_same_device(name: str, value: torch.Tensor, device: torch.device) -> None:
    if value.device != device:
        raise InputError(name, f"is on {value.device}, expected {device}")
