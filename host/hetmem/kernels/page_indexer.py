"""`page_indexer`: LServe / Quest page selection by an upper bound of the page's attention
scores, score(p) = max_r sum_i max(q_ri * min_pi, q_ri * max_pi), top-k pages.

Float semantics: memory {"mins": [P, D], "maxs": [P, D]} (per page and channel, the min and
max of the page's keys), query {"q": [Q, R, D]} (the R query heads of one KV group).

Formats:
- mins and maxs int16 [n, D], one scale per channel s_c = 4 * sqrt(m_c * M) / 32767, m_c
  the max |.| of channel c over mins and maxs at fit time and M the largest m_c (headroom:
  appended pages up to 4x beyond the fitted range of every channel do not saturate, a
  channel below M has more; beyond it they clip to +-32767). MIN = floor(min / s),
  MAX = ceil(max / s). The square root balances each channel's range between the pages and
  the folded query (`spec.BALANCE`): with s_c = 4 m_c / 32767 an outlier channel 10-30x
  the others made the int8 query's other channels round to a few levels; the int16 pages
  have steps to spare (a channel 30x below M still spans ~1500 steps).
  A key k of the page in the same scales, K = rint(k / s) (`quantize_keys`), satisfies
  MIN <= K <= MAX channel-wise; clipping is monotone, so this holds for saturated values
  too, although a saturated page no longer bounds its *float* keys.
- q int8 [Q, R, D]: the channel scales are folded in (q'_ri = q_ri * s_i) and the R heads
  of a query share one absmax scale t (the max over r needs one scale).
- score(p) = max_r sum_i (Q_ri >= 0 ? Q_ri * MAX_pi : Q_ri * MIN_pi) ~= bound(p) / t, an
  int8 x int16 product summed in int32 for D <= 512 (int64 in the model): the sign selects
  min or max, so it is >= max_r Q_r . K for every quantized key K of the page (the Quest
  bound, exact in integers), and since MIN * s <= min and MAX * s >= max it is also
  >= max_r Q_r . (k / s) for every float key k of an unsaturated page: quantizing the
  memory never drops a page below the (quantized-query) score of one of its keys
  (rounding to nearest would keep only the first property). tests/test_kernels.py checks
  both.

Why int16 and no row exponent (the other dot-product kernels use int8 with one): floor and
ceil each add half a step per channel on average, so with int8 the bound carries a bias
of ~0.5 * step * sum|Q| that grows with a page's step; ranking pages by it cost 3-5% recall
at k = 2048 (0.95-0.97 measured, with or without row exponents). The page summaries are
1/page_size of the keys, so the second byte is cheap.

Measured recall of the float64 top-k of the float bound (tests/test_kernel_quant.py,
seed 0: P=8192 pages of 8 Student-t(3) keys with 4 outlier channels x20, D=128, R=4 heads,
4 queries, a relevant quarter of the pages moved by 8 * Pareto(2) along the query's
direction): 1.000 / 0.997 / 0.997 for k = 64 / 256 / 2048 (the test asserts >= 0.98; 1.000 /
0.992 / 0.993 with the unbalanced scales). Random cases: bench/quant_recall.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from ..errors import InputError
from .spec import (
    BALANCE,
    CAPACITY,
    INT16_MAX,
    SEGS,
    STAGE,
    STAGE_WORDS,
    STAGED,
    Arg,
    ChannelState,
    EngineParams,
    KernelInputs,
    KernelSpec,
    as_float64,
    check_dim,
    check_rows,
    engine_cycles,
    engine_passes,
    exact_dot,
    fit_channels,
    fold_query,
    need,
    segment_groups,
    shape_segs,
    slot_scale,
    stage_args,
    with_segs,
)
from .topk import as_k

#: Range of the fitted page summaries kept free for appended pages.
HEADROOM = 4.0


def _to_int16(
    name: str, value: Any, state: ChannelState, rounding: Any, slots: Any = None
) -> np.ndarray:
    arr = as_float64(name, value, ndim=2)
    check_dim(name, arr, 1, state.dim, "channels of the fitted memory")
    scale = slot_scale(state, slots, arr.shape[0], "page")
    return np.clip(rounding(arr / scale), -INT16_MAX, INT16_MAX).astype(np.int16)


class PageIndexer(KernelSpec):
    name: ClassVar[str] = "page_indexer"
    args: ClassVar[tuple[Arg, ...]] = (
        Arg("mins", "int16", "[capacity, dim] row-major", "in", 5, "per-page channel minima"),
        Arg("maxs", "int16", "[capacity, dim] row-major", "in", 6, "per-page channel maxima"),
        Arg("q", "int8", "[queries, heads, dim] row-major", "in", 7, "query heads of a group"),
        Arg("out", "uint32", "[queries, k] ascending", "out", 25, "top-k page indices"),
        Arg("n", "uint32", "scalar", "scalar", None, "pages to scan"),
        Arg("k", "uint32", "scalar", "scalar", None, "pages to select per query"),
        Arg("queries", "uint32", "scalar", "scalar", None, "rows of q"),
        Arg("heads", "uint32", "scalar", "scalar", None, "query heads R per KV group"),
        Arg("dim", "uint32", "scalar", "scalar", None, "head dim D"),
        # last, so every other argument keeps its register offset
        Arg(SEGS, "uint32", "[queries, 2] (base, rows)", "in", 8, "memory pages per query"),
        *stage_args(8),  # staged memory beats, on the segments' bank
    )
    memory_args: ClassVar[tuple[str, ...]] = ("mins", "maxs")
    dims: ClassVar[dict[str, tuple[str, ...]]] = {
        "mins": (CAPACITY, "dim"),
        "maxs": (CAPACITY, "dim"),
        "q": ("queries", "heads", "dim"),
        SEGS: ("queries", "2"),
        STAGE: (STAGED, str(STAGE_WORDS)),
    }

    def fit(self, memory: Mapping[str, Any]) -> ChannelState:
        named = (("mins", need(memory, "mins", "memory")), ("maxs", need(memory, "maxs", "memory")))
        return fit_channels(*named, qmax=INT16_MAX, headroom=HEADROOM, balance=BALANCE)

    def quantize_memory(
        self, memory: Mapping[str, Any], state: ChannelState, slots: Any = None
    ) -> dict:
        mins = _to_int16("mins", need(memory, "mins", "memory"), state, np.floor, slots)
        maxs = _to_int16("maxs", need(memory, "maxs", "memory"), state, np.ceil, slots)
        check_dim("maxs", maxs, 0, mins.shape[0], "pages of mins")
        if (mins > maxs).any():
            raise InputError("mins", "exceeds maxs in some page and channel")
        return {"mins": mins, "maxs": maxs}

    def quantize_keys(self, keys: Any, state: ChannelState) -> np.ndarray:
        """Keys [N, D] in the pages' int16 format, rint(k / s) (for checking the bound)."""
        return _to_int16("keys", keys, state, np.rint)

    def quantize_query(
        self,
        query: Mapping[str, Any],
        state: ChannelState,
        *,
        k: int,
        slots: Any = None,
        segs: Any = None,
    ) -> KernelInputs:
        q, _ = fold_query("q", need(query, "q", "query"), state, 3, (1, 2), slots)
        scalars = {"k": as_k(k), "queries": q.shape[0], "heads": q.shape[1], "dim": state.dim}
        return KernelInputs(with_segs({"q": q}, segs, q.shape[0]), scalars)

    def candidates(self, memory: Mapping[str, Any]) -> int:
        return int(np.shape(need(memory, "mins", "memory"))[0])

    def scores(self, inputs: KernelInputs) -> np.ndarray:
        mins, maxs, q = (inputs.arrays[a] for a in ("mins", "maxs", "q"))
        s = inputs.scalars
        n, dim = int(s["n"]), int(s["dim"])
        for name, arr in (("mins", mins), ("maxs", maxs)):
            check_rows(name, arr, n, "pages")
            check_dim(name, arr, 1, dim, "dim")
        check_dim("q", q, 0, int(s["queries"]), "queries")
        check_dim("q", q, 1, int(s["heads"]), "heads")
        check_dim("q", q, 2, dim, "dim")
        # Q_ri >= 0 picks MAX, Q_ri < 0 picks MIN: one dot of [pos | neg] with [MAX | MIN].
        signed = np.concatenate([np.maximum(q, 0), np.minimum(q, 0)], axis=-1)
        per_head = exact_dot(signed, maxs[:n], mins[:n])  # [Q, R, n], exact integers
        return per_head.max(axis=1).astype(np.int64)

    def shape(self, inputs: KernelInputs) -> dict[str, Any]:
        s = inputs.scalars
        return {
            **{a: s[a] for a in ("n", "k", "queries", "heads", "dim")},
            SEGS: shape_segs(inputs),
        }

    def cycles(
        self,
        *,
        n: int,
        k: int,
        dim: int,
        heads: int,
        queries: int = 1,
        segs: Any = None,
        params: EngineParams | None = None,
    ) -> int:
        """As the RTL does it: passes over the memory, each with up to `lanes` query heads
        (`engine_passes`), stream 2 * dim bytes of mins and of maxs per page, each on its own
        port, one cycle per beat of 32 channels; then per query a selection: a scan of the n
        scores and the k indices written. With `segs`, per group of consecutive queries
        sharing a segment, over the segment's pages."""
        p = params or self.engine
        rows, counts = segment_groups(segs, n=n, queries=queries)
        passes = engine_passes(p, queries=counts, heads=heads)
        return engine_cycles(
            p,
            port_bytes=(rows * 2 * dim, rows * 2 * dim),
            lane_ops=passes * rows * max(1, -(-2 * dim // p.beat_bytes)) * p.lanes,
            n=n,
            k=k,
            queries=counts,
            passes=passes,
            rows=rows,
        )
