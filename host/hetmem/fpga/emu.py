"""`emu`: the FPGA target without a card. Kernels run as their golden models (bit-exact with
the card by the spec contract); kernel time is the spec's cycle model at the clock, and
transfers follow the PCIe model (`pcie.py`): every figure is `modeled`.

`execute` is the emu executor: it views raw buffer bytes as the arrays a spec's golden
model takes (`KernelSpec.buffer_shape`) and runs it. `xrt_emu` runs its kernels through
it too, so xrt-over-xrt_emu and emu compute the same way. A cosim target can subclass
`EmuDevice` and override `_execute` (and `timing_source`) to run the RTL instead.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import AllocationError, FpgaTimeout, InputError
from ..kernels import KernelInputs, KernelSpec
from ..kernels.spec import (
    DEFAULT_CLOCK_HZ,
    HBM_BANKS,
    STAGE,
    STAGED,
    Arg,
    apply_stage,
    empty_stage,
    stage_cycles,
)
from ..timeline import Span, Timeline
from .device import BANK_BYTES, Buffer, FpgaDevice, Timing, as_count
from .pcie import GEN3_X16, PcieLink

_BLAS: Any = None


def one_blas_thread() -> Any:
    """A context in which numpy's BLAS runs on one thread. The golden models' integer dots
    are small matmuls; with several BLAS threads, their workers spin after each call and
    slow the torch work that follows on the same cores several-fold (measured on the 2-core
    CI machine: a Llama-3-8B-shaped DSA layer step on emu 12.8 ms -> 4.3 ms)."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


#: Spans an emulated card's timeline keeps (a long run must not grow it without bound).
TIMELINE_SPANS = 4096


class CardTimeline(Timeline):
    """A card's in-order timeline: each operation starts when the one before it ended."""

    def __init__(self) -> None:
        super().__init__()
        self.spans = deque(maxlen=TIMELINE_SPANS)  # type: ignore[assignment]
        self.now = 0.0

    def add(self, lane: str, step: str, seconds: float, source: Any, after: float = 0.0) -> float:
        self.spans.append(Span(lane, step, max(self.now, after), float(seconds), source))
        self.now = self.spans[-1].end
        return self.now


#: The platform the emulator models (the manifest's xclbins target it).
PLATFORM = "xilinx_u55c_gen3x16_xdma_3_202210_1"


def view_inputs(
    spec: KernelSpec, raw: Mapping[str, np.ndarray], scalars: Mapping[str, int]
) -> KernelInputs:
    """The input buffers' raw uint8 bytes viewed as the golden model's arrays (a scalar the
    spec lets a caller leave out takes its default; no `stage` buffer: nothing staged)."""
    scalars = {**spec.scalar_defaults, **scalars}
    arrays: dict[str, np.ndarray] = {}
    for arg in spec.args:
        if arg.direction != "in":
            continue
        if arg.name == STAGE and STAGE not in raw and not int(scalars[STAGED]):
            arrays[STAGE] = empty_stage()
            continue
        data = raw[arg.name]
        shape = spec.buffer_shape(arg.name, scalars, data.nbytes)
        dtype = np.dtype(arg.dtype)
        need = int(np.prod(shape)) * dtype.itemsize
        arrays[arg.name] = data[:need].view(dtype).reshape(shape)
    return KernelInputs(arrays, {k: int(v) for k, v in scalars.items()})


def execute(
    spec: KernelSpec, raw: Mapping[str, np.ndarray], scalars: Mapping[str, int]
) -> tuple[np.ndarray, int]:
    """Run the golden model over raw buffer bytes: (out uint32 array, modeled cycles).

    A call with staged memory beats (`staged` > 0) first runs the pre-phase on the memory
    buffers' bytes themselves (`spec.apply_stage`: the card's memory keeps them), after
    every check the card makes before it touches anything (`KernelSpec.check_call`), so a
    refused call changes nothing; its modeled cycles count the copy (`spec.stage_cycles`)."""
    staged = int(scalars.get(STAGED, 0))
    if staged:
        spec.check_call(view_inputs(spec, raw, scalars))
        stage = view_inputs(spec, raw, scalars).arrays[STAGE]
        apply_stage([raw[name] for name in spec.memory_args], stage, staged)
        outputs = spec.golden(view_inputs(spec, raw, {**scalars, STAGED: 0}))
        cycles = int(outputs.cycles) + stage_cycles(spec.engine, staged)
        out = outputs.indices if outputs.indices is not None else outputs.bitmap
        return np.ascontiguousarray(out, dtype=np.uint32), cycles
    outputs = spec.golden(view_inputs(spec, raw, scalars))
    out = outputs.indices if outputs.indices is not None else outputs.bitmap
    return np.ascontiguousarray(out, dtype=np.uint32), int(outputs.cycles)


class EmuDevice(FpgaDevice):
    """The golden models on a modeled U55C: 32 banks of `bank_bytes`, PCIe `link`,
    kernels at `clock_hz`."""

    target = "emu"
    transfer_source = "modeled"
    #: The golden models run the pre-phase (`execute`); cosim and hls override it.
    stages_appends = True
    #: Source of kernel run times (a cosim subclass says "simulated").
    timing_source = "modeled"

    def __init__(
        self,
        clock_hz: float | None = None,
        link: PcieLink = GEN3_X16,
        bank_bytes: int = BANK_BYTES,
        platform: str = PLATFORM,
    ) -> None:
        super().__init__()
        ok = clock_hz is None or (
            isinstance(clock_hz, int | float) and not isinstance(clock_hz, bool)
            and math.isfinite(clock_hz) and clock_hz > 0
        )  # fmt: skip
        if not ok:
            raise InputError("clock_hz", f"expected a positive clock in Hz, got {clock_hz!r}")
        self.clock_hz = float(clock_hz) if clock_hz is not None else DEFAULT_CLOCK_HZ
        if not isinstance(link, PcieLink):
            raise InputError("link", f"expected a PcieLink (hetmem.fpga.pcie), got {link!r}")
        self.link = link
        self.bank_bytes = as_count("bank_bytes", bank_bytes, minimum=1)
        self.name = f"emu (modeled {platform})"
        self.used = [0] * HBM_BANKS
        #: Wall time the host spent computing kernels (the golden model, or the simulator):
        #: the emulator's own work, which a card would do; benchmarks subtract it (measured).
        self.execute_seconds = 0.0
        #: The card's modeled timeline: transfers on the PCIe lane and kernel runs on the
        #: engine lane, in the order issued (XRT's in-order queue), so a run starts after the
        #: writes before it and a read after the run (the last `TIMELINE_SPANS` kept).
        self.timeline = CardTimeline()

    def _alloc(self, spec: KernelSpec, arg: Arg, nbytes: int) -> Buffer:
        bank = int(arg.bank)  # type: ignore[arg-type]
        free = self.bank_bytes - self.used[bank]
        if nbytes > free:
            raise AllocationError(
                f"{spec.name}.{arg.name}: {nbytes} bytes do not fit in HBM bank {bank} "
                f"({free} of {self.bank_bytes} bytes free)"
            )
        self.used[bank] += nbytes
        return Buffer(spec.name, arg.name, bank, nbytes, np.zeros(nbytes, dtype=np.uint8))

    def _write(self, buf: Buffer, raw: np.ndarray, offset: int) -> Timing:
        buf.handle[offset : offset + raw.nbytes] = raw
        seconds = self.link.seconds(raw.nbytes)
        self.timeline.add("pcie", f"write {buf.arg}", seconds, self.transfer_source)
        return Timing(seconds, self.transfer_source, raw.nbytes)

    def _write_ranges(
        self, buf: Buffer, raw: np.ndarray, offsets: np.ndarray, sizes: np.ndarray
    ) -> Timing:
        """Every range in one numpy scatter; each is a transfer of its own on the link."""
        if not len(sizes):
            return Timing(0.0, self.transfer_source, 0)
        starts = np.repeat(offsets - (np.cumsum(sizes) - sizes), sizes)
        buf.handle[starts + np.arange(raw.nbytes)] = raw
        seconds = float(sum(self.link.seconds(int(n)) for n in sizes.tolist()))
        self.timeline.add("pcie", f"write {buf.arg} ({len(sizes)} ranges)", seconds, "modeled")
        return Timing(seconds, self.transfer_source, raw.nbytes)

    def _read(self, buf: Buffer, nbytes: int, offset: int) -> tuple[np.ndarray, Timing]:
        data = buf.handle[offset : offset + nbytes].copy()
        seconds = self.link.seconds(nbytes)
        self.timeline.add("pcie", f"read {buf.arg}", seconds, self.transfer_source)
        return data, Timing(seconds, self.transfer_source, nbytes)

    def _execute(
        self, spec: KernelSpec, raw: Mapping[str, np.ndarray], scalars: Mapping[str, int]
    ) -> tuple[np.ndarray, int]:
        """What executes the kernel: the golden model (cosim overrides with the RTL)."""
        return execute(spec, raw, scalars)

    def _run(
        self,
        spec: KernelSpec,
        buffers: dict[str, Buffer],
        scalars: dict[str, int],
        timeout_s: float,
    ) -> Timing:
        raw = {name: buf.handle for name, buf in buffers.items()}
        start = time.perf_counter()
        with one_blas_thread():
            out, cycles = self._execute(spec, raw, scalars)
        self.execute_seconds += time.perf_counter() - start
        seconds = cycles / self.clock_hz
        if seconds > timeout_s:  # the card would still be running when the host gives up
            raise FpgaTimeout(
                f"{spec.name}: no ap_done within {timeout_s} s (the run takes {cycles} cycles, "
                f"{seconds:.3g} s at {self.clock_hz / 1e6:g} MHz, {self.timing_source})"
            )
        flat = out.reshape(-1).view(np.uint8)
        buffers["out"].handle[: flat.nbytes] = flat
        self.timeline.add("kernel", spec.name, seconds, self.timing_source)
        return Timing(seconds, self.timing_source, 0, cycles)

    def _free(self, buf: Buffer) -> None:
        self.used[buf.bank] -= buf.nbytes
        buf.handle = None

    def _close(self) -> None:
        self.used = [0] * HBM_BANKS
