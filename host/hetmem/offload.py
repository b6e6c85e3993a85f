"""Hybrid placement: a method's Compute Relevancy + Retrieval as one kernel on the FPGA.

    stage = FpgaStage(DSA(), "emu")
    profile = stage.load(memory)                      # once: fit, allocate, write every row
    profile = stage.sync(memory)                      # after Method.append: new rows only
    selection, profile = stage.select(memory, query, budget=2048)

The stage bridges a method (its `kernel_memory` / `kernel_query` floats, per slot
[B, G, ...] for attention, one slot for RAG) and an FPGA device (`hetmem.fpga`). The memory
stays resident on the card across decode steps: `load` fits the kernel's integer formats
once per slot (with the spec's headroom for appends) and writes every row into buffers with
spare row capacity; `sync` quantizes and writes only the rows an append touched (the new
ones plus a partial last page or block whose summary changed). A buffer that runs out of
capacity is reallocated and refilled from the host's copy of what the card holds (the
device interface has no card-to-card copy, so those bytes cross PCIe again, and the
profile says so). bm25's CSR index moves postings on every append, so it is rewritten.

`select` quantizes the query, writes it, runs the kernel once per slot (and per group of
queries that see the same prefix of the memory), reads the selection back and gives it the
exact form of the method's float Retrieval: a `TopK` with the method's unit, per-row
lengths and causal visibility applied the same way (a query sees a prefix of the units, so
the kernel scans that prefix; when the budget covers the whole prefix no kernel runs and
the padding slots are invalid, as the float top-k leaves them), or a `Bitmap` for
SeerAttention-R's threshold mode. Apply runs on it unchanged.

Every profile row carries its source: host work is `measured`; transfers and kernel runs
come from the device (`modeled` on emu, `simulated` on cosim, `measured` on a card).
After a fault, `invalidate` forgets the card's state; the next call reloads it from the
method's memory on the host, so no appended entry is lost.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import kernels
from .checks import check_k, check_positive_int
from .errors import FpgaError, InputError, PlacementError
from .methods.base import Memory, Method
from .profile import Profile, StepRecord
from .selection import Bitmap, Selection, TopK

#: Host-side work (quantization, packing) runs on the CPU and is wall-clock timed.
HOST = "host (cpu)"
#: Spare row capacity of a memory buffer: rows in use x GROWTH, at least MIN_ROWS, in
#: multiples of ROW_ALIGN (a decode step appends one row; reallocation is rare).
GROWTH = 1.5
MIN_ROWS = 256
ROW_ALIGN = 64


def capacity_for(rows: int) -> int:
    """Rows to allocate for a memory of `rows` rows (with room for appends)."""
    want = max(MIN_ROWS, int(np.ceil(rows * GROWTH)))
    return -(-want // ROW_ALIGN) * ROW_ALIGN


@dataclass
class _Slot:
    """One memory slot on the card: its fitted formats, its buffers and the host's copy of
    the bytes they hold (rows [0, rows) valid, `capacity` rows allocated)."""

    state: Any
    buffers: dict[str, Any] = field(default_factory=dict)
    host: dict[str, np.ndarray] = field(default_factory=dict)
    rows: int = 0
    capacity: int = 0
    entries: int = 0  # candidates the kernel scans: rows, or bm25's documents
    vocab: int = 0  # bm25: terms in the resident index


class FpgaStage:
    """Runs a method's fused Relevancy + Retrieval kernel on an FPGA device.

    `fpga`: a target name ("emu", "xrt_emu", "xrt", "pynq", "cosim", "auto" or None for
    auto), a mapping {"target": name, **open_device options} (e.g. an xclbin path), or an
    open `FpgaDevice`. A named target is opened on first use (so that a fault there falls
    under the pipeline's policy) and reopened after `invalidate`, since a lost card needs a
    fresh handle; a device passed in is used as is and never closed here.
    """

    def __init__(self, method: Method, fpga: Any = None, *, timeout_s: float = 10.0):
        if not isinstance(method, Method):
            raise InputError("method", f"expected a hetmem Method, got {type(method).__name__}")
        if method.kernel is None:
            raise PlacementError("method", f"{method.name!r} has no FPGA kernel")
        if not (hasattr(method, "kernel_memory") and hasattr(method, "kernel_query")):
            raise PlacementError(
                "method", f"{method.name!r} does not give its kernel's inputs (kernel_memory)"
            )
        if not (isinstance(timeout_s, int | float) and timeout_s > 0):
            raise InputError("timeout_s", f"expected a positive number, got {timeout_s!r}")
        self.method = method
        self.spec = kernels.get(method.kernel)
        self.timeout_s = float(timeout_s)
        self._owned = True
        self.device: Any = None
        self.options: dict[str, Any] = {}
        from .fpga import TARGETS, FpgaDevice

        if fpga is None:
            fpga = "auto"
        if isinstance(fpga, Mapping):
            self.options = {k: v for k, v in fpga.items() if k != "target"}
            fpga = fpga.get("target", "auto")
        if isinstance(fpga, FpgaDevice) and not self.options:
            self.device, self._owned, self.target = fpga, False, fpga.target
        elif isinstance(fpga, str):
            if fpga != "auto" and fpga not in TARGETS:
                known = ", ".join(["auto", *TARGETS])
                raise InputError("fpga", f"unknown FPGA target {fpga!r}; targets are {known}")
            self.target = fpga
        else:
            raise InputError(
                "fpga",
                f"expected a target name, a mapping with 'target', or an FpgaDevice, "
                f"got {type(fpga).__name__}",
            )
        self.rows_append = all(
            self.spec.dims[a][0] == kernels.spec.CAPACITY for a in self.spec.memory_args
        )
        self.slots: list[_Slot] = []
        self._lengths: torch.Tensor | None = None  # attention: kv lengths at the last sync
        self._query_bufs: dict[str, Any] = {}
        self.loaded = False

    # -- labels ----------------------------------------------------------------------------
    @property
    def label(self) -> str:
        """The device column of profile rows: fpga:<target>, e.g. fpga:emu."""
        if self.target == "auto" and self.device is not None:
            return f"fpga:{self.device.target}"
        return f"fpga:{self.target}"

    # -- the card's memory -------------------------------------------------------------------
    def load(self, memory: Memory) -> Profile:
        """Fit the kernel's formats per slot, allocate buffers with spare capacity and write
        every row that holds entries; replaces whatever the card held for this stage."""
        with self._on_fault():
            return self._load(memory)

    def _load(self, memory: Memory) -> Profile:
        profile = Profile()
        self._release()
        device = self._open()
        with self._host(profile, "quantize memory") as rec:
            floats = self.method.kernel_memory(memory)  # type: ignore[attr-defined]
            entries = self._candidates(memory, floats)
            ends = self._valid_rows(memory, floats)
            fitted = []
            for part in self._memory_slots(floats, [(0, end) for end in ends]):
                state = self.spec.fit(part)
                slot = _Slot(state, entries=entries)
                fitted.append((slot, self.spec.quantize_memory(part, state)))
            rec.note = f"{len(fitted)} slots"
        writes = _Transfers()
        for slot, ints in fitted:
            self.slots.append(slot)
            self._place(device, slot, ints, writes)
        self._lengths = self._kv_lengths(memory)
        self.loaded = True
        writes.record(profile, "transfer memory -> fpga", self.label, "load: every entry")
        return profile

    def sync(self, memory: Memory) -> Profile:
        """After `Method.append`: quantize and write only the rows the append touched."""
        with self._on_fault():
            return self._sync(memory)

    def _sync(self, memory: Memory) -> Profile:
        if not self.loaded:
            return self._load(memory)
        profile = Profile()
        device = self._open()
        writes, regrow = _Transfers(), _Transfers()
        if not self.rows_append:
            self._sync_whole(device, memory, profile, writes)
        else:
            with self._host(profile, "quantize memory") as rec:
                floats = self.method.kernel_memory(memory)  # type: ignore[attr-defined]
                entries = self._candidates(memory, floats)
                spans = list(
                    zip(self._first_dirty(), self._valid_rows(memory, floats), strict=True)
                )
                updates = []
                for slot, (first, _), part in zip(
                    self.slots, spans, self._memory_slots(floats, spans), strict=True
                ):
                    updates.append((first, self.spec.quantize_memory(part, slot.state)))
                    slot.entries = entries
                rec.note = f"{sum(_rows(i) for _, i in updates)} rows over {len(updates)} slots"
            for slot, (first, ints) in zip(self.slots, updates, strict=True):
                self._write_rows(device, slot, first, ints, writes, regrow)
        self._lengths = self._kv_lengths(memory)
        regrow.record(
            profile,
            "transfer memory -> fpga",
            self.label,
            "regrow: buffers reallocated, resident rows re-sent from the host copy",
        )
        note = "appended rows only" if self.rows_append else "CSR rewritten: postings move"
        writes.record(profile, "transfer memory -> fpga", self.label, note)
        return profile

    def invalidate(self) -> None:
        """Forget the card's state after a fault; the next sync or select reloads it from
        the method's memory on the host (nothing appended is lost: the host has it all)."""
        self._release()
        if self._owned and self.device is not None:
            with suppress(FpgaError, InputError):  # a lost card: nothing left to release
                self.device.close()
            self.device = None

    def close(self) -> None:
        """Free the card's buffers, and close the device when this stage opened it."""
        self.invalidate()

    # -- selection ---------------------------------------------------------------------------
    def select(self, memory: Memory, query: Any, budget: int) -> tuple[Selection, Profile]:
        """Relevancy + Retrieval on the card: the method's selection and the profile."""
        with self._on_fault():
            return self._select(memory, query, budget)

    def _select(self, memory: Memory, query: Any, budget: int) -> tuple[Selection, Profile]:
        profile = Profile()
        if not self.loaded:
            profile.extend(self._load(memory))
        elif self._stale(memory):
            profile.extend(self._sync(memory))
        device = self._open()
        plan = self._plan(memory, query, budget, profile)
        transfers = {"query": _Transfers(), "run": _Transfers(), "out": _Transfers()}
        for call in plan.calls:
            self._run_call(device, plan, call, transfers)
        transfers["query"].record(profile, "transfer query -> fpga", self.label, "host -> card")
        runs = transfers["run"]
        note = f"{self.spec.name}: {runs.count} runs, {runs.cycles} cycles"
        runs.record(profile, "relevancy+retrieval", self.label, note, always=True)
        transfers["out"].record(
            profile, "transfer selection -> gpu", self.label, "card -> host", always=True
        )
        with self._host(profile, "build selection"):
            selection = plan.selection()
        return selection, profile

    # -- internals: slots ---------------------------------------------------------------------
    @property
    def _attention(self) -> bool:
        return self.method.family == "sparse attention"

    def _memory_slots(
        self, floats: Mapping[str, Any], spans: list[tuple[int, int]]
    ) -> list[dict[str, Any]]:
        """Float memory per slot, rows [first, end) of slot i from spans[i] (numpy)."""
        if not self.rows_append:  # bm25: the whole index, one slot
            return [{k: _numpy(v) for k, v in floats.items()}]
        if not self._attention:
            (first, end) = spans[0]
            return [{k: _numpy(v[first:end]) for k, v in floats.items()}]
        arrays = {k: v.detach() for k, v in floats.items()}
        g = int(next(iter(arrays.values())).shape[1])
        return [
            {k: _numpy(v[s // g, s % g, first:end]) for k, v in arrays.items()}
            for s, (first, end) in enumerate(spans)
        ]

    def _candidates(self, memory: Memory, floats: Mapping[str, Any]) -> int:
        """Candidates of the memory: units over the padded cache, or documents."""
        if not self.rows_append:
            return int(memory.entries)
        first = next(iter(floats.values()))
        return int(first.shape[2] if self._attention else first.shape[0])

    def _valid_rows(self, memory: Memory, floats: Mapping[str, Any]) -> list[int]:
        """Per slot, the rows that hold entries: each batch row's length in units. The
        padding past it is never scanned (a query sees at most its row), so never sent."""
        n = self._candidates(memory, floats)
        if not self._attention:
            return [n]
        unit = self.method.unit
        g = int(next(iter(floats.values())).shape[1])
        lengths = memory.kv.lengths.tolist()  # type: ignore[attr-defined]
        return [min(n, -(-int(length) // unit)) for length in lengths for _ in range(g)]

    def _kv_lengths(self, memory: Memory) -> torch.Tensor | None:
        kv = getattr(memory, "kv", None)
        return None if kv is None else kv.lengths.detach().to("cpu").clone()

    def _first_dirty(self) -> list[int]:
        """Per slot, the first row an append may have changed: the unit holding each batch
        row's old length (a partial page/block is re-summarized), or the old row count."""
        if not self._attention:
            return [slot.rows for slot in self.slots]
        unit = self.method.unit
        old = self._lengths
        g = len(self.slots) // int(old.shape[0])  # type: ignore[union-attr]
        return [
            min(slot.rows, int(old[s // g]) // unit)  # type: ignore[index]
            for s, slot in enumerate(self.slots)
        ]

    def _stale(self, memory: Memory) -> bool:
        """The memory grew since the last sync without one (an append outside a Pipeline)."""
        if self._attention:
            now = self._kv_lengths(memory)
            return now is None or self._lengths is None or not torch.equal(now, self._lengths)
        return memory.entries != self.slots[0].entries

    # -- internals: buffers --------------------------------------------------------------------
    def _open(self) -> Any:
        if self.device is None:
            from .fpga import open_device

            self.device = open_device(self.target, **self.options)
        return self.device

    def _release(self) -> None:
        """Free every buffer this stage holds (best effort on a faulted card)."""
        bufs = [b for slot in self.slots for b in slot.buffers.values()]
        bufs += list(self._query_bufs.values())
        if self.device is not None:
            for buf in bufs:
                with suppress(FpgaError, InputError):
                    self.device.free(buf)
        self.slots, self._query_bufs = [], {}
        self._lengths = None
        self.loaded = False

    def _place(self, device: Any, slot: _Slot, ints: dict[str, np.ndarray], writes: _Transfers):
        """Allocate a new slot's buffers with spare capacity and write all its rows."""
        if self.rows_append:
            rows = _rows(ints)
            slot.capacity = capacity_for(rows)
            for arg, data in ints.items():
                self._alloc_rows(device, slot, arg, data, slot.capacity)
            self._write_rows(device, slot, 0, ints, writes, None)
        else:
            self._write_whole(device, slot, ints, writes)

    def _alloc_rows(
        self, device: Any, slot: _Slot, arg: str, like: np.ndarray, capacity: int
    ) -> None:
        host = np.zeros((capacity, *like.shape[1:]), dtype=like.dtype)
        slot.buffers[arg] = device.alloc(self.spec.name, arg, max(1, host.nbytes))
        slot.host[arg] = host

    def _write_rows(
        self,
        device: Any,
        slot: _Slot,
        first: int,
        ints: dict[str, np.ndarray],
        writes: _Transfers,
        regrow: _Transfers | None,
    ) -> None:
        """Write rows [first, first + len) of every memory buffer of a slot; reallocate
        (and re-send rows [0, first) from the host copy) when capacity runs out."""
        end = first + _rows(ints)
        if end > slot.capacity:
            capacity = capacity_for(end)
            old = slot.buffers
            slot.buffers = {}
            for arg, data in ints.items():
                keep = slot.host[arg][:first]
                device.free(old[arg])
                self._alloc_rows(device, slot, arg, data, capacity)
                slot.host[arg][:first] = keep
                if first and regrow is not None:
                    regrow.add(device.write(slot.buffers[arg], keep))
            slot.capacity = capacity
        for arg, data in ints.items():
            if data.shape[0]:
                row_bytes = slot.host[arg][:1].nbytes
                writes.add(device.write(slot.buffers[arg], data, offset=first * row_bytes))
                slot.host[arg][first:end] = data
        slot.rows = end

    def _write_whole(
        self, device: Any, slot: _Slot, ints: dict[str, np.ndarray], writes: _Transfers
    ) -> None:
        """A memory rewritten in full (bm25's CSR): grow a buffer when it is too small."""
        for arg, data in ints.items():
            buf = slot.buffers.get(arg)
            if buf is None or buf.nbytes < data.nbytes:
                if buf is not None:
                    device.free(buf)
                self._alloc_rows(device, slot, arg, data, capacity_for(data.shape[0]))
            writes.add(device.write(slot.buffers[arg], data))
            slot.host[arg][: data.shape[0]] = data
        slot.rows = _rows(ints)
        slot.vocab = int(ints["term_offsets"].shape[0]) - 1 if "term_offsets" in ints else 0

    def _sync_whole(self, device: Any, memory: Memory, profile: Profile, writes: _Transfers):
        """bm25: postings move inside the CSR on append, so the index is rewritten; past
        the avgdl tolerance the impacts are refitted first."""
        from .kernels.bm25 import drifted

        with self._host(profile, "quantize memory") as rec:
            floats = self.method.kernel_memory(memory)  # type: ignore[attr-defined]
            (part,) = self._memory_slots(floats, [])
            slot = self.slots[0]
            refit = drifted(slot.state, part["doc_lengths"])
            if refit:
                slot.state = self.spec.fit(part)
            ints = self.spec.quantize_memory(part, slot.state)
            slot.entries = self._candidates(memory, floats)
            rec.note = "CSR rewritten" + (" (avgdl drifted: refitted)" if refit else "")
        self._write_whole(device, slot, ints, writes)

    def _query_buffer(self, device: Any, arg: str, nbytes: int) -> Any:
        """A reusable per-call buffer (query args, out) of at least `nbytes`."""
        buf = self._query_bufs.get(arg)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                device.free(buf)
            buf = device.alloc(self.spec.name, arg, max(64, 2 * nbytes))
            self._query_bufs[arg] = buf
        return buf

    # -- internals: one call -----------------------------------------------------------------
    def _plan(self, memory: Memory, query: Any, budget: int, profile: Profile) -> _Plan:
        """Check the budget, build the kernel's float query per slot, quantize it, and group
        the queries of each slot by the prefix of the memory they see."""
        rows = self.slots[0].entries
        threshold = getattr(self.method, "mode", "topk") == "threshold"
        k = self._k(budget, rows, threshold)
        dev = memory.device
        with profile.measure("kernel query", dev) as rec:
            floats = self.method.kernel_query(memory, query)  # type: ignore[attr-defined]
            rec.nbytes = sum(_nbytes(v) for v in floats.values())
        if not self._attention:
            q = {name: _numpy(v) for name, v in floats.items()}
            queries = int(next(iter(q.values())).shape[0])
            plan = _Plan(self, k, threshold, (1, 1, queries), rows)
            plan.add(0, 0, q, np.arange(queries), rows)
            self._quantize(plan, profile)
            return plan
        arrays = {name: v.detach() for name, v in floats.items()}
        b, gq, t = next(iter(arrays.values())).shape[:3]
        gm = len(self.slots) // b
        positions = self.method.positions(memory, query).to("cpu")  # type: ignore[attr-defined]
        lengths = memory.kv.lengths.to("cpu")  # type: ignore[attr-defined]
        seen = torch.minimum(positions + 1, lengths[:, None]).clamp(min=0)
        visible = ((seen + self.method.unit - 1) // self.method.unit).clamp(max=rows)  # [B, T]
        plan = _Plan(self, k, threshold, (b, gq, t), rows)
        for bi in range(b):
            per_row = {name: _numpy(v[bi]) for name, v in arrays.items()}  # [Gq, T, ...]
            for g in range(gq):
                slot = bi * gm + g // (gq // gm)
                for n in torch.unique(visible[bi]).tolist():
                    which = torch.nonzero(visible[bi] == n).flatten().numpy()
                    plan.add(
                        slot, bi * gq + g, {k_: a[g][which] for k_, a in per_row.items()}, which, n
                    )
        self._quantize(plan, profile)
        return plan

    def _k(self, budget: int, rows: int, threshold: bool) -> int:
        """The budget as units to select, checked as the method's float Retrieval does."""
        if threshold:
            return 0  # the float threshold rule takes no budget either
        budget = check_positive_int("budget", budget)
        unit = self.method.unit
        if budget < unit:
            raise InputError("budget", f"{budget} tokens is less than one {unit}-token unit")
        return check_k("budget", budget // unit, rows)

    def _quantize(self, plan: _Plan, profile: Profile) -> None:
        with self._host(profile, "quantize query") as rec:
            for call in plan.calls:
                if call.n == 0 or (not plan.threshold and plan.k >= call.n):
                    continue  # the whole visible prefix is selected: no kernel run
                state = self.slots[call.slot].state
                params = {"tau": self.method.threshold} if plan.threshold else {"k": plan.k}  # type: ignore[attr-defined]
                call.inputs = self.spec.quantize_query(call.floats, state, **params)
                call.inputs.scalars["n"] = call.n
                if "vocab" in self.spec.scalar_args():
                    call.inputs.scalars["vocab"] = self.slots[call.slot].vocab
            rec.note = f"{sum(c.inputs is not None for c in plan.calls)} calls"

    def _run_call(self, device: Any, plan: _Plan, call: _Call, transfers: dict) -> None:
        if call.inputs is None:
            return
        slot = self.slots[call.slot]
        scalars = call.inputs.scalars
        buffers = dict(slot.buffers)
        for arg, data in call.inputs.arrays.items():
            buf = self._query_buffer(device, arg, data.nbytes)
            transfers["query"].add(device.write(buf, data))
            buffers[arg] = buf
        shape = self.spec.buffer_shape("out", scalars, 0)
        out_buf = self._query_buffer(device, "out", self.spec.buffer_nbytes("out", scalars))
        buffers["out"] = out_buf
        transfers["run"].add(device.run(self.spec.name, buffers, scalars, self.timeout_s))
        out, timing = device.read(out_buf, np.uint32, int(np.prod(shape)))
        transfers["out"].add(timing)
        call.out = out.reshape(shape)

    @contextmanager
    def _on_fault(self) -> Iterator[None]:
        """A fault leaves the card's state unknown (a buffer half written, a lost handle):
        forget it, so that the next call rebuilds it from the host, then re-raise."""
        try:
            yield
        except FpgaError:
            self.invalidate()
            raise

    @contextmanager
    def _host(self, profile: Profile, step: str) -> Iterator[StepRecord]:
        record = StepRecord(step, HOST, 0.0, "measured")
        start = time.perf_counter()
        yield record
        record.seconds = time.perf_counter() - start
        profile.add(record)


@dataclass
class _Call:
    """One kernel call: a memory slot, the selection row it fills, its queries (indices
    into the row's query axis), the prefix `n` of the memory they see."""

    slot: int
    row: int
    floats: dict[str, np.ndarray]
    queries: np.ndarray
    n: int
    inputs: Any = None
    out: np.ndarray | None = None


@dataclass
class _Plan:
    """The calls of one select and the selection they assemble into."""

    stage: FpgaStage
    k: int
    threshold: bool
    shape: tuple[int, int, int]  # (B, G, T) of the selection
    rows: int  # candidates (units) in the memory
    calls: list[_Call] = field(default_factory=list)

    def add(self, slot: int, row: int, floats: dict, queries: np.ndarray, n: int) -> None:
        self.calls.append(_Call(slot, row, floats, queries, int(n)))

    def selection(self) -> Selection:
        b, g, t = self.shape
        unit = self.stage.method.unit
        if self.threshold:
            mask = np.zeros((b * g, t, self.rows), dtype=bool)
            for call in self.calls:
                if call.out is not None:
                    mask[call.row, call.queries, : call.n] = kernels.unpack_bitmap(call.out, call.n)
            return Bitmap(torch.from_numpy(mask).view(b, g, t, self.rows), unit=unit)
        indices = np.broadcast_to(np.arange(self.k, dtype=np.int64), (b * g, t, self.k)).copy()
        valid = np.ones((b * g, t, self.k), dtype=bool)
        for call in self.calls:
            if call.out is not None:
                indices[call.row, call.queries] = call.out.astype(np.int64)
            else:  # the budget covers the visible prefix: all of it, then invalid padding
                valid[call.row, call.queries] = np.arange(self.k) < call.n
        if not self.stage._attention:  # RAG: the queries are the batch rows
            shape = (t, 1, 1, self.k)
            return TopK(
                torch.from_numpy(indices.reshape(shape)), torch.from_numpy(valid.reshape(shape))
            )
        shape = (b, g, t, self.k)
        return TopK(
            torch.from_numpy(indices).view(shape), torch.from_numpy(valid).view(shape), unit
        )


class _Transfers:
    """Timings of one kind (writes, runs or reads) summed per source, for one profile row
    per source (figures of different sources are never added)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.nbytes: dict[str, int] = {}
        self.count = 0
        self.cycles = 0

    def add(self, timing: Any) -> None:
        self.seconds[timing.source] = self.seconds.get(timing.source, 0.0) + timing.seconds
        self.nbytes[timing.source] = self.nbytes.get(timing.source, 0) + timing.nbytes
        self.count += 1
        self.cycles += int(timing.cycles or 0)

    def record(
        self, profile: Profile, step: str, device: str, note: str, *, always: bool = False
    ) -> None:
        if not self.seconds and always:
            profile.add(StepRecord(step, device, 0.0, "modeled", 0, f"{note} (none needed)"))
        for source, seconds in self.seconds.items():
            profile.add(StepRecord(step, device, seconds, source, self.nbytes[source], note))  # type: ignore[arg-type]


def _numpy(value: Any) -> Any:
    """A CPU numpy view of a tensor (bf16/fp16 widened to float32); other values as is."""
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu")
        if value.dtype in (torch.float16, torch.bfloat16):
            value = value.float()
        return value.numpy()
    return value


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return int(getattr(value, "nbytes", 0))


def _rows(ints: Mapping[str, np.ndarray]) -> int:
    return int(next(iter(ints.values())).shape[0])
