"""A transformers `Cache` whose layers keep a hetmem method memory current.

Each layer keeps transformers' dense keys and values (batch-wide padded layout), so prefill
runs exact sdpa with the model's mask and every `Cache` operation (crop, reorder, select)
keeps its meaning. Beside them it holds a hetmem `Pipeline` whose memory is the compacted
copy (`layout.compact`: per-row lengths, no padding) that sparse decode reads: built by
`method.prepare` at prefill, grown by `method.append` as tokens are cached, and rebuilt from
the dense copy whenever an operation reorders or drops tokens (the dense copy is the host's
truth, as for an FPGA copy).
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..attention import KVChunk
from ..pipeline import Pipeline
from .layout import compact
from .settings import SparseDecode

#: The layer whose `update` ran last in this context: the attention call that follows in the
#: same module reads it, since transformers passes the cache to the module, not to the
#: attention function.
_JUST_UPDATED: ContextVar[HetmemLayer | None] = ContextVar("hetmem_just_updated", default=None)


class HetmemLayer(DynamicLayer):
    """One decoder layer: dense keys/values plus the method memory of one `Pipeline`."""

    def __init__(self, pipeline: Pipeline, settings: SparseDecode):
        super().__init__()
        self.pipeline = pipeline
        self.settings = settings
        self.sparse_steps = 0
        self.dense_steps = 0

    @property
    def memory(self) -> Any:
        return self.pipeline.memory

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self.pipeline.memory is not None:
            # Each row grows at its own length; the attention call checks the tokens are real.
            self.pipeline.append(KVChunk(key_states, value_states))
        _JUST_UPDATED.set(self)
        return keys, values

    def build(self, valid: torch.Tensor | None) -> None:
        """Prepare the memory from the dense copy, keeping the `valid` [B, S] tokens."""
        self.pipeline.prepare(compact(self.keys, self.values, valid))

    def invalidate(self) -> None:
        """Drop the memory; the next attention call rebuilds it from the dense copy."""
        self.pipeline.memory = None

    def budget_now(self) -> int:
        """The budget of this decode step (every unit when the longest row fits)."""
        memory = self.pipeline.memory
        return self.settings.budget_for(memory.kv.capacity, self.pipeline.method.unit)

    # Operations that reorder or drop cached tokens: the dense copy follows transformers,
    # the memory is rebuilt from it on the next attention call.
    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.invalidate()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.invalidate()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.invalidate()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.invalidate()

    def reset(self) -> None:
        super().reset()
        self.invalidate()


class HetmemCache(Cache):
    """The cache `generate()` uses on a wrapped model: one `HetmemLayer` per decoder layer."""

    def __init__(self, settings: SparseDecode):
        layers = [HetmemLayer(settings.pipeline(i), settings) for i in range(settings.layers)]
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
    """The hetmem layer that just returned `keys` from its update, or None.

    The identity check makes a stale announcement harmless: a forward that runs on another
    cache (a plain `DynamicCache`) hands the attention function other tensors.
    """
    layer = _JUST_UPDATED.get()
    if layer is None:
        return None
    _JUST_UPDATED.set(None)
    return layer if layer.keys is keys else None
