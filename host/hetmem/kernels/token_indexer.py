"""`token_indexer`: DeepSeek Sparse Attention's lightning indexer,
score(s) = sum_h w_h * ReLU(q_h . k_s), top-k tokens.

Float semantics: memory {"keys": [N, Di]} (per-token indexer keys), query
{"q": [Q, H, Di], "w": [Q, H]} (H indexer heads; w may be negative).

Formats:
- keys int8 [n, Di] in block floating point in the stored basis of `vector_search`
  (channels balanced by rms ** 1/2, the randomized Hadamard rotation, per-channel scales s_c)
  and one power-of-two exponent per token, shifts uint8 [n]; a token up to 8x beyond the
  fitted range of the stored basis takes a negative exponent, beyond that it saturates to
  +-127.
- q int8 [Q, H, Di]: each head in the stored basis with the scales folded in,
  q'_h = (R (q_h * b)) * s (`spec.fold`), and each head gets its own absmax scale t_h,
  Q_hc = rint(q'_hc / t_h), so q_h . k_s ~= t_h * 2**-4 * ((Q_h . K_s) << shift_s), the
  dot in int32.
- w int16 [Q, H]: since ReLU(c x) = c ReLU(x) for c > 0, the head scale is folded into the
  weight, w'_h = w_h * t_h, then quantized with one absmax scale u per query,
  W_h = rint(w'_h / u) in [-32767, 32767].
- score(s) = (sum_h W_h * ReLU(Q_h . K_s)) << shift_s ~= score_float(s) * 2**4 / u, exact
  in int64: the sum needs 1 + 15 + 14 + log2(Di) + log2(H) bits (43 for Di = 128, H = 64,
  inside a DSP48's 48-bit accumulator), the shift 7 more.

Measured recall of the float64 top-k (tests/test_kernel_quant.py, seed 0: N=16384 tokens,
H=8 heads, Di=128, 4 queries, w in +-[0.2, 1] with a quarter negative; keys Student-t(3)
with 4 outlier channels x20, a relevant quarter of the tokens moved by 8 * Pareto(2) along a
random mix of the query's head directions): 0.996 / 0.995 / 0.994 for k = 64 / 256 / 2048
(the test asserts >= 0.98). On random heavy-tailed cases without planted structure, where
the per-channel format it replaced lost most (bench/quant_recall.py), see `vector_search`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from .spec import (
    CAPACITY,
    CHUNK,
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
    check_shifts,
    engine_cycles,
    engine_passes,
    exact_dot,
    exact_float,
    fit_rotated,
    fold_query,
    magnitude,
    need,
    quantize_rows,
    segment_groups,
    shape_segs,
    stage_args,
    with_segs,
)
from .topk import as_k


class TokenIndexer(KernelSpec):
    name: ClassVar[str] = "token_indexer"
    args: ClassVar[tuple[Arg, ...]] = (
        Arg("keys", "int8", "[capacity, dim] row-major", "in", 0, "per-token indexer keys"),
        Arg("shifts", "uint8", "[capacity]", "in", 1, "token exponents: score << shift"),
        Arg("q", "int8", "[queries, heads, dim] row-major", "in", 2, "indexer queries"),
        Arg("w", "int16", "[queries, heads]", "in", 3, "head weights, head scales folded"),
        Arg("out", "uint32", "[queries, k] ascending", "out", 24, "top-k token indices"),
        Arg("n", "uint32", "scalar", "scalar", None, "tokens to scan"),
        Arg("k", "uint32", "scalar", "scalar", None, "tokens to select per query"),
        Arg("queries", "uint32", "scalar", "scalar", None, "query tokens"),
        Arg("heads", "uint32", "scalar", "scalar", None, "indexer heads H"),
        Arg("dim", "uint32", "scalar", "scalar", None, "indexer head dim Di"),
        # last, so every other argument keeps its register offset
        Arg(SEGS, "uint32", "[queries, 2] (base, rows)", "in", 4, "memory rows per query"),
        *stage_args(4),  # staged memory beats, on the segments' bank
    )
    memory_args: ClassVar[tuple[str, ...]] = ("keys", "shifts")
    dims: ClassVar[dict[str, tuple[str, ...]]] = {
        "keys": (CAPACITY, "dim"),
        "shifts": (CAPACITY,),
        "q": ("queries", "heads", "dim"),
        "w": ("queries", "heads"),
        SEGS: ("queries", "2"),
        STAGE: (STAGED, str(STAGE_WORDS)),
    }

    def fit(self, memory: Mapping[str, Any]) -> ChannelState:
        return fit_rotated("keys", need(memory, "keys", "memory"))

    def quantize_memory(
        self, memory: Mapping[str, Any], state: ChannelState, slots: Any = None
    ) -> dict:
        (keys,), shifts = quantize_rows(
            state, [("keys", need(memory, "keys", "memory"))], slots=slots
        )
        return {"keys": keys, "shifts": shifts}

    def quantize_query(
        self,
        query: Mapping[str, Any],
        state: ChannelState,
        *,
        k: int,
        slots: Any = None,
        segs: Any = None,
    ) -> KernelInputs:
        q, t = fold_query("q", need(query, "q", "query"), state, 3, (2,), slots)  # t: [Q, H, 1]
        w = as_float64("w", need(query, "w", "query"), ndim=2)
        check_dim("w", w, 0, q.shape[0], "queries of q")
        check_dim("w", w, 1, q.shape[1], "heads of q")
        folded = w * t[..., 0]
        u = np.abs(folded).max(axis=1, keepdims=True) / INT16_MAX if folded.size else folded
        w_int = np.rint(folded / np.where(u > 0, u, 1.0)).astype(np.int16)
        scalars = {"k": as_k(k), "queries": q.shape[0], "heads": q.shape[1], "dim": state.dim}
        return KernelInputs(with_segs({"q": q, "w": w_int}, segs, q.shape[0]), scalars)

    def candidates(self, memory: Mapping[str, Any]) -> int:
        return int(np.shape(need(memory, "keys", "memory"))[0])

    def scores(self, inputs: KernelInputs) -> np.ndarray:
        keys, q, w = (inputs.arrays[a] for a in ("keys", "q", "w"))
        s = inputs.scalars
        n, dim = int(s["n"]), int(s["dim"])
        check_rows("keys", keys, n, "rows")
        check_dim("keys", keys, 1, dim, "dim")
        check_dim("q", q, 0, int(s["queries"]), "queries")
        check_dim("q", q, 1, int(s["heads"]), "heads")
        check_dim("q", q, 2, dim, "dim")
        check_dim("w", w, 0, q.shape[0], "queries")
        check_dim("w", w, 1, q.shape[1], "heads")
        shifts = check_shifts(inputs.arrays["shifts"], n)
        # The head sum in float64 where exact: |W| * max |dot| * H within 2**53.
        bound = magnitude(w.dtype) * magnitude(q.dtype) * magnitude(keys.dtype) * dim
        wtype = exact_float(bound * q.shape[1]) or np.int64
        wq = w.astype(wtype)[:, None, :]  # [Q, 1, H]
        out = np.empty((q.shape[0], n), dtype=np.int64)
        for start in range(0, n, CHUNK):
            dots = exact_dot(q, keys[start : min(n, start + CHUNK)])  # [Q, H, c], exact
            np.maximum(dots, 0, out=dots)
            summed = np.matmul(wq, dots.astype(wtype, copy=False))[:, 0]
            out[:, start : start + dots.shape[-1]] = summed.astype(np.int64)
        return out << shifts

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
        (`engine_passes`), stream n * dim key bytes and n shift bytes on their own ports,
        ceil(dim/64) cycles per row (the H weight MACs ride in the adder tree); then per
        query a selection: a scan of the n scores and the k indices written. With `segs`, per group of
        consecutive queries sharing a segment, over the segment's rows."""
        p = params or self.engine
        rows, counts = segment_groups(segs, n=n, queries=queries)
        passes = engine_passes(p, queries=counts, heads=heads)
        return engine_cycles(
            p,
            port_bytes=(rows * dim, rows),
            lane_ops=passes * rows * max(1, -(-dim // p.beat_bytes)) * p.lanes,
            n=n,
            k=k,
            queries=counts,
            passes=passes,
            rows=rows,
        )
