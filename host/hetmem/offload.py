"""Hybrid placement: a method's Compute Relevancy + Retrieval as one kernel on the FPGA.

    stage = FpgaStage(DSA(), "emu")                   # or a shared `Card` of a model
    profile = stage.load(memory)                      # once: fit, allocate, write every row
    profile = stage.stage_rows(memory)                # after Method.append: host mirror only
    selection, profile = stage.select(memory, query, plan)   # sends staged rows, selects
    selection, profile = stage.select_host(memory, query, plan)  # the same, card untouched

The stage bridges a method's `KernelBinding` (its float memory and query, the layout, the
unit) and a card (`hetmem.fpga.cards.Card`: one open device that every layer of a model
shares, each layer's memory a slot set on it). The memory stays resident across decode
steps: `load` fits the kernel's integer formats once per slot (with the spec's headroom for
appends) and writes every row into buffers with spare row capacity; `sync` quantizes and
writes only the rows an append touched (the new ones plus a partial last page or block whose
summary changed). A buffer that runs out of capacity is reallocated and refilled from the
host's copy of what the card holds (those bytes cross PCIe again, and the profile says so).
An inverted index (layout "index") moves postings on every append, so it is rewritten.

Layout "slots" (attention) keeps one slot per (batch row, KV group), layout "rows" one. The
kernel takes a segment table (`segs`: each query's base row and rows): every slot of the
layer lives in one buffer per memory argument, slot s at rows [s * capacity, s * capacity +
rows_s), and a step is ONE write (the query arrays, the segment table and the rows appended
since the last step, packed in one allocation), ONE launch for every batch row, KV group and
query (each scanning its slot's visible prefix), and ONE selection read, whatever the batch;
the slots' states are stacked, so the step's queries (and an append's rows) are quantized
in one call. The appended rows of different slots are not contiguous, so they travel as
`stage`: every whole 64-byte beat of a memory buffer they touch, copied from the host's
exact mirror, which the kernel writes into its memory before the scan (`_compose_stage`);
a card without that pre-phase (`FpgaDevice.stages_appends` false) gets them first, one
range per slot and memory buffer (`write_ranges`). An inverted index
(bm25, layout "index") is one slot and needs no segment table. `begin` / `finish` split a
select around the launch, so the host can work while the card computes (the micro-batch
overlap of `Pipeline`).

`select` quantizes the query, writes it, launches, reads the selection back and gives it the
exact form of the method's float Retrieval: a `TopK` with the method's unit, per-row lengths
and causal visibility applied the same way (a query sees a prefix of the units, so the kernel
scans that prefix; when the budget covers the whole prefix no kernel runs and the padding
slots are invalid, as the float top-k leaves them), or a `Bitmap` in threshold mode. Apply
runs on it unchanged.

Every profile row carries its source: host work is `measured`; transfers and kernel runs come
from the device (`modeled` on emu, `simulated` on cosim, `measured` on a card), with the PCIe
transactions they made.

The host keeps a mirror of what the card holds (the quantized rows, the slots' states): an
append quantizes its rows into the mirror and touches no device (the next select sends them),
so it cannot fault halfway. After a fault the card is reset (`Card.reset`): every stage on it
sees the new generation and is restored from its mirror (no refit: the same formats, the same
answers), so nothing is lost. `select_host` runs the kernel's bit-exact golden model over the
mirror: the pipeline's fallback, and what it runs while the card's `CircuitBreaker` is open,
returns exactly what the card would have.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import kernels
from .errors import FpgaError, InputError, PlacementError
from .fpga.cards import Card, Cards
from .fpga.emu import execute, one_blas_thread
from .kernels import spec as kspec
from .kernels.spec import check_segments
from .methods.base import KernelBinding, Memory, Method
from .plan import StepPlan
from .profile import Profile, StepRecord
from .selection import Bitmap, Selection, TopK, budget_units

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
    """One memory slot on the card: its fitted formats and the rows in use."""

    state: Any
    rows: int = 0
    vocab: int = 0  # an inverted index: terms in the resident index


class FpgaStage:
    """Runs a method's fused Relevancy + Retrieval kernel on a card.

    `fpga`: a `Card` (shared with the other layers of a model), or anything `Cards.open`
    takes (a target name, a mapping {"target": name, **options}, an open `FpgaDevice`): the
    stage then has a card of its own, opened on first use so that a fault there falls under
    the pipeline's policy.
    """

    def __init__(self, method: Method, fpga: Any = None, *, timeout_s: float = 10.0):
        if not isinstance(method, Method):
            raise InputError("method", f"expected a hetmem Method, got {type(method).__name__}")
        binding = method.binding()
        if binding is None:
            raise PlacementError("method", f"{method.name!r} has no FPGA kernel")
        if not isinstance(binding, KernelBinding):
            raise PlacementError("method", f"{method.name!r}.binding() must return a KernelBinding")
        if not (isinstance(timeout_s, int | float) and timeout_s > 0):
            raise InputError("timeout_s", f"expected a positive number, got {timeout_s!r}")
        self.method = method
        self.binding = binding
        self.spec = kernels.get(binding.kernel)
        if binding.layout != "index" and not self.spec.segmented:
            raise PlacementError(
                "method",
                f"kernel {self.spec.name!r} takes no segment table (segs): a memory of "
                f"{binding.layout} needs one launch over all its slots",
            )
        self.timeout_s = float(timeout_s)
        self.card = fpga if isinstance(fpga, Card) else Cards.open(fpga)[0]
        self._own_card = not isinstance(fpga, Card)  # a model's shared card is the model's
        self.stacked: Any = None  # every slot's state, stacked (not for an index)
        self.slots: list[_Slot] = []
        self.capacity = 0  # rows allocated per slot
        self.buffers: dict[str, Any] = {}  # one buffer per memory argument, every slot in it
        self.host: dict[str, np.ndarray] = {}  # [slots * capacity, ...] what the card holds
        self._lengths: torch.Tensor | None = None  # attention: kv lengths at the last sync
        self._query_bufs: dict[tuple[str, int], Any] = {}
        self._busy: set[int] = set()  # buffer sets of launches in flight
        self._generation = -1  # the card generation the slots were written in
        self._card_capacity = -1  # rows per slot of the card's buffers
        self._unsent: list[Any] = []  # appended rows in the mirror, not yet on the card
        #: Checks the bytes per HBM bank a load needs before anything is allocated; a model
        #: sets one that counts its other layers on the card (`SparseDecode`).
        self.fit_check: Callable[[dict[int, int]], None] | None = None

    # -- labels and state ----------------------------------------------------------------------
    @property
    def label(self) -> str:
        return self.card.label

    @property
    def device(self) -> Any:
        return self.card.device

    @property
    def target(self) -> str:
        return self.card.target

    @property
    def loaded(self) -> bool:
        return bool(self.slots) and self._generation == self.card.generation

    # -- the card's memory -----------------------------------------------------------------------
    # The host keeps a mirror of what the card holds (`host`, with the slots' states and
    # rows): it is brought up to the memory first, on the host alone, and the card is then
    # written from it. A fault loses only the card's copy; the mirror stays exact, so the
    # card is restored from it (no refit: the same formats, the same results), and the host
    # runs the kernel's golden model over it when the card is skipped (`select_host`).
    def load(self, memory: Memory) -> Profile:
        """Fit the kernel's formats per slot, allocate buffers with spare capacity and write
        every row that holds entries; replaces whatever the card held for this stage."""
        profile = Profile()
        self._fit(memory, profile)
        with self._on_fault():
            self._restore(self.card.open(), profile, "load: every entry")
        return profile

    def _fit(self, memory: Memory, profile: Profile) -> None:
        """The host mirror from the whole memory: states fitted, every row quantized."""
        self._release()
        with self._host(profile, "quantize memory") as rec:
            floats = self.binding.memory(memory)
            parts = self._slot_floats(memory, floats)
            slots, ints = [], []
            for part in parts:
                state = self.spec.fit(part)
                slots.append(_Slot(state))
                ints.append(self.spec.quantize_memory(part, state))
            rec.note = f"{len(slots)} slots"
        if self.binding.layout == "index":
            self.host = {arg: data.copy() for arg, data in ints[0].items()}
            slots[0].rows = int(memory.entries)
            slots[0].vocab = self._vocab(ints[0])
        else:
            capacity = capacity_for(max((_rows(i) for i in ints), default=0))
            self._check_fits(ints, len(slots), capacity)
            self.capacity = capacity
            self.host = {
                arg: np.zeros((len(slots) * capacity, *data.shape[1:]), dtype=data.dtype)
                for arg, data in ints[0].items()
            }
            for s, part in enumerate(ints):
                for arg, data in part.items():
                    self.host[arg][s * capacity : s * capacity + data.shape[0]] = data
                slots[s].rows = _rows(part)
            self.stacked = self.spec.stack_states([slot.state for slot in slots])
        self.slots = slots
        self._lengths = self._kv_lengths(memory)

    def _restore(self, device: Any, profile: Profile, note: str) -> None:
        """Write the whole mirror to the card: fresh buffers, every resident row."""
        self._drop_card()
        writes = _Transfers()
        if self.binding.layout == "index":
            for arg, data in self.host.items():
                rows = capacity_for(data.shape[0])
                buf = device.alloc(self.spec.name, arg, max(1, _row_bytes(data) * rows))
                self.buffers[arg] = buf
                writes.add(device.write(buf, data))
        else:
            rows = len(self.slots) * self.capacity
            self.buffers = {
                arg: device.alloc(self.spec.name, arg, max(1, _row_bytes(data) * rows))
                for arg, data in self.host.items()
            }
            for s, slot in enumerate(self.slots):
                first = s * self.capacity
                for arg, data in self.host.items():
                    if slot.rows:
                        writes.add(
                            device.write(
                                self.buffers[arg],
                                data[first : first + slot.rows],
                                offset=first * _row_bytes(data),
                            )
                        )
        self._card_capacity = self.capacity
        self._generation = self.card.generation
        writes.record(profile, "transfer memory -> fpga", self.label, note)

    def memory_need(self, memory: Memory) -> dict[int, int]:
        """Bytes per HBM bank this stage's memory takes on a card (with spare capacity)."""
        floats = self.binding.memory(memory)
        parts = self._slot_floats(memory, floats)
        need: dict[int, int] = {}
        if not parts:
            return need
        state = self.spec.fit(parts[0])
        sample = self.spec.quantize_memory(parts[0], state)
        capacity = capacity_for(max(self._slot_rows(memory, floats)))
        for arg, data in sample.items():
            bank = int(self.spec.arg(arg).bank)  # type: ignore[arg-type]
            rows = capacity_for(data.shape[0]) if self.binding.layout == "index" else capacity
            need[bank] = need.get(bank, 0) + _row_bytes(data) * rows * len(parts)
        return need

    def sync(self, memory: Memory) -> Profile:
        """After `Method.append`: quantize the rows the append touched into the mirror and
        write only those to the card (a card that lost its copy gets the whole mirror).
        `select` does this itself for a memory that grew since the last one."""
        profile = Profile()
        self._bring_up(memory, profile)
        return profile

    def stage_rows(self, memory: Memory) -> Profile:
        """After `Method.append`, on the host alone: the rows it touched quantized into the
        mirror; the card takes them at the next select (so an append never faults)."""
        profile = Profile()
        if self.slots and self._stale(memory):
            self._unsent.append(self._update(memory, profile))
        return profile

    def _bring_up(self, memory: Memory, profile: Profile, defer: bool = False) -> None:
        """Mirror up to the memory (host), then the card up to the mirror. `defer`: a select
        follows, and a card that copies staged beats (`_stages`) takes the appended rows
        with its launch (`begin`), so they stay in `_unsent` here."""
        fitted = not self.slots
        if fitted:
            self._fit(memory, profile)
        else:
            profile.extend(self.stage_rows(memory))
        with self._on_fault():
            device = self.card.open()
            whole = "all" in self._unsent
            if not self.loaded or self._card_capacity != self.capacity or whole:
                self._unsent = []  # the whole mirror is written
                if fitted:
                    note = "load: every entry"
                elif whole and self.loaded:
                    note = "CSR rewritten: postings move"
                elif self.loaded:
                    note = "regrow: buffers reallocated, resident rows re-sent from the host copy"
                else:
                    note = "restored from the host copy"
                self._restore(device, profile, note)
            elif self._unsent and not (defer and self._stages(device)):
                self._send_unsent(device, profile)

    def _send_unsent(self, device: Any, profile: Profile) -> None:
        """The appended rows not yet on the card, written range by range (`write_ranges`:
        one transaction per slot and memory buffer)."""
        unsent, self._unsent = self._unsent, []
        writes = _Transfers()
        for appended in unsent:
            self._write_appended(device, *appended, writes)
        writes.record(profile, "transfer memory -> fpga", self.label, "appended rows only")

    def _stages(self, device: Any) -> bool:
        """Whether appended rows ride on the launch: a kernel with staged beats (`stage`,
        `staged`) on a card that copies them in before the scan, for slot memories."""
        return (
            self.binding.layout != "index"
            and self.spec.staging
            and bool(getattr(device, "stages_appends", False))
        )

    def _compose_stage(self) -> np.ndarray:
        """The `stage` that brings the card's memory up to the mirror: every 64-byte beat
        of each memory buffer that the unsent rows touch, each once, with the mirror's bytes
        (exact, so a whole beat is right where it also holds rows that did not change)."""
        beats = []
        for arg in self.spec.memory_args:
            row = _row_bytes(self.host[arg])
            offsets, sizes = [], []
            for firsts, counts, _ in self._unsent:
                base = np.arange(len(counts), dtype=np.int64) * self.capacity
                offsets.append((base + np.asarray(firsts, dtype=np.int64)) * row)
                sizes.append(np.asarray(counts, dtype=np.int64) * row)
            beats.append(kspec.beats_of(np.concatenate(offsets), np.concatenate(sizes)))
        return kspec.compose_stage([self.host[arg] for arg in self.spec.memory_args], beats)

    def _update(self, memory: Memory, profile: Profile) -> Any:
        """The mirror takes the rows appended since the last update (host only): (firsts,
        counts, rows) for `_write_appended`, or "all" for an index rewritten whole."""
        if self.binding.layout == "index":
            self._update_index(memory, profile)
            self._lengths = self._kv_lengths(memory)
            return "all"
        with self._host(profile, "quantize memory") as rec:
            firsts = self._first_dirty()  # every slot's new rows: one quantization
            counts, ints = self._quantize_rows(memory, self.binding.memory(memory), firsts)
            rec.note = f"{int(counts.sum())} rows over {len(counts)} slots"
        starts = np.asarray(firsts, dtype=np.int64)
        ends = starts + counts
        if int(ends.max(initial=0)) > self.capacity:  # the mirror regrows; the card follows
            self._regrow_host(capacity_for(int(ends.max())), firsts)
        base = np.arange(len(counts), dtype=np.int64) * self.capacity + starts
        rows = np.repeat(base - (np.cumsum(counts) - counts), counts) + np.arange(int(counts.sum()))
        for arg, data in ints.items():
            self.host[arg][rows] = data
        for slot, end in zip(self.slots, ends.tolist(), strict=True):
            slot.rows = end
        self._lengths = self._kv_lengths(memory)
        return firsts, counts, ints

    def resident(self, s: int) -> dict[str, np.ndarray]:
        """What the card holds for slot s (its rows in use), read back from the card."""
        region, first = self.buffers, s * self.capacity
        rows = self.slots[s].rows
        out = {}
        for arg, host in self.host.items():
            if self.binding.layout == "index":
                count, offset = host.shape[0], 0
            else:
                count, offset = rows, first
            row = host[:1] if host.ndim else host
            data, _ = self.device.read(
                region[arg], host.dtype, count * row.size, offset=offset * _row_bytes(host)
            )
            out[arg] = data.reshape(count, *host.shape[1:])
        return out

    def invalidate(self) -> None:
        """Forget this stage's memory on the card; the next call reloads it from the host."""
        self._release()

    def close(self) -> None:
        """Free this stage's buffers, and close its card unless a model shares it (a device
        passed in is never closed here)."""
        self._release()
        if self._own_card:
            self.card.close()

    # -- selection ---------------------------------------------------------------------------
    def select(
        self, memory: Memory, query: Any, budget: int | StepPlan, rows: slice | None = None
    ) -> tuple[Selection, Profile]:
        """Relevancy + Retrieval on the card: the method's selection and the profile.

        `budget`: a token budget, or the step's `StepPlan` (positions, budget) that every
        layer shares. `rows`: the batch rows `query` holds (a micro-batch), default all."""
        return self.finish(self.begin(memory, query, budget, rows))

    def begin(
        self, memory: Memory, query: Any, budget: int | StepPlan, rows: slice | None = None
    ) -> _Pending:
        """Quantize and write the query and start the launch; return at once (the host may
        run other work while the card computes). `finish` waits and reads the selection."""
        profile = Profile()
        self._bring_up(memory, profile, defer=True)
        with self._on_fault():
            device = self.card.open()
            launch = self._plan(memory, query, budget, profile, rows)
            pending = _Pending(launch, profile)
            if self._unsent and launch.groups and self._stages(device):
                # the appended rows ride on the first launch's query write (one transaction)
                with self._host(profile, "compose staged beats") as rec:
                    stage = self._compose_stage()
                    rec.note = f"{stage.shape[0]} memory beats"
                if stage.shape[0]:
                    first = launch.groups[0]
                    first.inputs.arrays[kspec.STAGE] = stage
                    first.inputs.scalars[kspec.STAGED] = int(stage.shape[0])
                else:  # no row changed: nothing to send
                    self._unsent = []
            elif self._unsent:
                self._send_unsent(device, profile)
            for group in launch.groups:
                self._start_group(device, group, pending.transfers)
                if group.inputs.scalars.get(kspec.STAGED, 0):
                    self._unsent = []  # the launch carries them: the card copies them in
            return pending

    def finish(self, pending: _Pending) -> tuple[Selection, Profile]:
        """Wait for the launches of `begin`, read the selection back and build it."""
        with self._on_fault():
            device = self.card.open()
            transfers, profile = pending.transfers, pending.profile
            for group in pending.launch.groups:
                try:
                    transfers["run"].add(group.running.wait())
                except Exception:
                    if group.inputs.scalars.get(kspec.STAGED, 0):
                        # the card may not hold the staged rows: rebuilt from the mirror
                        self._drop_card()
                    raise
                shape = self.spec.buffer_shape("out", group.inputs.scalars, 0)
                out, timing = device.read(group.out_buffer, np.uint32, int(np.prod(shape)))
                transfers["out"].add(timing)
                group.out = out.reshape(shape)
                self._busy.discard(group.at)
            transfers["query"].record(profile, "transfer query -> fpga", self.label, "host -> card")
            runs = transfers["run"]
            note = f"{self.spec.name}: {runs.count} launches, {runs.cycles} cycles"
            runs.record(profile, "relevancy+retrieval", self.label, note, always=True)
            transfers["out"].record(
                profile, "transfer selection -> gpu", self.label, "card -> host", always=True
            )
            with self._host(profile, "build selection"):
                selection = pending.launch.selection()
            return selection, profile

    def select_host(
        self, memory: Memory, query: Any, budget: int | StepPlan, rows: slice | None = None
    ) -> tuple[Selection, Profile]:
        """What `select` returns, computed on the host: the kernel's bit-exact golden model
        over the host mirror of the card's memory and the same quantized query, so a step
        whose card faulted (or is skipped by the circuit breaker) returns exactly what the
        card would have. Touches no device."""
        profile = Profile()
        if not self.slots:
            self._fit(memory, profile)
        elif self._stale(memory):
            self._update(memory, profile)  # the card takes these rows when it is used again
        launch = self._plan(memory, query, budget, profile, rows)
        with self._host(profile, "relevancy+retrieval (golden model)") as rec:
            memory_raw = {arg: _raw(data) for arg, data in self.host.items()}
            with one_blas_thread():
                for group in launch.groups:
                    raw = dict(memory_raw)
                    raw.update({arg: _raw(data) for arg, data in group.inputs.arrays.items()})
                    scalars = group.inputs.scalars
                    out, _ = execute(self.spec, raw, scalars)
                    group.out = out.reshape(self.spec.buffer_shape("out", scalars, 0))
            rec.note = f"{self.spec.name} on the host: {len(launch.groups)} launches"
        with self._host(profile, "build selection"):
            selection = launch.selection()
        return selection, profile

    # -- internals: slots -----------------------------------------------------------------------
    @property
    def _attention(self) -> bool:
        return self.binding.layout == "slots"

    def _slot_floats(self, memory: Memory, floats: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Float memory per slot (numpy), the rows that hold entries (a load)."""
        if self.binding.layout == "index":
            return [{k: _numpy(v) for k, v in floats.items()}]
        ends = self._slot_rows(memory, floats)
        if not self._attention:
            return [{k: _numpy(v[: ends[0]]) for k, v in floats.items()}]
        arrays = {k: v.detach() for k, v in floats.items()}
        g = int(next(iter(arrays.values())).shape[1])
        return [
            {k: _numpy(_flat_rows(v[s // g, s % g, :end])) for k, v in arrays.items()}
            for s, end in enumerate(ends)
        ]

    def _quantize_rows(
        self, memory: Memory, floats: Mapping[str, Any], firsts: list[int]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Rows [firsts[s], rows of slot s) of every slot, gathered with one index and
        quantized in one call with each row's slot state (a decode step's append: one row
        or two per slot): (rows per slot, the rows of every slot in slot order)."""
        ends = np.asarray(self._slot_rows(memory, floats), dtype=np.int64)
        starts = np.asarray(firsts, dtype=np.int64)
        counts = np.maximum(ends - starts, 0)
        slot = np.repeat(np.arange(len(counts)), counts)
        offsets = np.cumsum(counts) - counts
        unit = np.arange(int(counts.sum())) - np.repeat(offsets - starts, counts)
        if self._attention:
            g = int(next(iter(floats.values())).shape[1])
            index = (
                torch.from_numpy(slot // g),
                torch.from_numpy(slot % g),
                torch.from_numpy(unit),
            )
        else:
            index = (torch.from_numpy(unit),)
        part = {k: _numpy(_flat_rows(v.detach()[index])) for k, v in floats.items()}
        return counts, self.spec.quantize_memory(part, self.stacked, slots=slot)

    def _write_appended(
        self,
        device: Any,
        firsts: list[int],
        counts: np.ndarray,
        ints: dict[str, np.ndarray],
        writes: _Transfers,
    ) -> None:
        """Every slot's new rows (slot order, already in the mirror) to the card: each slot's
        rows are one range of each memory buffer (`FpgaDevice.write_ranges`; a card that
        stages beats takes them with the launch instead, `_compose_stage`)."""
        base = np.arange(len(counts), dtype=np.int64) * self.capacity + np.asarray(firsts)
        for arg, data in ints.items():
            row_bytes = _row_bytes(self.host[arg])
            before = device.transactions
            timing = device.write_ranges(
                self.buffers[arg], data, base * row_bytes, counts * row_bytes
            )
            writes.add(timing, device.transactions - before)

    def _slot_rows(self, memory: Memory, floats: Mapping[str, Any]) -> list[int]:
        """Per slot, the rows that hold entries: each batch row's length in units. The
        padding past it is never scanned (a query sees at most its row), so never sent."""
        if self.binding.layout == "index":
            return [int(memory.entries)]
        first = next(iter(floats.values()))
        if not self._attention:
            return [int(first.shape[0])]
        n, g, unit = int(first.shape[2]), int(first.shape[1]), self.binding.unit
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
        unit, old = self.binding.unit, self._lengths
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
        if self.binding.layout == "index":
            return int(memory.entries) != self.slots[0].rows
        return int(memory.entries) != self.slots[0].rows

    # -- internals: buffers --------------------------------------------------------------------
    def _check_fits(self, ints: list[dict[str, np.ndarray]], slots: int, capacity: int) -> None:
        """A memory that cannot fit the card is the caller's input, not a card fault."""
        need: dict[int, int] = {}
        for arg, data in ints[0].items():
            bank = int(self.spec.arg(arg).bank)  # type: ignore[arg-type]
            row = _row_bytes(data)
            need[bank] = need.get(bank, 0) + row * capacity * slots
        if self.fit_check is not None:
            self.fit_check(need)
        else:
            Cards([self.card]).check_fit([need])

    def _regrow_host(self, capacity: int, keep: list[int]) -> None:
        """The mirror with `capacity` rows per slot, rows [0, keep[s]) of each slot kept
        (the card's buffers are then reallocated and refilled from it: those bytes cross
        PCIe again, and the profile says so)."""
        old, old_capacity = self.host, self.capacity
        self.capacity = capacity
        self.host = {
            arg: np.zeros((len(self.slots) * capacity, *arr.shape[1:]), dtype=arr.dtype)
            for arg, arr in old.items()
        }
        for s, rows in enumerate(keep):
            for arg, arr in old.items():
                self.host[arg][s * capacity : s * capacity + rows] = arr[
                    s * old_capacity : s * old_capacity + rows
                ]

    def _update_index(self, memory: Memory, profile: Profile) -> None:
        """An inverted index: postings move inside the CSR on append, so it is requantized
        whole (and rewritten); past the avgdl tolerance the impacts are refitted first."""
        from .kernels.bm25 import drifted

        with self._host(profile, "quantize memory") as rec:
            (part,) = self._slot_floats(memory, self.binding.memory(memory))
            slot = self.slots[0]
            refit = drifted(slot.state, part["doc_lengths"])
            if refit:
                slot.state = self.spec.fit(part)
            ints = self.spec.quantize_memory(part, slot.state)
            rec.note = "CSR rewritten" + (" (avgdl drifted: refitted)" if refit else "")
        self.host = {arg: data.copy() for arg, data in ints.items()}
        slot.rows = int(memory.entries)
        slot.vocab = self._vocab(ints)

    @staticmethod
    def _vocab(ints: Mapping[str, np.ndarray]) -> int:
        return int(ints["term_offsets"].shape[0]) - 1 if "term_offsets" in ints else 0

    def _drop_card(self) -> None:
        """Forget the card's copy (free its buffers, best effort on a faulted card); the
        host mirror stays."""
        device = self.card.device
        if device is not None:  # buffers of a device since reopened are refused: ignored
            bufs = list(self.buffers.values())
            owners = [b.parent if b.parent is not None else b for b in self._query_bufs.values()]
            bufs += list({id(b): b for b in owners}.values())
            for buf in bufs:
                with suppress(FpgaError, InputError):
                    device.free(buf)
        self.buffers, self._query_bufs = {}, {}
        self._busy = set()
        self._generation = -1
        self._card_capacity = -1

    def _release(self) -> None:
        """Free the card's copy and the host mirror."""
        self._drop_card()
        self.slots, self.host, self.stacked = [], {}, None
        self._lengths, self._unsent = None, []
        self.capacity = 0

    def _query_buffers(self, device: Any, sizes: dict[str, int], at: int) -> dict[str, Any]:
        """Reusable buffers for the per-step query arrays (and the segment table), packed in
        one allocation so that one write sends them all; regrown (2x) when a step needs
        more. `at`: the buffer set of a launch (launches in flight each have their own)."""
        bufs = {arg: self._query_bufs.get((arg, at)) for arg in sizes}
        if any(b is None or b.nbytes < sizes[arg] for arg, b in bufs.items()):
            for arg in sizes:
                old = self._query_bufs.pop((arg, at), None)
                if old is not None and old.parent is None:
                    device.free(old)
            parents = {id(b.parent): b.parent for b in bufs.values() if b is not None and b.parent}
            for parent in parents.values():
                with suppress(FpgaError, InputError):
                    device.free(parent)
            grown = {arg: max(64, 2 * n) for arg, n in sizes.items()}
            bufs = device.alloc_packed(self.spec.name, grown)
            self._query_bufs.update({(arg, at): buf for arg, buf in bufs.items()})
        return bufs  # type: ignore[return-value]

    def _out_buffer(self, device: Any, nbytes: int, at: int) -> Any:
        """The output buffer of buffer set `at`."""
        buf = self._query_bufs.get(("out", at))
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                device.free(buf)
            buf = self._query_bufs[("out", at)] = device.alloc(
                self.spec.name, "out", max(64, 2 * nbytes)
            )
        return buf

    # -- internals: one step -------------------------------------------------------------------
    def _plan(
        self,
        memory: Memory,
        query: Any,
        budget: int | StepPlan,
        profile: Profile,
        rows: slice | None = None,
    ) -> _Launch:
        """The step's queries, their slots and visible prefixes, quantized, in launch groups."""
        threshold = self.binding.threshold
        plan = budget if isinstance(budget, StepPlan) else None
        with profile.measure("kernel query", memory.device) as rec:
            floats = self.binding.query(memory, query)
            rec.nbytes = sum(_nbytes(v) for v in floats.values())
        if not self._attention:
            rows = self.slots[0].rows
            k = 0 if threshold else budget_units(_budget(budget), 1, rows)
            q = {name: _numpy(v) for name, v in floats.items()}
            count = int(next(iter(q.values())).shape[0])
            launch = _Launch(self, k, threshold, (1, 1, count), rows)
            launch.add(np.zeros(count, np.int64), np.arange(count), np.full(count, rows), q)
            self._quantize(launch, profile)
            return launch
        arrays = {name: v.detach() for name, v in floats.items()}
        b, gq, t = next(iter(arrays.values())).shape[:3]
        batch = int(memory.kv.batch)  # type: ignore[attr-defined]
        first = 0 if rows is None else range(batch)[rows].start
        gm = len(self.slots) // batch
        unit = self.binding.unit
        candidates = -(-int(memory.kv.capacity) // unit)  # type: ignore[attr-defined]
        if plan is None:
            positions = self.method.positions(memory, query).to("cpu")  # type: ignore[attr-defined]
            plan = StepPlan(positions, memory.kv.lengths.to("cpu"), _budget(budget))  # type: ignore[attr-defined]
        k = 0 if threshold else min(plan.k(unit), candidates)
        visible = plan.seen(unit).clamp(max=candidates).numpy()[first : first + b]  # [b, T]
        launch = _Launch(self, k, threshold, (b, gq, t), candidates)
        # Queries in (batch row, query group, query) order; each query's slot and prefix.
        bi = np.repeat(np.arange(b), gq * t)
        gi = np.tile(np.repeat(np.arange(gq), t), b)
        ti = np.tile(np.arange(t), b * gq)
        slot = (first + bi) * gm + gi // (gq // gm)
        n = visible[bi, ti]
        flat = {name: _numpy(v.reshape(b * gq * t, *v.shape[3:])) for name, v in arrays.items()}
        launch.add(slot, bi * gq * t + gi * t + ti, n, flat)
        self._quantize(launch, profile)
        return launch

    def _quantize(self, launch: _Launch, profile: Profile) -> None:
        """Quantize each query with its slot's state; queries whose budget covers their
        visible prefix (or that see nothing) run no kernel; the others are one launch."""
        with self._host(profile, "quantize query") as rec:
            run = launch.n > 0
            if not launch.threshold:
                run &= launch.n > launch.k
            which = np.nonzero(run)[0]
            params = {"tau": self.binding.tau} if launch.threshold else {"k": launch.k}
            for order in [which] if which.size else []:
                one = {name: v[order] for name, v in launch.floats.items()}
                if self.stacked is not None:  # every slot's queries in one call
                    quantized = self.spec.quantize_query(
                        one, self.stacked, slots=launch.slot[order], **params
                    )
                else:  # an index: one slot
                    quantized = self.spec.quantize_query(one, self.slots[0].state, **params)
                arrays, scalars = dict(quantized.arrays), dict(quantized.scalars)
                scalars["queries"] = int(order.size)
                scalars["n"] = int(launch.n[order].max())
                if self.spec.segmented:
                    base = launch.slot[order] * self.capacity
                    arrays["segs"] = np.stack([base, launch.n[order]], axis=1).astype(np.uint32)
                    # A card refuses a bad segment by writing nothing: check the host's copy.
                    check_segments(
                        arrays["segs"],
                        n=scalars["n"],
                        k=None if launch.threshold else launch.k,
                        held=len(self.slots) * self.capacity,
                    )
                if "vocab" in self.spec.scalar_args():
                    scalars["vocab"] = self.slots[int(launch.slot[order[0]])].vocab
                group = _Group(order, kernels.KernelInputs(arrays, scalars))
                launch.groups.append(group)
            rec.note = f"{int(which.size)} queries in {len(launch.groups)} launches"

    def _start_group(self, device: Any, group: _Group, transfers: dict) -> None:
        scalars = group.inputs.scalars
        arrays = group.inputs.arrays
        buffers = dict(self.buffers)
        group.at = min(set(range(len(self._busy) + 1)) - self._busy)
        self._busy.add(group.at)
        sizes = {arg: data.nbytes for arg, data in arrays.items()}
        if self.spec.staging:  # the stage buffer is bound (and this stage's) even when empty
            sizes.setdefault(kspec.STAGE, 64)
        sent = self._query_buffers(device, sizes, group.at)
        before = device.transactions
        transfers["query"].add(device.write_packed(arrays, sent), device.transactions - before)
        buffers.update(sent)
        group.out_buffer = buffers["out"] = self._out_buffer(
            device, self.spec.buffer_nbytes("out", scalars), group.at
        )
        group.running = device.run_async(self.spec.name, buffers, scalars, self.timeout_s)

    @contextmanager
    def _on_fault(self) -> Iterator[None]:
        """A fault leaves the card's state unknown (a buffer half written, a lost handle):
        reset the card, so that every stage on it rebuilds from the host, then re-raise."""
        try:
            yield
        except FpgaError:
            self._drop_card()  # the host mirror stays exact: the card is restored from it
            self.card.reset()
            raise

    @contextmanager
    def _host(self, profile: Profile, step: str) -> Iterator[StepRecord]:
        record = StepRecord(step, HOST, 0.0, "measured")
        start = time.perf_counter()
        yield record
        record.seconds = time.perf_counter() - start
        profile.add(record)


@dataclass
class _Group:
    """One launch: its queries (indices into the step's query list) and inputs."""

    order: np.ndarray
    inputs: Any
    at: int = 0  # the buffer set its launch reads and writes
    running: Any = None  # the device's Launch
    out_buffer: Any = None
    out: np.ndarray | None = None


@dataclass
class _Pending:
    """A selection in flight between `FpgaStage.begin` and `finish`."""

    launch: _Launch
    profile: Profile
    transfers: dict = field(
        default_factory=lambda: {"query": _Transfers(), "run": _Transfers(), "out": _Transfers()}
    )


@dataclass
class _Launch:
    """The queries of one select, their slots and visible prefixes, and the launches that
    assemble the selection."""

    stage: FpgaStage
    k: int
    threshold: bool
    shape: tuple[int, int, int]  # (B, G, T) of the selection
    rows: int  # candidates (units) in the memory
    slot: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    row: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # flat (b, g, t)
    n: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    floats: dict[str, np.ndarray] = field(default_factory=dict)
    groups: list[_Group] = field(default_factory=list)

    def add(self, slot: np.ndarray, row: np.ndarray, n: np.ndarray, floats: dict) -> None:
        self.slot, self.row, self.n = (
            slot.astype(np.int64),
            row.astype(np.int64),
            n.astype(np.int64),
        )
        self.floats = floats

    def selection(self) -> Selection:
        b, g, t = self.shape
        unit = self.stage.binding.unit
        if self.threshold:
            mask = np.zeros((b * g * t, self.rows), dtype=bool)
            for group in self.groups:
                width = int(group.inputs.scalars["n"])
                bits = kernels.unpack_bitmap(group.out, width)  # [Q, n]
                bits &= np.arange(width)[None, :] < self.n[group.order][:, None]
                mask[self.row[group.order], :width] = bits
            return Bitmap(torch.from_numpy(mask).view(b, g, t, self.rows), unit=unit)
        count = b * g * t
        indices = np.broadcast_to(np.arange(self.k, dtype=np.int64), (count, self.k)).copy()
        # A query that runs no kernel selects its whole visible prefix, then invalid padding.
        valid = np.zeros((count, self.k), dtype=bool)
        valid[self.row] = np.arange(self.k)[None, :] < self.n[:, None]
        for group in self.groups:
            rows = self.row[group.order]
            indices[rows] = group.out.astype(np.int64)
            valid[rows] = True
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
    per source (figures of different sources are never added), with the transactions."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.nbytes: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        self.count = 0
        self.cycles = 0

    def add(self, timing: Any, transactions: int = 1) -> None:
        self.seconds[timing.source] = self.seconds.get(timing.source, 0.0) + timing.seconds
        self.nbytes[timing.source] = self.nbytes.get(timing.source, 0) + timing.nbytes
        self.counts[timing.source] = self.counts.get(timing.source, 0) + transactions
        self.count += 1
        self.cycles += int(timing.cycles or 0)

    def record(
        self, profile: Profile, step: str, device: str, note: str, *, always: bool = False
    ) -> None:
        if not self.seconds and always:
            profile.add(StepRecord(step, device, 0.0, "modeled", 0, f"{note} (none needed)"))
        for source, seconds in self.seconds.items():
            profile.add(
                StepRecord(
                    step,
                    device,
                    seconds,
                    source,
                    self.nbytes[source],
                    note,
                    self.counts[source],  # type: ignore[arg-type]
                )
            )


def _budget(budget: int | StepPlan) -> int:
    return budget.budget if isinstance(budget, StepPlan) else budget


def _flat_rows(rows: torch.Tensor) -> torch.Tensor:
    """Rows [N, ...] of a slot as the kernel's [N, F] (a binding may give each row as several
    dims, e.g. a folded DSA index's [Hkv, D] keys, so that its memory is a view)."""
    return rows.flatten(1) if rows.dim() > 2 else rows


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


def _raw(data: np.ndarray) -> np.ndarray:
    """An array's bytes, as a buffer on the card holds them."""
    return np.ascontiguousarray(data).reshape(-1).view(np.uint8)


def _row_bytes(data: np.ndarray) -> int:
    """Bytes of one row of a memory array (its trailing axes)."""
    return int(np.prod(data.shape[1:], dtype=np.int64)) * data.itemsize


def _rows(ints: Mapping[str, np.ndarray]) -> int:
    return int(next(iter(ints.values())).shape[0])
