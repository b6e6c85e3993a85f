"""The four steps under a placement, with explicit transfers and a per-step profile.

    pipe = Pipeline(DSA(...), placement={"relevancy": "fpga", "retrieval": "fpga"})
    pipe.prepare(kv)            # Prepare Memory, once
    out = pipe.step(query, budget=2048)   # Relevancy, Retrieval, Apply; per decode step
    pipe.append(new_kv)         # the memory grows; on the card only new entries cross PCIe
    print(pipe.profile.table())

Placement maps each step to `gpu` (CUDA/ROCm, else the CPU, said once), `cpu`, or `fpga`.
On the FPGA, Compute Relevancy and Retrieval are one fused kernel: both go there or
neither does. Each change of device between steps is recorded as a transfer step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any, Literal

import torch

from .device import ALL_NAMES, torch_device
from .errors import FpgaError, PlacementError
from .methods.base import STEPS, Memory, Method
from .profile import Profile, StepRecord, device_label
from .selection import Bitmap, Selection, TopK

Policy = Literal["fallback", "raise"]

DEFAULT_PLACEMENT = {step: "gpu" for step in STEPS}
#: Profiles kept in `Pipeline.history` (a long generation must not grow it without bound).
HISTORY = 1024


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


class Pipeline:
    """Runs a method's four steps under a placement and profiles every step."""

    def __init__(
        self,
        method: Method,
        placement: Mapping[str, str] | str | None = None,
        *,
        fpga: Any = None,
        on_fpga_error: Policy = "fallback",
    ):
        if not isinstance(method, Method):
            raise PlacementError("method", f"expected a hetmem Method, got {type(method).__name__}")
        if on_fpga_error not in ("fallback", "raise"):
            raise PlacementError("on_fpga_error", "expected 'fallback' or 'raise'")
        self.method = method
        self.placement = normalize_placement(placement)
        self.on_fpga_error: Policy = on_fpga_error
        self.uses_fpga = self.placement["relevancy"] == "fpga"
        if self.uses_fpga and method.kernel is None:
            raise PlacementError("placement", f"method {method.name!r} has no FPGA kernel")
        self.fpga_stage = None
        if self.uses_fpga:
            from .offload import FpgaStage

            self.fpga_stage = FpgaStage(method, fpga)
        self.memory: Memory | None = None
        self.profile = Profile()
        self.history: deque[Profile] = deque(maxlen=HISTORY)
        self.counters: dict[str, int] = {"fpga_fallbacks": 0}
        self.last_selection: Selection | None = None

    # -- devices -------------------------------------------------------------------------
    def device(self, step: str) -> torch.device:
        """The torch device of a torch-placed step (the GPU path for an FPGA step)."""
        name = self.placement[step]
        return torch_device("gpu" if name == "fpga" else name)

    def _label(self, step: str) -> str:
        if self.placement[step] == "fpga":
            return self.fpga_stage.label if self.fpga_stage else "fpga"
        return device_label(self.device(step))

    def _move(self, profile: Profile, what: str, value: Any, src: str, dst: str) -> Any:
        """A transfer between torch devices, as an explicit, measured step."""
        src_dev, dst_dev = self.device(src), self.device(dst)
        if src_dev == dst_dev:
            return value
        nbytes = _nbytes(value)
        with profile.measure(f"transfer {what}", dst_dev, nbytes, f"{src_dev} -> {dst_dev}"):
            value = _to(value, dst_dev)
        return value

    # -- steps ---------------------------------------------------------------------------
    def prepare(self, data: Any) -> Memory:
        """Prepare Memory once; decode steps reuse it and `append` grows it."""
        profile = Profile()
        dev = self.device("prepare")
        data = _to(data, dev)
        with profile.measure("prepare", dev, _nbytes(data)) as rec:
            self.memory = self.method.prepare(data)
            rec.note = f"{self.memory.entries} entries"
        if self.fpga_stage is not None:
            try:
                profile.extend(self.fpga_stage.load(self.memory))
            except FpgaError as exc:  # the next select reloads the card from the host copy
                self._fault(profile, exc, "loading the memory")
        self._finish(profile)
        return self.memory

    def append(self, data: Any) -> None:
        """Grow the memory by new entries; on the card only the new entries are sent."""
        memory = self._require_memory()
        profile = Profile()
        dev = self.device("prepare")
        data = _to(data, dev)
        with profile.measure("append", dev, _nbytes(data)) as rec:
            self.method.append(memory, data)
            rec.note = f"{memory.entries} entries"
        if self.fpga_stage is not None:
            try:
                profile.extend(self.fpga_stage.sync(memory))
            except FpgaError as exc:  # the host memory has every entry; the card reloads
                self._fault(profile, exc, "sending the appended entries")
        self._finish(profile)

    def select(self, query: Any, budget: int, profile: Profile | None = None) -> Selection:
        """Compute Relevancy and Retrieval under the placement; return the selection."""
        memory = self._require_memory()
        profile = profile if profile is not None else Profile()
        self.method.check_query(memory, query)
        if self.fpga_stage is not None:
            try:
                query_m = _to(query, memory.device)  # the kernel's query is built beside the memory
                selection, fpga_profile = self.fpga_stage.select(memory, query_m, budget)
            except FpgaError as exc:
                self._fault(profile, exc, "relevancy+retrieval; rerunning it on the GPU path")
            else:
                profile.extend(fpga_profile)
                return self._move_selection(profile, selection)
        query_r = _to(query, self.device("relevancy"))
        with profile.measure("relevancy", self.device("relevancy"), memory.index_nbytes):
            scores = self.method.relevancy(memory, query_r)
        scores = self._move(profile, "scores", scores, "relevancy", "retrieval")
        with profile.measure("retrieval", self.device("retrieval"), scores.nbytes):
            selection = self.method.retrieve(scores, budget)
        return self._move(profile, "selection", selection, "retrieval", "apply")

    def step(self, query: Any, budget: int) -> Any:
        """One decode step: Relevancy, Retrieval, Apply. Returns Apply's output."""
        memory = self._require_memory()
        profile = Profile()
        selection = self.select(query, budget, profile)
        dev = self.device("apply")
        with profile.measure("apply", dev, self.method.apply_nbytes(memory, selection)):
            out = self.method.apply(memory, selection, _to(query, dev))
        self.last_selection = selection
        self._finish(profile)
        return out

    def _move_selection(self, profile: Profile, selection: Selection) -> Selection:
        """The FPGA's selection arrives on the host; Apply may need it on a GPU."""
        dev = self.device("apply")
        if dev.type == "cpu":
            return selection
        with profile.measure("transfer selection -> gpu", dev, _nbytes(selection), "host -> gpu"):
            return _to(selection, dev)

    # -- bookkeeping ---------------------------------------------------------------------
    def _fault(self, profile: Profile, exc: FpgaError, what: str) -> None:
        """An FPGA fault: raise it (on_fpga_error="raise"), or count it, warn, and forget
        the card's state so that the next FPGA step rebuilds it from the host's memory."""
        import warnings

        if self.fpga_stage is not None:
            self.fpga_stage.invalidate()
        if self.on_fpga_error == "raise":
            raise exc
        self.counters["fpga_fallbacks"] += 1
        profile.counters["fpga_fallbacks"] += 1
        profile.add(
            StepRecord(
                "fpga fault",
                self._label("relevancy"),
                0.0,
                "measured",
                0,
                f"{type(exc).__name__}: {exc}",
            )
        )
        warnings.warn(
            f"hetmem: FPGA fault while {what} ({type(exc).__name__}: {exc}); the card's memory "
            "will be rebuilt from the host copy",
            RuntimeWarning,
            stacklevel=3,
        )

    def _finish(self, profile: Profile) -> None:
        self.profile = profile
        self.history.append(profile)

    def _require_memory(self) -> Memory:
        if self.memory is None:
            raise PlacementError("memory", "is empty: call prepare() before step() or append()")
        return self.memory


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if hasattr(value, "nbytes") and isinstance(value.nbytes, int):
        return value.nbytes
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if hasattr(value, "__dict__"):
        return sum(_nbytes(v) for v in vars(value).values() if isinstance(v, torch.Tensor))
    return 0


def _to(value: Any, device: torch.device) -> Any:
    """Move tensors (and objects with a `to`) to a device; leave other values alone."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (TopK, Bitmap)):
        return type(value)(*(_to(v, device) for v in vars(value).values()))
    if hasattr(value, "to") and callable(value.to) and not isinstance(value, (str, bytes)):
        try:
            return value.to(device)
        except TypeError:
            return value
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    return value
