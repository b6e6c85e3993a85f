"""`vector_search`: dense retrieval (RAG), score(j) = q . k_j, top-k documents.

Float semantics: memory {"keys": [N, D]} (document embeddings), query {"q": [Q, D]}.

Formats (shared by the int8 dot-product kernels, see spec.py):
- keys int8 [n, D] in block floating point in a *stored basis*: each channel divided by
  b_c = rms_c ** 1/2 (fitted), then the fixed orthonormal randomized Hadamard rotation R
  (`spec.rotate`), r_j = R (k_j / b); per stored channel a scale s_c = max_j |r_jc| / 127
  at fit time, and one power-of-two exponent per row, K_j = rint(r_j / s * 2**x_j), x_j in
  [-3, 4] the largest that keeps |K_j| <= 127; the card holds shifts uint8 [n],
  shift_j = 4 - x_j. Appended rows quantize with the fitted state; a row up to 8x beyond
  the fitted range of the stored basis takes a negative exponent (the headroom), beyond
  that it saturates to +-127 (refit to get it back).
- the query takes the same basis with the balance multiplied and the scales folded in,
  q' = (R (q * b)) * s, then int8 with one absmax scale t per query: Q_c = rint(q'_c / t).
  R is orthonormal and the balance cancels, so q' . (r_j / s) = q . k_j.
- score S_j = (Q . K_j) << shift_j ~= (q . k_j) * 16 / t: integer (int32 dot, int64 after
  the shift), proportional to the float score; top-k by the shared contract (topk.py).

Why this basis. Keys with heavy tails and outlier channels (Student-t, a few channels 10-30x
the others, as real K caches) leave per-channel int8 few levels for typical entries: a
channel's scale follows its largest value, and a row's exponent follows its largest entry.
The rotation spreads an outlier channel and a heavy-tailed entry over every channel, so
the stored rows are close to Gaussian and their peaks close to their RMS; the balance
b_c = rms_c ** 1/2 splits each channel's range between the keys and the folded query,
which minimizes ||k / b|| * ||q * b|| (the scale of both rounding errors) when the queries'
channels are alike: dividing by the full rms (every key channel equal) would put an
outlier channel's whole range into the int8 query, whose other channels would then round
to a few levels. bench/quant_recall.py measures it against the per-channel format it
replaced (200 random cases per distribution, k = 64 and 256): on heavy-tailed keys, and
keys and queries, means 0.980-0.986 -> 0.995-0.997 and worst cases 0.92-0.95 -> 0.97-0.99;
Gaussian unchanged within noise; above faiss's 8-bit scalar quantizer on every distribution
(on Gaussian cases without appends faiss, whose queries stay float, is 0.001-0.002 above).

Measured recall of the float64 top-k (tests/test_kernel_quant.py, seed 0: N=16384, D=128,
8 queries; keys Student-t(3) with 4 outlier channels x20, plus for each query a relevant
quarter of the keys moved along the query's direction by 8 * Pareto(2)): 0.998 / 0.996 /
0.997 for k = 64 / 256 / 2048 (the test asserts >= 0.98).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from .spec import (
    CAPACITY,
    SEGS,
    STAGE,
    STAGE_WORDS,
    STAGED,
    Arg,
    ChannelState,
    EngineParams,
    KernelInputs,
    KernelSpec,
    check_dim,
    check_rows,
    check_shifts,
    engine_cycles,
    engine_passes,
    fit_rotated,
    fold_query,
    int_dot,
    need,
    quantize_rows,
    segment_groups,
    shape_segs,
    stage_args,
    with_segs,
)
from .topk import as_k


class VectorSearch(KernelSpec):
    name: ClassVar[str] = "vector_search"
    args: ClassVar[tuple[Arg, ...]] = (
        Arg("keys", "int8", "[capacity, dim] row-major", "in", 14, "document embeddings"),
        Arg("shifts", "uint8", "[capacity]", "in", 15, "row exponents: score << shift"),
        Arg("q", "int8", "[queries, dim] row-major", "in", 16, "queries, channel scales folded"),
        Arg("out", "uint32", "[queries, k] ascending", "out", 27, "top-k document indices"),
        Arg("n", "uint32", "scalar", "scalar", None, "rows of keys to scan"),
        Arg("k", "uint32", "scalar", "scalar", None, "documents to select per query"),
        Arg("queries", "uint32", "scalar", "scalar", None, "rows of q"),
        Arg("dim", "uint32", "scalar", "scalar", None, "channels per row"),
        # last, so every other argument keeps its register offset
        Arg(SEGS, "uint32", "[queries, 2] (base, rows)", "in", 17, "memory rows per query"),
        *stage_args(17),  # staged memory beats, on the segments' bank
    )
    memory_args: ClassVar[tuple[str, ...]] = ("keys", "shifts")
    dims: ClassVar[dict[str, tuple[str, ...]]] = {
        "keys": (CAPACITY, "dim"),
        "shifts": (CAPACITY,),
        "q": ("queries", "dim"),
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
        q, _ = fold_query("q", need(query, "q", "query"), state, 2, (1,), slots)
        scalars = {"k": as_k(k), "queries": q.shape[0], "dim": state.dim}
        return KernelInputs(with_segs({"q": q}, segs, q.shape[0]), scalars)

    def candidates(self, memory: Mapping[str, Any]) -> int:
        return int(np.shape(need(memory, "keys", "memory"))[0])

    def scores(self, inputs: KernelInputs) -> np.ndarray:
        keys, q = inputs.arrays["keys"], inputs.arrays["q"]
        n, dim = int(inputs.scalars["n"]), int(inputs.scalars["dim"])
        check_rows("keys", keys, n, "rows")
        check_dim("keys", keys, 1, dim, "dim")
        check_dim("q", q, 1, dim, "dim")
        check_dim("q", q, 0, int(inputs.scalars["queries"]), "queries")
        shifts = check_shifts(inputs.arrays["shifts"], n)
        return int_dot(q, keys[:n]) << shifts

    def shape(self, inputs: KernelInputs) -> dict[str, Any]:
        s = inputs.scalars
        return {
            "n": s["n"],
            "k": s["k"],
            "queries": s["queries"],
            "dim": s["dim"],
            SEGS: shape_segs(inputs),
        }

    def cycles(
        self,
        *,
        n: int,
        k: int,
        dim: int,
        queries: int = 1,
        segs: Any = None,
        params: EngineParams | None = None,
    ) -> int:
        """As the RTL does it: passes over the memory, each with up to `lanes` queries
        (`engine_passes`), stream n * dim key bytes and n shift bytes on their own ports,
        ceil(dim/64) cycles per row; then per query a selection: a scan of the n scores and
        the k indices written. With `segs`, per group of consecutive queries sharing a
        segment, over the segment's rows."""
        p = params or self.engine
        rows, counts = segment_groups(segs, n=n, queries=queries)
        passes = engine_passes(p, queries=counts)
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
