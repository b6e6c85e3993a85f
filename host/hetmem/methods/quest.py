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

from typing import Any

import torch

from ..attention import AttentionQuery, KVCache
from ..checks import check_positive_int
from ..selection import Scores
from ._attention import (
    AttentionMemory,
    BlockSummary,
    SparseAttentionMethod,
    as_chunk,
    as_kv,
    block_max,
    block_min,
)


class QuestMemory(AttentionMemory):
    def __init__(self, kv: KVCache, pages: BlockSummary):
        self.kv = kv
        self.pages = pages

    @property
    def mins(self) -> torch.Tensor:
        return self.pages.values["min"]  # [B, Hkv, P, D]

    @property
    def maxs(self) -> torch.Tensor:
        return self.pages.values["max"]

    @property
    def entries(self) -> int:
        return self.pages.blocks

    @property
    def index_nbytes(self) -> int:
        return 2 * self.mins.numel() * self.mins.element_size()

    def to(self, device: torch.device) -> QuestMemory:
        return QuestMemory(self.kv.to(device), self.pages.to(device))


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
        self.per_query_head = per_query_head
        self.scale = scale

    def prepare(self, data: Any) -> QuestMemory:
        kv, _ = as_kv(data)
        return QuestMemory(kv, BlockSummary(kv, self.unit, {"min": block_min, "max": block_max}))

    def append(self, memory: Any, data: Any) -> None:
        assert isinstance(memory, QuestMemory)
        chunk = as_chunk(data)
        first = int(memory.kv.lengths.min())
        memory.kv.append(chunk.keys, chunk.values)
        memory.pages.update(memory.kv, first)

    def bounds(self, memory: QuestMemory, q: torch.Tensor) -> torch.Tensor:
        """Upper bounds [B, Hkv, R, T, P] for queries q [B, Hq, T, D]."""
        b, hq, t, d = q.shape
        hkv = memory.kv.kv_heads
        # The group's R query heads and T queries share the M side of one matmul per (row,
        # KV head): broadcasting the summaries over R instead would copy them R times.
        qg = q.reshape(b, hkv, hq // hkv * t, d)  # [B, Hkv, R*T, D]
        mins = memory.mins.to(q.dtype)  # [B, Hkv, P, D]
        maxs = memory.maxs.to(q.dtype)
        pos, neg = qg.clamp(min=0), qg.clamp(max=0)
        bound = torch.matmul(pos, maxs.transpose(-1, -2))
        bound += torch.matmul(neg, mins.transpose(-1, -2))
        return bound.view(b, hkv, hq // hkv, t, -1)

    def relevancy(self, memory: Any, query: Any) -> Scores:
        assert isinstance(memory, QuestMemory)
        positions = self.positions(memory, query)
        bound = self.bounds(memory, query.q)  # [B, Hkv, R, T, P]
        scores = bound.flatten(1, 2) if self.per_query_head else bound.amax(dim=2)
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
