"""Resolve placement names to torch devices.

`gpu` means CUDA or ROCm (both appear as torch's `cuda`); on a machine without either it
runs on the CPU and says so once.
"""

from __future__ import annotations

import functools

import torch

from .errors import PlacementError
from .warn import warn

TORCH_NAMES = ("gpu", "cpu")
ALL_NAMES = ("gpu", "cpu", "fpga")


@functools.cache
def gpu_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    warn(  # attributed to the caller's line, not to hetmem's own frames
        "hetmem: no CUDA or ROCm GPU found; steps placed on 'gpu' run on the CPU",
        RuntimeWarning,
    )
    return torch.device("cpu")


def gpu_backend() -> str:
    """A short label for what `gpu` resolves to: cuda, rocm or cpu."""
    if not torch.cuda.is_available():
        return "cpu"
    return "rocm" if getattr(torch.version, "hip", None) else "cuda"


def torch_device(name: str | torch.device) -> torch.device:
    """Map a placement name (gpu, cpu) or a torch device string to a torch device."""
    if isinstance(name, torch.device):
        return name
    if name == "gpu":
        return gpu_device()
    if name == "fpga":
        raise PlacementError("device", "'fpga' is not a torch device")
    try:
        return torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise PlacementError(
            "device", f"unknown device {name!r}; expected one of {ALL_NAMES}"
        ) from exc


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
