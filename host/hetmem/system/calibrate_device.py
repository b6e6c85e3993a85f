"""`hetmem profile-device`: microbenchmarks on the local torch device that replace a GPU
profile's assumed roofline with measured figures.

- streaming bandwidth: a large device-to-device copy (read + write bytes / time);
- dense matmul throughput at the device's float dtype (bfloat16 on a GPU, float32 on a CPU);
- a top-k over a large float32 score vector (scores per second; the cost model's top-k
  counts `TOPK_PASSES` passes over the scores, the profile notes how many the measurement
  amounts to);
- the fixed cost of one small kernel (the roofline's launch cost).

Each is the median of `repeat` runs after a warm-up, timed with the device synchronized.
The result is a `DeviceProfile` of kind `gpu` (the system model's compute device, a CPU
too) with source `measured`; figures no microbenchmark gives (power, PCIe) are read from
NVML where it is present, else stated as `assumed`. Its efficiencies are 1: the figures are
already what the device reaches.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import torch

from ..device import synchronize, torch_device
from ..errors import InputError
from .devices import DeviceProfile, Efficiency, Figure
from .shape import TOPK_PASSES


@dataclass(frozen=True)
class Sizes:
    """How big each microbenchmark is."""

    copy_bytes: int = 256 << 20
    matmul_n: int = 2048
    topk_n: int = 1 << 24
    topk_k: int = 2048
    repeat: int = 5


DEFAULT = Sizes()
QUICK = Sizes(copy_bytes=16 << 20, matmul_n=256, topk_n=1 << 18, topk_k=256, repeat=2)


def _median_s(fn: Callable[[], Any], device: torch.device, repeat: int) -> float:
    fn()  # warm-up (allocations, kernel selection)
    synchronize(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _copy_s(dev: torch.device, nbytes: int, repeat: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    return _median_s(lambda: dst.copy_(src), dev, repeat)


def _matmul_s(dev: torch.device, m: int, dtype: torch.dtype, repeat: int) -> float:
    a = torch.randn(m, m, device=dev).to(dtype)
    b = torch.randn(m, m, device=dev).to(dtype)
    return _median_s(lambda: a @ b, dev, repeat)


def _topk_s(dev: torch.device, n: int, k: int, repeat: int) -> float:
    scores = torch.randn(n, dtype=torch.float32, device=dev)
    return _median_s(lambda: torch.topk(scores, k), dev, repeat)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {name} ({os.cpu_count()} threads)"


def float_dtype(device: torch.device) -> torch.dtype:
    """The dtype hetmem computes in on this device: bfloat16 on a GPU that has it, else
    float32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def _nvml(device: torch.device) -> dict[str, float]:
    """Power limit and PCIe link of an NVIDIA GPU through NVML, where it is present."""
    if device.type != "cuda" or getattr(torch.version, "hip", None):
        return {}
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        return {
            "tdp_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0,
            "pcie_gen": float(pynvml.nvmlDeviceGetMaxPcieLinkGeneration(h)),
            "pcie_lanes": float(pynvml.nvmlDeviceGetMaxPcieLinkWidth(h)),
        }
    except Exception:  # no pynvml, no driver, or a field the GPU lacks: stay assumed
        return {}


def profile_device(device: str | torch.device = "gpu", *, sizes: Sizes = DEFAULT,
                   progress: Callable[[str], None] | None = None) -> DeviceProfile:  # fmt: skip
    """Measure the local torch device (`gpu`: CUDA/ROCm, else the CPU) and return its
    profile (source `measured`). `progress(name)` is called after each microbenchmark."""
    if (
        sizes.repeat < 1
        or sizes.copy_bytes < 1024
        or sizes.matmul_n < 16
        or sizes.topk_n < sizes.topk_k
    ):
        raise InputError("sizes", f"microbenchmarks too small or inconsistent: {sizes}")
    dev = torch_device(device)
    name = device_name(dev)
    dtype = float_dtype(dev)
    tick = progress or (lambda _: None)
    cite = f"hetmem profile-device on {platform.node() or 'this machine'}, {datetime.now(UTC):%Y-%m-%d}"
    figures: dict[str, Figure] = {}

    def measured(key: str, value: float, unit: str, note: str) -> None:
        figures[key] = Figure(float(value), unit, cite, "measured", note)

    # streaming bandwidth: a large copy reads and writes every byte once
    nbytes = sizes.copy_bytes // 4 * 4
    t = _copy_s(dev, nbytes, sizes.repeat)
    measured("mem_bw", 2 * nbytes / t, "B/s",
             f"copy of {nbytes >> 20} MiB (read + write), median of {sizes.repeat}")  # fmt: skip
    tick("streaming bandwidth")

    # dense matmul at the device's float dtype
    m = sizes.matmul_n
    t = _matmul_s(dev, m, dtype, sizes.repeat)
    flops = 2 * m**3 / t
    dname = str(dtype).removeprefix("torch.")
    for key in ("fp16", "bf16"):
        measured(key, flops, "FLOP/s", f"{m}x{m} matmul at {dname} (the device's float dtype, "
                 "which hetmem's steps run in here)")  # fmt: skip
    if dtype == torch.float32:
        measured("fp32", flops, "FLOP/s", f"{m}x{m} matmul at float32")
    figures["int8"] = Figure(flops, "OP/s", cite, "assumed",
                             f"not measured: taken as the {dname} matmul rate")  # fmt: skip
    tick(f"matmul ({dname})")

    # a top-k over a large score vector
    t = _topk_s(dev, sizes.topk_n, sizes.topk_k, sizes.repeat)
    bw = figures["mem_bw"].value
    passes = t * bw / (4 * sizes.topk_n)
    measured("topk_rate", sizes.topk_n / t, "scores/s",
             f"torch.topk(k={sizes.topk_k}) over {sizes.topk_n} float32 scores: as long as "
             f"{passes:.1f} passes at the measured bandwidth (the cost model assumes {TOPK_PASSES})")  # fmt: skip
    tick("top-k")

    # the fixed cost of a small kernel
    x = torch.zeros(16, device=dev)
    launch = _median_s(lambda: x.add_(1.0), dev, max(sizes.repeat, 50))
    tick("kernel launch")

    read = _nvml(dev)
    assumed = "not measured by a microbenchmark: assumed; edit the profile with the board's figure"
    for key, default, unit in (("tdp_w", 300.0 if dev.type == "cuda" else 150.0, "W"),
                               ("pcie_gen", 4.0, ""), ("pcie_lanes", 16.0, "")):  # fmt: skip
        if key in read:
            measured(key, read[key], unit, "read through NVML")
        else:
            figures[key] = Figure(default, unit, cite, "assumed", assumed)
    tdp = figures["tdp_w"].value
    figures["idle_w"] = Figure(
        0.15 * tdp, "W", cite, "assumed", "15% of the TDP, as the built-in profiles"
    )
    figures["busy_w"] = Figure(tdp, "W", cite, "assumed", "the TDP (an upper bound)")
    measured("hbm_bytes", _memory_bytes(dev), "B", "device memory as the driver (or OS) reports it")
    efficiency = Efficiency(1.0, 1.0, launch, "measured",
                            "the figures are the rates reached (efficiency 1); launch_s: the "
                            "median time of a 16-element in-place add, synchronized")  # fmt: skip
    about = (f"{name}: measured by hetmem profile-device, torch {torch.__version__}, "
             f"{dev.type}, float dtype {dname}")  # fmt: skip
    return DeviceProfile(name, "gpu", figures, efficiency, "measured", about)
