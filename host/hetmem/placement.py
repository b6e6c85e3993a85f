"""Placements: which device runs each of the four steps, checked and filled in.

Apart from pipeline.py so that the system model (which costs and ranks placements) reads
them without importing the pipeline that asks it for `placement="auto"`.
"""

from __future__ import annotations

from collections.abc import Mapping

from .device import ALL_NAMES
from .errors import PlacementError
from .methods.base import STEPS

DEFAULT_PLACEMENT = {step: "gpu" for step in STEPS}


def normalize_placement(placement: Mapping[str, str] | str | None) -> dict[str, str]:
    """Fill a partial placement with `gpu`; accept 'gpu/fpga/fpga/gpu' shorthand."""
    if placement is None:
        return dict(DEFAULT_PLACEMENT)
    if isinstance(placement, str):
        parts = placement.split("/")
        if len(parts) != len(STEPS):
            raise PlacementError(
                "placement", f"expected 4 devices like 'gpu/fpga/fpga/gpu', got {placement!r}"
            )
        placement = dict(zip(STEPS, parts, strict=True))
    if not isinstance(placement, Mapping):
        raise PlacementError("placement", f"expected a mapping step -> device, got {placement!r}")
    out = dict(DEFAULT_PLACEMENT)
    for step, device in placement.items():
        if step not in STEPS:
            raise PlacementError("placement", f"unknown step {step!r}; steps are {STEPS}")
        if not isinstance(device, str) or device.split(":")[0] not in (*ALL_NAMES, "cuda"):
            raise PlacementError(
                "placement", f"step {step!r}: unknown device {device!r}; expected gpu, cpu or fpga"
            )
        out[step] = device
    for step in ("prepare", "apply"):
        if out[step] == "fpga":
            raise PlacementError(
                "placement", f"{step!r} runs on a torch device (gpu or cpu), not on the FPGA"
            )
    if (out["relevancy"] == "fpga") != (out["retrieval"] == "fpga"):
        raise PlacementError(
            "placement",
            "relevancy and retrieval are one fused kernel on the FPGA: place both on 'fpga' or neither",
        )
    return out
