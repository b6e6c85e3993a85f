"""What the sparse-attention methods share: memory base, query checks, Apply, the dense
reference, and per-block key summaries (Quest pages, SeerAttention-R blocks)."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .. import attention as _attention
from .. import native as _native
from .. import selection as _selection
from ..attention import (
    AttentionQuery,
    Growable,
    Growth,
    KVCache,
    KVChunk,
    _check_finite,
    check_query,
    dense_attention,
    sparse_attention,
)
from ..checks import check_positive_int, check_tensor
from ..device import synchronize
from ..errors import InputError
from ..selection import Bitmap, Scores, Selection, TopK, budget_units, topk_select
from .base import KernelBinding, Memory, Method


def as_kv(data: Any) -> tuple[KVCache, torch.Tensor | None]:
    """Prepare input: a KVCache, or a (KVCache, features [B, S, F]) pair."""
    features = None
    if isinstance(data, tuple) and len(data) == 2:
        data, features = data
    if not isinstance(data, KVCache):
        raise InputError(
            "data", f"expected a KVCache (or (KVCache, features)), got {type(data).__name__}"
        )
    return data, features


def as_chunk(data: Any) -> KVChunk:
    if isinstance(data, tuple) and len(data) == 2:
        data = KVChunk(*data)
    if not isinstance(data, KVChunk):
        raise InputError("data", f"expected a KVChunk or (keys, values), got {type(data).__name__}")
    return data


class AttentionMemory(Memory):
    """A method's index over a KV cache, plus the cache itself."""

    kv: KVCache

    @property
    def device(self) -> torch.device:
        return self.kv.device

    def rows(self, rows: slice) -> AttentionMemory:
        """A view of some batch rows for Apply (a micro-batch): the cache's rows, sharing
        storage; the index is not needed by Apply and stays whole."""
        view = copy.copy(self)
        view.kv = self.kv.rows(rows)
        return view

    @property
    def workspace(self) -> dict:
        """Apply's gather buffers, kept across decode steps (see `sparse_attention`)."""
        ws = self.__dict__.get("_workspace")
        if ws is None:
            ws = self.__dict__["_workspace"] = {}
        return ws


class LeanStep(NamedTuple):
    """A planned decode step run by `SparseAttentionMethod.lean_step`: Apply's output, the
    selection, the scores' bytes and each step's measured seconds (Relevancy, Retrieval,
    Apply), from which the pipeline keeps its profile."""

    out: torch.Tensor
    selection: TopK
    scores_nbytes: int
    seconds: tuple[float, float, float]


class NativeOp(NamedTuple):
    """A method's native one-row op (`SparseAttentionMethod._native_op`): the op, its own
    arguments, and the index whose length was advanced for the token (with the length
    before: set back where the op writes nothing)."""

    op: Callable[..., tuple[torch.Tensor | None, float]]
    args: tuple
    index: Growable
    before: int


class SparseAttentionMethod(Method):
    """Shared steps of the sparse-attention methods; subclasses supply the index."""

    family = "sparse attention"

    @property
    def scale(self) -> float | None:
        """The softmax scale (None: 1/sqrt(head dim)); a positive finite number."""
        return self.__dict__.get("_scale")

    @scale.setter
    def scale(self, value: float | None) -> None:
        ok = (
            value is None
            or value is self.__dict__.get("_scale")
            or (
                not isinstance(value, bool)
                and isinstance(value, int | float)
                and math.isfinite(value)
                and value > 0
            )
        )
        if not ok:
            raise InputError("scale", f"expected a positive finite number or None, got {value!r}")
        self.__dict__["_scale"] = value

    def check_query(self, memory: Memory, query: Any) -> None:
        if not isinstance(query, AttentionQuery):
            raise InputError("query", f"expected an AttentionQuery, got {type(query).__name__}")
        assert isinstance(memory, AttentionMemory)
        check_query(query.q, memory.kv, query.positions)

    def candidates(self, memory: AttentionMemory) -> int:
        """Units Relevancy scores (tokens, blocks or pages) over the padded cache."""
        return -(-memory.kv.capacity // self.unit)

    def retrieve(self, scores: Scores, budget: int) -> Selection:
        """Top-k units under a token budget: k = budget // unit (at least one unit)."""
        k = budget_units(budget, self.unit, scores.values.shape[-1])
        indices, valid = topk_select(scores.values, k, name="budget", masked=scores.masked)
        return TopK(indices, valid, self.unit, all_valid=not scores.masked)

    def apply(self, memory: Memory, selection: Selection, query: Any) -> torch.Tensor:
        assert isinstance(memory, AttentionMemory)
        positions = self.positions(memory, query)
        return sparse_attention(
            query.q, memory.kv, selection, positions, self.scale, memory.workspace,
            checked=True, unmasked=self.unmasked(memory, selection, query),
        )  # fmt: skip

    def lean_step(
        self, memory: AttentionMemory, query: AttentionQuery, plan: Any
    ) -> LeanStep | None:
        """Relevancy, Retrieval and Apply of a planned decode step in which nothing is masked:
        one query per row at the end of rows of equal length, every unit visible (the plan
        says so), a top-k selection. The operators are those of `relevancy`, `retrieve` and
        `apply` on such a step, on the same tensors, so the output equals theirs to the bit
        (test); what is left out is their bookkeeping: the checks the plan settled, the
        masks that hide nothing, the dispatch between layouts (at B=1, 1k tokens, ~100 us
        a layer-step, measured). None for any other step (the caller runs the three)."""
        q, kv = query.q, memory.kv
        if (
            q.shape[2] != 1
            or query.features is not None
            or getattr(self, "mode", "topk") != "topk"
            or not kv.full
            or (  # (a plan over rows as long as the cache, each query at its end, sees it all)
                plan.full_length != kv._keys.length
                and not (plan.at_end and self.sees_all(plan, self.candidates(memory)))
            )
            or not self._lean_apply_fits(memory)
        ):
            return None
        sync = q.device.type != "cpu"  # each step's time its own: the device drained first
        if sync:
            synchronize(q.device)
        start = time.perf_counter()
        scores = self._lean_scores(memory, query)  # [B, G, 1, units], nothing masked
        if sync:
            synchronize(q.device)
        scored = time.perf_counter()
        selection = self._lean_selection(scores, plan.budget)
        indices = selection.indices
        if sync:
            synchronize(q.device)
        selected = time.perf_counter()
        if indices.shape[1] in (1, kv.kv_heads):  # a selection per row or per KV head
            scale = 1.0 / math.sqrt(q.shape[-1]) if self.scale is None else self.scale
            out = _attention._lean_attention(q, kv, selection, scale, memory.workspace)
        else:  # one per query head (Quest's per_query_head): Apply's general path
            out = self.apply(memory, selection, query)
        if sync:
            synchronize(q.device)
        end = time.perf_counter()
        nbytes = scores.numel() * scores.element_size()
        return LeanStep(out, selection, nbytes, (scored - start, selected - scored, end - selected))

    def lean_append(self, memory: Any, keys: torch.Tensor, values: torch.Tensor) -> bool:
        """`append` of a decode step's token, keys and values [B, Hkv, 1, D] without
        features, to a full cache (`KVCache.append_token`) and the method's index
        (`_lean_index`), with the general path's operators and without its checks; False
        (nothing done) for any other append."""
        if not self._lean_append_fits(memory):
            return False
        kv = memory.kv
        start = kv._keys.length
        if not kv.append_token(keys, values):
            return False
        self._lean_index(memory, keys, start)
        return True

    def _lean_append_fits(self, memory: Any) -> bool:
        """Whether `lean_append` takes a token into this memory: a method says so for the
        memories whose index its `_lean_index` keeps current (none by default)."""
        return False

    def _lean_index(self, memory: Any, keys: torch.Tensor, start: int) -> None:
        """The index's part of `lean_append`: the token at `start` (keys [B, Hkv, 1, D]) is in
        the cache; bring the index up to date with it (an index that is the cache itself has
        nothing to do)."""

    def lean_one(
        self,
        memory: AttentionMemory,
        keys: torch.Tensor,
        values: torch.Tensor,
        q: torch.Tensor,
        budget_for: Callable[[int], int],
    ) -> tuple[float, LeanStep] | None:
        """`lean_append` then `lean_step` of a decode step at one batch row, in one call and
        without a plan (one query at the end of its row sees every unit; the budget is
        `budget_for(length)` once the token is in): the same operators on the same tensors,
        so memory, output and selection equal theirs to the bit (test), with none of the
        calls between them (at B=1, 1k tokens, tens of us a layer-step, measured in
        bench/decode_e2e.py's B=1 overhead). Returns the append's seconds and the step;
        None, nothing done, where the method's one-row hooks do not serve (`_one_row_fits`)
        or `lean_append` declines."""
        shape = q.shape
        if (
            shape[0] != 1
            or shape[2] != 1
            or getattr(self, "mode", "topk") != "topk"
            or not self._one_row_fits(memory, q)
            or not self._lean_apply_fits(memory)
        ):
            return None
        kv = memory.kv
        sync = not q.is_cpu  # each step's time its own: the device drained first
        library = None
        if not (sync or q.requires_grad or keys.requires_grad or values.requires_grad):
            library = _native.library()  # (hetmem's native ops: CPU only)
        if sync:
            synchronize(q.device)
        begin = time.perf_counter()
        length = kv._keys.length
        scored = None if library is None else self._native_scores(library, memory, keys, values, q)
        if scored is not None:  # appended and scored by the method's op
            scores, appended = scored
            start = begin + appended
        else:
            if not self.lean_append(memory, keys, values):  # (declined: nothing done)
                return None
            if sync:
                synchronize(q.device)
            start = time.perf_counter()
            scores = self._one_row_scores(memory, q)  # [1, G, 1, units], nothing masked
        if sync:
            synchronize(q.device)
        scored_at = time.perf_counter()
        budget, unit = budget_for(length + 1), self.unit
        scale = self.__dict__.get("_scale")
        scale = 1.0 / math.sqrt(shape[3]) if scale is None else scale
        nbytes = scores.numel() * scores.element_size()
        k = budget_units(budget, unit, scores.shape[-1])
        kbuf = kv._keys._buffer
        if library is not None and 0 < k <= scores.shape[-1] and k * unit <= _attention.SMALL_APPLY:
            used = length + 1  # (a partial last unit's tokens past it hidden)
            hide = used if used % unit else -1
            vbuf = kv._values._buffer
            out, rows, picking = library.one_row_attend(scores, k, q, kbuf, vbuf, unit, hide, scale)
            if out is not None:  # (a NaN score: the Python path below says so)
                end = time.perf_counter()
                selection = TopK(rows, _selection.all_true(rows.shape, rows.device), unit, True)
                seconds = (scored_at - start, picking, end - scored_at - picking)
                return start - begin, LeanStep(out, selection, nbytes, seconds)
        selection = self._lean_selection(scores, budget)
        if sync:
            synchronize(q.device)
        selected = time.perf_counter()
        out = _attention._lean_attention(q, kv, selection, scale, memory.workspace)
        if sync:
            synchronize(q.device)
        end = time.perf_counter()
        seconds = (scored_at - start, selected - scored_at, end - selected)
        return start - begin, LeanStep(out, selection, nbytes, seconds)

    def _native_scores(
        self, library: Any, memory: Any, keys: torch.Tensor, values: torch.Tensor, q: torch.Tensor
    ) -> tuple[torch.Tensor, float] | None:
        """`lean_one`'s append and scores through hetmem's native ops (`hetmem.native`): the
        method's op (`_native_op`) writes the token, brings the index up to date and scores,
        with the same operators as `lean_append` and `_one_row_scores`, so the same memory
        and scores to the bit (tests); one call instead of the Python between them. Returns
        the scores and the append's seconds (timed in the op), the cache's lengths kept as
        `append_token` keeps them: the token in once the op wrote it, even when the op then
        raised (its row lengths moved, the write's last operator), the index's length back
        where it wrote nothing. None, nothing done, where the method has no op or declines,
        or where the op's screen did not pass the token and the exact check finds it finite
        (an overflowing screen: the Python path takes it); else its `InputError`."""
        kv = memory.kv
        if not (self._lean_append_fits(memory) and kv.token_fits(keys, values)):
            return None
        n = kv._keys.length
        kv.reserve_end(n + 1)
        planned = self._native_op(library, memory, q, n)
        if planned is None:
            return None
        op, args, index, before = planned
        try:
            scores, appended = op(
                keys, values, q, kv._keys._buffer, kv._values._buffer, kv._lengths, *args
            )
        except BaseException:
            if bool((kv._lengths > n).any()):
                kv._keys.length = kv._values.length = n + 1
            else:
                index.length = before
            raise
        if scores is None:
            index.length = before
            _check_finite(keys, values)
            return None
        kv._keys.length = kv._values.length = n + 1
        return scores, appended

    def _native_op(self, library: Any, memory: Any, q: torch.Tensor, n: int) -> NativeOp | None:
        """The method's native op for the token at `n` (the cache reserved for it): the op,
        its arguments after (keys, values, q, the key and value buffers, the row lengths),
        and the index whose length it advanced (with the length before). None where the
        method has none (the default) or declines."""
        return None

    def _lean_selection(self, scores: torch.Tensor, budget: int) -> TopK:
        """`retrieve` of scores that mask nothing: the top k = budget // unit units (the one
        rule), every pick valid."""
        k = budget_units(budget, self.unit, scores.shape[-1])
        indices = _selection._top_indices(scores, k)
        valid = _selection.all_true(indices.shape, indices.device)
        return TopK(indices, valid, self.unit, all_valid=True)

    def _one_row_fits(self, memory: AttentionMemory, q: torch.Tensor) -> bool:
        """Whether `lean_one` serves this memory and query [1, Hq, 1, D]: `_one_row_scores`
        serves them once the step's token is in, with one score row per batch row or per KV
        group (Apply's lean form; per query head takes the planned step). None by default."""
        return False

    def _one_row_scores(self, memory: AttentionMemory, q: torch.Tensor) -> torch.Tensor:
        """Relevancy's scores [1, G, 1, units] of one query [1, Hq, 1, D] at the end of a
        single row (every unit visible): `relevancy`'s, by default through it."""
        return self.relevancy(memory, AttentionQuery(q)).values

    def _lean_scores(self, memory: AttentionMemory, query: AttentionQuery) -> torch.Tensor:
        """Relevancy's scores [B, G, T, units] of a step that masks nothing (`lean_step`)."""
        return self.relevancy(memory, query).values

    def _lean_apply_fits(self, memory: AttentionMemory) -> bool:
        """Whether `apply` of an unmasked step is the shared lean Apply (`_lean_attention`)."""
        return True

    def unmasked(self, memory: AttentionMemory, selection: Selection, query: Any) -> bool:
        """Whether Apply needs no mask: every pick valid, and the step's plan puts each query
        at the end of rows of equal length (so every token is visible to it)."""
        plan = getattr(query, "plan", None)
        return (
            isinstance(selection, TopK)
            and selection.all_valid
            and plan is not None
            and plan.at_end
            and memory.kv.full
        )

    def sees_all(self, plan: Any, candidates: int) -> bool:
        """Whether the step's plan lets every query see all `candidates` units (then
        Relevancy masks nothing)."""
        return plan is not None and plan.all_visible(self.unit, candidates)

    def apply_nbytes(self, memory: Memory, selection: Selection) -> int:
        kv = memory.kv  # type: ignore[attr-defined]
        kbuf = kv._keys._buffer
        per_token = (kbuf.shape[3] + kv._values._buffer.shape[3]) * kbuf.element_size()
        if isinstance(selection, Bitmap):
            units, groups = int(selection.mask.sum()), selection.mask.shape[1]
        elif selection.all_valid:  # known without a device sync
            units, groups = selection.indices.numel(), selection.indices.shape[1]
        else:
            units, groups = int(selection.valid.sum()), selection.indices.shape[1]
        kv_groups = kbuf.shape[1] if groups == 1 else 1
        return units * selection.unit * per_token * kv_groups

    def binding(self) -> KernelBinding | None:
        """One slot per (batch row, KV group): the method's `kernel_memory` / `kernel_query`."""
        if self.kernel is None:
            return None
        return KernelBinding(
            self.kernel,
            "slots",
            self.kernel_memory,  # type: ignore[attr-defined]
            self.kernel_query,  # type: ignore[attr-defined]
            self.unit,
            self.threshold if getattr(self, "mode", "topk") == "threshold" else None,  # type: ignore[attr-defined]
        )

    def reference(self, memory: AttentionMemory, query: AttentionQuery) -> torch.Tensor:
        """Dense causal attention over the whole cache (what a full budget must equal)."""
        return dense_attention(query.q, memory.kv, query.positions, self.scale)

    def positions(self, memory: AttentionMemory, query: AttentionQuery) -> torch.Tensor:
        """The query's positions [B, T]: the step plan's (validated once for every layer),
        else checked here."""
        if query.plan is not None:
            return query.plan.positions_on(query.q.device)
        _, positions = check_query(query.q, memory.kv, query.positions)
        return positions

    def unit_visible(
        self, memory: AttentionMemory, positions: torch.Tensor, n: int, plan: Any = None
    ) -> torch.Tensor:
        """[B, T, n] units with at least one token a query may see (from the step's plan,
        computed once for every layer, when there is one)."""
        if plan is not None:
            seen = plan.seen(self.unit, positions.device)
            return torch.arange(n, device=positions.device)[None, None, :] < seen[:, :, None]
        start = torch.arange(n, device=positions.device) * self.unit
        lens = memory.kv.lengths[:, None, None]
        return (start[None, None, :] <= positions[:, :, None]) & (start[None, None, :] < lens)


def index_growth(kv: KVCache, unit: int = 1) -> Growth:
    """How an index over `kv` with one entry per `unit` tokens grows: as the cache does under
    a bounded `Growth` (its expected length in entries), else by a bounded one of its own (an
    index never doubles: its spare room stays a few percent)."""
    return Growth() if kv.growth is None else kv.growth.within(unit)


def block_reductions(
    kv: KVCache, block: int, first_block: int, reducers: dict[str, Callable[..., torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Per-block reductions [B, Hkv, blocks', F] of the keys over valid tokens, for the
    blocks from `first_block` to the end of the cache."""
    n_blocks = -(-kv.capacity // block)
    first_block = min(first_block, n_blocks)
    start = first_block * block
    if kv.full:  # no padding: whole blocks as a view, a partial last block on its own
        return _full_reductions(kv, block, start, reducers)
    keys = kv.keys[:, :, start:]
    pad = (n_blocks - first_block) * block - keys.shape[2]
    keys = torch.nn.functional.pad(keys, (0, 0, 0, pad))
    tok = start + torch.arange(keys.shape[2], device=kv.device)
    valid = (tok[None, :] < kv.lengths[:, None])[:, None, :, None]  # [B,1,S',1]
    b, h, _, d = keys.shape
    keys = keys.view(b, h, -1, block, d)
    valid = valid.view(b, 1, -1, block, 1)
    return {name: reduce(keys, valid) for name, reduce in reducers.items()}


def _full_reductions(
    kv: KVCache, block: int, start: int, reducers: dict[str, Callable[..., torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """`block_reductions` of a cache without padding (`KVCache.full`): no mask. A decode
    step's append re-reduces one block: one reduction per reducer over a view."""
    keys = kv.keys[:, :, start:]
    b, h, n, d = keys.shape
    whole, rest = divmod(n, block)
    parts = []
    if whole:
        view = keys.narrow(2, 0, whole * block).view(b, h, whole, block, d)
        parts.append({name: reduce(view, None) for name, reduce in reducers.items()})
    if rest:
        view = keys.narrow(2, whole * block, rest).view(b, h, 1, rest, d)
        parts.append({name: reduce(view, None) for name, reduce in reducers.items()})
    if len(parts) == 1:
        return parts[0]
    if not parts:  # no block: each reducer's output over no block (its own width)
        empty = keys.new_zeros(b, h, 0, block, d)
        return {name: reduce(empty, None) for name, reduce in reducers.items()}
    return {name: torch.cat([p[name] for p in parts], dim=2) for name in reducers}


class BlockSummary:
    """Per-block reductions of keys [B, Hkv, S, D] over valid tokens, kept current on append.

    Only the blocks touched by an append are recomputed (the partial last block and the new
    ones) and written in place into buffers with a few percent of spare room
    (`index_growth`): the summary grows with the cache and is never rebuilt or copied whole.
    """

    def __init__(
        self,
        kv: KVCache,
        block: int,
        reducers: dict[str, Callable[..., torch.Tensor]],
        steps: dict[str, Callable[..., None]] | None = None,
    ):
        """`steps` (optional, one per reducer): name -> step(slot, key, opens) that brings a
        block's reduction [B, Hkv, 1, F] (a view of the store) up to date with one more
        token's keys [B, Hkv, 1, D], in place, equal to the reducer over the block's tokens;
        `opens`: the token is the block's first. A decode step's token then costs one or two
        operators instead of a reduction of its whole block (`append_token`)."""
        self.block = check_positive_int("block_size", block)
        self.reducers = reducers
        self.steps = steps
        self.growth = index_growth(kv, self.block)
        self.stores: dict[str, Growable] = {}
        self.update(kv, 0)

    @property
    def values(self) -> dict[str, torch.Tensor]:
        """name -> [B, Hkv, blocks, F] (views of the buffers)."""
        return {name: store.data for name, store in self.stores.items()}

    @property
    def blocks(self) -> int:
        return next(iter(self.stores.values())).length

    def update(self, kv: KVCache, first_token: int) -> None:
        """Recompute blocks from the one holding `first_token` to the end of the cache."""
        n_blocks = -(-kv.capacity // self.block)
        first_block = min(first_token // self.block, n_blocks)
        fresh = block_reductions(kv, self.block, first_block, self.reducers)
        for name, values in fresh.items():
            store = self.stores.get(name)
            if store is None or first_block == 0:
                self.stores[name] = Growable(values, axis=2, growth=self.growth)
            else:
                store.reserve(n_blocks)
                store.buffer.narrow(2, first_block, n_blocks - first_block).copy_(values)
                store.length = n_blocks

    def append_token(self, kv: KVCache, position: int) -> bool:
        """Bring the summaries up to date with the token every row just appended at
        `position` (a full cache's decode step) by the `steps`; False when there are none
        (then `update` re-reduces the block)."""
        if self.steps is None:
            return False
        block = position // self.block
        key = kv._keys.buffer.narrow(2, position, 1)  # as stored (the cache's dtype)
        for name, step in self.steps.items():
            store = self.stores[name]
            if store.length <= block:
                store.reserve(block + 1)
                store.length = block + 1
            step(store.buffer.narrow(2, block, 1), key, position % self.block == 0)
        return True

    def to(self, device: torch.device) -> BlockSummary:
        out = object.__new__(BlockSummary)
        out.block, out.reducers, out.growth = self.block, self.reducers, self.growth
        out.steps = self.steps
        out.stores = {name: store.to(device) for name, store in self.stores.items()}
        return out


# The reducers take keys [B, Hkv, blocks, block, D] and the valid tokens' mask [B, 1, blocks,
# block, 1], or None when every token is valid; a block without a valid token gives zeros.
def block_min(keys: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Reductions over a block's tokens: keys [..., block, D], valid [..., block, 1] or None
    (every token valid) -> [..., D]; a block without a valid token reduces to zeros."""
    if valid is None:
        return keys.amin(dim=-2)
    out = keys.masked_fill(~valid, float("inf")).amin(dim=-2)
    return torch.where(torch.isinf(out), torch.zeros_like(out), out)


def block_max(keys: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return keys.amax(dim=-2)
    out = keys.masked_fill(~valid, float("-inf")).amax(dim=-2)
    return torch.where(torch.isinf(out), torch.zeros_like(out), out)


def block_mean(keys: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return keys.mean(dim=-2)
    count = valid.sum(dim=-2).clamp(min=1)
    # where, not a product: a padding slot may hold NaN, and NaN * 0 is NaN.
    return torch.where(valid, keys, torch.zeros_like(keys)).sum(dim=-2) / count


def check_features(name: str, features: torch.Tensor, kv_or_q_batch: int, tokens: int) -> None:
    check_tensor(name, features, dims=("batch", "tokens", "features"), floating=True, finite=True)
    if features.shape[0] != kv_or_q_batch or features.shape[1] != tokens:
        raise InputError(
            name, f"expected shape [{kv_or_q_batch}, {tokens}, F], got {tuple(features.shape)}"
        )
