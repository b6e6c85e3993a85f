"""`block_gate`: SeerAttention-R's AttnGate, logit(j) = q . k_j / sqrt(Dg) over pooled block
keys; top-k blocks, or a threshold bitmap.

Float semantics: memory {"keys": [Nb, Dg]} (pooled and projected block keys), query
{"q": [Q, Dg]} (unscaled). Threshold mode keeps block j when
logit_j >= max_j logit + ln(tau), tau in (0, 1], i.e. softmax(logit)_j >= tau * its max.

Formats (those of `vector_search`):
- keys int8 [n, Dg] in the stored basis (channels balanced, randomized Hadamard rotation,
  per-channel scales) with a power-of-two exponent per row (shifts uint8 [n]); the basis
  and scales are folded into the query, int8 with one absmax scale t per query;
  S_j = (Q . K_j) << shift_j ~= (q . k_j) * 2**4 / t (ROW_EXP_MAX = 4).
- threshold: logit_j ~= t * 2**-4 * S_j / sqrt(Dg), so the rule becomes S_j >= S_max - delta

      delta = floor(-ln(tau) * sqrt(Dg) * 2**4 / t)      (uint32, one per query)

  Because S_max - S_j is an integer, `floor` makes the integer decision *exactly* the float
  rule applied to the dequantized logits t * 2**-4 * S_j / sqrt(Dg); it can differ from the
  rule on the float logits only for a block whose logit, or the maximum, is within its
  quantization error of the threshold (tests/test_kernel_quant.py checks this bound).
  delta is clipped to 2 * 127**2 * Dg << 7 (beyond it every block is kept anyway), so
  S_max - delta fits the score width. An all-zero query has t = 0 and delta = 0.
- output: top-k mode (mode 0) [Q, k] uint32 ascending; threshold mode (mode 1) a bitmap
  [Q, ceil(n/32)] uint32, block j at bit j % 32 of word j // 32; `k` is 0 there.

Measured (tests/test_kernel_quant.py, seed 0 data as `vector_search`, N=8192 blocks,
Dg=128, 8 queries): top-k recall of the float64 top-k 0.992 / 0.996 / 0.996 for
k = 64 / 256 / 2048 (the test asserts >= 0.98). Threshold mode, tau from 1 to 1e-6 on
Student-t(3) keys: every block where the bitmap and the float rule disagree (at most 69
of 65536 in one setting; 287 with the per-channel format before the stored basis) lies
within the quantization bound of the threshold.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from ..errors import InputError
from .spec import (
    INT8_MAX,
    MAX_SHIFT,
    MODE_THRESHOLD,
    MODE_TOPK,
    ROW_EXP_MAX,
    SEGS,
    Arg,
    ChannelState,
    EngineParams,
    KernelInputs,
    check_dim,
    engine_cycles,
    engine_passes,
    fold_query,
    need,
    segment_groups,
    stage_args,
    with_segs,
)
from .topk import as_k
from .vector_search import VectorSearch


def threshold_delta(tau: float, t: np.ndarray, dim: int) -> np.ndarray:
    """Integer margins [Q] uint32: floor(-ln(tau) * sqrt(dim) * 2**ROW_EXP_MAX / t),
    clipped (see the module docstring); 0 for an all-zero query (t = 0)."""
    cap = (2 * INT8_MAX * INT8_MAX * dim) << MAX_SHIFT
    t = np.asarray(t, dtype=np.float64).reshape(-1)
    margin = -math.log(tau) * math.sqrt(dim) * 2.0**ROW_EXP_MAX
    delta = np.where(t > 0, np.floor(margin / np.where(t > 0, t, 1.0)), 0.0)
    return np.clip(delta, 0, cap).astype(np.uint32)


class BlockGate(VectorSearch):
    name: ClassVar[str] = "block_gate"
    args: ClassVar[tuple[Arg, ...]] = (
        Arg("keys", "int8", "[capacity, dim] row-major", "in", 9, "pooled block keys"),
        Arg("shifts", "uint8", "[capacity]", "in", 10, "row exponents: score << shift"),
        Arg("q", "int8", "[queries, dim] row-major", "in", 11, "gate queries, scales folded"),
        Arg("delta", "uint32", "[queries]", "in", 12, "threshold margins (threshold mode)"),
        Arg("out", "uint32", "[queries, k] or [queries, ceil(n/32)]", "out", 26, "selection"),
        Arg("n", "uint32", "scalar", "scalar", None, "blocks to scan"),
        Arg("k", "uint32", "scalar", "scalar", None, "blocks per query (top-k mode)"),
        Arg("queries", "uint32", "scalar", "scalar", None, "rows of q"),
        Arg("dim", "uint32", "scalar", "scalar", None, "channels per row"),
        Arg("mode", "uint32", "scalar", "scalar", None, "0 top-k, 1 threshold bitmap"),
        # last, so every other argument keeps its register offset
        Arg(SEGS, "uint32", "[queries, 2] (base, rows)", "in", 13, "memory blocks per query"),
        *stage_args(13),  # staged memory beats, on the segments' bank
    )
    memory_args: ClassVar[tuple[str, ...]] = ("keys", "shifts")
    dims: ClassVar[dict[str, tuple[str, ...]]] = {**VectorSearch.dims, "delta": ("queries",)}

    def quantize_query(
        self,
        query: Mapping[str, Any],
        state: ChannelState,
        *,
        k: int | None = None,
        tau: float | None = None,
        slots: Any = None,
        segs: Any = None,
    ) -> KernelInputs:
        """Top-k with `k`, or threshold mode with `tau` in (0, 1]; exactly one of them."""
        if (k is None) == (tau is None):
            raise InputError("k", "give exactly one of k (top-k) or tau (threshold)")
        q, t = fold_query("q", need(query, "q", "query"), state, 2, (1,), slots)
        if tau is None:
            delta = np.zeros(q.shape[0], dtype=np.uint32)
            scalars = {"k": as_k(k), "mode": MODE_TOPK}
        else:
            if not 0 < float(tau) <= 1:
                raise InputError("tau", f"expected 0 < tau <= 1, got {tau}")
            delta = threshold_delta(float(tau), t, state.dim)
            scalars = {"k": 0, "mode": MODE_THRESHOLD}
        scalars.update(queries=q.shape[0], dim=state.dim)
        return KernelInputs(with_segs({"q": q, "delta": delta}, segs, q.shape[0]), scalars)

    def thresholds(self, scores: np.ndarray, inputs: KernelInputs) -> np.ndarray:
        """S_max - delta per query (int64)."""
        delta = inputs.arrays["delta"]
        check_dim("delta", delta, 0, scores.shape[0], "queries")
        return scores.max(axis=1) - delta.astype(np.int64)

    def shape(self, inputs: KernelInputs) -> dict[str, Any]:
        return {**super().shape(inputs), "mode": int(inputs.scalars["mode"])}

    def cycles(
        self,
        *,
        n: int,
        k: int = 0,
        dim: int,
        queries: int = 1,
        mode: int = MODE_TOPK,
        segs: Any = None,
        params: EngineParams | None = None,
    ) -> int:
        """As vector_search; threshold mode writes the bitmap words during its scan and has
        no threshold search or per-index drain (its scan covers the n bits of a bitmap row,
        whatever the query's rows)."""
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
            bitmap=mode == MODE_THRESHOLD,
            passes=passes,
            rows=rows,
        )
