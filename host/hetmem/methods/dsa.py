"""DSA: DeepSeek Sparse Attention's lightning indexer.

Prepare: per-token indexer keys k_s = x_s W_k from per-token features x_s.
Relevancy: score(t, s) = sum_h w_{t,h} * ReLU(q_{t,h} . k_s), with q_{t,h} and w_{t,h}
projected from the query token's features.
Retrieval: top-k tokens, one selection per query token shared by every head.
Apply: attention over the selected tokens.

The projections are inputs here (`IndexerWeights`); `hetmem calibrate` trains them.
Without trained weights, `IndexerWeights.from_attention` builds an indexer that scores
ReLU of the model's own attention logits through a random orthogonal projection, a sane
untrained baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..attention import AttentionQuery, Growable, KVCache
from ..checks import check_tensor
from ..errors import InputError
from ..selection import Scores
from ._attention import AttentionMemory, SparseAttentionMethod, as_chunk, as_kv, check_features


@dataclass
class IndexerWeights:
    """wk [F, Di] projects token features to indexer keys; wq [Fq, H*Di] and ww [Fq, H]
    project a query token's features to H indexer queries and their head weights.
    Without ww every head weighs 1/H."""

    wq: torch.Tensor
    wk: torch.Tensor
    ww: torch.Tensor | None = None
    heads: int = 0

    def __post_init__(self) -> None:
        check_tensor("wq", self.wq, dims=("features", "heads*dim"), floating=True, finite=True)
        check_tensor("wk", self.wk, dims=("features", "dim"), floating=True, finite=True)
        if self.ww is not None:
            check_tensor("ww", self.ww, dims=("features", "heads"), floating=True, finite=True)
            if self.wq.shape[0] != self.ww.shape[0]:
                raise InputError("ww", "must take the same query features as wq")
            self.heads = self.ww.shape[1]
        elif self.heads <= 0:
            self.heads = self.wq.shape[1] // self.wk.shape[1]
        heads = self.heads
        if self.wq.shape[1] != heads * self.wk.shape[1]:
            raise InputError(
                "wq",
                f"has {self.wq.shape[1]} columns, expected heads*dim = {heads}*{self.wk.shape[1]}",
            )

    @property
    def dim(self) -> int:
        return self.wk.shape[1]

    def to(self, device: torch.device) -> IndexerWeights:
        ww = None if self.ww is None else self.ww.to(device)
        return IndexerWeights(self.wq.to(device), self.wk.to(device), ww, self.heads)

    @classmethod
    def from_attention(
        cls, q_heads: int, kv_heads: int, head_dim: int, dim: int = 128, seed: int = 0
    ) -> IndexerWeights:
        """An untrained indexer over default features (keys and queries flattened over heads):
        H = q_heads indexer heads; head h scores ReLU(q_h . k_{kv(h)}) projected to `dim`
        dimensions by a random orthogonal map, weighted 1/H."""
        gen = torch.Generator().manual_seed(seed)
        fk = kv_heads * head_dim
        dim = min(dim, fk)
        proj = torch.linalg.qr(torch.randn(fk, fk, generator=gen))[0][:, :dim]  # [Fk, Di]
        wk = proj.clone()
        group = q_heads // kv_heads
        wq = torch.zeros(q_heads * head_dim, q_heads * dim)
        for h in range(q_heads):
            kv_slot = slice((h // group) * head_dim, (h // group + 1) * head_dim)
            wq[h * head_dim : (h + 1) * head_dim, h * dim : (h + 1) * dim] = proj[kv_slot]
        return cls(wq, wk, None, q_heads)


class DSAMemory(AttentionMemory):
    def __init__(self, kv: KVCache, keys: Growable):
        self.kv = kv
        self.keys = keys  # [B, S, Di]

    @property
    def entries(self) -> int:
        return self.kv.capacity

    @property
    def index_nbytes(self) -> int:
        k = self.keys.data
        return k.numel() * k.element_size()

    def to(self, device: torch.device) -> DSAMemory:
        return DSAMemory(self.kv.to(device), self.keys.to(device))


class DSA(SparseAttentionMethod):
    """DSA lightning indexer: token-level top-k shared across heads."""

    name = "dsa"
    kernel = "token_indexer"
    describe = {
        "prepare": "per-token indexer keys k_s = x_s W_k",
        "relevancy": "sum_h w_h * ReLU(q_h . k_s)",
        "retrieval": "top-k tokens (shared by all heads)",
        "apply": "attention over the selected tokens",
    }

    def __init__(self, weights: IndexerWeights | None = None, *, scale: float | None = None):
        self.weights = weights
        self._default = weights is None
        self.scale = scale
        self.unit = 1

    def _weights(self, kv: KVCache, q_heads: int | None = None) -> IndexerWeights:
        """The given weights, or the untrained default, built for the query heads once seen
        (its key map depends only on the KV layout, so keys built before stay valid)."""
        if self.weights is None or (self._default and q_heads and q_heads != self.weights.heads):
            heads = q_heads or (self.weights.heads if self.weights is not None else kv.kv_heads)
            self.weights = IndexerWeights.from_attention(heads, kv.kv_heads, kv.dim)
            self._default = True
        if self.weights.wk.device != kv.device:
            self.weights = self.weights.to(kv.device)
        return self.weights

    def _features(self, kv: KVCache, features: torch.Tensor | None, start: int = 0) -> torch.Tensor:
        if features is None:
            keys = kv.keys[:, :, start:]
            return keys.permute(0, 2, 1, 3).flatten(2)  # [B, S, Hkv*D]
        check_features("features", features, kv.batch, kv.capacity - start)
        return features

    def prepare(self, data: Any) -> DSAMemory:
        kv, features = as_kv(data)
        feats = self._features(kv, features)
        weights = self._weights(kv)
        if feats.shape[-1] != weights.wk.shape[0]:
            raise InputError(
                "features", f"have {feats.shape[-1]} channels, wk expects {weights.wk.shape[0]}"
            )
        return DSAMemory(kv, Growable(feats.to(weights.wk.dtype) @ weights.wk, axis=1))

    def append(self, memory: Any, data: Any) -> None:
        assert isinstance(memory, DSAMemory)
        chunk = as_chunk(data)
        kv = memory.kv
        feats = chunk.features
        if feats is None:
            feats = chunk.keys.permute(0, 2, 1, 3).flatten(2)  # [B, T, Hkv*D]
        else:
            check_features("features", feats, kv.batch, chunk.keys.shape[2])
        positions = kv.append(chunk.keys, chunk.values)  # [B, T], each row at its own length
        new_keys = feats.to(memory.keys.buffer.dtype) @ self._weights(kv).wk
        memory.keys.reserve(kv.capacity)
        memory.keys.length = kv.capacity
        rows = torch.arange(kv.batch, device=kv.device)[:, None].expand_as(positions)
        memory.keys.buffer[rows, positions] = new_keys

    def indexer_query(
        self, memory: DSAMemory, query: AttentionQuery
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Indexer queries [B, T, H, Di] and head weights [B, T, H]."""
        q = query.q
        weights = self._weights(memory.kv, q.shape[1])
        feats = query.features
        if feats is None:
            feats = q.permute(0, 2, 1, 3).flatten(2)  # [B, T, Hq*D]
        else:
            check_features("query.features", feats, q.shape[0], q.shape[2])
        if feats.shape[-1] != weights.wq.shape[0]:
            raise InputError(
                "query.features",
                f"have {feats.shape[-1]} channels, wq expects {weights.wq.shape[0]}",
            )
        feats = feats.to(weights.wq.dtype)
        qi = (feats @ weights.wq).unflatten(-1, (weights.heads, weights.dim))
        if weights.ww is None:
            w = torch.full(qi.shape[:-1], 1.0 / weights.heads, dtype=qi.dtype, device=qi.device)
        else:
            w = feats @ weights.ww
        return qi, w

    def relevancy(self, memory: Any, query: Any) -> Scores:
        assert isinstance(memory, DSAMemory)
        positions = self.positions(memory, query)
        qi, w = self.indexer_query(memory, query)
        keys = memory.keys.data  # [B, S, Di]
        logits = torch.einsum("bthd,bsd->btsh", qi, keys.to(qi.dtype)) / math.sqrt(qi.shape[-1])
        scores = (torch.relu(logits) * w[:, :, None, :]).sum(-1)  # [B, T, S]
        visible = self.unit_visible(memory, positions, scores.shape[-1])
        scores = scores.masked_fill(~visible, float("-inf"))
        return Scores(scores[:, None], unit=1)

    def kernel_memory(self, memory: DSAMemory) -> dict[str, torch.Tensor]:
        """Float rows the token_indexer kernel holds, per slot: {"keys": [B, 1, S, Di]}."""
        return {"keys": memory.keys.data[:, None]}

    def kernel_query(self, memory: DSAMemory, query: AttentionQuery) -> dict[str, torch.Tensor]:
        """Float query of the token_indexer kernel: q [B, 1, T, H, Di], w [B, 1, T, H]."""
        qi, w = self.indexer_query(memory, query)
        return {"q": qi[:, None] / math.sqrt(qi.shape[-1]), "w": w[:, None]}
