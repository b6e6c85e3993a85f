"""DSA: DeepSeek Sparse Attention's lightning indexer.

Prepare: per-token indexer keys k_s = x_s W_k from per-token features x_s.
Relevancy: score(t, s) = sum_h w_{t,h} * ReLU(q_{t,h} . k_s), with q_{t,h} and w_{t,h}
projected from the query token's features (`indexer_scores`, which calibration trains on).
Retrieval: top-k tokens, one selection per query token shared by every head.
Apply: attention over the selected tokens.

The projections are inputs here (`IndexerWeights`); `hetmem calibrate` trains them.

Folded index: with the default features (the cached keys, x_s = K_s flattened over KV heads,
Fk = Hkv*D channels) and an indexer key projection no narrower than its input (Fk <= Di, as
on small models whose KV row is itself short), the indexer keys hold no less than the keys
they summarize. The memory then keeps no index: q . (K_s W_k) = (q W_k^T) . K_s, so
Relevancy folds W_k into the indexer queries and scores the cache's keys directly. The
scores are the same up to float rounding; the bytes of the index (Di floats per token) and
Prepare's projection are gone, and the card holds the keys themselves.

Index precision: `index_dtype` (e.g. torch.bfloat16) stores the indexer keys in a narrower
float than the model's, as DeepSeek-V3.2 keeps its indexer keys in FP8: Relevancy then
reads half the bytes (the long-context decode step's largest read after Apply's) and runs
its matmul in that dtype, the logits widened to float32 before the ReLU and the head sum.
The selection can differ from a float32 index's only where two scores are within the
rounding (~0.4% of the largest logit). A folded index has no keys of its own: the option
does not apply to it.
Without trained weights, `IndexerWeights.from_attention` builds an indexer that scores
ReLU of the model's own attention logits through a random orthogonal projection, a sane
untrained baseline.

Apply of a decode query gathers, per batch row, the k selected tokens' keys for every KV
head, tile by tile, and multiplies each tile by the query heads while it is in cache; the
values are then summed straight from the KV cache by one fused gather-and-sum
(`bag_values`, no gathered copy). `kv_layout` says where the keys are gathered from:

- "head" (default): the KV cache itself, head-major [B, Hkv, S, D]. A selected token is
  Hkv rows of D elements (512 bytes at D=128, float32) far apart, so the key gather makes
  Hkv*k short random reads, which a CPU serves at a fraction of its streaming bandwidth.
  No memory beyond the cache.
- "token": the memory also keeps the keys token-major ([B, S, Hkv*D + one cache line]),
  built by Prepare and grown by Append, never rebuilt. A selected token's keys are then one
  contiguous row (4 KiB for Llama-3-8B's 8 KV heads), and the gather makes k long reads.
  The price: as many bytes again as the keys (half the KV cache, plus 1.6% padding at
  Hkv*D = 1024), one more strided write of every appended token, and a copy that follows
  only `append` (a cache changed in place after Prepare is not seen by Apply).

"head" is the default because the memory is what a long context runs out of, and a GPU
gathers 512-byte rows well; ask for "token" where memory is ample and Apply's gather is the
bottleneck (CPU decode).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from .. import attention as _attention
from ..attention import (
    HALF_DTYPES,
    AttentionQuery,
    Growable,
    KVCache,
    bag_values,
    sparse_attention,
    workspace_buffer,
)
from ..checks import check_tensor
from ..errors import InputError
from ..selection import Bitmap, Scores, Selection, TopK, budget_units
from ._attention import (
    AttentionMemory,
    NativeOp,
    SparseAttentionMethod,
    as_chunk,
    as_kv,
    check_features,
)

#: Where Apply gathers the selected keys from (see the module docstring): "head", the shared
#: head-major KV cache; "token", a token-major copy of the keys kept in the memory.
KV_LAYOUTS = ("head", "token")


class IndexerWeights:
    """wk [F, Di] projects token features to indexer keys; wq [Fq, H*Di] and ww [Fq, H]
    project a query token's features to H indexer queries and their head weights.
    Without ww every head weighs 1/H.

    A block-diagonal wq (each indexer head reads only its own query head's D channels
    through its KV group's [D, Di] block, as the untrained default does) is kept as those
    blocks, `blocks` [Hkv, D, Di], and applied per group: Hkv*D*Di weights read per step
    instead of the dense (H*D) x (H*Di) matrix, 1/H of it (64 MiB -> 512 KiB at Llama-3-8B's
    shape). `wq` then builds the dense matrix on request (training starts from it)."""

    def __init__(
        self,
        wq: torch.Tensor | None,
        wk: torch.Tensor,
        ww: torch.Tensor | None = None,
        heads: int = 0,
        *,
        blocks: torch.Tensor | None = None,
    ):
        self.wk, self.ww, self.heads, self.blocks = wk, ww, heads, blocks
        self._wq = wq
        check_tensor("wk", wk, dims=("features", "dim"), floating=True, finite=True)
        if (wq is None) == (blocks is None):
            raise InputError("wq", "give either wq or its block-diagonal blocks, not both")
        if blocks is not None:
            check_tensor(
                "blocks", blocks, dims=("kv_heads", "dim", "index_dim"), floating=True, finite=True
            )
            if blocks.shape[2] != wk.shape[1]:
                raise InputError("blocks", f"have {blocks.shape[2]} columns, wk {wk.shape[1]}")
            if ww is not None or heads <= 0 or heads % blocks.shape[0]:
                raise InputError(
                    "blocks", f"need heads (a multiple of {blocks.shape[0]} KV heads) and no ww"
                )
            return
        check_tensor("wq", wq, dims=("features", "heads*dim"), floating=True, finite=True)
        if ww is not None:
            check_tensor("ww", ww, dims=("features", "heads"), floating=True, finite=True)
            if wq.shape[0] != ww.shape[0]:
                raise InputError("ww", "must take the same query features as wq")
            self.heads = ww.shape[1]
        elif self.heads <= 0:
            self.heads = wq.shape[1] // wk.shape[1]
        heads = self.heads
        if wq.shape[1] != heads * wk.shape[1]:
            raise InputError(
                "wq",
                f"has {wq.shape[1]} columns, expected heads*dim = {heads}*{wk.shape[1]}",
            )

    @property
    def dim(self) -> int:
        return self.wk.shape[1]

    @property
    def foldable(self) -> bool:
        """Whether the indexer keys are no narrower than the features they project (Fk <= Di):
        then an index over the default features is folded into the queries (module docs)."""
        return self.wk.shape[0] <= self.wk.shape[1]

    @property
    def query_features(self) -> int:
        """Fq, the query features wq takes."""
        if self.blocks is not None:
            return self.heads * self.blocks.shape[1]
        return self._wq.shape[0]

    @property
    def wq(self) -> torch.Tensor:
        """The dense [Fq, H*Di] query projection (built from `blocks` when block-diagonal)."""
        if self._wq is not None:
            return self._wq
        hkv, d, di = self.blocks.shape
        group = self.heads // hkv
        wq = self.blocks.new_zeros(self.heads * d, self.heads * di)
        for h in range(self.heads):
            wq[h * d : (h + 1) * d, h * di : (h + 1) * di] = self.blocks[h // group]
        return wq

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """Indexer queries [..., H, Di] of query features [..., Fq]."""
        if self.blocks is None:
            return (feats.to(self._wq.dtype) @ self._wq).unflatten(-1, (self.heads, self.dim))
        hkv, d, di = self.blocks.shape
        lead = feats.shape[:-1]
        if feats.dtype != self.blocks.dtype:
            feats = feats.to(self.blocks.dtype)
        g = self.heads // hkv
        # [N, Hkv, G, D] -> [Hkv, N*G, D]: one bmm with the Hkv blocks [Hkv, D, Di]
        grouped = feats.reshape(-1, hkv, g, d).transpose(0, 1).reshape(hkv, -1, d)
        out = torch.bmm(grouped, self.blocks).view(hkv, -1, g, di)  # [Hkv, N, G, Di]
        return out.transpose(0, 1).reshape(*lead, self.heads, di)

    def to(self, device: torch.device) -> IndexerWeights:
        ww = None if self.ww is None else self.ww.to(device)
        if self.blocks is not None:
            return IndexerWeights(
                None, self.wk.to(device), None, self.heads, blocks=self.blocks.to(device)
            )
        return IndexerWeights(self._wq.to(device), self.wk.to(device), ww, self.heads)

    @classmethod
    def from_attention(
        cls, q_heads: int, kv_heads: int, head_dim: int, dim: int = 128, seed: int = 0
    ) -> IndexerWeights:
        """An untrained indexer over default features (keys and queries flattened over heads):
        H = q_heads indexer heads; head h scores ReLU(q_h . k_{kv(h)}) projected to `dim`
        dimensions by a random orthogonal map, weighted 1/H. Its wq is block-diagonal and is
        kept as the Hkv blocks."""
        gen = torch.Generator().manual_seed(seed)
        fk = kv_heads * head_dim
        dim = min(dim, fk)
        proj = torch.linalg.qr(torch.randn(fk, fk, generator=gen))[0][:, :dim]  # [Fk, Di]
        blocks = proj.reshape(kv_heads, head_dim, dim).clone()
        return cls(None, proj.clone(), None, q_heads, blocks=blocks)


@functools.lru_cache(maxsize=64)
def _constant(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A scalar tensor of `value`, kept (read-only: expanded, never written)."""
    return torch.tensor(value, dtype=dtype, device=device)


def _common_dtype(keys: torch.Tensor, qi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and queries in one dtype: a narrow index (`index_dtype`) keeps its own and the
    queries take it (the matmul reads the keys as stored); otherwise the keys take the
    queries' dtype."""
    if keys.dtype == qi.dtype:
        return keys, qi
    if keys.dtype in HALF_DTYPES and qi.dtype not in HALF_DTYPES:
        return keys, qi.to(keys.dtype)
    return keys.to(qi.dtype), qi


def _index_dtype(value: Any) -> torch.dtype | None:
    """`index_dtype` as a floating torch dtype (a name such as "bfloat16" accepted)."""
    if value is None:
        return None
    dtype = getattr(torch, value, None) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(
            "index_dtype", f"expected a floating torch dtype (e.g. torch.bfloat16), got {value!r}"
        )
    return dtype


def query_key_logits(qi: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q_{t,h} . k_s of every indexer query and key, [..., S, T*H] (S-major, as the keys
    are; t major, h minor): one matmul of the keys [..., S, Di] with the T*H queries qi
    [..., T, H, Di], in the queries' dtype (keys of another dtype are converted; Relevancy
    gives a narrow index's matmul the index's dtype, `_common_dtype`)."""
    *lead, t, h, di = qi.shape
    if keys.dtype != qi.dtype:
        keys = keys.to(qi.dtype)
    queries = qi.reshape(*lead, t * h, di).transpose(-1, -2)
    if keys.dim() == 3:  # the decode memory's [B, S, Di]: one bmm, no matmul dispatch
        return torch.bmm(keys, queries)
    return keys @ queries


def indexer_scores(
    logits: torch.Tensor, w: torch.Tensor | None, dim: int, *, inplace: bool = False
) -> torch.Tensor:
    """The lightning indexer's score of every key for every query, [..., T, S]:
    sum_h w[..., t, h] * ReLU(logits[..., s, t, h]) / sqrt(dim).

    logits [..., S, T, H]: q_{t,h} . k_s (`query_key_logits` viewed so, or a folded index's);
    w [..., T, H]: the head weights, or None when every head weighs 1/H; dim: Di.

    The one definition of DSA's score: `DSA.relevancy` scores with it (inplace=True: ReLU
    and scale written into the fresh logits, on the no-grad decode path), and `hetmem
    calibrate` trains the indexer against it (inplace=False: differentiable). The
    1/sqrt(Di) scale commutes with ReLU and rides on the [..., T, H] weights (on the head
    sum when every head weighs 1/H).
    """
    logits = logits.relu_() if inplace else torch.relu(logits)
    if w is None:
        scores = logits.sum(-1).transpose(-1, -2)  # [..., T, S]
        scale = 1.0 / (logits.shape[-1] * math.sqrt(dim))
        return scores.mul_(scale) if inplace else scores * scale
    return torch.einsum("...sth,...th->...ts", logits, w / math.sqrt(dim))


class DSAMemory(AttentionMemory):
    def __init__(self, kv: KVCache, keys: Growable | None, token_keys: Growable | None = None):
        self.kv = kv
        # [B, S, Di]; None for a folded index (the cache's keys are scored directly)
        self.keys = keys
        # kv_layout="token": the cache's keys again, token-major [B, S, Hkv*D + pad], so that
        # a selected token's keys are one contiguous row to gather.
        self.token_keys = token_keys

    @property
    def entries(self) -> int:
        return self.kv._keys.length

    @property
    def folded(self) -> bool:
        """No index of its own: Relevancy scores the cache's keys (module docs)."""
        return self.keys is None

    @property
    def index_nbytes(self) -> int:
        """Bytes Relevancy reads: the indexer keys, or the cache's keys when folded."""
        return (self.kv._keys if self.keys is None else self.keys).nbytes

    @property
    def token_copy_nbytes(self) -> int:
        """Bytes allocated for the token-major copy of the keys (0 for kv_layout="head")."""
        if self.token_keys is None:
            return 0
        return self.token_keys.buffer.numel() * self.token_keys.buffer.element_size()

    def rows(self, rows: slice) -> DSAMemory:
        view = super().rows(rows)
        store = self.token_keys
        if store is not None:  # Apply gathers keys from it: the same rows
            view.token_keys = Growable.adopt(
                store.buffer[rows], store.axis, store.length, store.growth
            )
        return view  # type: ignore[return-value]

    def to(self, device: torch.device) -> DSAMemory:
        token_keys = None if self.token_keys is None else self.token_keys.to(device)
        keys = None if self.keys is None else self.keys.to(device)
        return DSAMemory(self.kv.to(device), keys, token_keys)


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

    def __init__(
        self,
        weights: IndexerWeights | None = None,
        *,
        scale: float | None = None,
        kv_layout: str = "head",
        index_dtype: torch.dtype | str | None = None,
    ):
        if kv_layout not in KV_LAYOUTS:
            raise InputError("kv_layout", f"expected one of {KV_LAYOUTS}, got {kv_layout!r}")
        if weights is not None and not isinstance(weights, IndexerWeights):
            raise InputError(
                "weights", f"expected IndexerWeights or None, got {type(weights).__name__}"
            )
        self.weights = weights
        self._default = weights is None
        self.scale = scale
        self.kv_layout = kv_layout
        self.index_dtype = _index_dtype(index_dtype)
        self.unit = 1

    def _weights(self, kv: KVCache, q_heads: int | None = None) -> IndexerWeights:
        """The given weights, or the untrained default, built for the query heads once seen
        (its key map depends only on the KV layout, so keys built before stay valid)."""
        if self.weights is None or (self._default and q_heads and q_heads != self.weights.heads):
            heads = q_heads or (self.weights.heads if self.weights is not None else kv.kv_heads)
            self.weights = IndexerWeights.from_attention(heads, kv.kv_heads, kv.dim)
            self._default = True
        if self.weights.wk.device != kv._keys._buffer.device:
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
        weights = self._weights(kv)
        channels = kv.kv_heads * kv.dim if features is None else features.shape[-1]
        if channels != weights.wk.shape[0]:
            raise InputError(
                "features", f"have {channels} channels, wk expects {weights.wk.shape[0]}"
            )
        keys = None
        if features is not None or not weights.foldable:
            feats = self._features(kv, features)
            # The indexer keys grow like the cache (a bounded `Growth` follows the cache's).
            growth = None if kv.growth is None else kv.growth.within(1)
            index = feats.to(weights.wk.dtype) @ weights.wk
            if self.index_dtype is not None:
                index = index.to(self.index_dtype)
            keys = Growable(index, axis=1, growth=growth)
        token_keys = token_major(kv) if self.kv_layout == "token" else None
        return DSAMemory(kv, keys, token_keys)

    def append(self, memory: Any, data: Any) -> None:
        assert isinstance(memory, DSAMemory)
        chunk = as_chunk(data)
        kv = memory.kv
        feats = chunk.features
        if feats is not None:
            check_features("features", feats, kv.batch, chunk.keys.shape[2])
            if memory.folded:
                raise InputError(
                    "features", "this memory's index is folded into the keys (prepared "
                    "without features): append keys and values only",
                )  # fmt: skip
        elif not memory.folded:
            feats = chunk.keys.permute(0, 2, 1, 3).flatten(2)  # [B, T, Hkv*D]
        full, start = kv.full, kv.capacity
        # [B, T], each row at its own length (not built when every row was at the end and
        # no token-major copy writes at them)
        store = memory.token_keys
        positions = kv.append(chunk.keys, chunk.values, positions=not full or store is not None)
        rows = None
        if memory.keys is not None:  # a folded index is the cache's keys: nothing more to do
            rows = self._append_keys(memory, feats, positions, full, start)
        if store is not None:
            store.reserve(kv.capacity)
            if kv.capacity > store.length:
                store.buffer.narrow(1, store.length, kv.capacity - store.length).zero_()
                store.length = kv.capacity
            new = chunk.keys.transpose(1, 2).flatten(2)  # [B, T, Hkv*D]
            if rows is None:
                rows = torch.arange(kv.batch, device=kv.device)[:, None].expand_as(positions)
            store.buffer[rows, positions, : new.shape[-1]] = new.to(store.buffer.dtype)

    def _lean_append_fits(self, memory: Any) -> bool:
        """`lean_append` writes no token-major copy of the keys."""
        return isinstance(memory, DSAMemory) and memory.token_keys is None

    def _lean_index(self, memory: Any, keys: torch.Tensor, start: int) -> None:
        """The token's indexer key (none for an index folded into the keys)."""
        if memory.keys is not None:  # (one token: [B, Hkv, 1, D] is [B, 1, Hkv*D] as laid out)
            self._append_keys(memory, keys.reshape(keys.shape[0], 1, -1), None, True, start)

    def _append_keys(
        self,
        memory: DSAMemory,
        feats: torch.Tensor,
        positions: torch.Tensor | None,
        full: bool,
        start: int,
    ) -> torch.Tensor | None:
        """The appended tokens' indexer keys into the index; the [B, T] row indices used (None
        when every row was at the end: one slice)."""
        kv, keys = memory.kv, memory.keys
        wk = self._weights(kv).wk
        new_keys = feats.to(wk.dtype) @ wk
        length = kv._keys.length
        if length > keys._buffer.shape[1]:
            keys.reserve(length)
        keys.length = length
        if full:  # every row at the end: one slice (the copy casts, as `to` would)
            keys._buffer.narrow(1, start, new_keys.shape[1]).copy_(new_keys)
            return None
        rows = torch.arange(kv.batch, device=kv.device)[:, None].expand_as(positions)
        keys.buffer[rows, positions] = new_keys.to(keys.buffer.dtype)
        return rows

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
        if feats.shape[-1] != weights.query_features:
            raise InputError(
                "query.features",
                f"have {feats.shape[-1]} channels, wq expects {weights.query_features}",
            )
        qi = weights.project(feats)
        if weights.ww is None:  # every head weighs 1/H: one kept scalar, expanded (a view)
            w = _constant(1.0 / weights.heads, qi.dtype, qi.device).expand(qi.shape[:-1])
        else:
            w = feats.to(weights.ww.dtype) @ weights.ww
        return qi, w

    def folded_query(self, qi: torch.Tensor) -> torch.Tensor:
        """Indexer queries [..., H, Di] folded through wk^T onto the key features [..., H, Fk]
        (a folded index scores the cache's keys with them)."""
        wk = self.weights.wk
        return qi.to(wk.dtype) @ wk.T

    def index_logits(self, memory: DSAMemory, qi: torch.Tensor) -> torch.Tensor:
        """q_h . k_s for every token and indexer query: [B, S, T*H] (S-major as the keys are).
        One bmm with the indexer keys; a folded index: the folded queries times the cache's
        head-major keys, one bmm over (row, KV head) and a sum over the KV heads."""
        b, t, h, di = qi.shape
        if memory.keys is not None:  # [B, S, Di]
            keys = memory.keys
            if keys.buffer.dtype not in HALF_DTYPES:
                return query_key_logits(qi, keys.data)
            # A narrow index: its matmul in its dtype, over the same shape for SHAPE_QUANTUM
            # steps or more (`Growable.padded`); the logits widened to the queries' dtype.
            padded, cast = _common_dtype(keys.padded(SHAPE_QUANTUM), qi)
            logits = query_key_logits(cast, padded)[:, : keys.length]
            return logits if logits.dtype == qi.dtype else logits.to(qi.dtype)
        kv = memory.kv
        hkv, d, s = kv.kv_heads, kv.dim, kv.capacity
        keys = kv.keys  # [B, Hkv, S, D], a view of the cache's buffer
        qf = self.folded_query(qi).view(b, t * h, hkv, d).permute(0, 2, 3, 1)
        qf = qf.reshape(b * hkv, d, t * h).to(keys.dtype)
        logits = torch.bmm(keys.reshape(b * hkv, s, d), qf).view(b, hkv, s, t * h)
        if hkv == 1:
            return logits[:, 0].float()
        return logits.sum(1, dtype=torch.float32)

    def relevancy(self, memory: Any, query: Any) -> Scores:
        assert isinstance(memory, DSAMemory)
        lean = self._one_query_scores(memory, query)
        if lean is not None:
            return Scores(lean, unit=1, masked=False)
        positions = self.positions(memory, query)
        qi, w = self.indexer_query(memory, query)
        b, t, h, di = qi.shape
        equal = self.weights is not None and self.weights.ww is None  # every head weighs 1/H
        if memory.keys is not None and memory.keys.data.shape[1] > _chunk_tokens(b, t * h):
            scores = self._chunked_scores(memory, qi, None if equal else w)
        else:
            logits = self.index_logits(memory, qi).view(b, -1, t, h)  # [B, S, T, H]
            scores = indexer_scores(logits, None if equal else w, di, inplace=True)
        if self.sees_all(query.plan, scores.shape[-1]):
            return Scores(scores[:, None], unit=1, masked=False)
        visible = self.unit_visible(memory, positions, scores.shape[-1], query.plan)
        scores = scores.masked_fill(~visible, float("-inf"))
        return Scores(scores[:, None], unit=1)

    def _one_query_scores(self, memory: DSAMemory, query: AttentionQuery) -> torch.Tensor | None:
        """Relevancy of a decode step at B=1 that sees every token (the step's plan says so),
        with the default features, equal head weights and block-diagonal query weights:
        `indexer_scores` [1, 1, 1, S] by the operators of the general path (the block
        projection, the index matmul over the same padded shape, ReLU, head sum, scale) on
        the same tensors, without its reshapes: equal to it to the bit (test). None for
        any other step."""
        q, plan, keys = query.q, query.plan, memory.keys
        if (
            plan is None
            or keys is None
            or q.shape[0] != 1
            or q.shape[2] != 1
            or query.features is not None
        ):
            return None
        weights = self._weights(memory.kv, q.shape[1])
        if (
            weights.blocks is None  # (block-diagonal weights weigh every head equally)
            or keys.length > _chunk_tokens(1, weights.heads)
            or (plan.full_length != keys.length and not plan.all_visible(1, keys.length))
        ):
            return None
        return self._one_row_scores(memory, q)

    def _one_row_fits(self, memory: AttentionMemory, q: torch.Tensor) -> bool:
        """DSA's own index, block-diagonal query weights, and the scores' length in one
        chunk once the token is in (`_one_query_scores`' conditions)."""
        if not isinstance(memory, DSAMemory) or memory.keys is None:
            return False
        weights = self._weights(memory.kv, q.shape[1])
        return weights.blocks is not None and memory.keys.length < _chunk_tokens(1, weights.heads)

    def _one_row_scores(self, memory: AttentionMemory, q: torch.Tensor) -> torch.Tensor:
        """`indexer_scores` [1, 1, 1, S] of one query at the end of one row: the block
        projection, the index matmul over the same padded shape, ReLU, head sum, scale
        (the weights made current by the caller's `_weights`: `_one_row_fits`'s or
        `_one_query_scores`')."""
        keys = memory.keys  # type: ignore[attr-defined]
        weights = self.weights
        blocks = weights.blocks
        hkv, d, di = blocks.shape
        heads, n = weights.heads, keys.length
        qi = torch.bmm(q.reshape(hkv, heads // hkv, d).to(blocks.dtype), blocks)  # [Hkv, G, Di]
        if keys.buffer.dtype in HALF_DTYPES:
            padded, cast = _common_dtype(keys.padded(SHAPE_QUANTUM), qi)
            logits = torch.bmm(padded, cast.view(1, heads, di).transpose(1, 2))[:, :n]
            if logits.dtype != qi.dtype:
                logits = logits.to(qi.dtype)
        else:
            data, cast = _common_dtype(keys.data, qi)
            logits = torch.bmm(data, cast.view(1, heads, di).transpose(1, 2))
        scores = logits.relu_().sum(-1)  # [1, S]
        return scores.mul_(1.0 / (heads * math.sqrt(di))).view(1, 1, 1, n)

    def _native_op(self, library: Any, memory: Any, q: torch.Tensor, n: int) -> NativeOp | None:
        """`dsa_one_row`: the token's indexer key into the index, then `_one_row_scores`,
        for float32 query weights (the op's cast of the queries)."""
        index, weights = memory.keys, self.weights  # (made current by `_one_row_fits`)
        blocks = weights.blocks
        if blocks.dtype != torch.float32:
            return None
        if n + 1 > index._buffer.shape[1]:
            index.reserve(n + 1)
        index.length = n + 1
        span = index.padded(SHAPE_QUANTUM).shape[1] if index._buffer.dtype in HALF_DTYPES else n + 1
        scale = 1.0 / (weights.heads * math.sqrt(blocks.shape[2]))
        args = (index._buffer, weights.wk, blocks, n, span, scale)
        return NativeOp(library.dsa_one_row, args, index, n)

    def _lean_scores(self, memory: AttentionMemory, query: AttentionQuery) -> torch.Tensor:
        """`lean_step`'s scores: at B=1 over its own index, `_one_query_scores` (no call of
        `relevancy`'s dispatch); else `relevancy`'s."""
        assert isinstance(memory, DSAMemory)
        scores = self._one_query_scores(memory, query)
        return self.relevancy(memory, query).values if scores is None else scores

    def _lean_apply_fits(self, memory: AttentionMemory) -> bool:
        """A token-major copy of the keys takes DSA's own decode Apply, not the lean one."""
        return isinstance(memory, DSAMemory) and memory.token_keys is None

    def _chunked_scores(
        self, memory: DSAMemory, qi: torch.Tensor, w: torch.Tensor | None
    ) -> torch.Tensor:
        """`indexer_scores` [B, T, S] over the indexer keys a chunk of tokens at a time, the
        chunk's logits in one buffer kept across steps (`memory.workspace`): a long context's
        [B, S, T*H] logits are never allocated whole (64 MiB a layer-step at 64k, B=8: an
        mmap and its page faults every step, and a pass through DRAM instead of cache)."""
        b, t, h, di = qi.shape
        keys = memory.keys.data  # [B, S, Di]
        s = keys.shape[1]
        keys, cast = _common_dtype(keys, qi)
        queries = cast.reshape(b, t * h, di).transpose(1, 2)  # [B, Di, T*H]
        step = _chunk_tokens(b, t * h)
        size = b * step * t * h
        buf = workspace_buffer(memory.workspace, "index_logits", size, qi)
        narrow = None  # a narrow index's logits, widened into buf before the ReLU
        if keys.dtype in HALF_DTYPES:
            narrow = workspace_buffer(memory.workspace, "index_logits_narrow", size, queries)
        scores = qi.new_empty(b, t, s)
        for start in range(0, s, step):
            n = min(step, s - start)
            if narrow is None:
                logits = buf[: b * n * t * h].view(b, n, t * h)
                torch.bmm(keys.narrow(1, start, n), queries, out=logits)
            else:
                # Every chunk exactly `step` tokens (the last one overlaps the one before):
                # a narrow matmul's kernel is built per shape, and the context grows by a
                # token a step.
                logits = buf[: b * step * t * h].view(b, step, t * h)
                out = narrow[: b * step * t * h].view(b, step, t * h)
                torch.bmm(keys.narrow(1, start + n - step, step), queries, out=out)
                logits = logits.copy_(out).narrow(1, step - n, n)  # widened (or copied)
            part = indexer_scores(logits.view(b, n, t, h), w, di, inplace=True)
            scores.narrow(2, start, n).copy_(part)
        return scores

    def apply(self, memory: Any, selection: Selection, query: Any) -> torch.Tensor:
        """Attention over the selected tokens. A decode query (one per row) with DSA's shared
        selection takes `shared_decode_attention` (from the token-major copy when the memory
        keeps one); anything else (several queries per row, per-head or block selections)
        goes through `sparse_attention` over the KV cache."""
        assert isinstance(memory, DSAMemory)
        q, positions = query.q, self.positions(memory, query)
        if isinstance(selection, Bitmap):
            selection = selection.to_topk()
        idx = selection.indices
        if (
            not isinstance(selection, TopK)
            or selection.unit != 1
            or idx.dim() != 4
            or tuple(idx.shape[:3]) != (q.shape[0], 1, 1)
            or idx.shape[3] == 0
            or q.shape[2] != 1
        ):
            return sparse_attention(
                q, memory.kv, selection, positions, self.scale, memory.workspace, checked=True
            )
        unmasked = self.unmasked(memory, selection, query)
        small = q.shape[0] * idx.shape[3] <= _attention.SMALL_APPLY
        if (unmasked or small) and memory.token_keys is None:
            # The keys head-major and nothing masked: the shared lean Apply (its item chunks
            # batch every row and KV head; measured at least as fast as the row loop here);
            # or few tokens, masked or not: the one sdpa of `sparse_attention`'s small path
            # (so that the lean and the masked step give the same output, to the bit)
            return sparse_attention(
                q, memory.kv, selection, positions, self.scale, memory.workspace,
                checked=True, unmasked=unmasked,
            )  # fmt: skip
        return shared_decode_attention(
            q, memory, idx[:, 0, 0], selection.valid[:, 0, 0], positions, self.scale,
            unmasked=unmasked,
        )  # fmt: skip

    def kernel_memory(self, memory: DSAMemory) -> dict[str, torch.Tensor]:
        """Float rows the token_indexer kernel holds, per slot: {"keys": [B, 1, S, Di]}; a
        folded index: the cache's keys, [B, 1, S, Hkv, D] (a view; a row is Hkv*D long)."""
        if memory.keys is None:
            return {"keys": memory.kv.keys.permute(0, 2, 1, 3)[:, None]}
        return {"keys": memory.keys.data[:, None]}

    def kernel_query(self, memory: DSAMemory, query: AttentionQuery) -> dict[str, torch.Tensor]:
        """Float query of the token_indexer kernel: q [B, 1, T, H, Di] (folded: Fk), w
        [B, 1, T, H]."""
        qi, w = self.indexer_query(memory, query)
        di = qi.shape[-1]
        if memory.keys is None:
            qi = self.folded_query(qi)
        return {"q": qi[:, None] / math.sqrt(di), "w": w[:, None]}


#: Tokens a narrow index's Relevancy matmul is padded to a multiple of (`Growable.padded`).
SHAPE_QUANTUM = 256

#: Bytes of one chunk of Relevancy's logits ([B, tokens, T*H] floats) on a long context:
#: small enough to stay in the cores' caches, large enough that a chunk's few dispatches
#: are nothing beside its matmul.
CHUNK_BYTES = 2 << 20


def _chunk_tokens(batch: int, queries: int) -> int:
    """Tokens per chunk of Relevancy's logits (at least 1024)."""
    return max(1024, CHUNK_BYTES // (4 * batch * queries))


#: Bytes of padding after each row of the token-major keys: a row of Hkv*D floats is a
#: multiple of 4 KiB, and the matmuls that read one head's keys from gathered rows at such a
#: stride thrash a few cache sets; one cache line more spreads them.
ROW_PAD_BYTES = 64

#: Bytes of selected keys (Hkv*D per token, padding not counted) Apply gathers per tile: a
#: tile is multiplied while it is still in the cores' caches, so the selected keys cross DRAM
#: once and the gather buffer stays small (512 tokens for Llama-3-8B's layer).
TILE_BYTES = 2 << 20


def token_major(kv: KVCache) -> Growable:
    """The cache's keys token-major, [B, S, Hkv*D + padding], row s holding token s for
    every KV head. Grown like the cache (same capacity steps)."""
    b, h, s, d = kv.keys.shape
    pad = -(-ROW_PAD_BYTES // kv.keys.element_size())
    store = Growable(
        kv.keys.new_empty(b, 0, h * d + pad),
        axis=1,
        min_capacity=kv._keys.min_capacity,
        growth=kv.growth,
    )
    store.reserve(s)
    store.length = s
    store.data[:, :, : h * d].view(b, s, h, d).copy_(kv.keys.transpose(1, 2))
    store.data[:, :, h * d :].zero_()
    return store


def shared_decode_attention(
    q: torch.Tensor,
    memory: DSAMemory,
    tokens: torch.Tensor,
    valid: torch.Tensor,
    positions: torch.Tensor,
    scale: float | None,
    unmasked: bool = False,
) -> torch.Tensor:
    """One query per row q [B, Hq, 1, D] over its selected tokens [B, k] (shared by every
    head) with exact causal and padding masks; [B, Hq, 1, D]. `unmasked`: every selected
    token is valid and visible (the lean decode path): no mask is built.

    Keys row by row and tile by tile: gather the tile's selected keys into one reused buffer
    (one index_select: with the token-major copy, one row of Hkv*D per token, else Hkv rows
    of D) and multiply them by the R = Hq/Hkv query heads of each group (one bmm over the KV
    heads) while they are in cache. One softmax. Values: one fused gather-and-sum over the
    head-major KV cache for every row and head (`bag_values`).
    """
    kv = memory.kv
    b, hq, _, d = q.shape
    hkv = kv.kv_heads
    r = hq // hkv
    k = tokens.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    # Masked: invalid slots, padding, and (for a query before the row's end) the future.
    if unmasked:
        masked = False
    else:
        hidden = ~(valid & (tokens <= positions) & (tokens < kv.lengths[:, None]))  # [B, k]
        masked = bool(hidden.any())  # (check_query has synchronized already)
        tokens = tokens.clamp(0, kv.capacity - 1)
    qs = (q * scale).reshape(b, hkv, r, d)
    cap = kv._keys.buffer.shape[2]
    token_major = memory.token_keys is not None
    # [B, cap, Hkv*D + pad] token-major, else [B, Hkv*cap, D]
    kbuf = memory.token_keys.buffer if token_major else kv._keys.buffer.flatten(1, 2)
    step = max(1, min(k, TILE_BYTES // (hkv * d * kbuf.element_size())))
    per_tile = step * (1 if token_major else hkv) * kbuf.shape[-1]
    tile = workspace_buffer(memory.workspace, "keys", per_tile, kbuf)
    head_rows = torch.arange(hkv, device=q.device)[:, None] * cap  # [Hkv, 1]
    logits = q.new_empty(b, hkv, r, k)
    for i in range(b):
        for s in range(0, k, step):
            n = min(step, k - s)
            if token_major:
                got = torch.index_select(
                    kbuf[i], 0, tokens[i, s : s + n], out=tile[: n * kbuf.shape[-1]].view(n, -1)
                )
                heads = got[:, : hkv * d].view(n, hkv, d).transpose(0, 1)
            else:
                ix = (head_rows + tokens[i, s : s + n]).reshape(-1)
                got = torch.index_select(kbuf[i], 0, ix, out=tile[: hkv * n * d].view(-1, d))
                heads = got.view(hkv, n, d)
            logits[i, :, :, s : s + n] = torch.bmm(qs[i], heads.to(q.dtype).transpose(1, 2))
    if masked:
        logits.masked_fill_(hidden[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if masked:  # a row that sees none of its selection (fully padded) gives zeros, not NaN
        probs.masked_fill_(hidden.all(-1)[:, None, None, None], 0.0)
    # Values straight from the head-major cache: row (i*Hkv + h)*cap + token.
    rows = torch.arange(b * hkv, device=q.device).view(b, hkv, 1) * cap + tokens[:, None, :]
    table = kv._values.buffer.view(-1, kv.value_dim)
    out = bag_values(probs.view(b * hkv, r, k), rows.view(b * hkv, k), table)
    return out.view(b, hq, 1, kv.value_dim)


def _dsa_costs(self: DSA, shape: Any) -> dict:
    """Bytes and FLOPs of each step of one layer's decode step for `shape`
    (`hetmem.system.shape.Shape`), from what this method holds and computes: Prepare appends
    each new token's indexer key (k = x W_k), Relevancy projects the indexer queries and
    head weights and scores every visible token against H heads (ReLU, weighted sum),
    Retrieval takes a top-k of the S token scores, Apply attends over the k tokens shared by
    every head. `fpga` is the token_indexer launch (one slot per row), `to_fpga` the packed
    query write plus the appended keys, `from_fpga` the selection read."""
    from ..system.accounting import INDEX_BYTES, SEG_BYTES, segments, sparse_apply_cost, topk_cost
    from ..system.shape import StepCost

    m, b, t, s = shape.model, shape.batch, shape.queries, shape.context
    hkv, d = m.attn_kv_heads, m.attn_qk_dim
    blocked = False  # a block-diagonal wq reads Hkv*D*Di weights, not Fq*H*Di
    if self.weights is not None:
        heads, di = self.weights.heads, self.weights.dim
        fk, fq = self.weights.wk.shape[0], self.weights.query_features
        blocked = self.weights.blocks is not None
    elif m.index_heads:  # the model's own indexer (DeepSeek-V3.2): from hidden states
        heads, di, fk, fq = m.index_heads, m.index_dim, m.hidden, m.q_lora_rank or m.hidden
    else:  # the untrained default (`IndexerWeights.from_attention`): block-diagonal wq
        heads, di, fk, fq = m.q_heads, min(128, hkv * d), hkv * d, m.q_heads * m.head_dim
        blocked = True
    wq_weights = hkv * m.head_dim * di if blocked else fq * heads * (di + 1)
    wq_flops = 2 * heads * m.head_dim * di if blocked else 2 * fq * heads * (di + 1)
    kb, wb, tokens = m.kv_bytes, m.weight_bytes, b * t
    k = min(budget_units(shape.budget, 1), s)
    # A folded index (cached keys as features, Fk <= Di): no index kept or appended;
    # Relevancy folds wk^T into the queries and scores the Fk = Hkv*D key channels.
    folded = not m.index_heads and fk == hkv * d and fk <= di
    scored = fk if folded else di
    if folded:
        wq_weights += fk * di
        wq_flops += 2 * heads * fk * di
    costs = {
        "prepare": StepCost(
            0 if folded else fk * di * wb + tokens * di * kb,
            0 if folded else 2 * tokens * fk * di,
            note="none: the index is folded into the keys"
            if folded
            else "indexer keys of the appended tokens",
        ),
        "relevancy": StepCost(
            wq_weights * wb + b * s * scored * kb + tokens * s * 4,
            tokens * wq_flops + 2 * tokens * s * heads * (scored + 1),
            launches=4 if folded else 3,
            note=f"{heads} indexer heads x {scored} over {s} tokens"
            + (" (folded into the cached keys)" if folded else ""),
        ),
        "retrieval": topk_cost(tokens * s),
        "apply": sparse_apply_cost(shape, b * hkv, k, m.q_heads // hkv),
    }
    if k < s:  # the stage runs no kernel when the budget covers the prefix
        costs["to_fpga"] = StepCost(
            tokens * (heads * scored + 2 * heads + SEG_BYTES) + tokens * (scored + 1),
            note="int8 queries, int16 weights, segments; appended keys",
        )
        costs["fpga"] = StepCost(
            b * s * (scored + 1),
            kernel=self.kernel,
            call={
                "n": s,
                "k": k,
                "dim": scored,
                "heads": heads,
                "queries": tokens,
                "segs": segments(b, t, s),
            },
        )
        costs["from_fpga"] = StepCost(tokens * k * INDEX_BYTES, note="selected token indices")
    return costs


DSA.costs = _dsa_costs  # type: ignore[attr-defined]
