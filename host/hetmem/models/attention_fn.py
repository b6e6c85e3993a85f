"""The attention function registered with transformers under the name `hetmem`.

Registered in `AttentionInterface` (what `config._attn_implementation` selects) together
with transformers' sdpa mask in `AttentionMaskInterface`, so the model builds the same
causal + padding mask it builds for sdpa. Model code is never edited.

Per call, on a layer of a `HetmemCache`, the new states first go into the layer's memory
(its one copy of the keys and values; the mask's diagonal says which are padding):
- prefill (the cache held nothing before): exact sdpa with the model's mask on the states
  themselves; the memory is prepared from their compacted form;
- decode (one real query token per row): Compute Relevancy, Retrieval and Apply through the
  layer's `Pipeline` under the token budget (inference: attention dropout is not applied);
- anything else after prefill (a chunk of several tokens, a masked new token, a sliding
  window layer past its window): exact sdpa on the padded layout rebuilt from the memory
  for this call.
Any other call (no cache, or a transformers cache) runs sdpa unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from ..attention import AttentionQuery
from .cache import HetmemLayer, claim
from .layout import fresh_validity

NAME = "hetmem"


def register() -> None:
    """Make `attn_implementation="hetmem"` valid (idempotent; kept registered once made)."""
    AttentionInterface.register(NAME, hetmem_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def hetmem_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Same contract as transformers' sdpa: returns ([B, T, Hq, D], None)."""
    layer = claim(key)
    if layer is not None:
        if _take_in(layer, query, attention_mask, kwargs):
            return _sparse_decode(layer, query, scaling), None
        layer.dense_steps += 1
        if key.shape[-2] != layer.get_seq_length():
            # The call needs the padded layout of the whole context: rebuilt for it only.
            key, value = layer.dense()
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def _take_in(
    layer: HetmemLayer,
    query: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kwargs: dict[str, Any],
) -> bool:
    """Take the layer's new states into its memory; say whether this call decodes sparse."""
    queries = query.shape[2]
    keys = layer.get_seq_length()
    fresh = fresh_validity(attention_mask, keys, queries)
    layer.take_in(fresh)
    window = kwargs.get("sliding_window")
    if window is not None and keys > window:
        # hetmem selects from the whole context; past the window the model's sliding mask
        # differs from it, so this layer runs dense (exact) from here on.
        return False
    # A single real new token per row over a longer context decodes sparse.
    return queries == 1 and keys > 1 and fresh is None


def _sparse_decode(layer: HetmemLayer, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """One decode step through the layer's pipeline; [B, 1, Hq, D] like sdpa."""
    pipeline = layer.pipeline
    pipeline.method.scale = scaling
    # One plan per step, made by the first layer and shared by the others.
    plan = layer.settings.plan(pipeline.memory.kv.lengths, layer.budget_now())
    out = pipeline.decode(AttentionQuery(query, plan.positions_on(query.device), plan=plan), plan)
    layer.sparse_steps += 1
    return out.to(device=query.device, dtype=query.dtype).transpose(1, 2).contiguous()
