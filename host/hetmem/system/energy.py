"""Energy over a schedule: per device, busy power x busy time + idle power x idle time
(`modeled`: the profiles' powers, the schedule's modeled times). The link's own power is
not counted (it is the GPU's and the card's), nor the host's.

Measured power, where a reader is present (each imported only when asked for): NVML
through `pynvml` on an NVIDIA GPU, `rocm-smi --showpower --json` on an AMD GPU, and XRT's
electrical report (`xbutil examine -r electrical --format JSON`) on an Alveo card.
`measure_energy(fn, meters)` samples them while `fn` runs and integrates (`measured`).
"""

from __future__ import annotations

import importlib
import itertools
import json
import shutil
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError
from .schedule import Schedule

#: Schedule lanes and the device of the system each belongs to.
LANE_DEVICES = {"gpu": "gpu", "fpga": "card"}


@dataclass
class Energy:
    """Joules per device over a schedule, and how they were obtained."""

    joules: dict[str, float]
    seconds: float
    source: str = "modeled"
    detail: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.joules.values())


def schedule_energy(sched: Schedule) -> Energy:
    """Busy power x busy time + idle power x (makespan - busy) for the GPU and, when the
    schedule's system has one, the card (which idles whenever its engine does not run)."""
    total = sched.seconds
    devices = {"gpu": sched.system.gpu}
    if sched.system.card is not None:
        devices["card"] = sched.system.card
    joules, detail = {}, {}
    for lane, key in LANE_DEVICES.items():
        dev = devices.get(key)
        if dev is None:
            continue
        busy = min(sched.busy(lane), total)
        idle = total - busy
        joules[dev.name] = dev.busy_w * busy + dev.idle_w * idle
        detail[dev.name] = {"busy_s": busy, "idle_s": idle, "busy_w": dev.busy_w,
                            "idle_w": dev.idle_w}  # fmt: skip
    return Energy(joules, total, "modeled", detail)


# -- measured power -------------------------------------------------------------------------


class PowerMeter(ABC):
    """One device's power reading, in watts (NVML, rocm-smi or XRT below)."""

    name = "meter"

    @abstractmethod
    def watts(self) -> float:
        """The device's power now, in watts."""


class NvmlMeter(PowerMeter):
    """An NVIDIA GPU's power through NVML (`pynvml`, imported here, not before)."""

    def __init__(self, index: int = 0):
        try:
            self.nvml = importlib.import_module("pynvml")
        except ImportError as exc:
            raise InputError("meter", "NVML power needs pynvml (pip install nvidia-ml-py)") from exc
        self.nvml.nvmlInit()
        self.handle = self.nvml.nvmlDeviceGetHandleByIndex(index)
        self.name = f"nvml:{index}"

    def watts(self) -> float:
        return float(self.nvml.nvmlDeviceGetPowerUsage(self.handle)) / 1000.0  # mW


def _run_json(cmd: list[str], runner: Callable[[list[str]], str] | None) -> Any:
    if runner is None:
        if shutil.which(cmd[0]) is None:
            raise InputError("meter", f"{cmd[0]} is not installed here")
        runner = lambda c: subprocess.run(c, capture_output=True, text=True, check=True).stdout  # noqa: E731
    try:
        return json.loads(runner(cmd))
    except (ValueError, subprocess.CalledProcessError) as exc:
        raise InputError("meter", f"{' '.join(cmd)} gave no power reading: {exc}") from None


def _find_watts(data: Any, keys: tuple[str, ...]) -> float | None:
    """The first number under a key containing one of `keys` (case-insensitive)."""
    if isinstance(data, Mapping):
        for k, v in data.items():
            if any(s in str(k).lower() for s in keys):
                try:
                    return float(str(v).split()[0])
                except (ValueError, IndexError):
                    pass
            found = _find_watts(v, keys)
            if found is not None:
                return found
    elif isinstance(data, list):
        for v in data:
            found = _find_watts(v, keys)
            if found is not None:
                return found
    return None


class RocmSmiMeter(PowerMeter):
    """An AMD GPU's power through `rocm-smi --showpower --json`."""

    def __init__(self, index: int = 0, runner: Callable[[list[str]], str] | None = None):
        self.index, self.runner, self.name = index, runner, f"rocm-smi:{index}"

    def watts(self) -> float:
        data = _run_json(["rocm-smi", "-d", str(self.index), "--showpower", "--json"], self.runner)
        w = _find_watts(data, ("power (w)", "power"))
        if w is None:
            raise InputError("meter", "rocm-smi reported no power")
        return w


class XrtMeter(PowerMeter):
    """An Alveo card's power through XRT (`xbutil examine -r electrical --format JSON`)."""

    def __init__(self, device: str = "", runner: Callable[[list[str]], str] | None = None):
        self.device, self.runner, self.name = device, runner, f"xrt:{device or 0}"

    def watts(self) -> float:
        cmd = [
            "xbutil",
            "examine",
            "-r",
            "electrical",
            "--format",
            "JSON",
            "--output",
            "/dev/stdout",
        ]
        if self.device:
            cmd[2:2] = ["-d", self.device]
        w = _find_watts(_run_json(cmd, self.runner), ("power_consumption_watts", "power"))
        if w is None:
            raise InputError("meter", "xbutil reported no power")
        return w


def measure_energy(fn: Callable[[], Any], meters: Mapping[str, PowerMeter],
                   interval_s: float = 0.05) -> tuple[Any, Energy]:  # fmt: skip
    """Run `fn` while sampling each meter every `interval_s`; joules by the trapezoid rule
    over the samples (`measured`). Returns fn's result and the energy."""
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in meters}
    stop = threading.Event()

    def sample() -> None:
        now = time.perf_counter()
        for k, m in meters.items():
            samples[k].append((now, m.watts()))

    def loop() -> None:
        while not stop.wait(interval_s):
            sample()

    sample()
    thread = threading.Thread(target=loop, daemon=True)
    start = time.perf_counter()
    thread.start()
    try:
        result = fn()
    finally:
        stop.set()
        thread.join()
        sample()
    seconds = time.perf_counter() - start
    joules = {}
    for k, pts in samples.items():
        joules[k] = sum((t1 - t0) * (w0 + w1) / 2 for (t0, w0), (t1, w1) in itertools.pairwise(pts))
    return result, Energy(joules, seconds, "measured")
