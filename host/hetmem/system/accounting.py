"""Pieces of the methods' `costs(shape)` that every method counts the same way: a GPU
top-k, sparse attention over selected units, the segment table of a launch, the bytes of
a kernel's query. The methods decide what they hold and select (their own accounting);
these only count it."""

from __future__ import annotations

import math

import numpy as np

from .shape import TOPK_PASSES, Shape, StepCost

#: Segment-table bytes per query (uint32 base, rows).
SEG_BYTES = 8
#: Bytes of one selected index read back from the card.
INDEX_BYTES = 4


def topk_cost(scores: int, note: str = "") -> StepCost:
    """A GPU top-k over `scores` float32 scores (all rows together): `TOPK_PASSES` reads."""
    return StepCost(scores * 4 * TOPK_PASSES, scores * TOPK_PASSES, launches=2, dtype="fp32",
                    note=note or f"top-k over {scores} scores, {TOPK_PASSES} passes")  # fmt: skip


def sparse_apply_cost(shape: Shape, slots: int, tokens: int, heads_per_slot: int) -> StepCost:
    """Attention of each query over `tokens` selected tokens per slot (`slots` = rows x KV
    groups holding a selection): the selected keys and values are read once per slot, every
    query head of the slot multiplies them."""
    m = shape.model
    per_token = m.kv_token_bytes // max(m.attn_kv_heads, 1) if not m.mla else m.kv_token_bytes
    nbytes = slots * tokens * per_token
    flops = 2 * slots * shape.queries * heads_per_slot * tokens * (m.attn_qk_dim + m.attn_v_dim)
    return StepCost(nbytes, flops, launches=3, note=f"{tokens} tokens x {slots} slots")


def dense_attention_cost(shape: Shape, tokens: int) -> StepCost:
    """Decode attention of every row over `tokens` tokens of its cache (dense)."""
    m = shape.model
    nbytes = shape.batch * tokens * m.kv_token_bytes
    flops = 2 * shape.tokens * m.q_heads * tokens * (m.attn_qk_dim + m.attn_v_dim)
    return StepCost(nbytes, flops, launches=2, note=f"dense over {tokens} tokens")


def segments(slots: int, queries_per_slot: int, rows: int) -> np.ndarray:
    """The launch's segment table: each slot's queries (consecutive) over its `rows`."""
    base = np.repeat(np.arange(slots, dtype=np.int64) * rows, queries_per_slot)
    return np.stack([base, np.full(base.shape, rows, np.int64)], axis=1)


def units(tokens: int, unit: int) -> int:
    return -(-int(tokens) // int(unit))


def k_units(budget: int, unit: int, candidates: int) -> int:
    """The budget in units (`hetmem.selection.budget_units`: at least one), capped."""
    return max(1, min(int(budget) // int(unit), candidates))


def ceil_log2(n: int) -> int:
    return max(1, math.ceil(math.log2(max(n, 2))))
