"""LServe / Quest: query-aware page selection from per-page key bounds.

Prepare: per page of `page_size` tokens and per channel, the min and max of the keys.
Relevancy: the upper bound sum_i max(q_i * min_i, q_i * max_i) of q . k over the page,
never below the true maximum score of any key in the page.
Retrieval: top-k pages under a token budget.
Apply: attention over the tokens of the selected pages.

With GQA the bound is taken per KV head as the max over the group's query heads (still an
upper bound for each head), so one selection serves the group; `per_query_head=True`
selects per query head instead, as the original Quest does for multi-head attention.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..attention import HALF_DTYPES, AttentionQuery, KVCache
from ..checks import check_positive_int
from ..errors import InputError
from ..selection import Scores
from ._attention import (
    AttentionMemory,
    BlockSummary,
    NativeOp,
    SparseAttentionMethod,
    as_chunk,
    as_kv,
    block_max,
    block_min,
)


def page_bounds(keys: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """A page's max and min keys side by side, [..., 2D] (`block_max`, then `block_min`)."""
    return torch.cat([block_max(keys, valid), block_min(keys, valid)], dim=-1)


def page_bounds_step(slot: torch.Tensor, key: torch.Tensor, opens: bool) -> None:
    """`page_bounds` of a page [B, Hkv, 1, 2D] (a view of the store) with one more token's
    keys [B, Hkv, 1, D], in place: the running max and min are the page's exactly."""
    d = key.shape[-1]
    if opens:  # the page's first token: its max and its min
        slot.unflatten(-1, (2, d)).copy_(key.unsqueeze(-2).expand(*key.shape[:-1], 2, d))
        return
    high, low = slot[..., :d], slot[..., d:]
    torch.maximum(high, key, out=high)
    torch.minimum(low, key, out=low)


class QuestMemory(AttentionMemory):
    """The KV cache and its pages' summaries, each page's max and min keys side by side in
    one store ([B, Hkv, P, 2D]): the bound is one matmul of K = 2D over them (two of K = D,
    one per side, read the pages at ~70% of the speed in bf16: 10.4 against 7.5 ms at 4096
    pages, B=8, measured)."""

    def __init__(self, kv: KVCache, pages: BlockSummary):
        self.kv = kv
        self.pages = pages

    @property
    def summaries(self) -> torch.Tensor:
        return self.pages.values["bounds"]  # [B, Hkv, P, 2D]: max | min

    @property
    def mins(self) -> torch.Tensor:
        return self.summaries[..., self.kv.dim :]  # [B, Hkv, P, D]

    @property
    def maxs(self) -> torch.Tensor:
        return self.summaries[..., : self.kv.dim]

    @property
    def entries(self) -> int:
        return self.pages.blocks

    @property
    def index_nbytes(self) -> int:
        return self.pages.stores["bounds"].nbytes

    def to(self, device: torch.device) -> QuestMemory:
        return QuestMemory(self.kv.to(device), self.pages.to(device))


#: Pages a half-precision bound's matmul is padded to a multiple of (`Growable.padded`).
SHAPE_QUANTUM = 16


@functools.lru_cache(maxsize=64)
def _sides(d: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp bounds [2, D] that turn q seen twice into [relu(q) | min(q, 0)]."""
    inf = float("inf")
    low = torch.tensor([0.0, -inf], dtype=dtype, device=device)[:, None].expand(2, d)
    high = torch.tensor([inf, 0.0], dtype=dtype, device=device)[:, None].expand(2, d)
    return low.contiguous(), high.contiguous()


class Quest(SparseAttentionMethod):
    """Quest page selection by the min/max upper bound."""

    name = "quest"
    kernel = "page_indexer"
    describe = {
        "prepare": "per-page min/max of keys",
        "relevancy": "upper bound sum_i max(q_i*min_i, q_i*max_i)",
        "retrieval": "top-k pages under a token budget",
        "apply": "paged sparse attention",
    }

    def __init__(
        self, page_size: int = 16, *, per_query_head: bool = False, scale: float | None = None
    ):
        self.unit = check_positive_int("page_size", page_size)
        if not isinstance(per_query_head, bool):
            raise InputError("per_query_head", f"expected a bool, got {per_query_head!r}")
        self.per_query_head = per_query_head
        self.scale = scale

    def prepare(self, data: Any) -> QuestMemory:
        kv, _ = as_kv(data)
        pages = BlockSummary(kv, self.unit, {"bounds": page_bounds}, {"bounds": page_bounds_step})
        return QuestMemory(kv, pages)

    def append(self, memory: Any, data: Any) -> None:
        assert isinstance(memory, QuestMemory)
        chunk = as_chunk(data)
        kv = memory.kv
        first, full = kv.shortest(), kv.full
        kv.append(chunk.keys, chunk.values, positions=False)
        # One token at the end of every row (a decode step): the page it lands in, updated.
        if not (full and chunk.keys.shape[2] == 1 and memory.pages.append_token(kv, first)):
            memory.pages.update(kv, first)

    def _lean_append_fits(self, memory: Any) -> bool:
        """Pages kept current one token at a time (`BlockSummary.append_token`)."""
        return isinstance(memory, QuestMemory) and memory.pages.steps is not None

    def _lean_index(self, memory: Any, keys: torch.Tensor, start: int) -> None:
        """The page the token lands in."""
        memory.pages.append_token(memory.kv, start)

    def _one_row_fits(self, memory: AttentionMemory, q: torch.Tensor) -> bool:
        """A selection per KV group (per query head takes Apply's general path)."""
        return not self.per_query_head and isinstance(memory, QuestMemory)

    def _one_row_scores(self, memory: AttentionMemory, q: torch.Tensor) -> torch.Tensor:
        """The pages' bounds [1, Hkv, 1, P], their max over each group (`relevancy`'s)."""
        return self.bounds(memory, q, group_max=True)  # type: ignore[arg-type]

    def _native_op(self, library: Any, memory: Any, q: torch.Tensor, n: int) -> NativeOp | None:
        """`quest_one_row`: the bounds of the token's page, then the pages' upper bounds
        for the query, their max over each group (`_one_row_scores`)."""
        store, unit = memory.pages.stores["bounds"], self.unit
        before = store.length
        if before <= n // unit:
            store.reserve(n // unit + 1)
            store.length = n // unit + 1
        half = q.dtype in HALF_DTYPES and store._buffer.dtype == q.dtype
        span = store.padded(SHAPE_QUANTUM).shape[2] if half else -1
        low, high = _sides(memory.kv._keys._buffer.shape[3], q.dtype, q.device)
        args = (store._buffer, low, high, n, unit, store.length, span)
        return NativeOp(library.quest_one_row, args, store, before)

    def bounds(self, memory: QuestMemory, q: torch.Tensor, group_max: bool = False) -> torch.Tensor:
        """Upper bounds [B, Hkv, R, T, P] for queries q [B, Hq, T, D]; `group_max`: their
        max over the group's R query heads, [B, Hkv, T, P] (taken before the small result is
        sliced and transposed: one operator fewer on a decode step)."""
        b, hq, t, d = q.shape
        hkv = memory.kv.kv_heads
        r = hq // hkv
        # The group's R query heads and T queries share the M side of one matmul per (row,
        # KV head): broadcasting the summaries over R instead would copy them R times.
        qg = q.reshape(b * hkv, r * t, d)  # [B*Hkv, R*T, D]
        # q_i * (q_i < 0 ? min_i : max_i) = [relu(q) | min(q, 0)] . [max | min]: one matmul,
        # its left side one clamp of q seen twice, between (0, inf) and (-inf, 0).
        low, high = _sides(d, q.dtype, q.device)
        signed = torch.clamp(qg[:, :, None].expand(b * hkv, r * t, 2, d), low, high)
        signed = signed.view(b * hkv, r * t, 2 * d)
        pages = memory.summaries  # [B, Hkv, P, 2D]
        p = pages.shape[2]
        if q.dtype in HALF_DTYPES and pages.dtype == q.dtype:
            # A half-precision CPU matmul builds its kernel per shape and copies an operand
            # that is not one block: the pages' buffer (`Growable.padded`) as stored, and
            # the small [P, R*T] result transposed instead.
            pages = memory.pages.stores["bounds"].padded(SHAPE_QUANTUM)
            n = pages.shape[2]
            bound = torch.bmm(pages.reshape(b * hkv, n, 2 * d), signed.transpose(1, 2))
            if group_max:  # [B*Hkv, n, T]
                bound = bound.view(b * hkv, n, r, t).amax(dim=2)[:, :p]
                return bound.transpose(1, 2).reshape(b, hkv, t, p)
            return bound[:, :p].transpose(1, 2).reshape(b, hkv, r, t, p)
        pages = pages.reshape(b * hkv, p, 2 * d).to(q.dtype)
        bound = torch.bmm(signed, pages.transpose(1, 2)).view(b, hkv, r, t, p)
        return bound.amax(dim=2) if group_max else bound

    def relevancy(self, memory: Any, query: Any) -> Scores:
        assert isinstance(memory, QuestMemory)
        positions = self.positions(memory, query)
        if self.per_query_head:
            scores = self.bounds(memory, query.q).flatten(1, 2)  # [B, Hq, T, P]
        else:
            scores = self.bounds(memory, query.q, group_max=True)  # [B, Hkv, T, P]
        if self.sees_all(query.plan, scores.shape[-1]):
            return Scores(scores, unit=self.unit, masked=False)
        visible = self.unit_visible(memory, positions, scores.shape[-1], query.plan)[:, None]
        return Scores(scores.masked_fill(~visible, float("-inf")), unit=self.unit)

    def kernel_memory(self, memory: QuestMemory) -> dict[str, torch.Tensor]:
        """Float rows of the page_indexer kernel per (batch, KV head): mins/maxs [B, Hkv, P, D]."""
        return {"mins": memory.mins, "maxs": memory.maxs}

    def kernel_query(self, memory: QuestMemory, query: AttentionQuery) -> dict[str, torch.Tensor]:
        """q [B, Hkv, T, R, D]: the group's query heads (or one head per slot)."""
        q = query.q
        hkv = memory.kv.kv_heads
        qg = q.unflatten(1, (hkv, q.shape[1] // hkv)).transpose(2, 3)  # [B, Hkv, T, R, D]
        if self.per_query_head:
            qg = q[:, :, :, None, :]  # [B, Hq, T, 1, D]
        return {"q": qg}


def _quest_costs(self: Quest, shape: Any) -> dict:
    """Bytes and FLOPs of each step of one layer's decode step for `shape`
    (`hetmem.system.shape.Shape`), from this method's memory: Prepare updates the min/max of
    the page each new token lands in, Relevancy reads every visible page's mins and maxs
    per KV head (two matmuls with the group's R query heads: the bound), Retrieval takes a
    top-k of the pages, Apply attends over the k pages' tokens. `fpga` is the page_indexer
    launch (one slot per row and KV head, or per query head with `per_query_head`)."""
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
    hkv, d, kb = m.attn_kv_heads, m.attn_qk_dim, m.kv_bytes
    pages = units(s, self.unit)
    k = min(budget_units(shape.budget, self.unit), pages)
    slots, r = (b * m.q_heads, 1) if self.per_query_head else (b * hkv, m.q_heads // hkv)
    costs = {
        "prepare": StepCost(
            b * hkv * (self.unit + 4) * d * kb,
            2 * b * t * hkv * d,
            note="min/max of the page each new token lands in",
        ),
        "relevancy": StepCost(
            b * hkv * pages * 2 * d * kb + slots * t * pages * 4,
            2 * 2 * b * m.q_heads * t * pages * d,
            launches=3,
            note=f"bounds of {pages} pages of {self.unit} tokens",
        ),
        "retrieval": topk_cost(slots * t * pages),
        "apply": sparse_apply_cost(
            shape,
            b * m.q_heads if self.per_query_head else b * hkv,
            k * self.unit,
            1 if self.per_query_head else r,
        ),
    }
    if k < pages:
        queries = slots * t
        costs["to_fpga"] = StepCost(
            queries * (r * d + SEG_BYTES) + b * hkv * 2 * 2 * d,
            note="int8 queries, segments; the new page's int16 mins/maxs",
        )
        costs["fpga"] = StepCost(
            slots * pages * 4 * d,
            kernel=self.kernel,
            call={
                "n": pages,
                "k": k,
                "dim": d,
                "heads": r,
                "queries": queries,
                "segs": segments(slots, t, pages),
            },
        )
        costs["from_fpga"] = StepCost(queries * k * INDEX_BYTES, note="selected page indices")
    return costs


Quest.costs = _quest_costs  # type: ignore[attr-defined]
