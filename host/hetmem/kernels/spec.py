"""The contract every FPGA kernel spec fulfils; emu, cosim, xrt, the RTL tests and the HLS
C-simulation all read it.

A kernel fuses Compute Relevancy and Retrieval: it reads a resident *memory* (integer rows
in HBM) and a per-call *query*, and writes only the selection (top-k indices, ascending,
or a threshold bitmap). Scores never leave the card.

Register map (Vitis `ap_ctrl_hs`): 0x00 control (bit 0 ap_start, bit 1 ap_done, bit 2
ap_idle, bit 3 ap_ready), 0x04 global interrupt enable, 0x08 IP interrupt enable, 0x0C IP
interrupt status, then the arguments from 0x10 in order: a 32-bit scalar takes one 32-bit
register, a 64-bit buffer address two (low word first); each argument starts on the next
free 32-bit word, with the Vitis gap of one word after each argument.

Quantization, the same shape for every kernel: `fit(memory floats) -> state` once (scales,
with headroom, since the memory grows by appends), `quantize_memory(floats, state)` on the
whole memory or on any slice of appended rows, `quantize_query(floats, state, k=...)` per
call, then `bind` joins the resident memory and the query into `KernelInputs` and `golden`
runs the integer model. `emulate` does the four in one call. The int8 dot-product kernels
(token_indexer, block_gate, vector_search) store rows in a *balanced, rotated* basis in
block floating point (`fit_rotated`, `quantize_rows`, `fold`): each channel is divided by
the square root of its RMS (balancing the range between keys and queries), the row is
rotated by a fixed orthonormal randomized Hadamard transform (`rotate`: spreads outlier
channels and heavy tails over every channel), and stored as int8 with per-channel scales
and a power-of-two exponent per row (a `shifts` byte) whose negative range is the headroom
for appended rows. The query takes the same balance (multiplied) and rotation and the
channel scales, then int8, so the integer dot stays proportional to the float one: the
rotation is orthonormal and the balance cancels, q . k = (H (q * b)) . (H (k / b)).
The engine's datapath (int8 x int8 dot, << shift) does not see the basis.

Segments (the four kernels with RTL): the input buffer `segs`, uint32 [queries, 2], gives
each query its (base, rows): query i scans memory rows [base_i, base_i + rows_i) and its
selection's indices are relative to base_i, so one launch covers every slot of a layer
stored at row offsets of one memory buffer. The scalar `n` is the largest rows_i (threshold
mode: bitmap rows of ceil(n/32) words, bits at or past rows_i zero). `bind` fills
segs = (0, n) per query when the query has none. Slots quantized with their own states are
quantized together through `stack_states` and `slots=` (one fancy index, no loop).

Staged appends (the same four kernels): the input buffer `stage`, uint32 [staged, 17], and
the scalar `staged` (last; 0 = nothing staged) carry whole 64-byte beats of the memory
buffers (word 0: STAGE_PORT_B for port b, or 0, | the beat index; words 1..16 the bytes),
which the kernel copies into its memory before the scan (`apply_stage`, the golden
pre-phase). The host composes them from its exact mirror of the card's memory
(`beats_of`, `compose_stage`), so a decode step's appended rows, which lie at different
slots' offsets, ride on the launch's one query write instead of one write per slot.

Cycle model: every engine streams its memory from HBM one 512-bit beat per port per cycle,
feeds `lanes` dot-product units, then selects. `engine_cycles` is the one formula; the
constants of every kernel live in `ENGINES`, which the RTL bench calibrates.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import numpy as np

from ..errors import InputError
from . import engine as _engine
from . import topk as _topk

CTRL = 0x00
GIE = 0x04
IER = 0x08
ISR = 0x0C
ARGS_BASE = 0x10
AP_START, AP_DONE, AP_IDLE, AP_READY = 0x1, 0x2, 0x4, 0x8

#: Bytes per AXI beat of the kernels' HBM ports (512-bit).
BEAT_BYTES = 64
#: The kernel clock the U55C build targets; a card's measured clock overrides it.
DEFAULT_CLOCK_HZ = 300e6
#: HBM pseudo-channels of the U55C.
HBM_BANKS = 32

#: The row-capacity dimension of a memory buffer in `KernelSpec.dims`.
CAPACITY = "capacity"

#: Values of the `mode` scalar.
MODE_TOPK = 0
MODE_THRESHOLD = 1

Direction = Literal["in", "out", "scalar"]


@dataclass(frozen=True)
class Arg:
    """One kernel argument: a buffer in an HBM pseudo-channel, or a 32-bit scalar."""

    name: str
    dtype: str  # numpy dtype name: "int8", "uint32", ...
    layout: str  # e.g. "[n, dim] row-major"
    direction: Direction
    bank: int | None = None  # HBM pseudo-channel (0..31) for buffers; None for scalars
    doc: str = ""

    @property
    def is_buffer(self) -> bool:
        return self.direction != "scalar"

    @property
    def width_bytes(self) -> int:
        """Bytes the argument takes in the register map: 8 for an address, 4 for a scalar."""
        return 8 if self.is_buffer else 4


@dataclass
class KernelInputs:
    """Integer inputs of one kernel call, already quantized: memory arrays, query arrays and
    scalars, by argument name."""

    arrays: dict[str, np.ndarray]
    scalars: dict[str, int] = field(default_factory=dict)


@dataclass
class KernelOutputs:
    """What a kernel call returns: `indices` [queries, k] uint32 ascending (top-k mode), or
    `bitmap` [queries, ceil(n/32)] uint32 (threshold mode), and the cycles the call took."""

    indices: np.ndarray | None = None
    bitmap: np.ndarray | None = None
    cycles: int = 0


# -- cycle model -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineParams:
    """Constants of one kernel's RTL engine; the RTL bench calibrates them (see `ENGINES`).

    lanes: dot-product units working in parallel; each takes one beat (`beat_bytes` int8
        elements of a memory row) against one query vector per cycle (bm25: posting updates
        per cycle).
    ports: 512-bit HBM ports of the memory, one per memory buffer (each in its own
        pseudo-channel), each reading one beat per cycle.
    pipeline_latency: cycles from the first beat read to the first score.
    drain_per_k: cycles per selected index written out (the RTL packs 16 to a beat: 1/16).
    scan_bits: candidates per cycle of the index-ascending scan that emits the selection.
    control_overhead: ap_start to first read plus last write to ap_done (descriptor set-up,
        query load, AXI write response).
    slots: queries whose scores the engine keeps at once (0: as many as lanes).
    pass_overhead: cycles per pass over the memory besides streaming it (query load).
    topk_scans: index-order scans of a query's scores in top-k mode (each `n / scan_bits`
        cycles): the scan that emits the selection, plus in the RTL one that gathers the
        scores of the histogram bin holding the k-th largest (bitmap mode: one scan).
    select_overhead: cycles per query of a top-k selection besides its scans and drain
        (histogram scans, taking the k-th bin's candidates, the threshold search);
        data-dependent in the RTL, fitted on the bench's random data.
    stage_overhead, stage_per_beat: the pre-phase that copies staged memory beats (`stage`)
        into the memory before the scan: cycles once when any beat is staged (the first
        read's and the last write response's latency), and per beat (its 68-byte row read
        on the query port and cut into two chunks, its write issued). Fitted on the RTL in
        cosim (Verilator, 32-cycle HBM latencies; vector_search, n = 4096): 81 / 148 / 633 /
        2039 cycles for 3 / 24 / 166 / 574 beats against 75 / 147 / 637 / 2045 modeled.
    """

    lanes: int
    ports: int
    beat_bytes: int = BEAT_BYTES
    clock_hz: float = DEFAULT_CLOCK_HZ
    pipeline_latency: int = 32
    drain_per_k: float = 1
    scan_bits: int = 32
    control_overhead: int = 160
    slots: int = 0
    pass_overhead: int = 0
    topk_scans: int = 1
    select_overhead: int = 0
    stage_overhead: int = 64
    stage_per_beat: float = 3.45

    def with_(self, **changes: Any) -> EngineParams:
        """A copy with some constants changed (calibration)."""
        return replace(self, **changes)


#: The RTL engine's constants (fpga/rtl/hm_engine.v at its default parameters,
#: `engine.PARAMS`: 8 lanes, 8 slots, 64 scores per scan cycle, 16 indices per output beat),
#: calibrated against its cycle counts (tests/rtl/test_cycles.py,
#: bench/results/rtl_cycles.json: within 5%).
_RTL = {
    "lanes": _engine.LANES,
    "ports": 2,
    "slots": _engine.SLOTS,
    "scan_bits": _engine.SCAN,
    "drain_per_k": 1 / 16,
    "pipeline_latency": 8,
    "control_overhead": 25,
    "pass_overhead": 25,
    "topk_scans": 2,
}

#: Every kernel's engine constants, in one place.
ENGINES: dict[str, EngineParams] = {
    "token_indexer": EngineParams(**_RTL, select_overhead=120),
    # Quest scores (max over heads of bounds) crowd the k-th histogram bin: taking its
    # candidates one per cycle costs about one more scan
    "page_indexer": EngineParams(**{**_RTL, "topk_scans": 3}, select_overhead=200),
    "block_gate": EngineParams(**_RTL, select_overhead=50),
    # k = n / 2 at 4k: the index drain, not the scan, paces the emit scan
    "vector_search": EngineParams(**_RTL, select_overhead=0),
    "bm25": EngineParams(lanes=2, ports=3),  # no RTL: not calibrated
}


def engine_passes(params: EngineParams, *, queries: Any, heads: int = 1) -> Any:
    """Passes of the RTL over the memory: each loads up to `lanes` query vectors (query x
    head), whole queries when heads <= lanes (at most `slots` queries at once), else one
    query's heads `lanes` at a time. `queries` may be an int array (one entry per group of
    queries sharing a segment): the passes of each group."""
    lanes, heads = params.lanes, max(int(heads), 1)
    q = np.maximum(np.asarray(queries, dtype=np.int64), 1)
    if heads > lanes:
        passes = q * -(-heads // lanes)
    else:
        per_pass = min(lanes // heads, params.slots or lanes)
        passes = -(-q // per_pass)
    return int(passes) if passes.ndim == 0 else passes


def segment_groups(
    segs: np.ndarray | None, *, n: int, queries: int
) -> tuple[np.ndarray, np.ndarray]:
    """The groups the engine streams: runs of CONSECUTIVE queries with the same segment
    (base, rows). Returns (rows of each group, queries in it), int64 arrays; no segs is one
    group of every query over rows [0, n)."""
    if segs is None or np.size(segs) == 0:
        return np.array([int(n)], dtype=np.int64), np.array([max(int(queries), 1)], np.int64)
    segs = np.asarray(segs).reshape(-1, 2).astype(np.int64)
    new = np.ones(segs.shape[0], dtype=bool)
    new[1:] = (segs[1:] != segs[:-1]).any(axis=1)
    starts = np.flatnonzero(new)
    counts = np.diff(np.append(starts, segs.shape[0]))
    return segs[starts, 1], counts


def engine_cycles(
    params: EngineParams,
    *,
    port_bytes: Sequence[Any],
    lane_ops: Any,
    n: int,
    k: int,
    queries: Any,
    bitmap: bool = False,
    passes: Any = 1,
    rows: Any = None,
) -> int:
    """The cycle model shared by every engine, summed over the groups g of consecutive
    queries that share a segment (one group, rows = n, for a single-memory call):

        control_overhead
        + sum over g of [ max(max over ports of ceil(port_bytes_g / beat_bytes),
                              ceil(lane_ops_g / lanes))
                          + pipeline_latency + passes_g * pass_overhead
                          + queries_g * (ceil(scanned_g / scan_bits) * (1 if bitmap else topk_scans)
                                         + (0 if bitmap else select_overhead + ceil(drain_per_k * k))) ]

    scanned_g is the group's rows in top-k mode, and n (the call's largest rows, the width of
    every bitmap row) in threshold mode. `port_bytes` (one entry per port), `lane_ops`,
    `queries`, `passes` and `rows` are ints, or int arrays with one entry per group.

    Each memory port streams one beat per cycle (with balanced ports that is
    ceil(bytes / (beat_bytes * ports))) unless the lanes are the bottleneck (`lane_ops`:
    lane-cycles of all the group's passes); the selection of each query is an index-ascending
    scan of its scores plus, in top-k mode, a second scan that gathers the k-th bin's
    candidates (`topk_scans`), finding the threshold and writing the indices.
    """
    if len(port_bytes) > params.ports:
        raise InputError("port_bytes", f"{len(port_bytes)} streams on {params.ports} ports")
    rows = np.asarray(n if rows is None else rows, dtype=np.int64)
    stream = np.zeros_like(rows)
    for b in port_bytes:
        stream = np.maximum(stream, -(-np.asarray(b, dtype=np.int64) // params.beat_bytes))
    compute = -(-np.asarray(lane_ops, dtype=np.int64) // params.lanes)
    scanned = np.asarray(int(n), dtype=np.int64) if bitmap else rows
    scan = -(-scanned // params.scan_bits) * (1 if bitmap else params.topk_scans)
    drain = 0 if bitmap else params.select_overhead + math.ceil(params.drain_per_k * int(k))
    groups = (
        np.maximum(stream, compute)
        + params.pipeline_latency
        + np.asarray(passes, dtype=np.int64) * params.pass_overhead
        + np.asarray(queries, dtype=np.int64) * (scan + drain)
    )
    return int(params.control_overhead + np.sum(groups))


def stage_cycles(params: EngineParams, staged: int) -> int:
    """Cycles of the pre-phase that copies `staged` memory beats from the `stage` buffer
    into the memory (0 when nothing is staged): stage_overhead + ceil(staged *
    stage_per_beat).
    Every kernel's modeled call time adds it to `engine_cycles`."""
    staged = int(staged)
    if staged <= 0:
        return 0
    return params.stage_overhead + math.ceil(staged * params.stage_per_beat)


def seconds(cycles: int, clock_hz: float = DEFAULT_CLOCK_HZ) -> float:
    """Modeled or simulated time of `cycles` at `clock_hz`."""
    if clock_hz <= 0:
        raise InputError("clock_hz", f"expected a positive clock, got {clock_hz}")
    return float(cycles) / float(clock_hz)


# -- formats ---------------------------------------------------------------------------------

INT8_MAX = 127
INT16_MAX = 32767
UINT16_MAX = 65535
#: Row exponents of the int8 dot-product kernels' memory rows (block floating point): row r
#: is stored as int8 K_r = rint(r_r / s * 2**x_r), r_r the row in the stored basis
#: (`to_stored`), s the per-channel scales (the fitted max |r| / 127), x_r the largest
#: exponent in [ROW_EXP_MIN, ROW_EXP_MAX] that keeps |K_r| <= 127; the card gets
#: shift_r = ROW_EXP_MAX - x_r in [0, MAX_SHIFT] (uint8) and computes (Q . K_r) << shift_r.
#: ROW_EXP_MIN < 0 is the headroom for appends: a row up to 2**-ROW_EXP_MIN = 8x beyond the
#: fitted range of the stored basis quantizes without saturating; beyond that it saturates.
#: In the original channels that is statistical: a row within 4x of the fitted per-channel
#: range lands beyond 8x in the stored basis only when most of its channels sit at their
#: extremes together (bench/quant_recall.py: none of ~1.2M such appended rows did).
#: ROW_EXP_MAX: a row up to 16x below the fitted range still gets the full int8 range.
ROW_EXP_MIN = -3
ROW_EXP_MAX = 4
MAX_SHIFT = ROW_EXP_MAX - ROW_EXP_MIN
#: Exponent of the channel balance: the int8 kernels divide channel c of the keys by
#: rms_c ** BALANCE before the rotation (and multiply the query by it); page_indexer's
#: per-channel scales are max|.| ** BALANCE * (the largest max|.|) ** (1 - BALANCE). 1/2
#: splits a channel's range evenly between the keys and the folded query, which minimizes
#: ||k / b|| * ||q * b||, the scale of both rounding errors, when the queries' channels are
#: alike (or unknown, as at fit time); 1 (every key channel equalized) would put all of an
#: outlier channel's range into the query.
BALANCE = 0.5
#: Widest row the dot accumulators hold exactly (127 * 127 * dim << MAX_SHIFT < 2**63).
MAX_DIM = 65536
#: Candidates per chunk of the golden models (bounds their temporary memory).
CHUNK = 16384


def as_float64(name: str, value: Any, ndim: int | None = None) -> np.ndarray:
    """A float64 numpy copy of an array or a (CPU or GPU) torch tensor; NaN/Inf rejected."""
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().to("cpu").double().numpy()
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(name, f"expected a float array, got {type(value).__name__}") from exc
    if ndim is not None and arr.ndim != ndim:
        raise InputError(name, f"expected {ndim} dimensions, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputError(name, "contains NaN or Inf")
    return arr


def as_int_array(name: str, value: Any, ndim: int | None = None) -> np.ndarray:
    """An int64 numpy copy of an integer array or tensor."""
    if hasattr(value, "detach"):
        value = value.detach().to("cpu").numpy()
    arr = np.asarray(value)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InputError(name, f"expected an integer array, got dtype {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise InputError(name, f"expected {ndim} dimensions, got shape {arr.shape}")
    return arr.astype(np.int64)


def check_dim(name: str, arr: np.ndarray, axis: int, expected: int, what: str) -> None:
    if arr.shape[axis] != expected:
        raise InputError(
            name, f"axis {axis} has length {arr.shape[axis]}, expected {expected} ({what})"
        )


def check_rows(name: str, arr: np.ndarray, n: int, what: str) -> None:
    """A memory buffer holds at least the `n` rows the call scans."""
    if arr.shape[0] < n:
        raise InputError(name, f"holds {arr.shape[0]} {what}, fewer than n={n}")


@dataclass(frozen=True)
class ChannelState:
    """Fitted state of the dot-product kernels: per-channel scales `scale` [D] of the stored
    basis, stored value ~= scale * int value * 2**-row exponent; with `balance` [D] (the
    int8 kernels), the stored basis is `rotate(value / balance)`, without it the channels
    themselves (page_indexer). A stacked state (`stack_channels`) holds the arrays of
    several slots, [S, D]; quantizing with it takes a slot per row."""

    scale: np.ndarray
    balance: np.ndarray | None = None

    @property
    def rotated(self) -> bool:
        """Whether rows are stored balanced and rotated (`to_stored`)."""
        return self.balance is not None

    @property
    def dim(self) -> int:
        return int(self.scale.shape[-1])

    @property
    def stacked(self) -> bool:
        return self.scale.ndim == 2


def stack_channels(states: Sequence[ChannelState]) -> ChannelState:
    """The states of several slots (same channels) as one stacked state, scales [S, D]."""
    states = list(states)
    if not states:
        raise InputError("states", "expected at least one state to stack")
    for i, st in enumerate(states):
        if not isinstance(st, ChannelState) or st.stacked:
            raise InputError("states", f"entry {i} is not a single slot's ChannelState")
        if st.dim != states[0].dim:
            raise InputError("states", f"entry {i} has {st.dim} channels, entry 0 {states[0].dim}")
        if st.rotated != states[0].rotated:
            raise InputError("states", f"entry {i} and entry 0 store different bases")
    balance = np.stack([st.balance for st in states]) if states[0].rotated else None
    return ChannelState(np.stack([st.scale for st in states]), balance)


def _slot_rows(state: ChannelState, slots: Any, rows: int, what: str) -> np.ndarray | None:
    """The slot of each of `rows` rows (None for a single state); see `slot_scale`."""
    if slots is None:
        if state.stacked:
            raise InputError("slots", f"a stacked state needs slots, one per {what}")
        return None
    if not state.stacked:
        raise InputError("slots", "slots need a stacked state (spec.stack_states)")
    idx = as_int_array("slots", slots, ndim=1)
    if idx.shape[0] != rows:
        raise InputError("slots", f"has {idx.shape[0]} entries, expected {rows} (one per {what})")
    if idx.size and (idx.min() < 0 or idx.max() >= state.scale.shape[0]):
        raise InputError("slots", f"expected slots in [0, {state.scale.shape[0]})")
    return idx


def slot_scale(state: ChannelState, slots: Any, rows: int, what: str) -> np.ndarray:
    """The channel scales to quantize `rows` rows with: [D] for a single state, [rows, D]
    (the row's slot's scales, one fancy index, no loop over slots) for a stacked state with
    `slots` (int [rows], each in [0, S))."""
    idx = _slot_rows(state, slots, rows, what)
    return state.scale if idx is None else state.scale[idx]


def slot_arrays(
    state: ChannelState, slots: Any, rows: int, what: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """(scale, balance) for `rows` rows, as `slot_scale` (balance None: not rotated)."""
    idx = _slot_rows(state, slots, rows, what)
    if idx is None:
        return state.scale, state.balance
    return state.scale[idx], None if state.balance is None else state.balance[idx]


# -- the stored basis of the int8 kernels ------------------------------------------------------


#: Values per chunk of rows that `rotate` transforms at once (stays in cache).
ROTATE_CHUNK = 1 << 17


@functools.lru_cache(maxsize=32)
def rotation_signs(dim: int) -> np.ndarray:
    """The fixed +-1 of each channel that precedes the Hadamard blocks: the top bit of the
    splitmix64 hash of the channel index (reproducible everywhere, no random generator)."""
    z = (np.arange(int(dim), dtype=np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    signs = np.where(z >> np.uint64(63), -1.0, 1.0)
    signs.flags.writeable = False
    return signs


def rotation_blocks(dim: int) -> list[int]:
    """The Hadamard block sizes of `rotate` over `dim` channels: the powers of two of dim's
    binary expansion, largest first (one block when dim is a power of two)."""
    return [1 << b for b in range(int(dim).bit_length() - 1, -1, -1) if int(dim) >> b & 1]


@functools.lru_cache(maxsize=32)
def _hadamard_factors(m: int) -> tuple[np.ndarray, np.ndarray]:
    """(H_a, H_b^T / sqrt(m)) with a * b = m, a = 2**floor(log2(m) / 2): the Sylvester
    Hadamard matrix H_m = H_a (x) H_b (Kronecker), so H_m x / sqrt(m) over a row x viewed
    as [a, b] is H_a X H_b^T / sqrt(m). Read-only."""
    a = 1 << (m.bit_length() - 1) // 2
    b = m // a

    def sylvester(n: int) -> np.ndarray:
        h = np.ones((1, 1))
        while h.shape[0] < n:
            h = np.block([[h, h], [h, -h]])
        return h

    left, right = sylvester(a), sylvester(b).T / math.sqrt(m)
    left.flags.writeable = right.flags.writeable = False
    return left, right


def _walsh_hadamard(x: np.ndarray) -> np.ndarray:
    """H_m x / sqrt(m) over the last axis of a 2-D array (m a power of two), H_m the
    Sylvester Hadamard matrix (symmetric; H_m H_m = m I); a new array. Two small matrix
    products per row (`_hadamard_factors`), stacked: every row is its own product of the
    same shapes, so a row's result never depends on the rows beside it (appended rows
    quantize alone as within the whole memory) and no product is large enough to thread."""
    rows, m = x.shape
    if m == 1:
        return np.array(x, dtype=np.float64, copy=True)
    left, right = _hadamard_factors(m)
    a = left.shape[0]
    return np.matmul(np.matmul(left, x.reshape(rows, a, m // a)), right).reshape(rows, m)


def rotate(x: np.ndarray, inverse: bool = False) -> np.ndarray:
    """The fixed orthonormal rotation R of the int8 kernels' stored basis over the last axis
    (a new float64 array): R = blockdiag(H_b / sqrt(b)) diag(signs), the Hadamard blocks of
    `rotation_blocks`. A randomized Hadamard transform: it spreads a channel far larger
    than the others (an outlier channel, or one heavy-tailed entry) over every channel of
    its block, so no channel's range is set by a few values. `inverse`: R^T = R^-1.

    Each row's result is the same float operations whatever rows surround it
    (`_walsh_hadamard`)."""
    x = np.asarray(x, dtype=np.float64)
    dim = x.shape[-1]
    signs = rotation_signs(dim)
    blocks = rotation_blocks(dim)
    flat = x.reshape(-1, dim)
    out = np.empty_like(flat)
    step = max(1, ROTATE_CHUNK // max(dim, 1))
    for first in range(0, flat.shape[0], step):  # rows in cache-sized chunks
        part = flat[first : first + step]
        part = part * signs if not inverse else part
        if len(blocks) == 1:
            part = _walsh_hadamard(part)
        else:
            pieces, start = [], 0
            for size in blocks:
                pieces.append(_walsh_hadamard(part[:, start : start + size]))
                start += size
            part = np.concatenate(pieces, axis=1)
        out[first : first + step] = part * signs if inverse else part
    return out.reshape(x.shape)


def to_stored(state: ChannelState, value: np.ndarray, slots: Any = None, what: str = "row"):
    """Float rows [N, D] in the state's stored basis divided by the channel scales (the
    values `quantize_rows` rounds after its row exponent): rotate(value / balance) / scale,
    or value / scale without a balance."""
    scale, balance = slot_arrays(state, slots, value.shape[0], what)
    if balance is not None:
        value = rotate(value / balance)
    return value / scale


def fold(state: ChannelState, q: np.ndarray, slots: Any = None) -> np.ndarray:
    """A float query [Q, ..., D] in the stored basis with the channel scales folded in:
    rotate(q * balance) * scale (q * scale without a balance), so that for a memory row k,
    fold(q) . to_stored(k) = q . k."""
    scale, balance = slot_arrays(state, slots, q.shape[0], "query")
    expand = (q.shape[0], *([1] * (q.ndim - 2)), q.shape[-1])
    if scale.ndim == 2:  # [Q, D] -> [Q, 1, ..., D]
        scale = scale.reshape(expand)
        balance = None if balance is None else balance.reshape(expand)
    if balance is not None:
        q = rotate(q * balance)
    return q * scale


def dequantize_rows(
    state: ChannelState, ints: np.ndarray, shifts: np.ndarray, slots: Any = None
) -> np.ndarray:
    """The float rows the int8 rows and their shifts stand for (the inverse of
    `quantize_rows`, up to rounding and saturation)."""
    scale, balance = slot_arrays(state, slots, ints.shape[0], "memory row")
    exp = ROW_EXP_MAX - np.asarray(shifts, dtype=np.float64)
    stored = ints.astype(np.float64) * np.exp2(-exp)[:, None] * scale
    return stored if balance is None else rotate(stored, inverse=True) * balance


def _nonzero(values: np.ndarray) -> np.ndarray:
    """Per-channel statistics with every zero channel replaced by the largest (1 when all
    are zero), so appended values in a channel that was zero still quantize."""
    fallback = values.max() if values.size and values.max() > 0 else 1.0
    return np.where(values > 0, values, fallback)


def fit_channels(
    *named: tuple[str, Any], qmax: int = INT8_MAX, headroom: float = 1.0, balance: float = 1.0
) -> ChannelState:
    """Per-channel scales headroom * m_c ** balance * M ** (1 - balance) / qmax over float
    arrays [N, D] of one memory, m_c = max |x| of channel c, M the largest m_c: with
    balance 1 every channel's range maps to qmax / headroom; below 1 a channel's scale is
    never smaller (its headroom is at least `headroom`), and a small channel's range moves
    from the stored values into the folded query (`BALANCE`).

    A channel that is all zero takes the largest channel scale (headroom / qmax when
    everything is zero), so appended values in it still quantize.
    """
    arrays = [as_float64(name, value, ndim=2) for name, value in named]
    for (name, _), arr in zip(named[1:], arrays[1:], strict=True):
        check_dim(name, arr, 1, arrays[0].shape[1], f"channels of {named[0][0]}")
    d = arrays[0].shape[1]
    absmax = np.zeros(d)
    for arr in arrays:
        if arr.size:
            absmax = np.maximum(absmax, np.abs(arr).max(axis=0))
    absmax = _nonzero(absmax)
    peak = absmax.max() if d else 1.0
    return ChannelState(absmax**balance * peak ** (1.0 - balance) * headroom / qmax)


def fit_rotated(name: str, value: Any) -> ChannelState:
    """The stored basis of an int8 kernel's memory [N, D]: balance b_c = rms_c ** BALANCE
    (rms over the rows; a zero channel takes the largest), then per-channel scales
    max |rotate(x / b)| / 127 over the rows (a zero channel takes the largest)."""
    arr = as_float64(name, value, ndim=2)
    rms = np.sqrt(np.mean(arr * arr, axis=0)) if arr.shape[0] else np.zeros(arr.shape[1])
    balance = _nonzero(rms) ** BALANCE
    stored = rotate(arr / balance)
    absmax = np.abs(stored).max(axis=0) if stored.shape[0] else np.zeros(arr.shape[1])
    return ChannelState(_nonzero(absmax) / INT8_MAX, balance)


def need(mapping: Mapping[str, Any], name: str, what: str) -> Any:
    """mapping[name], or an `InputError` naming what is missing (a kernel's memory or query
    given as a mapping of arrays)."""
    if not isinstance(mapping, Mapping):
        raise InputError(what, f"expected a mapping of arrays, got {type(mapping).__name__}")
    if name not in mapping:
        raise InputError(name, f"missing from the {what} (has {sorted(mapping)})")
    return mapping[name]


def quantize_rows(
    state: ChannelState,
    named: Sequence[tuple[str, Any]],
    roundings: Sequence[Any] | None = None,
    slots: Any = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Float rows [N, D] (one or more arrays sharing each row's exponent) -> (int8 arrays in
    the state's stored basis, shift uint8 [N]). `roundings`: np.rint (default), np.floor
    or np.ceil per array; clipping to +-127 (beyond 8x the fitted range) is monotone.
    `slots`: with a stacked state, the slot of each row (`slot_scale`)."""
    normalized: list[np.ndarray] = []
    for name, value in named:
        arr = as_float64(name, value, ndim=2)
        check_dim(name, arr, 1, state.dim, "channels of the fitted memory")
        if normalized:
            check_dim(name, arr, 0, normalized[0].shape[0], f"rows of {named[0][0]}")
        normalized.append(to_stored(state, arr, slots, "memory row"))
    peak = np.zeros(normalized[0].shape[0])
    for arr in normalized:
        if arr.size:
            peak = np.maximum(peak, np.abs(arr).max(axis=1))
    # the largest exponent whose scaled peak rounds to at most 127 (a row at exactly the
    # fitted range, 127.000...01 after the divisions, keeps exponent 0)
    limit = INT8_MAX + 0.5
    with np.errstate(divide="ignore"):
        exp = np.floor(np.log2(limit / np.where(peak > 0, peak, 1.0)))
    exp = np.where(peak * np.exp2(exp) >= limit, exp - 1, exp)  # guard log2 rounding
    exp = np.where(peak * np.exp2(exp + 1) < limit, exp + 1, exp)
    exp = np.where(peak > 0, exp, ROW_EXP_MAX)
    exp = np.clip(exp, ROW_EXP_MIN, ROW_EXP_MAX)
    roundings = roundings or [np.rint] * len(normalized)
    ints = [
        np.clip(rnd(arr * np.exp2(exp)[:, None]), -INT8_MAX, INT8_MAX).astype(np.int8)
        for rnd, arr in zip(roundings, normalized, strict=True)
    ]
    return ints, (ROW_EXP_MAX - exp).astype(np.uint8)


def fold_query(
    name: str,
    q: Any,
    state: ChannelState,
    ndim: int,
    axes: tuple[int, ...],
    slots: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold the state into a float query (`fold`: balance, rotation, channel scales) and
    quantize it to int8 with one absmax scale t per query over `axes`. `slots`: with a
    stacked state, the slot of each query (`slot_scale`).

    Returns (int8 query, t with 0 for an all-zero query, shaped to broadcast): for a memory
    row, float q . k ~= t * 2**-ROW_EXP_MAX * ((Q . K) << shift).
    """
    q = as_float64(name, q, ndim=ndim)
    check_dim(name, q, -1, state.dim, "channels of the fitted memory")
    folded = fold(state, q, slots)
    t = np.abs(folded).max(axis=axes, keepdims=True) / INT8_MAX if folded.size else folded
    safe = np.where(t > 0, t, 1.0)
    ints = np.clip(np.rint(folded / safe), -INT8_MAX, INT8_MAX).astype(np.int8)
    return ints, t


#: Bytes of one block of rows converted to float for a matmul: small enough to stay in cache
#: between its conversion and its use.
DOT_BLOCK_BYTES = 1 << 21


def magnitude(dtype: Any) -> int:
    """The largest |value| of an integer dtype (128 for int8: -128 is representable)."""
    info = np.iinfo(dtype)
    return max(-int(info.min), int(info.max))


def exact_float(bound: int) -> type | None:
    """The narrowest float type in which integer arithmetic up to `bound` is exact.

    Every integer of magnitude <= 2**24 (float32) or 2**53 (float64) is representable. A dot
    product of integers whose |products| sum to at most `bound` has every product and every
    partial sum, in any order and blocking a BLAS picks, with or without FMA, an integer of
    magnitude <= bound: each rounding is then the identity and the float result is the
    integer one. None when neither type is exact.
    """
    if bound <= 2**24:
        return np.float32
    if bound <= 2**53:
        return np.float64
    return None


def exact_dot(queries: np.ndarray, *keys: np.ndarray) -> np.ndarray:
    """Integer dot products of int queries [..., D] with int rows [n, D], through a float
    BLAS matmul where `exact_float` proves it exact (as int32 on the card); returns the
    float array of exact integers, or int64 where no float type is exact.

    Several key arrays [n, D_i] act as one [n, sum D_i] (channels concatenated, no copy of
    the whole memory); `queries` then has sum D_i channels.
    """
    dim = sum(k.shape[-1] for k in keys)
    if queries.shape[-1] != dim:
        raise InputError("q", f"has {queries.shape[-1]} channels, the rows {dim}")
    n = keys[0].shape[0]
    bound = magnitude(queries.dtype) * max(magnitude(k.dtype) for k in keys) * dim
    if bound >= 2**63:
        raise InputError("dim", f"{dim} channels overflow an int64 accumulator")
    ftype = exact_float(bound)
    if ftype is None:  # wider than float64's exact range: integer einsum, chunked
        q = queries.astype(np.int64)
        out = np.empty((*queries.shape[:-1], n), dtype=np.int64)
        for start in range(0, n, CHUNK):
            block = np.concatenate([k[start : start + CHUNK] for k in keys], axis=-1)
            out[..., start : start + CHUNK] = np.einsum("...d,nd->...n", q, block.astype(np.int64))
        return out
    q = queries.reshape(-1, dim).astype(ftype)
    out = np.empty((q.shape[0], n), dtype=ftype)
    rows = max(1, DOT_BLOCK_BYTES // (dim * np.dtype(ftype).itemsize))
    block = np.empty((min(rows, n), dim), dtype=ftype)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        view = block[: stop - start]
        col = 0
        for k in keys:  # convert in place: one pass over the integer rows
            view[:, col : col + k.shape[-1]] = k[start:stop]
            col += k.shape[-1]
        np.matmul(q, view.T, out=out[:, start:stop])
    return out.reshape(*queries.shape[:-1], n)


def int_dot(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Exact integer dot products: int8 queries [..., D] x int8 or int16 keys [n, D] ->
    int64 [..., n] (the card's int32 accumulation; `exact_dot` says why floats are exact)."""
    if keys.shape[-1] > MAX_DIM:
        raise InputError("dim", f"expected at most {MAX_DIM} channels, got {keys.shape[-1]}")
    return exact_dot(queries, keys).astype(np.int64)


def check_shifts(shifts: np.ndarray, n: int) -> np.ndarray:
    """The first n row shifts, as int64, each in [0, MAX_SHIFT]."""
    check_rows("shifts", shifts, n, "rows")
    out = shifts[:n].astype(np.int64)
    if out.size and out.max() > MAX_SHIFT:
        raise InputError("shifts", f"expected row shifts in [0, {MAX_SHIFT}]")
    return out


# -- segments --------------------------------------------------------------------------------

#: The per-query segment buffer of the kernels with RTL: uint32 [queries, 2], (base, rows).
SEGS = "segs"


def whole_segments(queries: int, n: int) -> np.ndarray:
    """segs for a single-memory call: every query scans rows [0, n)."""
    segs = np.zeros((int(queries), 2), dtype=np.uint32)
    segs[:, 1] = int(n)
    return segs


def as_segs(segs: Any, queries: int) -> np.ndarray:
    """Per-query (base, rows) as the uint32 [queries, 2] `segs` buffer; values checked
    against n and the memory by `KernelSpec.segments` at the call."""
    arr = as_int_array(SEGS, segs, ndim=2)
    if arr.shape != (int(queries), 2):
        raise InputError(SEGS, f"expected shape [{queries}, 2] (base, rows), got {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= 2**32):
        raise InputError(SEGS, "expected uint32 values (base, rows)")
    return arr.astype(np.uint32)


def check_segments(
    segs: Any,
    *,
    n: int,
    queries: int | None = None,
    k: int | None = None,
    held: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Check a call's segments and return (base, rows), int64 [queries] each. Query i scans
    memory rows [base_i, base_i + rows_i): rows_i in [1, n]; with `queries`, one segment
    per query; with `k` (top-k mode), k <= rows_i; with `held` (rows the memory buffer
    holds), base_i + rows_i <= held. `InputError` naming segs, or k. A host can run it on
    its copy of segs before a launch: the card refuses an invalid segment by writing
    nothing."""
    arr = np.asarray(segs)
    expect = "[queries, 2]" if queries is None else f"[{queries}, 2]"
    if arr.ndim != 2 or arr.shape[1] != 2 or (queries is not None and arr.shape[0] != queries):
        raise InputError(SEGS, f"expected shape {expect} (base, rows), got {arr.shape}")
    base, rows = arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64)
    if not len(rows):
        return base, rows
    if rows.min() < 1 or rows.max() > n:
        bad = int(np.flatnonzero((rows < 1) | (rows > n))[0])
        raise InputError(SEGS, f"query {bad} scans {int(rows[bad])} rows, expected 1..n={n}")
    if held is not None and (base + rows).max() > held:
        bad = int(np.argmax(base + rows))
        raise InputError(
            SEGS,
            f"query {bad} scans rows [{int(base[bad])}, {int(base[bad] + rows[bad])}) of a "
            f"memory that holds {held}",
        )
    if k is not None and k > rows.min():
        bad = int(np.argmin(rows))
        raise InputError("k", f"k={k} exceeds the {int(rows[bad])} rows of query {bad}'s segment")
    return base, rows


def with_segs(arrays: dict[str, np.ndarray], segs: Any, queries: int) -> dict[str, np.ndarray]:
    """A quantized query's arrays, with the `segs` buffer when segments are given (else
    `KernelSpec.bind` fills (0, n) per query)."""
    if segs is not None:
        arrays[SEGS] = as_segs(segs, queries)
    return arrays


def shape_segs(inputs: KernelInputs) -> np.ndarray | None:
    """The segs of a call for the cycle model (None: a single-memory call)."""
    return inputs.arrays.get(SEGS)


# -- staged appends: memory beats copied in before the scan --------------------------------

#: The staged-beats buffer of the kernels with RTL: uint32 [staged, STAGE_WORDS], riding on
#: the query port (written with the query and the segments: one PCIe transaction).
STAGE = "stage"
#: The scalar that says how many beats `stage` holds (0: none, the call as without staging).
STAGED = "staged"
#: Words per staged beat: word 0 = STAGE_PORT_B (memory port b) or 0 (port a) | the beat
#: index (byte offset // BEAT_BYTES in that memory buffer), words 1..16 = the beat's 64 bytes.
STAGE_WORDS = 1 + BEAT_BYTES // 4
STAGE_PORT_B = 1 << 31
#: The largest beat index word 0 holds.
STAGE_INDEX_MAX = STAGE_PORT_B - 1


def stage_args(bank: int) -> tuple[Arg, Arg]:
    """The two arguments a kernel with RTL takes last (after segs, so every other argument
    keeps its register offset): the `stage` buffer, in the segments' HBM bank (it rides on
    the query port beside them), and the `staged` scalar."""
    return (
        Arg(STAGE, "uint32", f"[staged, {STAGE_WORDS}]", "in", bank, "memory beats to copy in"),
        Arg(STAGED, "uint32", "scalar", "scalar", None, "beats in stage (0: none)"),
    )


def empty_stage() -> np.ndarray:
    """A stage of no beats (uint32 [0, STAGE_WORDS])."""
    return np.zeros((0, STAGE_WORDS), dtype=np.uint32)


def beats_of(offsets: Any, sizes: Any) -> np.ndarray:
    """The beat indices (byte offset // BEAT_BYTES) that byte ranges [offsets[i],
    offsets[i] + sizes[i]) touch, ascending, each once (empty ranges touch none)."""
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1)
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1)
    keep = sizes > 0
    first = offsets[keep] // BEAT_BYTES
    count = (offsets[keep] + sizes[keep] - 1) // BEAT_BYTES - first + 1
    if not count.size:
        return np.zeros(0, dtype=np.int64)
    beats = np.repeat(first - (np.cumsum(count) - count), count) + np.arange(int(count.sum()))
    return np.unique(beats)


def compose_stage(memory: Sequence[np.ndarray], beats: Sequence[Any]) -> np.ndarray:
    """The `stage` buffer that makes the card's memory equal to `memory` on the given beats:
    for port p (0 = a, 1 = b) and each beat index in beats[p], the 64 bytes of memory[p]'s
    bytes at that beat (zeros past its end). `memory` is the host's exact mirror of the
    card's memory buffers (any arrays; their bytes), so a whole beat is right even where it
    also holds rows that did not change. Returns uint32 [staged, STAGE_WORDS]."""
    if len(memory) != len(beats) or len(memory) > 2:
        raise InputError(STAGE, f"expected beats for each of {len(memory)} memory ports (<= 2)")
    parts = []
    for port, (array, which) in enumerate(zip(memory, beats, strict=True)):
        raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        idx = as_int_array(STAGE, which, ndim=1)
        held = -(-raw.nbytes // BEAT_BYTES)
        if idx.size and (idx.min() < 0 or idx.max() >= held):
            raise InputError(STAGE, f"a beat outside port {port}'s {held} beats")
        part = np.zeros((idx.size, STAGE_WORDS), dtype=np.uint32)
        part[:, 0] = idx.astype(np.uint32) | np.uint32(STAGE_PORT_B if port else 0)
        data = part[:, 1:].view(np.uint8)  # [beats, 64]: the beat's bytes, little-endian words
        whole = raw.nbytes // BEAT_BYTES
        full = idx < whole
        data[full] = raw[: whole * BEAT_BYTES].reshape(whole, BEAT_BYTES)[idx[full]]
        if (~full).any():  # the buffer's last, partial beat
            tail = raw[whole * BEAT_BYTES :]
            data[~full, : tail.size] = tail
        parts.append(part)
    return np.concatenate(parts) if parts else empty_stage()


def check_stage(stage: Any, staged: int, memory_bytes: Sequence[int]) -> tuple[np.ndarray, ...]:
    """Check a call's stage and return, per memory port, (beat indices int64, beat bytes
    uint8 [beats, 64]) interleaved: (idx_a, data_a, idx_b, data_b). Every beat must start
    inside its buffer (index < ceil(nbytes / 64)) and name port a or b; `InputError` naming
    stage or staged. The card refuses such a call (nothing written, memory unchanged)."""
    staged = int(staged)
    arr = np.asarray(stage)
    if arr.dtype != np.uint32 or arr.ndim != 2 or arr.shape[1] != STAGE_WORDS:
        raise InputError(
            STAGE, f"expected uint32 [staged, {STAGE_WORDS}], got {arr.dtype} {arr.shape}"
        )
    if arr.shape[0] < staged:
        raise InputError(STAGED, f"is {staged}, the stage holds {arr.shape[0]} beats")
    arr = arr[:staged]
    port = (arr[:, 0] >> np.uint32(31)).astype(np.int64)
    index = (arr[:, 0] & np.uint32(STAGE_INDEX_MAX)).astype(np.int64)
    out: list[np.ndarray] = []
    for p in range(2):
        mine = port == p
        if mine.any() and p >= len(memory_bytes):
            raise InputError(
                STAGE, f"a beat names memory port {p}, the kernel has {len(memory_bytes)}"
            )
        held = -(-int(memory_bytes[p]) // BEAT_BYTES) if p < len(memory_bytes) else 0
        if mine.any() and index[mine].max() >= held:
            bad = int(np.flatnonzero(mine & (index >= held))[0])
            raise InputError(
                STAGE,
                f"beat {bad} writes beat {int(index[bad])} of memory port {'ab'[p]}, "
                f"which holds {held} beats",
            )
        data = np.ascontiguousarray(arr[mine, 1:]).view(np.uint8).reshape(-1, BEAT_BYTES)
        out += [index[mine], data]
    return tuple(out)


def apply_stage(memory: Sequence[np.ndarray], stage: Any, staged: int) -> None:
    """The golden model of the pre-phase: for each of the first `staged` beats of `stage`,
    in order, bytes [idx * 64, idx * 64 + 64) of memory port a or b := the beat's bytes
    (bytes past the buffer's end dropped; a later beat of the same index wins). `memory`:
    the memory buffers' bytes (uint8, writable), changed in place. Checked first
    (`check_stage`): a bad beat changes nothing."""
    parts = check_stage(stage, staged, [m.nbytes for m in memory])
    for p, raw in enumerate(memory):
        index, data = parts[2 * p], parts[2 * p + 1]
        if not index.size:
            continue
        view = raw.reshape(-1).view(np.uint8)
        whole = view.nbytes // BEAT_BYTES
        # a repeated index: the last beat wins (the card writes them in order)
        _, last = np.unique(index[::-1], return_index=True)
        keep = np.sort(index.size - 1 - last)
        index, data = index[keep], data[keep]
        full = index < whole
        beats = view[: whole * BEAT_BYTES].reshape(whole, BEAT_BYTES)
        beats[index[full]] = data[full]
        if (~full).any():  # the last, partial beat: its bytes inside the buffer
            view[whole * BEAT_BYTES :] = data[~full][0, : view.nbytes - whole * BEAT_BYTES]


# -- the spec --------------------------------------------------------------------------------


class KernelSpec(ABC):
    """Base class of a kernel spec. Subclasses fill the class attributes and the methods."""

    name: ClassVar[str]
    args: ClassVar[tuple[Arg, ...]]
    #: Which args are the resident memory (appended; stay on the card across calls).
    memory_args: ClassVar[tuple[str, ...]]
    #: Dimensions of each input buffer, for viewing its raw bytes (`buffer_shape`): a
    #: scalar's name, that name + "+1", a literal size ("2"), or CAPACITY (rows the buffer's
    #: bytes hold).
    dims: ClassVar[dict[str, tuple[str, ...]]]

    @classmethod
    def registers(cls) -> dict[str, int]:
        """Argument name -> byte offset in the AXI4-Lite register map."""
        offsets: dict[str, int] = {}
        offset = ARGS_BASE
        for arg in cls.args:
            offsets[arg.name] = offset
            offset += arg.width_bytes + 4
        return offsets

    @classmethod
    def arg(cls, name: str) -> Arg:
        for a in cls.args:
            if a.name == name:
                return a
        raise KeyError(f"{cls.name} has no argument {name!r}")

    @classmethod
    def query_args(cls) -> tuple[str, ...]:
        """Input buffers sent per call (everything read that is not resident memory)."""
        return tuple(
            a.name for a in cls.args if a.direction == "in" and a.name not in cls.memory_args
        )

    @classmethod
    def output_args(cls) -> tuple[str, ...]:
        return tuple(a.name for a in cls.args if a.direction == "out")

    @classmethod
    def scalar_args(cls) -> tuple[str, ...]:
        return tuple(a.name for a in cls.args if a.direction == "scalar")

    @classmethod
    def _buffer_dims(cls, arg: str, scalars: Mapping[str, int]) -> list[int | None]:
        """Dimensions of buffer `arg` from the scalars; None for the CAPACITY one."""
        spec_arg = cls.arg(arg)
        if not spec_arg.is_buffer:
            raise InputError("arg", f"{cls.name}.{arg} is a scalar, not a buffer")

        def scalar(name: str) -> int:
            if name not in scalars:
                raise InputError(name, f"missing scalar of {cls.name} (shape of {arg})")
            return int(scalars[name])

        if spec_arg.direction == "out":
            if int(scalars.get("mode", MODE_TOPK)) == MODE_THRESHOLD:
                return [scalar("queries"), -(-scalar("n") // 32)]
            return [scalar("queries"), scalar("k")]
        dims: list[int | None] = []
        for dim in cls.dims[arg]:
            if dim == CAPACITY:
                dims.append(None)
            elif dim.isdigit():
                dims.append(int(dim))
            elif dim.endswith("+1"):
                dims.append(scalar(dim[:-2]) + 1)
            else:
                dims.append(scalar(dim))
        return dims

    @classmethod
    def buffer_shape(cls, arg: str, scalars: Mapping[str, int], nbytes: int) -> tuple[int, ...]:
        """The numpy shape of buffer `arg` for one call with these scalars, so a device can
        view raw bytes as the arrays `golden` takes. A memory buffer has a row capacity
        beyond the rows in use (CAPACITY: as many rows as `nbytes` holds; the scalar `n`
        says how many are scanned); other buffers use only their first bytes. `out` is
        [queries, k], or [queries, ceil(n/32)] in threshold mode."""
        dims = cls._buffer_dims(arg, scalars)
        if None in dims:
            row = int(np.prod([d for d in dims if d is not None]))
            row *= np.dtype(cls.arg(arg).dtype).itemsize
            rows = max(int(nbytes), 0) // row if row else 0
            dims = [rows if d is None else d for d in dims]
        return tuple(int(d) for d in dims)  # type: ignore[arg-type]

    @classmethod
    def buffer_nbytes(
        cls, arg: str, scalars: Mapping[str, int], capacity: int | None = None
    ) -> int:
        """Bytes buffer `arg` takes for a call with these scalars; a memory buffer needs its
        row `capacity` (rows, pages, blocks or postings it can hold)."""
        dims = cls._buffer_dims(arg, scalars)
        if None in dims:
            if capacity is None or int(capacity) < 0:
                raise InputError("capacity", f"give the row capacity of {cls.name}.{arg}")
            dims = [int(capacity) if d is None else d for d in dims]
        return int(np.prod(dims)) * np.dtype(cls.arg(arg).dtype).itemsize

    @property
    def engine(self) -> EngineParams:
        """This kernel's default engine constants (from `ENGINES`)."""
        return ENGINES[self.name]

    # -- quantization ----------------------------------------------------------------------
    @abstractmethod
    def fit(self, memory: Mapping[str, Any], **params: Any) -> Any:
        """Fit the integer formats (scales) to a float memory; returns the state."""

    @abstractmethod
    def quantize_memory(self, memory: Mapping[str, Any], state: Any) -> dict[str, np.ndarray]:
        """Float memory (all of it, or appended rows only) -> the memory buffers' arrays."""

    @abstractmethod
    def quantize_query(self, query: Mapping[str, Any], state: Any, **params: Any) -> KernelInputs:
        """Float query -> the query buffers' arrays and the per-call scalars (k, mode, ...)."""

    @abstractmethod
    def candidates(self, memory: Mapping[str, Any]) -> int:
        """Candidates in a memory (float or quantized): rows, pages, blocks or documents."""

    def stack_states(self, states: Sequence[Any]) -> Any:
        """The fitted states of several slots as one stacked state, for quantizing the rows
        (queries) of many slots at once with `slots=` (the dot-product kernels)."""
        return stack_channels(states)

    @property
    def segmented(self) -> bool:
        """Whether the kernel takes a `segs` buffer (one memory segment per query)."""
        return any(a.name == SEGS for a in self.args)

    @property
    def staging(self) -> bool:
        """Whether the kernel takes staged memory beats (`stage`, `staged`): the beats are
        copied into the memory buffers before the scan (`apply_stage`)."""
        return any(a.name == STAGE for a in self.args)

    #: Scalars a caller may leave out, with the value they then take.
    @property
    def scalar_defaults(self) -> dict[str, int]:
        return {STAGED: 0} if self.staging else {}

    def bind(
        self, memory: Mapping[str, np.ndarray], query: KernelInputs, n: int | None = None
    ) -> KernelInputs:
        """Join resident memory arrays and a quantized query into one call's inputs; `n`
        (candidates to scan) defaults to the memory's candidates. A query without a `segs`
        array scans rows [0, n) for every query: segs = (0, n) per query; one without a
        `stage` stages nothing (an empty stage, staged = 0)."""
        arrays = {name: memory[name] for name in self.memory_args}
        arrays.update(query.arrays)
        scalars = dict(query.scalars)
        scalars["n"] = self.candidates(memory) if n is None else int(n)
        if self.segmented and SEGS not in arrays:
            arrays[SEGS] = whole_segments(int(scalars.get("queries", 0)), scalars["n"])
        if self.staging and STAGE not in arrays:  # nothing staged
            arrays[STAGE] = empty_stage()
            scalars.setdefault(STAGED, 0)
        return KernelInputs(arrays, scalars)

    def complete(self, inputs: KernelInputs) -> KernelInputs:
        """The inputs with `segs` where a segmented kernel's inputs lack it (built without
        `bind`, as before segments existed): (0, n) per query, as `bind` adds it; and, for
        a kernel that takes staged beats, an empty `stage` and staged = 0 where they are
        missing. A new KernelInputs; the caller's is left alone."""
        arrays, scalars = dict(inputs.arrays), dict(inputs.scalars)
        if self.staging:
            scalars.setdefault(STAGED, 0)
            if STAGE not in arrays and scalars[STAGED] == 0:
                arrays[STAGE] = empty_stage()
        if self.segmented and SEGS not in arrays:
            n, queries = scalars.get("n"), scalars.get("queries")
            if all(isinstance(v, int | np.integer) and 0 <= v < 2**32 for v in (n, queries)):
                arrays[SEGS] = whole_segments(int(queries), int(n))  # type: ignore[arg-type]
            # else check_inputs names the bad scalar
        if arrays.keys() == inputs.arrays.keys() and scalars.keys() == inputs.scalars.keys():
            return inputs
        return KernelInputs(arrays, scalars)

    def segments(self, inputs: KernelInputs) -> tuple[np.ndarray, np.ndarray] | None:
        """The checked (base, rows) of every query, int64 [queries] each, or None for a
        kernel without segments (`check_segments`, with the rows every memory buffer
        holds)."""
        if not self.segmented:
            return None
        s = inputs.scalars
        base, rows = check_segments(
            inputs.arrays[SEGS],
            n=int(s["n"]),
            queries=int(s["queries"]),
            k=int(s["k"]) if int(s.get("mode", MODE_TOPK)) == MODE_TOPK else None,
        )
        whole = bool(len(rows)) and base.max() == 0 and rows.min() == int(s["n"])
        for name in self.memory_args:
            if whole:  # a single-memory call: the buffer must hold n rows, as before
                check_rows(name, inputs.arrays[name], int(s["n"]), "rows")
            else:
                check_segments(
                    inputs.arrays[SEGS], n=int(s["n"]), held=int(inputs.arrays[name].shape[0])
                )
        return base, rows

    def _segment_inputs(
        self, inputs: KernelInputs, which: np.ndarray | None, base: int, rows: int
    ) -> KernelInputs:
        """The single-memory call of the queries `which` over memory rows [base, base+rows)
        (`which` None: the whole call)."""
        if which is None:
            return inputs
        arrays = dict(inputs.arrays)
        for name in self.memory_args:
            arrays[name] = arrays[name][base : base + rows]
        if len(which) != int(inputs.scalars["queries"]):
            for name in self.query_args():
                if name != STAGE:  # per call, not per query
                    arrays[name] = arrays[name][which]
        scalars = {**inputs.scalars, "n": int(rows), "queries": len(which)}
        return KernelInputs(arrays, scalars)

    def emulate(
        self,
        memory: Mapping[str, Any],
        query: Mapping[str, Any],
        state: Any = None,
        **params: Any,
    ) -> KernelOutputs:
        """Fit (unless `state` is given), quantize memory and query, and run `golden`."""
        state = self.fit(memory) if state is None else state
        ints = self.quantize_memory(memory, state)
        query_ints = self.quantize_query(query, state, **params)
        return self.golden(self.bind(ints, query_ints, n=self.candidates(memory)))

    # -- the integer model -----------------------------------------------------------------
    def check_inputs(self, inputs: KernelInputs) -> None:
        """Every input buffer present with its declared dtype; every scalar present and a
        32-bit unsigned register value."""
        for arg in self.args:
            if arg.direction == "in":
                value = inputs.arrays.get(arg.name)
                if not isinstance(value, np.ndarray):
                    raise InputError(arg.name, f"missing input buffer of {self.name}")
                if value.dtype != np.dtype(arg.dtype):
                    raise InputError(arg.name, f"expected dtype {arg.dtype}, got {value.dtype}")
            elif arg.direction == "scalar":
                if arg.name not in inputs.scalars:
                    raise InputError(arg.name, f"missing scalar of {self.name}")
                value = inputs.scalars[arg.name]
                if isinstance(value, bool) or not isinstance(value, int | np.integer):
                    raise InputError(arg.name, f"expected an int, got {type(value).__name__}")
                if not 0 <= int(value) < 2**32:
                    raise InputError(arg.name, f"expected a 32-bit unsigned value, got {value}")

    @abstractmethod
    def scores(self, inputs: KernelInputs) -> np.ndarray:
        """The integer scores the engine computes, int64 [queries, n]; never leave the card."""

    @abstractmethod
    def shape(self, inputs: KernelInputs) -> dict[str, Any]:
        """The keyword arguments of `cycles` for these inputs."""

    def check_call(
        self, inputs: KernelInputs
    ) -> tuple[KernelInputs, bool, tuple[np.ndarray, np.ndarray] | None]:
        """What the card checks before it touches anything (`InputError` naming the
        argument): the inputs (`complete`d), their dtypes and scalars, the mode, n and k,
        the segments, and the staged beats (each inside its memory buffer). Returns (the
        completed inputs, threshold mode, the segments' (base, rows) or None)."""
        inputs = self.complete(inputs)
        self.check_inputs(inputs)
        mode = int(inputs.scalars.get("mode", MODE_TOPK))
        threshold = mode == MODE_THRESHOLD and "mode" in self.scalar_args()
        if not threshold and mode != MODE_TOPK:
            raise InputError("mode", f"{self.name} does not support mode {mode}")
        if threshold and int(inputs.scalars["n"]) == 0:
            raise InputError("n", "is 0: there is nothing to select from")
        if not threshold:
            _topk.check_k(inputs.scalars["k"], int(inputs.scalars["n"]))  # before any work
        segs = self.segments(inputs)
        staged = int(inputs.scalars.get(STAGED, 0))
        if staged:
            sizes = [inputs.arrays[a].nbytes for a in self.memory_args]
            check_stage(inputs.arrays[STAGE], staged, sizes)
        return inputs, threshold, segs

    def golden(self, inputs: KernelInputs) -> KernelOutputs:
        """The bit-exact model: vectorized numpy, integer arithmetic only. With segments,
        each distinct (base, rows) is one single-memory call of its queries over its rows;
        indices are relative to the segment's base, bitmap rows are ceil(n/32) words with
        the bits at or past the query's rows zero. Inputs without segs scan rows [0, n)
        (`complete`)."""
        inputs, threshold, segs = self.check_call(inputs)
        staged = int(inputs.scalars.get(STAGED, 0))
        if staged:  # the pre-phase, on copies: the caller's memory arrays are left alone
            memory = [np.array(inputs.arrays[a]) for a in self.memory_args]
            apply_stage(memory, inputs.arrays[STAGE], staged)
            arrays = {**inputs.arrays, **dict(zip(self.memory_args, memory, strict=True))}
            arrays[STAGE] = empty_stage()
            inputs = KernelInputs(arrays, {**inputs.scalars, STAGED: 0})
        extra = stage_cycles(self.engine, staged)
        n, queries = int(inputs.scalars["n"]), int(inputs.scalars["queries"])
        if segs is None or not queries or (segs[0].max() == 0 and segs[1].min() == n):
            groups = [(None, 0, n)]  # one single-memory call: the inputs as they are
        else:
            pairs = np.stack(segs, axis=1)
            uniq, inverse = np.unique(pairs, axis=0, return_inverse=True)
            order = np.argsort(inverse.reshape(-1), kind="stable")
            splits = np.cumsum(np.bincount(inverse.reshape(-1), minlength=len(uniq)))[:-1]
            groups = [
                (which, int(b), int(r))
                for which, (b, r) in zip(np.split(order, splits), uniq, strict=True)
            ]
        if threshold:
            bitmap = np.zeros((queries, -(-n // 32)), dtype=np.uint32)
            for which, base, rows in groups:
                sub = self._segment_inputs(inputs, which, base, rows)
                scores = self.scores(sub)
                part = _topk.threshold_bitmap(scores, self.thresholds(scores, sub))
                bitmap[slice(None) if which is None else which, : part.shape[1]] = part
            return KernelOutputs(bitmap=bitmap, cycles=self.cycles(**self.shape(inputs)) + extra)
        indices = np.empty((queries, int(inputs.scalars["k"])), dtype=np.uint32)
        for which, base, rows in groups:
            sub = self._segment_inputs(inputs, which, base, rows)
            picked = _topk.topk(self.scores(sub), inputs.scalars["k"])
            if which is None:
                indices = picked
            else:
                indices[which] = picked
        return KernelOutputs(indices=indices, cycles=self.cycles(**self.shape(inputs)) + extra)

    def thresholds(self, scores: np.ndarray, inputs: KernelInputs) -> np.ndarray:
        """Per-query integer thresholds of threshold mode (kernels that have one)."""
        raise InputError("mode", f"{self.name} has no threshold mode")

    @abstractmethod
    def cycles(self, **shape: Any) -> int:
        """Cycles from ap_start to ap_done for a shape at the default engine parameters."""

    def seconds(self, **shape: Any) -> float:
        """Modeled seconds of a call: `cycles` at the engine's clock."""
        params = shape.get("params") or self.engine
        return seconds(self.cycles(**shape), params.clock_hz)
