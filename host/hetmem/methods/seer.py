"""SeerAttention-R: a learned gate (AttnGate) over pooled block keys.

Prepare: per block of `block_size` tokens, keys pooled by max, min and mean (concatenated),
projected by the gate's key map to Dg dimensions, per KV head.
Relevancy: gate logits q_g . k_g / sqrt(Dg), where q_g projects the KV group's query heads.
The pooling (`pool_blocks`), the two maps (`gate_queries`, `gate_keys`) and the score
(`gate_scores`) are module functions, differentiable, that `hetmem calibrate` trains on.
Retrieval: top-k blocks under a token budget, or (mode="threshold") a bitmap of the blocks
whose gate probability is at least `threshold` times the largest (logit >= max + ln tau).
Apply: block-sparse attention over the selected blocks.

The gate weights are inputs here (`GateWeights`); `hetmem calibrate` trains them by
self-distillation. The untrained default scores blocks by the group's mean query against
the mean-pooled key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..attention import HALF_DTYPES, AttentionQuery, Growable, KVCache
from ..checks import check_positive_int, check_tensor
from ..errors import InputError
from ..selection import Bitmap, Scores, Selection
from ._attention import (
    AttentionMemory,
    NativeOp,
    SparseAttentionMethod,
    as_chunk,
    as_kv,
    block_max,
    block_mean,
    block_min,
    block_reductions,
    index_growth,
)

#: How a block's keys are pooled before the gate's key map (concatenated in this order).
POOLS = {"max": block_max, "min": block_min, "mean": block_mean}


def pool_blocks(blocks: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Pooled keys [..., 3D] of blocks of keys [..., block, D]: max, min and mean over each
    block's valid tokens (valid [..., block, 1]; None: every token), in `POOLS` order."""
    return torch.cat([reduce(blocks, valid) for reduce in POOLS.values()], dim=-1)


def group_queries(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The gate's query input, [..., Hkv, T, R*D], of queries q [..., Hq, T, D]: each KV
    group's R query heads side by side."""
    if q.shape[-2] == 1:  # one query: the heads of a group are already side by side
        return q.reshape(*q.shape[:-3], kv_heads, 1, -1)
    return q.unflatten(-3, (kv_heads, -1)).transpose(-3, -2).flatten(-2)


def per_head(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., Hkv, N, F] through each KV head's own map w [Hkv, F, G]: [..., Hkv, N, G].

    One bmm over the Hkv heads with every leading row stacked into its M (`x @ w` would
    broadcast w over the leading dims: a copy of the weights per batch row, 16 MiB a decode
    step at B=8 on a Llama-3-8B layer, and B gemvs reading them again)."""
    x = x.to(w.dtype)
    if x.dim() == 3:
        return torch.bmm(x, w)
    lead, (h, n, f) = x.shape[:-3], x.shape[-3:]
    if math.prod(lead) == 1:  # one leading row (B=1): it is the stack
        return torch.bmm(x.reshape(h, n, f), w).view(*lead, h, n, w.shape[-1])
    stacked = x.movedim(-3, 0).reshape(h, -1, f)  # [Hkv, L*N, F]
    out = torch.bmm(stacked, w).view(h, *lead, n, w.shape[-1])
    return out.movedim(0, -3)


def gate_queries(q: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """Gate queries [..., Hkv, T, Dg] of queries q [..., Hq, T, D]: each KV group's query
    heads (`group_queries`) through its map wq [Hkv, R*D, Dg]."""
    return per_head(group_queries(q, wq.shape[0]), wq)


def gate_keys(pooled: torch.Tensor, wk: torch.Tensor) -> torch.Tensor:
    """Gate keys [..., Hkv, Nb, Dg] of pooled blocks [..., Hkv, Nb, 3D] through wk [Hkv, 3D, Dg]."""
    return per_head(pooled, wk)


def gate_scores(qg: torch.Tensor, kg: torch.Tensor) -> torch.Tensor:
    """The gate's logits q_g . k_g / sqrt(Dg), [..., T, Nb], of gate queries [..., T, Dg] and
    gate keys [..., Nb, Dg]."""
    kg = kg.to(qg.dtype)
    if qg.dtype in HALF_DTYPES:
        # A half-precision CPU matmul copies a transposed operand whole: the gate keys stay
        # as stored and the small [Nb, T] result is transposed instead.
        logits = (kg @ qg.transpose(-1, -2)).transpose(-1, -2)
    else:
        logits = qg @ kg.transpose(-1, -2)
    return logits / math.sqrt(qg.shape[-1])


@dataclass
class GateWeights:
    """wq [Hkv, R*D, Dg] maps a KV group's R query heads to the gate query; wk [Hkv, 3*D, Dg]
    maps the block's pooled keys (max, min, mean) to the gate key."""

    wq: torch.Tensor
    wk: torch.Tensor

    def __post_init__(self) -> None:
        check_tensor(
            "wq", self.wq, dims=("kv_heads", "group*dim", "gate_dim"), floating=True, finite=True
        )
        check_tensor(
            "wk", self.wk, dims=("kv_heads", "3*dim", "gate_dim"), floating=True, finite=True
        )
        if self.wq.shape[0] != self.wk.shape[0] or self.wq.shape[2] != self.wk.shape[2]:
            raise InputError(
                "wk", f"shape {tuple(self.wk.shape)} does not match wq {tuple(self.wq.shape)}"
            )

    def to(self, device: torch.device) -> GateWeights:
        return GateWeights(self.wq.to(device), self.wk.to(device))

    @classmethod
    def mean_pool(cls, q_heads: int, kv_heads: int, head_dim: int) -> GateWeights:
        """Untrained gate: mean of the group's queries against the mean-pooled block key."""
        group = q_heads // kv_heads
        eye = torch.eye(head_dim)
        wq = (eye.repeat(group, 1) / group).expand(kv_heads, -1, -1).clone()
        wk = torch.cat([torch.zeros(2 * head_dim, head_dim), eye]).expand(kv_heads, -1, -1).clone()
        return cls(wq, wk)


class SeerMemory(AttentionMemory):
    """The KV cache and the gate keys of its blocks (the pooled keys they are projected
    from are recomputed for the blocks an append touches, never kept)."""

    def __init__(self, kv: KVCache, gate_keys: torch.Tensor | Growable, block: int = 1):
        self.kv = kv
        # [B, Hkv, Nb, Dg], grown in place (a few percent of spare room)
        if not isinstance(gate_keys, Growable):
            gate_keys = Growable(gate_keys, axis=2, growth=index_growth(kv, block))
        self._gate_keys = gate_keys

    @property
    def gate_keys(self) -> torch.Tensor:
        return self._gate_keys.data

    def set_gate_keys(self, first_block: int, fresh: torch.Tensor) -> None:
        """Write the gate keys of blocks first_block.. (the ones an append touched)."""
        store = self._gate_keys
        end = first_block + fresh.shape[2]
        if end > store._buffer.shape[2]:
            store.reserve(end)
        store._buffer.narrow(2, first_block, fresh.shape[2]).copy_(fresh)
        store.length = end

    @property
    def entries(self) -> int:
        return self._gate_keys.length

    @property
    def index_nbytes(self) -> int:
        return self._gate_keys.nbytes

    def to(self, device: torch.device) -> SeerMemory:
        return SeerMemory(self.kv.to(device), self._gate_keys.to(device))


class SeerAttention(SparseAttentionMethod):
    """SeerAttention-R block gate: top-k blocks or a threshold bitmap."""

    name = "seer"
    kernel = "block_gate"
    describe = {
        "prepare": "pooled block keys through the AttnGate key map",
        "relevancy": "gate score q_g . k_g per block",
        "retrieval": "top-k blocks under a token budget, or a threshold bitmap",
        "apply": "block-sparse attention",
    }

    def __init__(
        self,
        weights: GateWeights | None = None,
        *,
        block_size: int = 64,
        mode: Literal["topk", "threshold"] = "topk",
        threshold: float = 0.01,
        scale: float | None = None,
    ):
        if weights is not None and not isinstance(weights, GateWeights):
            raise InputError(
                "weights", f"expected GateWeights or None, got {type(weights).__name__}"
            )
        self.weights = weights
        self._default = weights is None
        self.unit = check_positive_int("block_size", block_size)
        if mode not in ("topk", "threshold"):
            raise InputError("mode", f"expected 'topk' or 'threshold', got {mode!r}")
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, int | float)
            or not 0.0 < threshold <= 1.0
        ):
            raise InputError("threshold", f"expected a number in (0, 1], got {threshold!r}")
        self.mode = mode
        self.threshold = threshold
        self.scale = scale

    def _weights(self, kv: KVCache, q_heads: int | None = None) -> GateWeights:
        """The given weights, or the untrained default, built for the query heads once seen
        (its key map depends only on the KV layout, so gate keys built before stay valid)."""
        kbuf = kv._keys._buffer  # (its shape: a decode step reads these every layer)
        kv_heads, dim = kbuf.shape[1], kbuf.shape[3]
        w = self.weights
        built = None if w is None else w.wq.shape[1] // dim
        if w is None or (self._default and q_heads and built != q_heads // kv_heads):
            w = self.weights = GateWeights.mean_pool(q_heads or kv_heads, kv_heads, dim)
            self._default = True
        if w.wk.device != kbuf.device:
            w = self.weights = w.to(kbuf.device)
        if w.wk.shape[0] != kv_heads or w.wk.shape[1] != 3 * dim:
            raise InputError(
                "weights", f"wk {tuple(w.wk.shape)} does not fit kv_heads={kv_heads}, dim={dim}"
            )
        return w

    def _gate_keys(self, kv: KVCache, first_block: int = 0) -> torch.Tensor:
        """Gate keys [B, Hkv, Nb', Dg] of the blocks from `first_block` on: their keys pooled
        by max, min and mean, through the gate's key map."""
        pooled = block_reductions(kv, self.unit, first_block, {"pools": pool_blocks})["pools"]
        return gate_keys(pooled, self._weights(kv).wk)  # [B, Hkv, Nb, Dg]

    def prepare(self, data: Any) -> SeerMemory:
        kv, _ = as_kv(data)
        return SeerMemory(kv, self._gate_keys(kv), self.unit)

    def append(self, memory: Any, data: Any) -> None:
        assert isinstance(memory, SeerMemory)
        chunk = as_chunk(data)
        first_block = memory.kv.shortest() // self.unit
        memory.kv.append(chunk.keys, chunk.values, positions=False)
        memory.set_gate_keys(first_block, self._gate_keys(memory.kv, first_block))

    def _lean_append_fits(self, memory: Any) -> bool:
        return isinstance(memory, SeerMemory)

    def _lean_index(self, memory: Any, keys: torch.Tensor, start: int) -> None:
        """The gate key of the block the token lands in: its keys in the full cache (a view
        of the buffer) pooled and mapped, as `_gate_keys` does for that block."""
        kv, unit = memory.kv, self.unit
        first_block = start // unit
        kbuf = kv._keys._buffer
        b, h, _, d = kbuf.shape
        begin = first_block * unit
        block = kbuf.narrow(2, begin, start + 1 - begin).view(b, h, 1, start + 1 - begin, d)
        fresh = gate_keys(pool_blocks(block), self._weights(kv).wk)  # [B, Hkv, 1, Dg]
        memory.set_gate_keys(first_block, fresh)

    def _one_row_fits(self, memory: AttentionMemory, q: torch.Tensor) -> bool:
        return isinstance(memory, SeerMemory)

    def _one_row_scores(self, memory: AttentionMemory, q: torch.Tensor) -> torch.Tensor:
        """The gate logits [1, Hkv, 1, Nb] (`relevancy`'s)."""
        return gate_scores(self.gate_query(memory, q), memory.gate_keys)  # type: ignore[arg-type]

    def _native_op(self, library: Any, memory: Any, q: torch.Tensor, n: int) -> NativeOp | None:
        """`seer_one_row`: the gate key of the token's block, then the gate logits
        (`_one_row_scores`); a query the gate does not fit is left to the Python path
        (which says why)."""
        w = self._weights(memory.kv, q.shape[1])
        if _group_width(w, q) != w.wq.shape[1]:
            return None
        store, unit = memory._gate_keys, self.unit
        before, blocks = store.length, n // unit + 1
        if blocks > store._buffer.shape[2]:
            store.reserve(blocks)
        store.length = blocks
        args = (store._buffer, w.wq, w.wk, n, unit, blocks)
        return NativeOp(library.seer_one_row, args, store, before)

    def gate_query(self, memory: SeerMemory, q: torch.Tensor) -> torch.Tensor:
        """Gate queries [B, Hkv, T, Dg] from q [B, Hq, T, D]."""
        w = self._weights(memory.kv, q.shape[1])
        width = _group_width(w, q)
        if width != w.wq.shape[1]:
            raise InputError("query", f"group width {width} does not fit wq {tuple(w.wq.shape)}")
        return gate_queries(q, w.wq)

    def relevancy(self, memory: Any, query: Any) -> Scores:
        assert isinstance(memory, SeerMemory)
        positions = self.positions(memory, query)
        qg = self.gate_query(memory, query.q)
        logits = gate_scores(qg, memory.gate_keys)
        if self.sees_all(query.plan, logits.shape[-1]):
            return Scores(logits, unit=self.unit, masked=False)
        visible = self.unit_visible(memory, positions, logits.shape[-1], query.plan)[:, None]
        return Scores(logits.masked_fill(~visible, float("-inf")), unit=self.unit)

    def retrieve(self, scores: Scores, budget: int) -> Selection:
        if self.mode == "topk":
            return super().retrieve(scores, budget)
        logits = scores.values
        if logits.shape[-1] == 0:
            raise InputError("memory", "is empty: there is nothing to select from")
        top = logits.amax(dim=-1, keepdim=True)
        mask = (logits >= top + math.log(self.threshold)) & torch.isfinite(logits)
        return Bitmap(mask, unit=self.unit)

    def kernel_memory(self, memory: SeerMemory) -> dict[str, torch.Tensor]:
        """Float rows of the block_gate kernel per (batch, KV head): keys [B, Hkv, Nb, Dg]."""
        return {"keys": memory.gate_keys}

    def kernel_query(self, memory: SeerMemory, query: AttentionQuery) -> dict[str, torch.Tensor]:
        """Gate query per slot: q [B, Hkv, T, Dg] (unscaled; the kernel applies 1/sqrt(Dg))."""
        return {"q": self.gate_query(memory, query.q)}


def _group_width(w: GateWeights, q: torch.Tensor) -> int | None:
    """The gate query's input width R*D of queries q [B, Hq, T, D] over the weights' KV
    heads (the cache's: `_weights` checked); None where Hq is not a multiple of them."""
    hkv = w.wk.shape[0]
    return None if q.shape[1] % hkv else q.shape[1] // hkv * q.shape[-1]


def _seer_costs(self: SeerAttention, shape: Any) -> dict:
    """Bytes and FLOPs of each step of one layer's decode step for `shape`
    (`hetmem.system.shape.Shape`), from this method's memory: Prepare re-pools the block each
    new token lands in (max, min, mean) through the gate's key map, Relevancy projects each
    KV group's query heads to a gate query and scores every visible block, Retrieval takes a
    top-k of the blocks (threshold mode: a bitmap; the budget is then the expected
    selection), Apply attends over the selected blocks' tokens. `fpga` is the block_gate
    launch (one slot per row and KV head)."""
    from ..kernels import MODE_THRESHOLD, MODE_TOPK
    from ..selection import budget_units
    from ..system.accounting import (
        INDEX_BYTES,
        SEG_BYTES,
        segments,
        sparse_apply_cost,
        topk_cost,
        units,
    )
    from ..system.shape import StepCost

    m, b, t, s = shape.model, shape.batch, shape.queries, shape.context
    hkv, d, kb, wb = m.attn_kv_heads, m.attn_qk_dim, m.kv_bytes, m.weight_bytes
    r = m.q_heads // hkv
    dg = self.weights.wq.shape[2] if self.weights is not None else d
    blocks = units(s, self.unit)
    k = min(budget_units(shape.budget, self.unit), blocks)
    slots, threshold = b * hkv, self.mode == "threshold"
    costs = {
        "prepare": StepCost(
            b * hkv * self.unit * d * kb + hkv * 3 * d * dg * wb,
            2 * b * hkv * 3 * d * dg,
            launches=2,
            note="re-pool and project the block each new token lands in",
        ),
        "relevancy": StepCost(
            hkv * r * d * dg * wb + slots * blocks * dg * kb + slots * t * blocks * 4,
            2 * slots * t * (r * d * dg + blocks * dg),
            launches=2,
            note=f"gate over {blocks} blocks of {self.unit} tokens",
        ),
        "retrieval": topk_cost(slots * t * blocks),
        "apply": sparse_apply_cost(shape, slots, k * self.unit, r),
    }
    if threshold or k < blocks:
        queries = slots * t
        out = queries * (-(-blocks // 32) * 4 if threshold else k * INDEX_BYTES)
        costs["to_fpga"] = StepCost(
            queries * (dg + SEG_BYTES + 4 * threshold) + slots * (dg + 1),
            note="int8 gate queries, segments; the new block's key",
        )
        costs["fpga"] = StepCost(
            slots * blocks * (dg + 1),
            kernel=self.kernel,
            call={
                "n": blocks,
                "k": 0 if threshold else k,
                "dim": dg,
                "queries": queries,
                "mode": MODE_THRESHOLD if threshold else MODE_TOPK,
                "segs": segments(slots, t, blocks),
            },
        )
        costs["from_fpga"] = StepCost(out, note="selection (indices or bitmap)")
    return costs


SeerAttention.costs = _seer_costs  # type: ignore[attr-defined]
