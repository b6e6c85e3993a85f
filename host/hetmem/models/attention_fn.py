"""The attention function registered with transformers under the name `hetmem`.

Registered in `AttentionInterface` (what `config._attn_implementation` selects) together
with transformers' sdpa mask in `AttentionMaskInterface`, so the model builds the same
causal + padding mask it builds for sdpa. Model code is never edited.

Per call, on a layer of a `HetmemCache`, the new states first go into the layer's memory
(its one copy of the keys and values; the mask's diagonal says which are padding):
- prefill (the cache held nothing before): exact attention with the model's mask on the
  states themselves; the memory is prepared from their compacted form;
- decode (one real query token per row): Compute Relevancy, Retrieval and Apply through the
  layer's `Pipeline` under the token budget (inference: attention dropout is not applied);
- decode on a sliding-window layer whose window no longer covers the context: exact
  attention over the window, read from the memory (each row's last real tokens inside it);
- anything else after prefill (a chunk of several tokens, a masked new token): exact
  attention on the padded layout rebuilt from the memory for this call.
Any other call (no cache, or a transformers cache) runs exact attention unchanged.

Exact attention is transformers' sdpa, or, for a layer with attention sinks (`s_aux`, one
learned logit per head that joins the softmax and takes its share of the mass) or logit
softcapping (`softcap`: logits -> c * tanh(logits / c)), which sdpa cannot express, the
same softmax written out (`attend`). A sparse decode step of such a layer takes the
pipeline's selection and applies these to the softmax over the selected tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from ..attention import AttentionQuery, KVCache, expand_units, gather_tokens, visible_mask
from ..errors import UnsupportedModel
from ..profile import Profile
from ..selection import Bitmap, Selection
from .cache import HetmemLayer, claim
from .layout import fresh_validity

NAME = "hetmem"

#: Bytes of float32 logits `attend` holds at once (it runs a long prefill chunk by chunk).
LOGITS_BYTES = 256 << 20

#: What one call does with a layer of a hetmem cache.
SPARSE, WINDOW, DENSE = "sparse", "window", "dense"

#: Attention arguments a model may pass that hetmem does not apply: refused at the call
#: rather than silently dropped (`wrap` refuses the architectures it knows use them).
_REFUSED_KWARGS = {
    "sinks": "attention sinks passed as `sinks` (hetmem applies the `s_aux` convention)",
    "position_bias": "a position bias added to the logits (ALiBi or relative)",
}


def register() -> None:
    """Make `attn_implementation="hetmem"` valid (idempotent; kept registered once made)."""
    AttentionInterface.register(NAME, hetmem_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


@dataclass(frozen=True)
class Extras:
    """What a layer's attention does beyond softmax(q.k * scale): its sliding window (in
    tokens: a query sees its last `window` keys), sink logits [Hq], logit softcap."""

    window: int | None = None
    sinks: torch.Tensor | None = None
    softcap: float | None = None

    @property
    def written_out(self) -> bool:
        """Whether exact attention needs `attend` (sdpa cannot express sinks or softcap)."""
        return self.sinks is not None or self.softcap is not None

    @classmethod
    def of(cls, module: torch.nn.Module, kwargs: dict[str, Any]) -> Extras:
        if kwargs.keys().isdisjoint(_EXTRA_KWARGS):  # (most calls: a model without them)
            return _NO_EXTRAS
        for name, what in _REFUSED_KWARGS.items():
            if kwargs.get(name) is not None:
                raise UnsupportedModel(
                    type(module).__name__, what, "hetmem's attention would not apply it"
                )
        window = kwargs.get("sliding_window")
        softcap = kwargs.get("softcap")
        return cls(
            None if window is None else int(window),
            kwargs.get("s_aux"),
            None if softcap is None else float(softcap),
        )


_NO_EXTRAS = Extras()

#: The attention arguments `Extras.of` reads (or refuses).
_EXTRA_KWARGS = frozenset({"sliding_window", "softcap", "s_aux", *_REFUSED_KWARGS})


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
    extras = Extras.of(module, kwargs)
    layer = claim(key)
    if layer is not None:
        if extras.window is None and not extras.written_out:
            out = layer.lean_decode(query, attention_mask, scaling)
            if out is not None:  # a decode step with nothing masked: taken in and attended
                return out, None
        mode = _take_in(layer, query, attention_mask, extras.window)
        if mode == SPARSE:
            return _sparse_decode(layer, query, scaling, extras), None
        layer.dense_steps += 1
        if mode == WINDOW:
            return _window_decode(layer, query, scaling, extras), None
        if key.shape[-2] != layer.get_seq_length():
            # The call needs the padded layout of the whole context: rebuilt for it only.
            key, value = layer.dense()
    if extras.written_out:
        mask = _dense_mask(attention_mask, query.shape[-2], key.shape[-2], extras.window, key)
        return attend(query, key, value, mask, _scale(scaling, query), extras), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def _take_in(
    layer: HetmemLayer,
    query: torch.Tensor,
    attention_mask: torch.Tensor | None,
    window: int | None,
) -> str:
    """Take the layer's new states into its memory; say what this call runs."""
    queries = query.shape[2]
    keys = layer.get_seq_length()
    fresh = fresh_validity(attention_mask, keys, queries)
    layer.take_in(fresh)
    # A single real new token per row over a longer context decodes from the memory.
    if not (queries == 1 and keys > 1 and fresh is None):
        return DENSE
    if window is not None and keys > window:
        # hetmem selects from the whole visible prefix; the window hides its start.
        return WINDOW
    return SPARSE


# -- the decode steps ----------------------------------------------------------------------


def _sparse_decode(
    layer: HetmemLayer, query: torch.Tensor, scaling: float | None, extras: Extras
) -> torch.Tensor:
    """One decode step through the layer's pipeline; [B, 1, Hq, D] like sdpa."""
    pipeline = layer.pipeline
    pipeline.method.scale = scaling
    # One plan per step, made by the first layer and shared by the others.
    plan = layer.settings.plan(pipeline.memory.kv.lengths, layer.budget_now())
    step_query = AttentionQuery(query, plan.positions_on(query.device), plan=plan)
    if not extras.written_out:
        out = pipeline.decode(step_query, plan)
        layer.sparse_steps += 1
        return out.to(device=query.device, dtype=query.dtype).transpose(1, 2).contiguous()
    # Sinks or softcap: the pipeline selects (on its placement, the card included), the
    # softmax over the selected tokens adds them.
    memory = pipeline.memory
    profile = Profile()
    selection = pipeline.select(step_query, plan, profile)
    device = pipeline.device("apply")
    with profile.measure("apply", device, pipeline.method.apply_nbytes(memory, selection)):
        out = attend_selection(
            query.to(device),
            memory.kv,
            selection,
            plan.positions_on(device),
            _scale(scaling, query),
            extras,
        )
    pipeline.last_selection = selection
    pipeline._finish(profile)  # the step's profile, kept as the pipeline keeps its own
    layer.sparse_steps += 1
    return out.to(device=query.device, dtype=query.dtype)


def _window_decode(
    layer: HetmemLayer, query: torch.Tensor, scaling: float | None, extras: Extras
) -> torch.Tensor:
    """A decode step of a sliding-window layer past its window: exact attention over the
    keys the window shows, read from the memory; [B, 1, Hq, D].

    The window covers the last `window` padded positions; the real tokens among them are
    each row's last real tokens (the memory keeps them in order), so the step reads those."""
    kv = layer.kv
    window = int(extras.window)  # type: ignore[arg-type]
    validity = layer._validity
    lengths = kv.lengths
    if validity is None or validity.mask is None:  # left padding: every position since is real
        shown = lengths.clamp(max=window)
    else:
        shown = validity.full()[:, -window:].sum(dim=-1).to(lengths.device)
    width = min(window, kv.capacity)
    offsets = torch.arange(width, device=lengths.device)
    index = (lengths - shown)[:, None] + offsets[None, :]  # [B, width]
    valid = offsets[None, :] < shown[:, None]
    index = index.clamp(0, kv.capacity - 1)
    b, h = kv.batch, kv.kv_heads
    keys = kv.keys.gather(2, index[:, None, :, None].expand(b, h, width, kv.keys.shape[-1]))
    values = kv.values.gather(2, index[:, None, :, None].expand(b, h, width, kv.values.shape[-1]))
    device = query.device
    mask = valid.to(device)[:, None, None, :]  # [B, 1, 1, width]
    out = attend(
        query, keys.to(device, query.dtype), values.to(device, query.dtype), mask,
        _scale(scaling, query), extras,
    )  # fmt: skip
    return out


# -- exact attention with sinks and softcap ------------------------------------------------


def _scale(scaling: float | None, query: torch.Tensor) -> float:
    return query.shape[-1] ** -0.5 if scaling is None else float(scaling)


def _logits_to_probs(logits: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last axis, with a sink logit per head (shaped to broadcast against
    logits[..., :1]) taking its share of the mass; rows that see nothing give zeros."""
    if sinks is None:
        return torch.softmax(logits, dim=-1).nan_to_num(0.0)
    sink = sinks.to(logits.dtype).expand(*logits.shape[:-1], 1)
    probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)
    return probs[..., :-1]


def _softcap(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    extras: Extras,
) -> torch.Tensor:
    """Exact softmax attention, [B, T, Hq, Dv]: query [B, Hq, T, D], key / value
    [B, Hkv, S, D] (each KV head serving Hq / Hkv query heads), `mask` bool (True: attend)
    or additive, broadcast to [B, Hq, T, S]; the logits softcapped, the sink logits joining
    the softmax. Computed in float32, in chunks of queries of at most `LOGITS_BYTES` of
    logits (a long prefill never holds all of them)."""
    b, heads, t, _ = query.shape
    hkv = key.shape[1]
    r = heads // hkv
    qg = query.float().unflatten(1, (hkv, r))  # [B, Hkv, R, T, D]
    kt = key.float()[:, :, None].transpose(-1, -2)  # [B, Hkv, 1, D, S]
    vf = value.float()[:, :, None]  # [B, Hkv, 1, S, Dv]
    if mask is not None:
        mask = mask.to(query.device)
        mask = mask[:, :, None] if mask.shape[1] == 1 else mask.unflatten(1, (hkv, r))
    sinks = None if extras.sinks is None else extras.sinks.to(query.device).view(1, hkv, r, 1, 1)
    per_query = b * heads * key.shape[-2] * 4
    step = max(1, LOGITS_BYTES // max(per_query, 1))
    outs = []
    for start in range(0, t, step):
        rows = slice(start, min(t, start + step))
        logits = _softcap(torch.matmul(qg[:, :, :, rows], kt) * scale, extras.softcap)
        if mask is not None:
            part = mask[:, :, :, rows] if mask.shape[-2] == t else mask
            if part.dtype == torch.bool:
                logits = logits.masked_fill(~part, float("-inf"))
            else:
                logits = logits + part.float()
        outs.append(torch.matmul(_logits_to_probs(logits, sinks), vf))  # [B, Hkv, R, t, Dv]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)
    return out.flatten(1, 2).to(query.dtype).transpose(1, 2).contiguous()


def attend_selection(
    query: torch.Tensor,
    kv: KVCache,
    selection: Selection,
    positions: torch.Tensor,
    scale: float,
    extras: Extras,
) -> torch.Tensor:
    """Attention over the selected tokens only, with the layer's softcap and sinks;
    [B, T, Hq, Dv]. Selected tokens that are invalid, padding or in the query's future are
    masked (as `sparse_attention` masks them)."""
    if isinstance(selection, Bitmap):
        selection = selection.to_topk()
    tokens, valid = expand_units(selection)  # [B, G, T, n], G in (1, Hkv, Hq)
    b, hq, t, _ = query.shape
    hkv = kv.kv_heads
    groups = tokens.shape[1]
    if groups == hq and hq != hkv:
        grouped = tokens.unflatten(1, (hkv, hq // hkv))  # [B, Hkv, R, T, n]
        valid = valid.unflatten(1, (hkv, hq // hkv))
    else:
        grouped, valid = tokens[:, :, None], valid[:, :, None]  # [B, G, 1, T, n]
    mask = valid & visible_mask(kv, positions, grouped)
    keys, values = gather_tokens(kv, tokens, hq)  # [B, Hkv, G', T, n, D]
    qg = query.float().unflatten(1, (hkv, hq // hkv))  # [B, Hkv, R, T, D]
    logits = (qg.unsqueeze(-2) @ keys.float().transpose(-1, -2)).squeeze(-2) * scale
    logits = _softcap(logits, extras.softcap)  # [B, Hkv, R, T, n]
    logits = logits.masked_fill(~mask.expand_as(logits), float("-inf"))
    sinks = None if extras.sinks is None else extras.sinks.to(query.device)
    sinks = None if sinks is None else sinks.view(1, hkv, hq // hkv, 1, 1)
    probs = _logits_to_probs(logits, sinks)
    out = (probs.unsqueeze(-2) @ values.float()).squeeze(-2)  # [B, Hkv, R, T, Dv]
    return out.flatten(1, 2).to(query.dtype).transpose(1, 2).contiguous()


def _dense_mask(
    attention_mask: torch.Tensor | None,
    queries: int,
    keys: int,
    window: int | None,
    like: torch.Tensor,
) -> torch.Tensor | None:
    """The model's mask, or (where its sdpa mask was skipped as plain causal) the causal
    mask of the last `queries` of `keys` positions, windowed like transformers' masks."""
    if attention_mask is not None:
        return attention_mask
    q = torch.arange(keys - queries, keys, device=like.device)[:, None]
    k = torch.arange(keys, device=like.device)[None, :]
    mask = k <= q
    if window is not None:
        mask &= k > q - window
    return mask[None, None]  # [1, 1, T, S]
