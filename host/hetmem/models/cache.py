"""A transformers `Cache` whose layers hold their keys and values once: in a hetmem method
memory.

Each layer's one copy of its keys and values is the `KVCache` of its `Pipeline`'s memory
(`memory.kv`): right padded, a length per row, no padding inside (`layout.compact`), with a
few percent of spare room (`Growth`, aligned to the method's unit). Both prefill's exact
sdpa and sparse decode read it:
- prefill (the layer empty): `update` hands the incoming states straight back for the exact
  sdpa call, and the attention function prepares the memory from their compacted form,
  using the model's mask to drop the padding;
- decode: `update` hands back the incoming token alone; the attention function appends it
  to the memory (`Pipeline.append`) and decodes sparse from the memory;
- any call that needs transformers' padded layout after prefill (a chunk of several tokens,
  a sliding-window layer past its window, a masked new token) gets it rebuilt from the
  compact copy for that call only (`HetmemLayer.dense`), and nothing of it is kept (the
  layer's `keys` / `values`, for code that reads them, are such copies too).
`Validity` remembers which padded positions hold real tokens, so every `Cache` operation
(crop, reorder, batch repeat and select) acts on the one copy and the method's index is
rebuilt from it (`Method.prepare` on the changed `KVCache`), never from a second copy.
"""

from __future__ import annotations

import threading
import weakref
from contextvars import ContextVar
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..attention import Growth, KVCache, KVChunk
from ..errors import ConcurrentUse, InputError
from ..pipeline import Pipeline
from .layout import Validity, compact, fresh_validity, padded
from .settings import SparseDecode

#: The layer whose `update` ran last in this context: the attention call that follows in the
#: same module reads it, since transformers passes the cache to the module, not to the
#: attention function.
_JUST_UPDATED: ContextVar[HetmemLayer | None] = ContextVar("hetmem_just_updated", default=None)

_THREAD = threading.local()


class ThreadScratch(dict):
    """Apply's gather buffers (`AttentionMemory.workspace`), kept per thread rather than per
    memory: the layers of a forward run one after another, so one scratch (bounded by
    `attention.CHUNK_BYTES` / `dsa.TILE_BYTES`) serves every layer and cache of the thread.
    It is the thread's working memory, not part of a cache: this object holds nothing
    itself and reads and writes the calling thread's buffers."""

    @staticmethod
    def _buffers() -> dict:
        buffers = getattr(_THREAD, "buffers", None)
        if buffers is None:
            buffers = _THREAD.buffers = {}
        return buffers

    def get(self, key: Any, default: Any = None) -> Any:
        return self._buffers().get(key, default)

    def __getitem__(self, key: Any) -> Any:
        return self._buffers()[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._buffers()[key] = value

    def __contains__(self, key: object) -> bool:
        return key in self._buffers()


SCRATCH = ThreadScratch()


class UseGuard:
    """One forward pass at a time over a cache: the thread whose forward is in progress
    (from its first layer's `update` to its last layer's attention call) owns the cache, and
    another thread that reaches it meanwhile gets `ConcurrentUse` (its tokens would interleave
    with the owner's in every layer). Threads with caches of their own run side by side."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.thread: int | None = None

    def enter(self) -> None:
        me = threading.get_ident()
        with self._lock:
            owner = self.thread
            if owner is not None and owner != me and _alive(owner):
                raise ConcurrentUse(
                    f"this cache is in a forward pass on thread {owner}; thread {me} may not "
                    "use it at the same time (one cache holds one sequence: give each thread "
                    "its own, e.g. a fresh generate() call)"
                )
            self.thread = me

    def leave(self) -> None:
        with self._lock:
            if self.thread == threading.get_ident():
                self.thread = None


def _alive(ident: int) -> bool:
    return any(t.ident == ident for t in threading.enumerate())


class HetmemLayer(DynamicLayer):
    """One decoder layer: its keys and values, held once, in the memory of one `Pipeline`."""

    def __init__(self, pipeline: Pipeline, settings: SparseDecode, max_length: int = 0):
        super().__init__()  # no dense `keys` / `values` are kept: the memory holds them
        self.pipeline = pipeline
        self.settings = settings
        self.sparse_steps = 0
        self.dense_steps = 0
        # A known final length (generate's prompt + max_new_tokens) is allocated at prefill:
        # decode then appends without reallocating, as a static cache does.
        self.growth = Growth(align=pipeline.method.unit, expected=max_length)
        self._length = 0  # transformers' padded length of the tokens in the memory
        self._validity: Validity | None = None
        # The states of the last `update`, until the attention call takes them in.
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        # Whether hetmem's attention function takes this layer's updates in (it said so at
        # the last call); else `update` returns the padded layout, as a DynamicLayer does.
        self._hetmem = False
        self._returned: weakref.ref | None = None
        self._guard = UseGuard()  # the cache's, once it is built
        self._last = True  # the model's last layer: its attention call ends a forward

    # -- what the memory holds -------------------------------------------------------------
    @property
    def memory(self) -> Any:
        return self.pipeline.memory

    @property
    def kv(self) -> KVCache | None:
        memory = self.pipeline.memory
        return None if memory is None else memory.kv

    @property
    def keys(self) -> torch.Tensor | None:  # type: ignore[override]
        """transformers' padded keys [B, Hkv, S, D] (what a DynamicLayer keeps), rebuilt from
        the memory on each read and not kept: a copy for code that reads `layer.keys`."""
        dense = self.dense()
        return None if dense is None else dense[0]

    @keys.setter
    def keys(self, value: Any) -> None:
        if value is not None:
            raise AttributeError("a HetmemLayer keeps its keys in the method memory")

    @property
    def values(self) -> torch.Tensor | None:  # type: ignore[override]
        """The padded values, as `keys`."""
        dense = self.dense()
        return None if dense is None else dense[1]

    @values.setter
    def values(self, value: Any) -> None:
        if value is not None:
            raise AttributeError("a HetmemLayer keeps its values in the method memory")

    def dense(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keys and values in transformers' padded layout, [B, Hkv, S, D] on the model's
        device, including states not yet taken in; None when the layer is empty."""
        kv = self.kv
        parts = []
        if kv is not None and self._length:
            keys, values = padded(kv, self._validity)
            parts.append((keys.to(self.device), values.to(self.device)))
        if self._pending is not None:
            parts.append(self._pending)
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        (k0, v0), (k1, v1) = parts
        return torch.cat([k0, k1.to(k0.dtype)], dim=-2), torch.cat([v0, v1.to(v0.dtype)], dim=-2)

    # -- transformers' layer interface -------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hold the new states until the attention call takes them in (with the model's
        mask, which says which of them are padding); return what the attention call reads:
        the states themselves when the layer was empty or hetmem's attention function took
        the last ones in, else the padded layout of the whole context, as a DynamicLayer."""
        self._guard.enter()
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._pending is not None:
            # No attention call took the last states in (the cache was filled by `update`
            # alone, or the model does not run hetmem's attention): every token real, as a
            # DynamicLayer keeps them.
            self.take_in(None)
            self._hetmem = False
        self._pending = (key_states, value_states)
        _JUST_UPDATED.set(self)
        if self._length == 0 or self._hetmem:
            return key_states, value_states
        keys, values = self.dense()
        self._returned = weakref.ref(keys)  # hetmem's attention may still claim them
        return keys, values

    def get_seq_length(self) -> int:
        pending = 0 if self._pending is None else self._pending[0].shape[-2]
        return self._length + pending

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def offload(self) -> None:
        """The memory stays where the pipeline's placement put it (transformers' layer
        offloading is not used on a hetmem cache)."""

    def prefetch(self) -> None:
        """See `offload`."""

    # -- taking new states in --------------------------------------------------------------
    def take_in(self, fresh: torch.Tensor | None) -> None:
        """Take the pending states into the memory; `fresh` [B, T] says which of them are
        real tokens (None: all). The first states prepare the memory from their compacted
        form; later ones are appended (each row at its own length)."""
        if self._pending is None:
            return
        try:
            self._take_in(fresh)
        finally:
            if self._last:
                self._guard.leave()

    def _take_in(self, fresh: torch.Tensor | None) -> None:
        keys, values = self._pending
        self._pending = None
        batch, tokens = keys.shape[0], keys.shape[-2]
        if fresh is not None and fresh.shape[0] != batch:
            fresh = fresh.expand(batch, -1)
        if self._length == 0:
            self._validity = Validity(fresh, batch, tokens, keys.device)
            self._length = tokens
            self.pipeline.prepare(compact(keys, values, fresh, self.growth))
            self._share_scratch()
            return
        validity = self._validity
        if fresh is None or bool(fresh.all()):
            self.pipeline.append(KVChunk(keys, values))
            validity.extend(None, tokens)
            self._length += tokens
            return
        # Some new tokens are padding: rebuild the compact copy with them left out (rare:
        # transformers' generate() never masks a token it feeds after the prompt).
        old_keys, old_values = padded(self.kv, validity)
        validity.extend(fresh, tokens)
        self._length += tokens
        all_keys = torch.cat([old_keys.to(keys.device, keys.dtype), keys], dim=-2)
        all_values = torch.cat([old_values.to(values.device, values.dtype), values], dim=-2)
        del old_keys, old_values
        self.pipeline.prepare(compact(all_keys, all_values, validity.full(), self.growth))
        self._share_scratch()

    def lean_decode(
        self, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None
    ) -> torch.Tensor | None:
        """A decode step that masks nothing (one real token per row appended to a layer with
        no padding), taken in and attended by `Pipeline.lean_decode`: what `take_in` and
        `_sparse_decode` do (the same memory, outputs and profiles), without their
        bookkeeping. [B, 1, Hq, D] like sdpa; None (nothing done) for any other call."""
        pending = self._pending
        if (
            pending is None
            or self._length == 0
            or query.shape[2] != 1
            or pending[0].shape[-2] != 1
            or self._validity.mask is not None
            or (
                attention_mask is not None
                and fresh_validity(attention_mask, self._length + 1, 1) is not None
            )
        ):
            return None
        try:
            out = self.pipeline.lean_decode(
                pending[0], pending[1], query, scaling, self._plan, self._budget
            )
        except BaseException:
            # As `take_in`: a step that raised keeps nothing pending (its token is in once
            # the append ran: the memory then holds one more token than the layer counted)
            self._pending = None
            kv = self.kv
            if kv is not None and kv.capacity > self._length:
                self._validity.extend(None, 1)
                self._length += 1
            if self._last:
                self._guard.leave()
            raise
        if out is None:
            return None
        self._pending = None
        self._validity.extend(None, 1)
        self._length += 1
        if self._last:
            self._guard.leave()
        self.sparse_steps += 1
        if out.dtype != query.dtype or out.device != query.device:
            out = out.to(device=query.device, dtype=query.dtype)
        if out.is_contiguous():  # (one query: [B, Hq, 1, D] is [B, 1, Hq, D] as laid out)
            return out.view(out.shape[0], 1, out.shape[1], out.shape[3])
        return out.transpose(1, 2).contiguous()

    def _budget(self, length: int) -> int:
        """The step's token budget once its rows hold `length` tokens at most."""
        return self.settings.budget_for(length, self.pipeline.method.unit)

    def _plan(self, kv: KVCache) -> Any:
        """The step's plan over the memory's rows once the token is in (shared by layers);
        a full cache's from its batch and length alone (no tensor read)."""
        settings, length = self.settings, kv._keys.length
        budget = settings.budget_for(length, self.pipeline.method.unit)
        if kv.full:
            return settings.full_plan(kv._keys._buffer.shape[0], length, budget)
        return settings.plan(kv.lengths, budget)

    def claimed_by(self, keys: torch.Tensor) -> bool:
        """Whether `keys` are what this layer's last `update` returned (hetmem's attention
        function takes the pending states in from here on)."""
        if self._pending is None:
            return False
        returned = None if self._returned is None else self._returned()
        self._returned = None
        if self._pending[0] is keys or returned is keys:
            self._hetmem = True
            return True
        return False

    def _share_scratch(self) -> None:
        memory = self.pipeline.memory
        if memory is not None and hasattr(type(memory), "workspace"):
            memory.__dict__["_workspace"] = SCRATCH

    def budget_now(self) -> int:
        """The budget of this decode step (every unit when the longest row fits)."""
        memory = self.pipeline.memory
        return self.settings.budget_for(memory.kv.capacity, self.pipeline.method.unit)

    # -- operations that drop or reorder tokens: on the one copy, then the index rebuilt ---
    def _rebuild(self) -> None:
        kv = self.kv
        if kv is None or self._length == 0 or kv.batch == 0:
            self.reset()
            return
        self.pipeline.prepare(kv)
        self._share_scratch()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last |tokens_to_remove| padded positions: each row loses the real tokens
        among them (its last ones)."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"Calling `crop` with a positive value (`{tokens_to_remove}`) is not supported. "
                "Please use a negative integer to remove that number of tokens from the cache instead."
            )
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self.take_in(None)
        length = max(self._length + tokens_to_remove, 0)
        if length == 0:
            self.reset()
            return
        self._validity.crop(length)
        self._length = length
        self.kv.truncate(self._validity.lengths())
        self._rebuild()

    def _select_rows(self, index: torch.Tensor) -> None:
        self.take_in(None)
        if self._length == 0:
            return
        self.kv.select_rows(index)
        self._validity.select_rows(index)
        self._rebuild()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.take_in(None)
        if self._length:
            rows = torch.arange(self.kv.batch, device=self.kv.device)
            self._select_rows(rows.repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        indices = torch.as_tensor(indices)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        self._select_rows(indices.long())

    def reset(self) -> None:
        self.pipeline.memory = None
        self._length = 0
        self._validity = None
        self._pending = None
        self._returned = None
        self.keys = self.values = None
        self.is_initialized = False


class HetmemCache(Cache):
    """The cache `generate()` uses on a wrapped model: one `HetmemLayer` per decoder layer.

    `max_length`: the tokens a row will hold at most (prompt + new tokens), when known: each
    layer's memory is allocated for them at prefill and never reallocated within them
    (without it, the memory keeps a few percent of spare room and grows by that)."""

    def __init__(self, settings: SparseDecode, max_length: int | None = None):
        if max_length is not None and (
            not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1
        ):
            raise InputError("max_length", f"expected a positive int or None, got {max_length!r}")
        expected = max_length or 0
        layers = [
            HetmemLayer(settings.pipeline(i), settings, expected) for i in range(settings.layers)
        ]
        guard = UseGuard()
        for i, layer in enumerate(layers):
            layer._guard, layer._last = guard, i == len(layers) - 1
        super().__init__(layers=layers)
        self.settings = settings

    @property
    def pipelines(self) -> list[Pipeline]:
        return [layer.pipeline for layer in self.layers]

    def stats(self) -> dict[str, int]:
        """Decode steps that ran sparse and attention calls that ran dense, over all layers."""
        return {
            "sparse_steps": sum(layer.sparse_steps for layer in self.layers),
            "dense_steps": sum(layer.dense_steps for layer in self.layers),
        }


def claim(keys: torch.Tensor) -> HetmemLayer | None:
    """The hetmem layer whose `update` just returned `keys`, or None.

    The identity check makes a stale announcement harmless: a forward that runs on another
    cache (a plain `DynamicCache`) hands the attention function other tensors.
    """
    layer = _JUST_UPDATED.get()
    if layer is None:
        return None
    _JUST_UPDATED.set(None)
    return layer if layer.claimed_by(keys) else None
