"""`cosim`: the FPGA target whose kernels are the RTL of fpga/rtl, simulated by Verilator.

Each kernel's top level (fpga/rtl/hm_<kernel>.v) is verilated together with the harness
fpga/cosim/harness.cpp into one executable, built once per (kernel, engine parameters, RTL
sources, harness, Verilator) into a cache folder ($HETMEM_CACHE/cosim, else build/cosim/
under the repository) and reused by every later device, in this process or another. A
device keeps one simulator process per kernel open and talks to it over pipes; the model
runs call after call without a reset, as a card does.

The harness models the HBM as AXI4 slaves over the bytes of the buffers a call binds (one
slave per master port: keys or minima on m_axi_mem_a, shifts or maxima on m_axi_mem_b, the
query buffers on m_axi_query, the selection on m_axi_out), each buffer at the base address
of its HBM pseudo-channel; a read burst's first beat comes `read_latency` cycles after its
address (default 32, a modeled HBM latency, not a measured one), then one 512-bit beat per
cycle. It writes the registers of the kernel spec's map over AXI4-Lite, sets ap_start and
counts the cycles to ap_done. Kernel time is those cycles at `clock_hz` (the 300 MHz the
U55C build targets unless given): `simulated`. Transfers follow the PCIe model: `modeled`.

Faults map to the card's errors: an access outside every bound buffer is `AxiError`
(DECERR), no ap_done within `timeout_s` of simulated time, or within `hang_factor` times
the spec's cycle model, is `FpgaTimeout` (the model is reset), a simulator process that
dies is `DeviceLost`. A call the RTL build cannot take (n beyond NMAX, dim beyond DMAX) is
an `InputError` naming the scalar.

bm25 has no RTL: allocating or running it on cosim raises `XclbinError` (as the xrt driver
does for a kernel missing from the xclbin), so the pipeline's policy applies; run bm25 on
`emu` instead. It is never run on the golden model under a `simulated` label.
"""

from __future__ import annotations

import math
import os
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import (
    AxiError,
    DeviceLost,
    FpgaError,
    FpgaTimeout,
    InputError,
    NoDeviceError,
    XclbinError,
)
from ..kernels import KernelInputs, KernelSpec
from ..kernels.spec import (
    CAPACITY,
    SEGS,
    STAGE,
    STAGED,
    Arg,
    check_stage,
    stage_cycles,
)

# The build is part of this target's interface (`cosim.build_model`, `cosim.missing`, ...).
from .cosim_build import (  # noqa: F401
    CXX_OPT,
    HARNESS,
    RTL_DIR,
    Model,
    available,
    build_model,
    cache_root,
    missing,
    model_key,
    no_rtl,
    top_params,
    verilator_bin,
    verilator_version,
)
from .device import Buffer, Timing, as_count
from .emu import BANK_BYTES, EmuDevice, view_inputs
from .implementations import RTL_KERNELS as RTL_KERNELS  # re-exported
from .pcie import GEN3_X16, PcieLink

#: Harness port numbers: the engine's AXI masters.
PORT_A, PORT_B, PORT_QUERY, PORT_OUT = 0, 1, 2, 3
#: Buffers are mapped whole, rounded up to this (an XRT bo's granularity).
PAGE = 4096

_REQ, _REP = 0x51524D48, 0x53524D48  # "HMRQ", "HMRS"
_OP_RUN, _OP_RESET, _OP_QUIT = 1, 2, 3
_DONE, _CYCLE_LIMIT, _WALL_LIMIT, _AXI_ERROR, _BAD = range(5)


# -- one simulator process -----------------------------------------------------------------------


@dataclass
class Reply:
    """What the harness answered for one call."""

    status: int
    cycles: int
    total_cycles: int
    written: int
    message: str
    out: bytes = b""
    #: Beats the memory ports took (the pre-phase's staged beats): (port, addr, 64 bytes).
    staged: list[tuple[int, int, bytes]] = field(default_factory=list)
    wall_s: float = 0.0  # request to reply, measured
    edges: int = 0  # clock edges simulated for this request (control writes included)


@dataclass
class Region:
    """A buffer mapped on one of the engine's ports for a call."""

    port: int
    addr: int
    size: int
    data: np.ndarray  # uint8: the initial contents (the rest of `size` is zero)


class Simulator:
    """A running harness process of one model (requests on stdin, replies on stdout)."""

    def __init__(self, model: Model, read_latency: int = 32, write_latency: int = 32) -> None:
        self.model = model
        self._total = 0  # clock edges this process has simulated
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the process)
        try:
            self._proc = subprocess.Popen(
                [str(model.binary), str(int(read_latency)), str(int(write_latency))],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._log,
            )
        except OSError as exc:
            raise NoDeviceError(f"cosim: cannot start {model.binary}: {exc}") from None

    def _lost(self, what: str) -> DeviceLost:
        code = self._proc.poll()
        self._log.seek(0)
        tail = self._log.read()[-2000:].decode(errors="replace").strip()
        detail = f"exit code {code}" if code is not None else "no reply"
        return DeviceLost(
            f"cosim: the simulator of {self.model.kernel} stopped answering during {what} "
            f"({detail}){': ' + tail if tail else ''}"
        )

    def _read(self, n: int) -> bytes:
        assert self._proc.stdout is not None
        data = self._proc.stdout.read(n)
        if data is None or len(data) != n:
            raise self._lost("a reply")
        return data

    def _send(self, parts: Iterable[bytes | memoryview]) -> None:
        assert self._proc.stdin is not None
        try:
            for part in parts:
                self._proc.stdin.write(part)
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._lost("a request") from None

    def _reply(self, out_need: int, run: bool = False) -> Reply:
        magic, status, cycles, total, written, length = struct.unpack("<IIQQQI", self._read(36))
        if magic != _REP:
            raise self._lost("a reply (bad magic)")
        message = self._read(length).decode(errors="replace") if length else ""
        out = self._read(out_need) if status in (_DONE, _AXI_ERROR) and out_need else b""
        staged = []
        if run and status in (_DONE, _AXI_ERROR):  # a finished call: the memory ports' writes
            (count,) = struct.unpack("<I", self._read(4))
            for _ in range(count):
                port, _, addr = struct.unpack("<IIQ", self._read(16))
                staged.append((port, addr, self._read(64)))
        return Reply(status, cycles, total, written, message, out, staged)

    def run(
        self,
        regions: list[Region],
        registers: list[tuple[int, int]],
        out_need: int,
        max_cycles: int,
        wall_limit_s: float,
    ) -> Reply:
        """One kernel call: map `regions`, write `registers`, ap_start, wait for ap_done."""
        parts: list[bytes | memoryview] = [
            struct.pack("<IIQdI", _REQ, _OP_RUN, int(max_cycles), float(wall_limit_s), len(regions))
        ]
        for r in regions:
            parts.append(struct.pack("<IIQQQ", r.port, 0, r.addr, r.size, r.data.nbytes))
            parts.append(memoryview(np.ascontiguousarray(r.data)).cast("B"))
        parts.append(struct.pack("<I", len(registers)))
        parts.append(b"".join(struct.pack("<II", off, val) for off, val in registers))
        parts.append(struct.pack("<Q", out_need))
        start = time.perf_counter()
        self._send(parts)
        reply = self._reply(out_need, run=True)
        reply.wall_s = time.perf_counter() - start
        reply.edges, self._total = reply.total_cycles - self._total, reply.total_cycles
        return reply

    def reset(self) -> None:
        """Reset the model (as after a hang); the buffers of the next call are mapped anew."""
        self._send([struct.pack("<II", _REQ, _OP_RESET)])
        self._total = self._reply(0).total_cycles

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._send([struct.pack("<II", _REQ, _OP_QUIT)])
                self._proc.stdin.close()  # type: ignore[union-attr]
                self._proc.wait(timeout=10)
            except (DeviceLost, subprocess.TimeoutExpired, OSError):
                self._proc.kill()
                self._proc.wait()
        self._log.close()


# -- the device -----------------------------------------------------------------------------------


@dataclass
class CosimStats:
    """Totals of one device's kernel calls: for the simulator-speed benchmark."""

    calls: int = 0
    cycles: int = 0  # simulated cycles, ap_start to ap_done
    edges: int = 0  # clock edges simulated (register writes and polls included)
    wall_s: float = 0.0  # wall time of those calls (request to reply), measured
    per_kernel: dict[str, list[int | float]] = field(default_factory=dict)

    @property
    def cycles_per_s(self) -> float:
        """Simulator speed: clock edges per second of wall time."""
        return self.edges / self.wall_s if self.wall_s > 0 else 0.0


def _view_segs(
    spec: KernelSpec, raw: Mapping[str, np.ndarray], scalars: Mapping[str, int]
) -> np.ndarray | None:
    """The call's segs [queries, 2] from its raw buffer (None: a kernel without segments)."""
    if not spec.segmented or SEGS not in raw:
        return None
    data = np.ascontiguousarray(raw[SEGS]).reshape(-1).view(np.uint8)
    shape = spec.buffer_shape(SEGS, scalars, data.nbytes)
    need = int(np.prod(shape)) * 4
    if data.nbytes < need:
        raise InputError(SEGS, f"the call needs {need} bytes, the buffer holds {data.nbytes}")
    return data[:need].view("<u4").reshape(shape)


class CosimDevice(EmuDevice):
    """The RTL of fpga/rtl on a simulated U55C: buffers and transfers as `emu` (32 banks,
    PCIe model), kernels executed by Verilator with `simulated` times.

    params: engine parameter overrides (LANES, SLOTS, NMAX, DMAX, SCAN) of every kernel's top;
        each distinct set is its own cached build.
    prebuild: kernels to build (or find in the cache) now instead of at their first run.
    read_latency / write_latency: cycles the modeled HBM takes to answer.
    hang_factor: a run without ap_done after this many times the spec's cycle model (plus
        a margin) is a hang: FpgaTimeout.
    wall_limit_s: wall-clock bound of one simulated call (FpgaTimeout past it).
    """

    target = "cosim"
    transfer_source = "modeled"
    timing_source = "simulated"
    #: The RTL's pre-phase copies staged beats into the memory ports (the harness's memory
    #: ports take writes; the beats they took are written into the buffers).
    stages_appends = True

    def __init__(
        self,
        clock_hz: float | None = None,
        *,
        params: Mapping[str, int] | None = None,
        prebuild: Iterable[str] = (),
        cache_dir: str | os.PathLike | None = None,
        rtl_dir: str | os.PathLike | None = None,
        read_latency: int = 32,
        write_latency: int = 32,
        hang_factor: float = 8.0,
        wall_limit_s: float = 600.0,
        jobs: int = 1,
        link: PcieLink = GEN3_X16,
        bank_bytes: int = BANK_BYTES,
    ) -> None:
        self.rtl_dir = Path(rtl_dir) if rtl_dir is not None else RTL_DIR
        reason = missing(self.rtl_dir)
        if reason:
            raise NoDeviceError(f"cosim: {reason}")
        super().__init__(clock_hz, link, bank_bytes)
        if params is not None and not isinstance(params, Mapping):
            raise InputError("params", f"expected a mapping of parameter to int, got {params!r}")
        self.params = dict(params or {})
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.read_latency = as_count("read_latency", read_latency)
        self.write_latency = as_count("write_latency", write_latency)
        if not (isinstance(hang_factor, int | float) and hang_factor >= 1):
            raise InputError("hang_factor", f"expected a number >= 1, got {hang_factor!r}")
        if not (isinstance(wall_limit_s, int | float) and wall_limit_s > 0):
            raise InputError("wall_limit_s", f"expected a positive number, got {wall_limit_s!r}")
        self.hang_factor = float(hang_factor)
        self.wall_limit_s = float(wall_limit_s)
        self.jobs = as_count("jobs", jobs, minimum=1)
        self.version = verilator_version()
        self.name = (
            f"cosim (RTL of fpga/rtl in {self.version.split(' (')[0]}, "
            f"simulated at {self.clock_hz / 1e6:g} MHz)"
        )
        self.models: dict[str, Model] = {}
        self.stats = CosimStats()
        self._sims: dict[str, Simulator] = {}
        for kernel in prebuild:
            self.model(kernel)

    # -- models and processes --------------------------------------------------------------
    def model(self, kernel: str) -> Model:
        """The built simulator of `kernel` (from the cache after the first build)."""
        if kernel not in self.models:
            self.models[kernel] = build_model(
                kernel, self.params, rtl_dir=self.rtl_dir, cache_dir=self.cache_dir, jobs=self.jobs
            )
        return self.models[kernel]

    def _simulator(self, kernel: str) -> Simulator:
        sim = self._sims.get(kernel)
        if sim is None:
            sim = Simulator(self.model(kernel), self.read_latency, self.write_latency)
            self._sims[kernel] = sim
        return sim

    # -- the hooks ------------------------------------------------------------------------------
    def _alloc(self, spec: KernelSpec, arg: Arg, nbytes: int) -> Buffer:
        if spec.name not in RTL_KERNELS:
            raise XclbinError(no_rtl(spec.name))
        return super()._alloc(spec, arg, nbytes)

    def _run(
        self,
        spec: KernelSpec,
        buffers: dict[str, Buffer],
        scalars: dict[str, int],
        timeout_s: float,
    ) -> Timing:
        raw = {name: buf.handle for name, buf in buffers.items()}
        limit = math.ceil(timeout_s * self.clock_hz)
        out, cycles = self._simulate(spec, raw, scalars, limit, timeout_s)
        buffers["out"].handle[: out.nbytes] = out
        return Timing(cycles / self.clock_hz, self.timing_source, 0, cycles)

    def _execute(
        self, spec: KernelSpec, raw: Mapping[str, np.ndarray], scalars: Mapping[str, int]
    ) -> tuple[np.ndarray, int]:
        """The RTL over raw buffer bytes: (out uint32 [queries, k or words], cycles)."""
        self._check_open()
        if "out" not in raw:
            raise InputError("out", "the raw buffers must include the output buffer")
        out, cycles = self._simulate(spec, raw, scalars, None, None)
        shape = spec.buffer_shape("out", scalars, 0)
        return out.view(np.uint32).reshape(shape).copy(), cycles

    def execute(
        self, spec: KernelSpec, raw: Mapping[str, np.ndarray], scalars: Mapping[str, int]
    ) -> tuple[np.ndarray, int]:
        """An executor for xrt_emu (`xrt_emu.device(executor=...)`): the RTL runs the call."""
        return self._execute(spec, raw, scalars)

    def _close(self) -> None:
        for sim in self._sims.values():
            sim.close()
        self._sims.clear()
        super()._close()

    # -- one call ---------------------------------------------------------------------------------
    def _check_build(self, spec: KernelSpec, scalars: Mapping[str, int], model: Model) -> None:
        """Scalars the RTL build cannot take would end the call with nothing written."""
        limits = {"n": model.params.get("NMAX"), "dim": model.params.get("DMAX")}
        for name, limit in limits.items():
            if limit is not None and name in scalars and int(scalars[name]) > limit:
                key = "NMAX" if name == "n" else "DMAX"
                raise InputError(
                    name,
                    f"{scalars[name]} exceeds this RTL build's {key}={limit} "
                    f"(open cosim with params={{'{key}': ...}})",
                )
        for name in ("dim", "queries", "heads"):
            if name in scalars and int(scalars[name]) == 0:
                raise InputError(name, f"is 0: the {spec.name} engine needs at least one")

    @staticmethod
    def _rows_scanned(
        spec: KernelSpec, raw: Mapping[str, np.ndarray], scalars: Mapping[str, int]
    ) -> int:
        """Memory rows the call reaches: n, or with segments the end of the last one. The
        segments are checked first (`KernelSpec.segments`: InputError naming segs or k),
        since the RTL refuses an invalid one by writing nothing."""
        segs = _view_segs(spec, raw, scalars)
        if segs is None:
            return int(scalars["n"])
        arrays = {name: view_inputs(spec, raw, scalars).arrays[name] for name in spec.memory_args}
        base, rows = spec.segments(KernelInputs({**arrays, SEGS: segs}, dict(scalars)))
        return int((base + rows).max()) if len(rows) else int(scalars["n"])

    def _regions(
        self, spec: KernelSpec, raw: Mapping[str, np.ndarray], scalars: Mapping[str, int]
    ) -> tuple[list[Region], dict[str, int], int]:
        """Each buffer at the base of its HBM pseudo-channel, on the port the engine reads it
        from; only the bytes the call uses are sent. Returns (regions, addresses, out bytes)."""
        regions: list[Region] = []
        addrs: dict[str, int] = {}
        rows = self._rows_scanned(spec, raw, scalars)
        memory = list(spec.memory_args)
        out_need = 0
        for arg in spec.args:
            if not arg.is_buffer:
                continue
            if arg.name not in raw:
                raise InputError(arg.name, f"missing buffer of {spec.name}")
            data = np.ascontiguousarray(raw[arg.name]).reshape(-1).view(np.uint8)
            if arg.direction == "in" and CAPACITY in spec.dims.get(arg.name, ()):
                need = spec.buffer_nbytes(arg.name, scalars, capacity=rows)
            else:
                need = spec.buffer_nbytes(arg.name, scalars)
            if need > data.nbytes:
                raise InputError(
                    arg.name, f"the call needs {need} bytes, the buffer holds {data.nbytes}"
                )
            if arg.direction == "out":
                port, out_need = PORT_OUT, need
            elif arg.name in memory:
                port = (PORT_A, PORT_B)[memory.index(arg.name)]
            else:
                port = PORT_QUERY
            addr = int(arg.bank) * BANK_BYTES  # type: ignore[arg-type]
            if arg.name == STAGE:  # it shares the segments' bank: the bank's upper half
                addr += BANK_BYTES // 2
            size = max(PAGE, -(-data.nbytes // PAGE) * PAGE)
            regions.append(Region(port, addr, size, data[:need]))
            addrs[arg.name] = addr
        return regions, addrs, out_need

    def _simulate(
        self,
        spec: KernelSpec,
        raw: Mapping[str, np.ndarray],
        scalars: Mapping[str, int],
        limit: int | None,
        timeout_s: float | None,
    ) -> tuple[np.ndarray, int]:
        """Run one call on the RTL: (out bytes the call writes, as uint8; cycles)."""
        if spec.name not in RTL_KERNELS:
            raise XclbinError(no_rtl(spec.name))
        scalars = {**spec.scalar_defaults, **scalars}
        raw = dict(raw)
        staged = int(scalars.get(STAGED, 0))
        if spec.staging and STAGE not in raw and not staged:
            raw[STAGE] = np.zeros(64, dtype=np.uint8)  # nothing staged: never read
        model = self.model(spec.name)
        self._check_build(spec, scalars, model)
        if staged:  # beats outside their buffer: refused on the host (the RTL cannot tell)
            stage = view_inputs(spec, raw, scalars).arrays[STAGE]
            check_stage(stage, staged, [raw[a].nbytes for a in spec.memory_args])
        regions, addrs, out_need = self._regions(spec, raw, scalars)
        regs: list[tuple[int, int]] = []
        for arg in spec.args:
            offset = spec.registers()[arg.name]
            if arg.is_buffer:
                regs += [
                    (offset, addrs[arg.name] & 0xFFFFFFFF),
                    (offset + 4, addrs[arg.name] >> 32),
                ]
            else:
                regs.append((offset, int(scalars[arg.name])))
        segs = _view_segs(spec, raw, scalars)
        shape_inputs = KernelInputs({} if segs is None else {SEGS: segs}, dict(scalars))
        modeled = spec.cycles(**spec.shape(shape_inputs)) + stage_cycles(spec.engine, staged)
        hang = int(self.hang_factor * modeled) + 100_000
        max_cycles = hang if limit is None else min(limit, hang)
        sim = self._simulator(spec.name)
        try:
            reply = sim.run(regions, regs, out_need, max_cycles, self.wall_limit_s)
        except DeviceLost:
            sim.close()
            self._sims.pop(spec.name, None)  # the next call starts a fresh process
            raise
        self._count(spec.name, reply)
        if reply.status == _CYCLE_LIMIT:
            if limit is not None and limit <= hang:
                raise FpgaTimeout(
                    f"{spec.name}: no ap_done within {timeout_s} s ({limit} cycles at "
                    f"{self.clock_hz / 1e6:g} MHz, simulated)"
                )
            raise FpgaTimeout(
                f"{spec.name}: no ap_done after {reply.cycles} simulated cycles, "
                f"{self.hang_factor:g}x the cycle model's {modeled}: the RTL hangs (model reset)"
            )
        if reply.status == _WALL_LIMIT:
            raise FpgaTimeout(
                f"{spec.name}: no ap_done after {reply.cycles} cycles in {self.wall_limit_s} s "
                "of simulation (wall_limit_s; model reset)"
            )
        if reply.status == _AXI_ERROR:
            raise AxiError(f"{spec.name}: {reply.message}")
        if reply.status != _DONE:
            raise FpgaError(f"{spec.name}: the cosim harness refused the call: {reply.message}")
        if reply.written != out_need:
            raise FpgaError(
                f"{spec.name}: the RTL wrote {reply.written} of the {out_need} output bytes "
                "(the engine refused the call or stopped early)"
            )
        self._keep_staged(spec, raw, addrs, reply)
        return np.frombuffer(reply.out, dtype=np.uint8).copy(), int(reply.cycles)

    @staticmethod
    def _keep_staged(
        spec: KernelSpec, raw: Mapping[str, np.ndarray], addrs: Mapping[str, int], reply: Reply
    ) -> None:
        """The beats the RTL wrote into its memory ports (the pre-phase), into the memory
        buffers: the card's memory keeps them (bytes past a buffer's end are dropped)."""
        for port, addr, data in reply.staged:
            name = spec.memory_args[port]
            buf = np.asarray(raw[name]).reshape(-1).view(np.uint8)
            at = addr - addrs[name]
            if 0 <= at < buf.nbytes:
                end = min(buf.nbytes, at + len(data))
                buf[at:end] = np.frombuffer(data, dtype=np.uint8)[: end - at]

    def _count(self, kernel: str, reply: Reply) -> None:
        s = self.stats
        s.calls += 1
        s.cycles += reply.cycles
        s.edges += reply.edges
        s.wall_s += reply.wall_s
        row = s.per_kernel.setdefault(kernel, [0, 0, 0, 0.0])  # calls, cycles, edges, wall
        row[0] += 1
        row[1] += reply.cycles
        row[2] += reply.edges
        row[3] += reply.wall_s
