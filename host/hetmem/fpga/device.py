"""The FPGA device interface every target implements (emu, cosim, xrt, pynq).

A device holds buffers in the HBM pseudo-channels the kernel specs name, moves bytes
between host and card, and runs kernels on what the card holds. The public methods check
their arguments here, once for every target, and raise `InputError` naming the argument;
the targets implement the underscored hooks and raise the `FpgaError` subclasses for
faults of the card. Every call returns a `Timing` that says where its time comes from.
"""

from __future__ import annotations

import math
import operator
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import kernels
from ..errors import InputError
from ..kernels import KernelInputs, KernelSpec
from ..kernels.spec import CAPACITY, HBM_BANKS, MODE_THRESHOLD, MODE_TOPK, STAGE, STAGED, Arg

#: One HBM pseudo-channel of the U55C: 16 GiB in 32 pseudo-channels (AMD UG1468 / the U55C
#: data sheet DS978: 16 GB HBM2, 32 pseudo-channels).
BANK_BYTES = (16 << 30) // HBM_BANKS

#: Where a figure comes from (see DESIGN.md, "Timing honesty").
TIMING_SOURCES = ("measured", "simulated", "modeled")


@dataclass(frozen=True)
class Timing:
    """Time of one transfer or kernel run, with its source."""

    seconds: float
    source: str  # "measured" | "simulated" | "modeled"
    nbytes: int = 0  # bytes moved over PCIe (transfers) or 0
    cycles: int | None = None  # kernel runs: cycles (modeled or simulated)

    def __post_init__(self) -> None:
        if self.source not in TIMING_SOURCES:
            raise InputError("source", f"expected one of {TIMING_SOURCES}, got {self.source!r}")
        if not (self.seconds >= 0 and math.isfinite(self.seconds)):
            raise InputError("seconds", f"expected a finite time >= 0, got {self.seconds}")


@dataclass
class Buffer:
    """A buffer object in one HBM pseudo-channel, allocated for one kernel argument."""

    kernel: str
    arg: str
    bank: int
    nbytes: int
    handle: Any = field(repr=False)  # target-specific: numpy bytes, pyxrt.bo, PynqBuffer
    #: A sub-buffer (`FpgaDevice.alloc_packed`): the buffer it lies in, at byte `offset`.
    parent: Buffer | None = field(default=None, repr=False)
    offset: int = 0


#: Alignment of the sub-buffers of a packed allocation (one AXI beat).
PACK_ALIGN = 64


class Launch:
    """A kernel run in flight (`FpgaDevice.run_async`): `wait()` returns its `Timing`, or
    raises the card's fault. The selection is in the `out` buffer once it returns."""

    def __init__(self, kernel: str, wait: Any) -> None:
        self.kernel = kernel
        self._wait = wait
        self._timing: Timing | None = None
        self._error: BaseException | None = None
        self._done = False

    @classmethod
    def finished(cls, kernel: str, timing: Timing | None, error: BaseException | None) -> Launch:
        launch = cls(kernel, None)
        launch._timing, launch._error, launch._done = timing, error, True
        return launch

    @property
    def done(self) -> bool:
        return self._done

    def wait(self) -> Timing:
        if not self._done:
            try:
                self._timing = self._wait()
            except BaseException as exc:
                self._error = exc
            self._done = True
        if self._error is not None:
            raise self._error
        assert self._timing is not None
        return self._timing


@dataclass(frozen=True)
class DeviceInfo:
    """One line of `list_devices`: a target and, for real cards, which card."""

    target: str
    available: bool
    name: str
    detail: str = ""


def as_count(name: str, value: Any, minimum: int = 0) -> int:
    """An int >= minimum (numpy ints accepted, bools not), or `InputError` naming it."""
    if isinstance(value, bool):
        raise InputError(name, f"expected an int, got {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise InputError(name, f"expected an int, got {type(value).__name__}") from None
    if out < minimum:
        raise InputError(name, f"expected an int >= {minimum}, got {out}")
    return out


def spec_of(kernel: Any) -> KernelSpec:
    """The kernel spec named `kernel` (InputError naming `kernel` when unknown)."""
    return kernels.get(kernel)


def buffer_arg(spec: KernelSpec, arg: Any) -> Arg:
    """The spec's buffer argument named `arg` (InputError naming `arg` otherwise)."""
    try:
        found = spec.arg(arg)
    except KeyError:
        buffers = [a.name for a in spec.args if a.is_buffer]
        raise InputError(
            "arg", f"{spec.name} has no argument {arg!r}; buffers: {buffers}"
        ) from None
    if not found.is_buffer:
        raise InputError("arg", f"{spec.name}.{arg} is a scalar, not a buffer")
    return found


def check_scalars(spec: KernelSpec, scalars: Mapping[str, Any]) -> dict[str, int]:
    """Every scalar of the kernel present, a 32-bit unsigned int; no unknown names; the
    selection valid for the mode (top-k: 1 <= k <= n; threshold: n >= 1)."""
    if not isinstance(scalars, Mapping):
        raise InputError(
            "scalars", f"expected a mapping of name to int, got {type(scalars).__name__}"
        )
    names = spec.scalar_args()
    unknown = sorted(set(scalars) - set(names))
    if unknown:
        raise InputError("scalars", f"{spec.name} has no scalars {unknown}; it takes {list(names)}")
    out: dict[str, int] = {}
    defaults = spec.scalar_defaults
    for name in names:
        if name not in scalars and name in defaults:  # e.g. staged: 0, nothing staged
            out[name] = defaults[name]
            continue
        if name not in scalars:
            raise InputError(name, f"missing scalar of {spec.name}")
        value = as_count(name, scalars[name])
        if value >= 2**32:
            raise InputError(name, f"expected a 32-bit unsigned value, got {value}")
        out[name] = value
    mode = out.get("mode", MODE_TOPK)
    if mode == MODE_TOPK:
        kernels.check_k(out["k"], out["n"])
    elif mode == MODE_THRESHOLD and "mode" in names:
        if out["n"] < 1:
            raise InputError("n", "is 0: there is nothing to select from")
    else:
        raise InputError("mode", f"{spec.name} does not support mode {mode}")
    return out


class FpgaDevice(ABC):
    """An FPGA card (real, simulated or emulated) that holds kernel buffers and runs
    kernels. Use as a context manager, or call `close`."""

    target: str  # "emu" | "cosim" | "xrt" | "pynq"
    name: str  # e.g. "emu (modeled xilinx_u55c_gen3x16_xdma_3_202210_1)"
    clock_hz: float
    #: Source of transfer times: "modeled" on emulated targets, "measured" on a card.
    transfer_source: str = "modeled"
    #: Capacity of each HBM pseudo-channel (a target with other banks overrides it).
    bank_bytes: int = BANK_BYTES
    #: Whether the card runs the kernels' pre-phase: the staged memory beats of a call
    #: (`stage`, `staged` > 0; `hetmem.kernels.spec.apply_stage`) copied into its memory
    #: buffers before the scan, so a step's appended rows ride on the query write. A target
    #: without it refuses staged > 0 (`InputError`); the host then writes appended rows
    #: with `write_ranges`.
    stages_appends: bool = False

    def __init__(self) -> None:
        self._live: dict[int, Buffer] = {}
        self._closed = False
        self._empty_stages: dict[str, Buffer] = {}  # per kernel: the stage of staged = 0
        #: PCIe transactions (writes, reads, launches) since the device opened.
        self.transactions = 0

    # -- HBM accounting ------------------------------------------------------------------------
    def bank_used(self) -> list[int]:
        """Bytes allocated in each HBM bank by live buffers."""
        used = [0] * HBM_BANKS
        for buf in self._live.values():
            used[buf.bank] += buf.nbytes
        return used

    def bank_free(self) -> list[int]:
        """Bytes still free in each HBM bank."""
        return [self.bank_bytes - u for u in self.bank_used()]

    # -- public entry points: checks, then the target's hook -------------------------------
    def alloc(self, kernel: str, arg: str, nbytes: int) -> Buffer:
        """A buffer of `nbytes` for `kernel`'s argument `arg`, in the HBM bank its spec
        names; raises AllocationError when the bank cannot hold it."""
        self._check_open()
        spec = spec_of(kernel)
        spec_arg = buffer_arg(spec, arg)
        buf = self._alloc(spec, spec_arg, as_count("nbytes", nbytes, minimum=1))
        self._live[id(buf)] = buf
        return buf

    def write(self, buf: Buffer, data: np.ndarray, offset: int = 0) -> Timing:
        """Host -> card: the bytes of `data` at byte `offset` of `buf`; only they cross
        PCIe (`Timing.nbytes` = data.nbytes)."""
        self._check_buffer(buf)
        if not isinstance(data, np.ndarray):
            raise InputError("data", f"expected a numpy array, got {type(data).__name__}")
        offset = as_count("offset", offset)
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        if offset + raw.nbytes > buf.nbytes:
            raise InputError(
                "data",
                f"{raw.nbytes} bytes at offset {offset} overrun the {buf.nbytes}-byte buffer "
                f"{buf.kernel}.{buf.arg}",
            )
        if raw.nbytes == 0:
            return Timing(0.0, self.transfer_source, 0)
        self.transactions += 1
        return self._write(buf, raw, offset)

    def write_ranges(
        self, buf: Buffer, data: np.ndarray, offsets: np.ndarray, sizes: np.ndarray
    ) -> Timing:
        """Host -> card: consecutive pieces of `data`'s bytes, `sizes[i]` bytes to byte
        `offsets[i]` of `buf` (each slot's appended rows of a memory): one transfer per
        range, as XRT syncs a buffer one range at a time; timings summed."""
        self._check_buffer(buf)
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1)
        sizes = np.asarray(sizes, dtype=np.int64).reshape(-1)
        if offsets.shape != sizes.shape or int(sizes.sum()) != raw.nbytes or (sizes < 0).any():
            raise InputError("sizes", f"expected sizes summing to the data's {raw.nbytes} bytes")
        if sizes.size and ((offsets < 0).any() or int((offsets + sizes).max()) > buf.nbytes):
            raise InputError("offsets", f"a range overruns the {buf.nbytes}-byte buffer")
        keep = sizes > 0
        self.transactions += int(keep.sum())
        return self._write_ranges(buf, raw, offsets[keep], sizes[keep])

    def _write_ranges(
        self, buf: Buffer, raw: np.ndarray, offsets: np.ndarray, sizes: np.ndarray
    ) -> Timing:
        """Write each range with the target's `_write` (a target may do it in one go)."""
        seconds, start = 0.0, 0
        for offset, size in zip(offsets.tolist(), sizes.tolist(), strict=True):
            seconds += self._write(buf, raw[start : start + size], offset).seconds
            start += size
        return Timing(seconds, self.transfer_source, raw.nbytes)

    def read(
        self, buf: Buffer, dtype: Any, count: int, offset: int = 0
    ) -> tuple[np.ndarray, Timing]:
        """Card -> host: `count` items of `dtype` from byte `offset` of `buf`."""
        self._check_buffer(buf)
        try:
            dtype = np.dtype(dtype)
        except TypeError:
            raise InputError("dtype", f"expected a numpy dtype, got {dtype!r}") from None
        count = as_count("count", count)
        offset = as_count("offset", offset)
        nbytes = count * dtype.itemsize
        if offset + nbytes > buf.nbytes:
            raise InputError(
                "count",
                f"{count} x {dtype} at offset {offset} overrun the {buf.nbytes}-byte buffer "
                f"{buf.kernel}.{buf.arg}",
            )
        if nbytes == 0:
            return np.empty(0, dtype=dtype), Timing(0.0, self.transfer_source, 0)
        self.transactions += 1
        raw, timing = self._read(buf, nbytes, offset)
        return np.ascontiguousarray(raw, dtype=np.uint8).view(dtype), timing

    def run(
        self,
        kernel: str,
        buffers: Mapping[str, Buffer],
        scalars: Mapping[str, int],
        timeout_s: float = 10.0,
    ) -> Timing:
        """Run `kernel` on the buffers (one per buffer argument of its spec) and scalars;
        the card writes the output buffer. Raises FpgaTimeout, DeviceLost, AxiError,
        XclbinError on faults of the card."""
        return self.run_async(kernel, buffers, scalars, timeout_s).wait()

    def run_async(
        self,
        kernel: str,
        buffers: Mapping[str, Buffer],
        scalars: Mapping[str, int],
        timeout_s: float = 10.0,
    ) -> Launch:
        """Start `kernel` and return at once with a `Launch` to wait on: the host prepares
        the next launch (or runs GPU work) while the card computes. Arguments are checked
        here, before anything starts; a fault of the card is raised by `Launch.wait`."""
        spec, bound, values, timeout = self._check_run(kernel, buffers, scalars, timeout_s)
        self.transactions += 1
        return self._run_async(spec, bound, values, timeout)

    def _run_async(
        self,
        spec: KernelSpec,
        buffers: dict[str, Buffer],
        scalars: dict[str, int],
        timeout_s: float,
    ) -> Launch:
        """Start a run. The default runs it to completion now (emulated and simulated cards
        compute in the host's process) and hands back the finished launch; a driver whose
        card runs on its own returns a launch that waits on it."""
        try:
            return Launch.finished(spec.name, self._run(spec, buffers, scalars, timeout_s), None)
        except Exception as exc:
            return Launch.finished(spec.name, None, exc)

    def _check_run(
        self,
        kernel: str,
        buffers: Mapping[str, Buffer],
        scalars: Mapping[str, int],
        timeout_s: float,
    ) -> tuple[KernelSpec, dict[str, Buffer], dict[str, int], float]:
        self._check_open()
        spec = spec_of(kernel)
        values = check_scalars(spec, scalars)
        if not isinstance(buffers, Mapping):
            raise InputError(
                "buffers", f"expected a mapping of argument to Buffer, got {type(buffers).__name__}"
            )
        wanted = [a.name for a in spec.args if a.is_buffer]
        unknown = sorted(set(buffers) - set(wanted))
        if unknown:
            raise InputError("buffers", f"{spec.name} has no buffers {unknown}; it takes {wanted}")
        if values.get(STAGED, 0) and not self.stages_appends:
            raise InputError(
                STAGED, f"{self.name} copies no staged memory beats: write the rows instead"
            )
        bound: dict[str, Buffer] = {}
        for name in wanted:
            if name == STAGE and name not in buffers and not values.get(STAGED, 0):
                bound[name] = self._empty_stage(spec)  # nothing staged: any buffer will do
                continue
            if name not in buffers:
                raise InputError(name, f"missing buffer of {spec.name}")
            buf = buffers[name]
            self._check_buffer(buf, name)
            if (buf.kernel, buf.arg) != (spec.name, name):
                raise InputError(
                    name, f"was allocated for {buf.kernel}.{buf.arg}, not {spec.name}.{name}"
                )
            self._check_size(spec, name, buf, values)
            bound[name] = buf
        if not (isinstance(timeout_s, int | float) and timeout_s > 0 and math.isfinite(timeout_s)):
            raise InputError(
                "timeout_s", f"expected a positive number of seconds, got {timeout_s!r}"
            )
        return spec, bound, values, float(timeout_s)

    def _empty_stage(self, spec: KernelSpec) -> Buffer:
        """A small `stage` buffer for calls that stage nothing (the kernel's argument must
        be bound all the same), allocated once per kernel; its bytes are never read."""
        buf = self._empty_stages.get(spec.name)
        if buf is None or self._live.get(id(buf)) is not buf:
            buf = self._empty_stages[spec.name] = self.alloc(spec.name, STAGE, 64)
        return buf

    def free(self, buf: Buffer) -> None:
        """Give the buffer's bank space back; the Buffer is unusable afterwards (freeing a
        packed allocation frees its sub-buffers too)."""
        self._check_buffer(buf)
        del self._live[id(buf)]
        if buf.parent is not None:
            return  # a sub-buffer owns no bank space of its own
        for other in [b for b in self._live.values() if b.parent is buf]:
            del self._live[id(other)]
        self._free(buf)

    # -- packed buffers: several arguments, one transfer ---------------------------------------
    def alloc_packed(self, kernel: str, sizes: Mapping[str, int]) -> dict[str, Buffer]:
        """Buffers for several input arguments of `kernel` laid out in ONE allocation (in the
        first argument's bank, each sub-buffer aligned to a beat), so that `write_packed`
        fills them all with one transfer: a step's query arrays cross PCIe as one
        transaction. A target that cannot make sub-buffers gets separate buffers (and
        `write_packed` then writes each)."""
        spec = spec_of(kernel)
        if not sizes:
            raise InputError("sizes", "expected at least one argument")
        layout, total = [], 0
        for arg, nbytes in sizes.items():
            buffer_arg(spec, arg)
            nbytes = as_count("nbytes", nbytes, minimum=1)
            layout.append((arg, total, nbytes))
            total += -(-nbytes // PACK_ALIGN) * PACK_ALIGN
        parent = self.alloc(spec.name, layout[0][0], total)
        subs = {}
        for arg, offset, nbytes in layout:
            handle = self._sub_handle(parent, arg, offset, nbytes)
            if handle is None:  # no sub-buffers on this target: one buffer per argument
                self.free(parent)
                return {arg: self.alloc(spec.name, arg, n) for arg, _, n in layout}
            sub = Buffer(spec.name, arg, parent.bank, nbytes, handle, parent, offset)
            self._live[id(sub)] = sub
            subs[arg] = sub
        return subs

    def write_packed(self, data: Mapping[str, np.ndarray], buffers: Mapping[str, Buffer]) -> Timing:
        """Host -> card: each array into its buffer; sub-buffers of one packed allocation
        go as one transfer of the span they cover (one PCIe transaction), other buffers
        one transfer each (their timings summed, transactions counted)."""
        parents = {id(buffers[a].parent) for a in data}
        parent = buffers[next(iter(data))].parent
        if parent is None or len(parents) != 1:
            timings = [self.write(buffers[arg], arr) for arg, arr in data.items()]
            return Timing(
                sum(t.seconds for t in timings),
                self.transfer_source,
                sum(t.nbytes for t in timings),
            )
        start = min(buffers[a].offset for a in data)
        end = max(buffers[a].offset + arr.nbytes for a, arr in data.items())
        span = np.zeros(end - start, dtype=np.uint8)
        for arg, arr in data.items():
            buf = buffers[arg]
            raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
            if raw.nbytes > buf.nbytes:
                raise InputError(arg, f"{raw.nbytes} bytes overrun the {buf.nbytes}-byte buffer")
            span[buf.offset - start : buf.offset - start + raw.nbytes] = raw
        return self.write(parent, span, offset=start)

    def _sub_handle(self, parent: Buffer, arg: str, offset: int, nbytes: int) -> Any:
        """The handle of a sub-buffer of `parent` for argument `arg`, or None where the
        target has none (or the argument's port cannot reach the parent's bank). A
        numpy-backed buffer (the emulated cards) takes a view of its bytes."""
        if isinstance(parent.handle, np.ndarray):
            return parent.handle[offset : offset + nbytes]
        return None

    def close(self) -> None:
        """Free every buffer and release the card; later calls raise InputError."""
        if self._closed:
            return
        for buf in list(self._live.values()):
            self._free(buf)
        self._live.clear()
        self._closed = True
        self._close()

    def __enter__(self) -> FpgaDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    # -- a one-shot call, for tests and a memory's first load -------------------------------
    def call(
        self, kernel: str, inputs: KernelInputs, timeout_s: float = 10.0
    ) -> tuple[np.ndarray, list[Timing]]:
        """Allocate one buffer per input array (its exact size), write them, run, read the
        output and free: returns (out [queries, k] or bitmap [queries, words], timings of
        the writes, the run and the read, in that order)."""
        spec = spec_of(kernel)
        if not isinstance(inputs, KernelInputs):
            raise InputError("inputs", f"expected KernelInputs, got {type(inputs).__name__}")
        if spec.segmented:
            inputs = spec.complete(inputs)  # a single-memory call scans rows [0, n)
        spec.check_inputs(inputs)
        scalars = check_scalars(spec, inputs.scalars)
        timings: list[Timing] = []
        bufs: dict[str, Buffer] = {}
        try:
            for arg in spec.args:
                if arg.name == STAGE and not scalars.get(STAGED, 0):
                    bufs[arg.name] = self.alloc(spec.name, arg.name, 64)  # bound, never read
                    continue
                if arg.direction == "in":
                    data = inputs.arrays[arg.name]
                    bufs[arg.name] = self.alloc(spec.name, arg.name, max(1, data.nbytes))
                    timings.append(self.write(bufs[arg.name], data))
            shape = spec.buffer_shape("out", scalars, 0)
            bufs["out"] = self.alloc(spec.name, "out", max(1, spec.buffer_nbytes("out", scalars)))
            timings.append(self.run(spec.name, bufs, scalars, timeout_s))
            out, timing = self.read(bufs["out"], np.uint32, int(np.prod(shape)))
            timings.append(timing)
            return out.reshape(shape), timings
        finally:
            for buf in bufs.values():
                if id(buf) in self._live:
                    self.free(buf)

    # -- checks --------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise InputError("device", f"{self.name} is closed")

    def _check_buffer(self, buf: Any, name: str = "buf") -> None:
        self._check_open()
        if not isinstance(buf, Buffer):
            raise InputError(name, f"expected a Buffer, got {type(buf).__name__}")
        if self._live.get(id(buf)) is not buf:
            raise InputError(
                name,
                f"{buf.kernel}.{buf.arg} is not allocated on {self.name} (freed, or another device's)",
            )

    @staticmethod
    def _check_size(spec: KernelSpec, name: str, buf: Buffer, scalars: Mapping[str, int]) -> None:
        """Fixed-shape buffers (queries, output) must hold what the scalars say; memory
        buffers are sized by their capacity and checked by the kernel against `n`."""
        arg = spec.arg(name)
        if arg.direction == "in" and CAPACITY in spec.dims.get(name, ()):
            return
        need = spec.buffer_nbytes(name, scalars)
        if need > buf.nbytes:
            shape = spec.buffer_shape(name, scalars, buf.nbytes)
            raise InputError(
                name, f"needs {need} bytes ({arg.dtype} {list(shape)}), the buffer has {buf.nbytes}"
            )

    # -- the target's hooks --------------------------------------------------------------------
    @abstractmethod
    def _alloc(self, spec: KernelSpec, arg: Arg, nbytes: int) -> Buffer:
        """Allocate in bank `arg.bank`; AllocationError when it does not fit."""

    @abstractmethod
    def _write(self, buf: Buffer, raw: np.ndarray, offset: int) -> Timing:
        """Copy raw uint8 bytes to the card at `offset`."""

    @abstractmethod
    def _read(self, buf: Buffer, nbytes: int, offset: int) -> tuple[np.ndarray, Timing]:
        """Copy `nbytes` from the card at `offset` into a new uint8 array."""

    @abstractmethod
    def _run(
        self,
        spec: KernelSpec,
        buffers: dict[str, Buffer],
        scalars: dict[str, int],
        timeout_s: float,
    ) -> Timing:
        """Execute the kernel; write its output buffer on the card."""

    @abstractmethod
    def _free(self, buf: Buffer) -> None:
        """Release the buffer's bank space."""

    @abstractmethod
    def _close(self) -> None:
        """Release the card (after every buffer was freed)."""
