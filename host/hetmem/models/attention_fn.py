"""The attention function registered with transformers under the name `hetmem`.

Registered in `AttentionInterface` (what `config._attn_implementation` selects) together
with transformers' sdpa mask in `AttentionMaskInterface`, so the model builds the same
causal + padding mask it builds for sdpa. Model code is never edited.

Per call, on a layer of a `HetmemCache`:
- prefill (the cache held nothing before) and multi-token chunks: exact sdpa with the
  model's mask; the layer's memory is prepared from the compacted keys;
- decode (one query token): Compute Relevancy, Retrieval and Apply through the layer's
  `Pipeline` under the token budget (inference: attention dropout is not applied).
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
from .layout import key_validity

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
    if layer is not None and _sync_memory(layer, query, key, attention_mask, kwargs):
        return _sparse_decode(layer, query, scaling), None
    if layer is not None:
        layer.dense_steps += 1
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def _sync_memory(
    layer: HetmemLayer,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    kwargs: dict[str, Any],
) -> bool:
    """Bring the layer's memory in line with its dense keys; say whether to decode sparse."""
    queries, keys = query.shape[2], key.shape[2]
    window = kwargs.get("sliding_window")
    if window is not None and keys > window:
        # hetmem selects from the whole context; past the window the model's sliding mask
        # differs from it, so this layer runs dense (exact) from here on.
        layer.invalidate()
        return False
    valid = key_validity(attention_mask, keys)
    fresh_all_real = valid is None or bool(valid[:, keys - queries :].all())
    if layer.memory is None or not fresh_all_real:
        # Prefill, or a cache operation (reorder, crop) or masked new tokens: rebuild.
        layer.build(valid)
    return queries == 1 and keys > 1


def _sparse_decode(layer: HetmemLayer, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """One decode step through the layer's pipeline; [B, 1, Hq, D] like sdpa."""
    pipeline = layer.pipeline
    pipeline.method.scale = scaling
    out = pipeline.step(AttentionQuery(query), layer.budget_now())
    layer.sparse_steps += 1
    return out.to(device=query.device, dtype=query.dtype).transpose(1, 2).contiguous()
