"""cocotb bench of the engine's top level (hm_engine, or a kernel wrapper): AxiRam models as
HBM (one per AXI master), AxiLiteMaster on the control port, random idle cycles and
backpressure on every channel. Each call's output must equal the golden model of its kernel
spec (hetmem.kernels), bit for bit; calls run back to back without reset.

Suites (HM_SUITE): "random" (random shapes of every kernel), "edges" (the contract's corner
cases), "largest" (n = NMAX), "segments" (multi-segment calls: several slots at different
bases of one memory, different rows per query, k close to rows, bitmaps of different rows),
"staged" (calls with staged memory beats: the pre-phase writes them into memory ports A and
B, the scan sees them, the memory keeps them),
"cycles" (no backpressure; cycles from ap_start to ap_done of the shapes in HM_SHAPES,
written to HM_OUT as JSON). HM_PARAMS holds the engine parameters it was built with.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import RisingEdge, SimTimeoutError, with_timeout
from cocotbext.axi import (
    AxiBus,
    AxiLiteBus,
    AxiLiteMaster,
    AxiRam,
    AxiRamRead,
    AxiRamWrite,
    AxiReadBus,
    AxiWriteBus,
)

from hetmem import kernels
from hetmem.kernels import KernelInputs
from hetmem.kernels import spec as kspec
from hetmem.kernels.engine import KERNEL_IDS, PARAMS

MEM_SIZE = 2**24
QUERY_SIZE = 2**20
OUT_SIZE = 2**20
SENTINEL = 0xA5


@dataclass
class Case:
    """One call: the kernel, its integer inputs, and a label for messages."""

    kernel: str
    inputs: KernelInputs
    label: str
    extra: dict = field(default_factory=dict)


def _keys(rng: np.random.Generator, n: int, dim: int, kind: str) -> np.ndarray:
    if kind == "ties":
        return rng.integers(-1, 2, (n, dim)).astype(np.int8)
    if kind == "equal":
        return np.repeat(rng.integers(-128, 128, (1, dim)), n, axis=0).astype(np.int8)
    if kind == "negative":
        return -rng.integers(1, 128, (n, dim)).astype(np.int8)
    return rng.integers(-128, 128, (n, dim)).astype(np.int8)


def make_case(
    kernel: str,
    rng: np.random.Generator,
    *,
    n: int,
    dim: int,
    queries: int = 1,
    heads: int = 1,
    k: int | None = None,
    mode: int = 0,
    kind: str = "random",
    label: str = "",
) -> Case:
    """Random integer inputs of `kernel` in its spec's formats (kind: random, ties, equal,
    negative); k defaults to a random 1..n."""
    spec = kernels.get(kernel)
    k = int(rng.integers(1, n + 1)) if k is None else k
    scalars: dict[str, int] = {"n": n, "k": k, "queries": queries, "dim": dim}
    arrays: dict[str, np.ndarray] = {}
    equal_shifts = kind in ("equal",)
    shifts = (
        np.full(n, int(rng.integers(0, 8)), dtype=np.uint8)
        if equal_shifts
        else rng.integers(0, kspec.MAX_SHIFT + 1, n).astype(np.uint8)
    )
    if kernel == "token_indexer":
        scalars["heads"] = heads
        arrays["keys"] = _keys(rng, n, dim, kind)
        arrays["shifts"] = shifts
        q = rng.integers(-128, 128, (queries, heads, dim)).astype(np.int8)
        if kind == "negative":  # every head's dot negative: every score ReLU'd to zero
            q = np.abs(q.astype(np.int16)).clip(1, 127).astype(np.int8)
        arrays["q"] = q
        arrays["w"] = rng.integers(-32767, 32768, (queries, heads)).astype(np.int16)
    elif kernel == "page_indexer":
        scalars["heads"] = heads
        a = rng.integers(-32767, 32768, (n, dim))
        b = rng.integers(-32767, 32768, (n, dim))
        if kind == "ties":
            a, b = rng.integers(-2, 1, (n, dim)), rng.integers(0, 3, (n, dim))
        elif kind == "equal":
            a, b = np.repeat(a[:1], n, axis=0), np.repeat(b[:1], n, axis=0)
        elif kind == "negative":
            a, b = -np.abs(a) - 1, -np.abs(b) - 1
        arrays["mins"] = np.minimum(a, b).astype(np.int16)
        arrays["maxs"] = np.maximum(a, b).astype(np.int16)
        q = rng.integers(-128, 128, (queries, heads, dim)).astype(np.int8)
        if kind == "negative":
            q = np.abs(q.astype(np.int16)).clip(1, 127).astype(np.int8)
        arrays["q"] = q
    else:
        arrays["keys"] = _keys(rng, n, dim, kind)
        arrays["shifts"] = shifts
        q = rng.integers(-128, 128, (queries, dim)).astype(np.int8)
        if kind == "negative":
            q = np.abs(q.astype(np.int16)).clip(1, 127).astype(np.int8)
        arrays["q"] = q
        if kernel == "block_gate":
            scalars["mode"] = mode
            arrays["delta"] = np.zeros(queries, dtype=np.uint32)
            if mode == kspec.MODE_THRESHOLD:
                scalars["k"] = 0
                scores = spec.scores(KernelInputs(arrays, scalars))
                spread = (scores.max(axis=1) - scores.min(axis=1)).astype(np.float64)
                frac = rng.choice([0.0, 0.01, 0.3, 1.0, 2.0], queries)
                arrays["delta"] = np.clip(spread * frac, 0, 2**32 - 1).astype(np.uint32)
    name = label or f"{kernel} {kind} n={n} dim={dim} q={queries} h={heads} k={scalars['k']}"
    return Case(kernel, spec.complete(KernelInputs(arrays, scalars)), name)


def segmented_case(
    kernel: str,
    rng: np.random.Generator,
    *,
    slot_rows: list[int],
    queries: int,
    dim: int,
    heads: int = 1,
    mode: int = 0,
    kind: str = "random",
    consecutive: bool = True,
    tight_k: bool = True,
    label: str = "",
) -> Case:
    """A multi-segment call: slots of `slot_rows` rows at increasing bases of one memory (with
    gaps), each query scanning a prefix of its slot (most the whole slot, so consecutive
    queries share segments), n the largest rows, k the smallest rows (or just below)."""
    bases, end = [], 0
    for r in slot_rows:
        end += int(rng.integers(0, 40))  # a gap: bases at any row
        bases.append(end)
        end += r
    slot = rng.integers(0, len(slot_rows), queries)
    if consecutive:
        slot = np.sort(slot)
    full = np.array([slot_rows[s] for s in slot])
    rows = np.where(rng.random(queries) < 0.6, full, rng.integers(1, full + 1))
    n = int(rows.max())
    k = max(1, int(rows.min()) - (0 if tight_k else int(rng.integers(0, 3))))
    base = make_case(
        kernel, rng, n=end, dim=dim, queries=queries, heads=heads, k=1, mode=mode, kind=kind
    )
    arrays = dict(base.inputs.arrays)
    arrays["segs"] = np.stack([np.array(bases)[slot], rows], axis=1).astype(np.uint32)
    scalars = {**base.inputs.scalars, "n": n}
    if mode != kspec.MODE_THRESHOLD:
        scalars["k"] = k
    name = label or (
        f"{kernel} segments {list(zip(arrays['segs'][:, 0].tolist(), rows.tolist(), strict=True))} "
        f"dim={dim} h={heads} k={scalars['k']} mode={mode}"
    )
    return Case(kernel, KernelInputs(arrays, scalars), name)


def segment_cases(rng: np.random.Generator, params: dict, kernel_names) -> list[Case]:
    """Multi-segment calls of every kernel (sizes scaled by HM_SEGMENT_ROWS)."""
    lanes, slots = params.get("LANES", PARAMS["LANES"]), params.get("SLOTS", PARAMS["SLOTS"])
    nmax, dmax = params.get("NMAX", PARAMS["NMAX"]), params.get("DMAX", PARAMS["DMAX"])
    top = min(int(os.environ.get("HM_SEGMENT_ROWS", "300")), nmax)
    cases = []
    for kernel in kernel_names:
        hv = 3 if kernel in ("token_indexer", "page_indexer") else 1
        sizes = [int(r) for r in rng.integers(top // 4, top + 1, 4)]
        cases += [
            segmented_case(kernel, rng, slot_rows=sizes, queries=slots + 3, dim=33, heads=hv),
            segmented_case(
                kernel, rng, slot_rows=sizes[:3], queries=5, dim=64, heads=hv, consecutive=False
            ),
            segmented_case(
                kernel, rng, slot_rows=[top, 1, top // 2], queries=4, dim=min(100, dmax), heads=hv
            ),
        ]
        if kernel in ("token_indexer", "page_indexer"):
            cases.append(
                segmented_case(kernel, rng, slot_rows=sizes[:2], queries=3, dim=40, heads=lanes + 3)
            )
        if kernel == "block_gate":
            for consecutive in (True, False):
                cases.append(
                    segmented_case(
                        kernel,
                        rng,
                        slot_rows=sizes,
                        queries=slots + 1,
                        dim=48,
                        mode=kspec.MODE_THRESHOLD,
                        consecutive=consecutive,
                    )
                )
    return cases


def staged_memory(case: Case) -> dict[str, np.ndarray]:
    """The memory arrays of a call after its pre-phase (the golden `apply_stage`)."""
    spec = kernels.get(case.kernel)
    memory = [np.array(case.inputs.arrays[a]) for a in spec.memory_args]
    s = case.inputs.scalars
    kspec.apply_stage(memory, case.inputs.arrays["stage"], int(s.get("staged", 0)))
    return dict(zip(spec.memory_args, memory, strict=True))


def with_stage(case: Case, rng: np.random.Generator, rows: int, label: str = "") -> Case:
    """`case` with `rows` of its memory rows rewritten (random values in the kernel's
    formats; the last row always among them) through staged beats: the case's memory is what
    the card held before, the stage brings it to the new rows, the golden model applies it."""
    spec = kernels.get(case.kernel)
    arrays = dict(case.inputs.arrays)
    n_rows = arrays[spec.memory_args[0]].shape[0]
    changed = np.unique(np.append(rng.choice(n_rows, min(rows, n_rows), replace=False), n_rows - 1))
    new = {}
    for a in spec.memory_args:
        data = np.array(arrays[a])
        if a == "shifts":
            data[changed] = rng.integers(0, kspec.MAX_SHIFT + 1, changed.size)
        else:
            info = np.iinfo(data.dtype)
            shape = (changed.size, *data.shape[1:])
            data[changed] = rng.integers(-info.max, info.max + 1, shape)
        if a == "maxs":  # a page's maxima are not below its minima
            data[changed] = np.maximum(data[changed], new["mins"][changed])
        new[a] = data
    beats = []
    for a in spec.memory_args:
        row = new[a][0].nbytes
        beats.append(kspec.beats_of(changed * row, np.full(changed.size, row)))
    stage = kspec.compose_stage([new[a] for a in spec.memory_args], beats)
    arrays["stage"] = stage
    scalars = {**case.inputs.scalars, "staged": int(stage.shape[0])}
    name = f"{label or case.label} staged {stage.shape[0]} beats ({changed.size} rows)"
    return Case(case.kernel, KernelInputs(arrays, scalars), name)


def staged_cases(rng: np.random.Generator, params: dict, kernel_names) -> list[Case]:
    """Calls with staged beats: one memory and several slots (the decode path), rows of 1 to
    1024 bytes, a few rows or many, a partial last beat of a buffer."""
    top = min(int(os.environ.get("HM_SEGMENT_ROWS", "300")), params.get("NMAX", PARAMS["NMAX"]))
    cases = []
    for kernel in kernel_names:
        hv = 3 if kernel in ("token_indexer", "page_indexer") else 1
        for dim, rows in ((33, 3), (64, 40), (7, 1)):
            base = make_case(kernel, rng, n=top, dim=dim, queries=2, heads=hv)
            cases.append(with_stage(base, rng, rows))
        sizes = [int(r) for r in rng.integers(top // 4, top + 1, 3)]
        seg = segmented_case(kernel, rng, slot_rows=sizes, queries=5, dim=48, heads=hv)
        cases.append(with_stage(seg, rng, 6))
    return cases


def expected(case: Case) -> np.ndarray:
    out = kernels.get(case.kernel).golden(case.inputs)
    return (out.bitmap if out.bitmap is not None else out.indices).reshape(-1).astype(np.uint32)


class Engine:
    """The DUT with its AXI models."""

    def __init__(self, dut, seed: int, backpressure: bool) -> None:
        self.dut = dut
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)
        self.backpressure = backpressure
        self.params = json.loads(os.environ.get("HM_PARAMS", "{}"))
        self.wrapper = os.environ.get("HM_WRAPPER", "")
        clk, rst = dut.ap_clk, dut.ap_rst_n
        self.mem = {  # the memory ports read, and write staged beats
            "a": AxiRam(AxiBus.from_prefix(dut, "m_axi_mem_a"), clk, rst, False, size=MEM_SIZE),
            "b": AxiRam(AxiBus.from_prefix(dut, "m_axi_mem_b"), clk, rst, False, size=MEM_SIZE),
            "q": AxiRamRead(
                AxiReadBus.from_prefix(dut, "m_axi_query"), clk, rst, False, size=QUERY_SIZE
            ),
        }
        self.out = AxiRamWrite(
            AxiWriteBus.from_prefix(dut, "m_axi_out"), clk, rst, False, size=OUT_SIZE
        )
        self.ctrl = AxiLiteMaster(AxiLiteBus.from_prefix(dut, "s_axi_control"), clk, rst, False)
        for name in ("m_axi_mem_a", "m_axi_mem_b", "m_axi_query", "m_axi_out", "s_axi_control"):
            logging.getLogger(f"cocotb.{dut._name}.{name}").setLevel(logging.WARNING)
        if backpressure:
            for ram in self.mem.values():
                read = getattr(ram, "read_if", ram)
                read.ar_channel.set_pause_generator(self._pauses(0.2))
                read.r_channel.set_pause_generator(self._pauses(0.3))
                write = getattr(ram, "write_if", None)
                if write is not None:
                    write.aw_channel.set_pause_generator(self._pauses(0.2))
                    write.w_channel.set_pause_generator(self._pauses(0.3))
                    write.b_channel.set_pause_generator(self._pauses(0.3))
            self.out.aw_channel.set_pause_generator(self._pauses(0.2))
            self.out.w_channel.set_pause_generator(self._pauses(0.3))
            self.out.b_channel.set_pause_generator(self._pauses(0.3))

    def _pauses(self, p: float):
        rng = random.Random(self.rng.random())
        while True:
            yield rng.random() < p

    async def reset(self) -> None:
        dut = self.dut
        cocotb.start_soon(Clock(dut.ap_clk, 10, unit="ns").start())
        dut.ap_rst_n.value = 0
        if hasattr(dut, "kernel") and not self.wrapper:
            dut.kernel.value = 0
        for _ in range(4):
            await RisingEdge(dut.ap_clk)
        dut.ap_rst_n.value = 1
        for _ in range(2):
            await RisingEdge(dut.ap_clk)
        await self.ctrl.write_dword(kspec.GIE, 1)
        await self.ctrl.write_dword(kspec.IER, 1)

    def _place(self, ram, data: bytes, align: int, region: list[int]) -> int:
        """Put `data` at a random address of `ram` after region[0]; returns the address."""
        start = region[0] + self.rng.randrange(0, 8) * 4096 + self.rng.randrange(0, 64) * 64
        if align == 1:
            start += self.rng.randrange(0, 64)
        region[0] = start + len(data) + 64
        assert region[0] < ram.size, "test memory too small"
        ram.write(start, data)
        return start

    async def call(self, case: Case) -> tuple[np.ndarray, int]:
        """Run one call; returns (the uint32 words written, cycles from start to done)."""
        dut = self.dut
        spec = kernels.get(case.kernel)
        if hasattr(dut, "kernel") and not self.wrapper:
            dut.kernel.value = KERNEL_IDS[case.kernel]
        arrays, scalars = case.inputs.arrays, case.inputs.scalars
        regions = {"a": [0], "b": [0], "q": [0]}
        addrs: dict[str, int] = {}
        for arg in spec.args:
            if arg.direction != "in":
                continue
            port = {"keys": "a", "mins": "a", "shifts": "b", "maxs": "b"}.get(arg.name, "q")
            data = np.ascontiguousarray(arrays[arg.name]).tobytes()
            align = 64 if port in ("a", "b") else 1
            addrs[arg.name] = self._place(self.mem[port], data, align, regions[port])
        out = spec_out_words(case)
        out_addr = self.rng.randrange(0, 16) * 4096 + self.rng.randrange(0, 64) * 64
        self.out.write(out_addr, bytes([SENTINEL]) * (4 * out + 256))
        addrs["out"] = out_addr
        regs = spec.registers()
        for arg in spec.args:
            off = regs[arg.name]
            if arg.is_buffer:
                await self.ctrl.write_dword(off, addrs[arg.name] & 0xFFFFFFFF)
                await self.ctrl.write_dword(off + 4, addrs[arg.name] >> 32)
            else:
                await self.ctrl.write_dword(off, int(scalars[arg.name]))
        if os.environ.get("HM_TRACE"):
            cocotb.start_soon(self._trace(os.environ["HM_TRACE"].split(",")))
        await self.ctrl.write_dword(kspec.CTRL, kspec.AP_START)
        budget = 20 * spec.cycles(**spec.shape(case.inputs)) + 20000
        try:
            await with_timeout(RisingEdge(dut.interrupt), 10 * budget, "ns")
        except SimTimeoutError as exc:
            h = self.engine_handle()
            state = {n: int(getattr(h, n).value) for n in ("state", "rows_done", "q0", "sel_slot")}
            topk = int(h.u_topk.state.value)
            if os.environ.get("HM_DEBUG"):
                for path in os.environ["HM_DEBUG"].split(","):
                    obj = h
                    for part in path.split("."):
                        obj = getattr(obj, part)
                    dut._log.error("%s = %s", path, obj.value)
            raise AssertionError(
                f"{case.label}: no ap_done in {budget} cycles, {state}, topk {topk}"
            ) from exc
        ctrl = await self.ctrl.read_dword(kspec.CTRL)
        assert ctrl & kspec.AP_DONE and ctrl & kspec.AP_IDLE, (
            f"control reads {ctrl:#x} at interrupt"
        )
        again = await self.ctrl.read_dword(kspec.CTRL)
        assert not again & kspec.AP_DONE, "ap_done is cleared by the read"
        await self.ctrl.write_dword(kspec.ISR, 1)  # toggle the done status off
        assert not int(dut.interrupt.value)
        cycles = int(self.engine_handle().run_cycles.value)
        raw = self.out.read(out_addr, 4 * out + 256)
        tail = raw[4 * out :]
        assert tail == bytes([SENTINEL]) * 256, f"{case.label}: wrote past the output"
        if int(scalars.get("staged", 0)):  # the memory keeps the staged beats
            for arg, want in staged_memory(case).items():
                port = {"keys": "a", "mins": "a"}.get(arg, "b")
                got = self.mem[port].read(addrs[arg], want.nbytes)
                assert got == want.tobytes(), f"{case.label}: {arg} in memory is not the staged one"
        return np.frombuffer(raw[: 4 * out], dtype="<u4").astype(np.uint32), cycles

    async def _trace(self, paths: list[str]) -> None:
        """Log `paths` (engine signals) whenever one changes, for 2000 cycles (debugging)."""
        h = self.engine_handle()
        last = None
        for _ in range(2000):
            await RisingEdge(self.dut.ap_clk)
            now = []
            for path in paths:
                obj = h
                for part in path.split("."):
                    obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
                now.append(str(obj.value))
            if now != last:
                self.dut._log.warning("trace %s", dict(zip(paths, now, strict=True)))
                last = now

    def engine_handle(self):
        return self.dut.u_engine if self.wrapper else self.dut


def spec_out_words(case: Case) -> int:
    s = case.inputs.scalars
    if int(s.get("mode", 0)) == kspec.MODE_THRESHOLD:
        return int(s["queries"]) * -(-int(s["n"]) // 32)
    return int(s["queries"]) * int(s["k"])


async def check(engine: Engine, cases: list[Case]) -> None:
    failures = []
    for case in cases:
        got, cycles = await engine.call(case)
        want = expected(case)
        if got.shape != want.shape or not np.array_equal(got, want):
            bad = np.flatnonzero(got != want)[:8] if got.shape == want.shape else "shape"
            failures.append(f"{case.label}: mismatch at {bad}")
            engine.dut._log.error(failures[-1])
        else:
            engine.dut._log.info("ok %s (%d cycles)", case.label, cycles)
    assert not failures, failures


def random_cases(rng: np.random.Generator, count: int, params: dict, kernel_names) -> list[Case]:
    lanes, slots = params.get("LANES", PARAMS["LANES"]), params.get("SLOTS", PARAMS["SLOTS"])
    nmax, dmax = params.get("NMAX", PARAMS["NMAX"]), params.get("DMAX", PARAMS["DMAX"])
    n_hi = min(nmax, int(os.environ.get("HM_RANDOM_N", "600")))
    dims = [
        min(int(d), dmax)
        for d in os.environ.get("HM_RANDOM_DIMS", f"1,7,16,33,64,100,128,130,{dmax}").split(",")
    ]
    cases = []
    for i in range(count):
        kernel = kernel_names[i % len(kernel_names)]
        n = int(rng.integers(1, n_hi + 1))
        dim = int(rng.choice(dims))
        heads = (
            int(rng.integers(1, lanes + 3)) if kernel in ("token_indexer", "page_indexer") else 1
        )
        queries = int(rng.integers(1, slots + 3))
        mode = int(rng.integers(0, 2)) if kernel == "block_gate" else 0
        kind = str(rng.choice(["random", "random", "ties"]))
        cases.append(
            make_case(kernel, rng, n=n, dim=dim, queries=queries, heads=heads, mode=mode, kind=kind)
        )
    return cases


def edge_cases(rng: np.random.Generator, params: dict, kernel_names) -> list[Case]:
    lanes, slots = params.get("LANES", PARAMS["LANES"]), params.get("SLOTS", PARAMS["SLOTS"])
    nmax, dmax = params.get("NMAX", PARAMS["NMAX"]), params.get("DMAX", PARAMS["DMAX"])
    n = min(nmax, 300)
    cases = []
    for kernel in kernel_names:
        hv = 3 if kernel in ("token_indexer", "page_indexer") else 1
        cases += [
            make_case(kernel, rng, n=n, dim=64, heads=hv, k=1, label=f"{kernel} k = 1"),
            make_case(kernel, rng, n=n, dim=64, heads=hv, k=n, label=f"{kernel} k = n"),
            make_case(
                kernel,
                rng,
                n=n,
                dim=32,
                heads=hv,
                queries=2,
                k=n // 3,
                kind="ties",
                label=f"{kernel} ties",
            ),
            make_case(
                kernel,
                rng,
                n=n,
                dim=64,
                heads=hv,
                k=n // 2,
                kind="equal",
                label=f"{kernel} all scores equal",
            ),
            make_case(
                kernel,
                rng,
                n=n,
                dim=48,
                heads=hv,
                k=17,
                kind="negative",
                label=f"{kernel} negative scores",
            ),
            make_case(
                kernel,
                rng,
                n=lanes * 13 + 5,
                dim=64,
                heads=hv,
                k=9,
                label=f"{kernel} n not a multiple of LANES",
            ),
            # (the width is the edge here, not the count: 4 x LANES + 3 rows)
            make_case(
                kernel,
                rng,
                n=lanes * 4 + 3,
                dim=dmax,
                heads=hv,
                k=min(20, lanes * 4 + 3),
                label=f"{kernel} dim = DMAX",
            ),
            make_case(kernel, rng, n=n, dim=3, heads=hv, k=20, label=f"{kernel} dim = 3"),
            make_case(
                kernel,
                rng,
                n=n,
                dim=64,
                heads=hv,
                queries=slots + 3,
                k=11,
                label=f"{kernel} queries > SLOTS",
            ),
        ]
        if kernel in ("token_indexer", "page_indexer"):
            cases.append(
                make_case(
                    kernel,
                    rng,
                    n=n,
                    dim=40,
                    heads=2 * lanes + 3,
                    queries=2,
                    k=31,
                    label=f"{kernel} heads > LANES (passes summed / maxed)",
                )
            )
            cases.append(
                make_case(
                    kernel,
                    rng,
                    n=n,
                    dim=40,
                    heads=lanes,
                    queries=3,
                    k=31,
                    label=f"{kernel} heads = LANES",
                )
            )
        if kernel == "block_gate":
            for kind in ("random", "ties", "equal", "negative"):
                cases.append(
                    make_case(
                        kernel,
                        rng,
                        n=n,
                        dim=64,
                        queries=3,
                        mode=1,
                        kind=kind,
                        label=f"block_gate threshold bitmap, {kind}",
                    )
                )
            cases.append(
                make_case(
                    kernel,
                    rng,
                    n=33,
                    dim=64,
                    queries=2,
                    mode=1,
                    label="block_gate threshold bitmap, n = 33",
                )
            )
    return cases


def largest_cases(rng: np.random.Generator, params: dict, kernel_names) -> list[Case]:
    """One call per kernel at the largest n the build allows (n = NMAX)."""
    lanes, nmax = params.get("LANES", PARAMS["LANES"]), params.get("NMAX", PARAMS["NMAX"])
    cases = []
    for kernel in kernel_names:
        hv = lanes if kernel in ("token_indexer", "page_indexer") else 1
        cases.append(
            make_case(
                kernel,
                rng,
                n=nmax,
                dim=64,
                heads=hv,
                k=min(2048, nmax),
                label=f"{kernel} largest n = NMAX = {nmax}",
            )
        )
    return cases


@cocotb.test()
async def engine_matches_golden(dut):
    seed = int(os.environ.get("HM_SEED", "1"))
    suite = os.environ.get("HM_SUITE", "random")
    names = os.environ.get("HM_KERNELS", ",".join(KERNEL_IDS)).split(",")
    engine = Engine(dut, seed, backpressure=os.environ.get("HM_BACKPRESSURE", "1") == "1")
    await engine.reset()
    rng = np.random.default_rng(seed)
    if suite == "random":
        cases = random_cases(rng, int(os.environ.get("HM_COUNT", "12")), engine.params, names)
    elif suite == "smoke":  # a kernel's wrapper: its register map, a few small calls
        cases = [
            make_case(
                names[0],
                rng,
                n=int(rng.integers(20, 100)),
                dim=int(dim),
                queries=2,
                heads=3,
                mode=int(mode),
            )
            for dim, mode in ((16, 0), (70, 1), (64, 0))
        ]
    elif suite == "largest":
        cases = largest_cases(rng, engine.params, names)
    elif suite == "segments":
        cases = segment_cases(rng, engine.params, names)
    elif suite == "staged":
        cases = staged_cases(rng, engine.params, names)
    else:
        cases = edge_cases(rng, engine.params, names)
    if os.environ.get("HM_ONLY"):  # to reproduce one case: the cases whose label has it
        cases = [c for c in cases if os.environ["HM_ONLY"] in c.label]
    await check(engine, cases)


@cocotb.test()
async def invalid_scalars_end_the_call(dut):
    """k > n, k = 0, n = 0, n > NMAX: ap_done at once and nothing written; then a valid call
    still works."""
    engine = Engine(dut, 5, backpressure=False)
    await engine.reset()
    rng = np.random.default_rng(5)
    nmax = engine.params.get("NMAX", PARAMS["NMAX"])
    kernel = os.environ.get("HM_KERNELS", "vector_search").split(",")[0]
    base = make_case(kernel, rng, n=50, dim=16, k=5)
    for change in ({"k": 51}, {"k": 0}, {"n": 0}, {"n": nmax + 1, "k": 1}):
        scalars = {**base.inputs.scalars, **change}
        case = Case(kernel, KernelInputs(base.inputs.arrays, scalars), f"{kernel} {change}")
        cycles = await refused_call(engine, case)
        assert cycles < 10, f"{case.label}: took {cycles} cycles"
    # invalid segments (rows 0, rows > n, k > rows): refused after the segment check
    for bad in ((0, 0), (3, 51), (10, 4)):
        segs = np.array([[0, 50], list(bad), [5, 20]], dtype=np.uint32)
        scalars = {**base.inputs.scalars, "queries": 3}
        case = Case(kernel, KernelInputs({"segs": segs}, scalars), f"{kernel} segment {bad}")
        cycles = await refused_call(engine, case)
        assert cycles < 200, f"{case.label}: took {cycles} cycles"
    # staged beats into a memory buffer that does not start on a beat: refused, memory unchanged
    staged = with_stage(base, rng, 2)
    before = engine.mem["a"].read(0, 4096)
    for a_addr in (4, 32):
        case = Case(kernel, staged.inputs, f"{kernel} staged, memory A at {a_addr}")
        cycles = await refused_call(engine, case, a_addr=a_addr)
        assert cycles < 10, f"{case.label}: took {cycles} cycles"
        assert engine.mem["a"].read(0, 4096) == before, f"{case.label}: memory written"
    await check(engine, [make_case(kernel, rng, n=50, dim=16, k=5)])


async def refused_call(engine: Engine, case: Case, a_addr: int = 0) -> int:
    """Run a call the engine refuses (its scalars or segs, or staged beats it cannot take);
    returns its cycles. Every buffer is at address 0 but `out`, `segs` (the case's, or a
    valid one per query), `stage` and memory A (at `a_addr`)."""
    spec = kernels.get(case.kernel)
    regs = spec.registers()
    out_addr, segs_addr, stage_addr = 0x8000, 0x4000, 0x6000
    if "stage" in case.inputs.arrays:
        engine.mem["q"].write(stage_addr, case.inputs.arrays["stage"].astype("<u4").tobytes())
    engine.out.write(out_addr, bytes([SENTINEL]) * 1024)
    s = case.inputs.scalars
    segs = case.inputs.arrays.get("segs")
    if segs is None:
        segs = kspec.whole_segments(int(s["queries"]), int(s["n"]))
    engine.mem["q"].write(segs_addr, np.ascontiguousarray(segs, dtype="<u4").tobytes())
    if hasattr(engine.dut, "kernel") and not engine.wrapper:
        engine.dut.kernel.value = KERNEL_IDS[case.kernel]
    for arg in spec.args:
        if arg.is_buffer:
            addr = {"out": out_addr, "segs": segs_addr, "stage": stage_addr}.get(arg.name, 0)
            if arg.name == spec.memory_args[0]:
                addr = a_addr
            await engine.ctrl.write_dword(regs[arg.name], addr)
            await engine.ctrl.write_dword(regs[arg.name] + 4, 0)
        else:
            await engine.ctrl.write_dword(regs[arg.name], int(case.inputs.scalars[arg.name]))
    await engine.ctrl.write_dword(kspec.CTRL, kspec.AP_START)
    while not (await engine.ctrl.read_dword(kspec.CTRL)) & kspec.AP_DONE:
        pass
    await engine.ctrl.write_dword(kspec.ISR, 1)
    assert engine.out.read(out_addr, 1024) == bytes([SENTINEL]) * 1024, f"{case.label} wrote"
    return int(engine.engine_handle().run_cycles.value)


@cocotb.test()
async def cycle_counts(dut):
    """Cycles from ap_start to ap_done of HM_SHAPES, no backpressure; outputs still checked."""
    shapes = json.loads(os.environ.get("HM_SHAPES", "[]"))
    if not shapes:
        return
    engine = Engine(dut, 11, backpressure=False)
    await engine.reset()
    rng = np.random.default_rng(11)
    records = []
    for shape in shapes:
        segs = shape.get("segments")
        case = make_case(
            shape["kernel"],
            rng,
            n=max(b + r for b, r in segs) if segs else shape["n"],
            dim=shape["dim"],
            queries=shape.get("queries", 1),
            heads=shape.get("heads", 1),
            k=shape.get("k"),
            mode=shape.get("mode", 0),
        )
        if segs:  # one memory of several slots; n is the largest rows
            arrays = {**case.inputs.arrays, "segs": np.array(segs, dtype=np.uint32)}
            scalars = {**case.inputs.scalars, "n": shape["n"]}
            case = Case(case.kernel, KernelInputs(arrays, scalars), f"{case.label} {segs}")
        got, cycles = await engine.call(case)
        assert np.array_equal(got, expected(case)), f"{case.label}: output differs from golden"
        records.append(
            {
                **shape,
                "k": int(case.inputs.scalars["k"]),
                "cycles": cycles,
                **engine_counters(engine),
            }
        )
        dut._log.info("cycles %s: %d", shape, cycles)
    with open(os.environ["HM_OUT"], "w") as fh:
        json.dump(records, fh, indent=1)


def engine_counters(engine: Engine) -> dict[str, int]:
    """Phase counters of the last call (stream, select, other)."""
    h = engine.engine_handle()
    return {
        "stream_cycles": int(h.stream_cycles.value),
        "select_cycles": int(h.select_cycles.value),
        "score_rows": int(h.score_rows.value),
    }
