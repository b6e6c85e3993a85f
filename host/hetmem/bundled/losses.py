"""The bundled model's training losses: the weighted next-token loss, and the supervision of a
few attention heads onto the sources of copies and answers (through an attention function
that keeps their queries and keys, `AttentionTap`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .batches import ANSWER, COPY, LM
from .data import BOS

#: The name the training-time attention function registers under (see `AttentionTap`).
TAP = "hetmem_train_tap"


class AttentionTap:
    """Keeps the post-RoPE queries and keys of some layers during a training forward.

    Registered with transformers' `AttentionInterface` as `TAP`; attention itself is sdpa,
    unchanged. The kept tensors feed `retrieval_loss`.
    """

    current: AttentionTap | None = None

    def __init__(self, heads: Sequence[tuple[int, int]], previous: Sequence[tuple[int, int]] = ()):
        self.heads = tuple(heads)
        self.previous = tuple(previous)
        self.layers = {layer for layer, _ in (*heads, *previous)}
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}

    @staticmethod
    def register() -> None:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask

        AttentionInterface.register(TAP, _tap_forward)
        AttentionMaskInterface.register(TAP, sdpa_mask)


def _tap_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    **kwargs: Any,
) -> Any:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    tap = AttentionTap.current
    if tap is not None and module.layer_idx in tap.layers:
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        tap.kept[module.layer_idx] = (query, key, scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def retrieval_loss(
    tap: AttentionTap, links: torch.Tensor, heads: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """Mean -log(attention weight on the source) over the links, for each of `heads`.

    A link (row, query position p, source position j) says: the token after p is a copy of
    the token at j. Supervising a few heads to attend there (and a first-layer head to the
    previous token) is the shortcut that makes a small model's retrieval form within
    minutes of CPU rather than days.
    """
    losses = []
    for layer, head in heads:
        q, k, scaling = tap.kept[layer]
        group = q.shape[1] // k.shape[1]
        for r in links[:, 0].unique().tolist():
            mine = links[links[:, 0] == r]
            p, j = mine[:, 1], mine[:, 2]
            scores = (q[r, head, p] @ k[r, head // group].T) * scaling  # [n, L]
            causal = torch.arange(k.shape[2])[None, :] <= p[:, None]
            scores = scores.masked_fill(~causal, float("-inf"))
            target = scores.gather(1, j[:, None])[:, 0]
            losses.append(torch.logsumexp(scores, -1) - target)
    return torch.cat(losses).mean()


def loss_fn(
    model: Any,
    batch: dict[str, torch.Tensor],
    tap: AttentionTap | None = None,
    retrieval_weight: float = 1.0,
    previous_weight: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted next-token loss (logits only where the weight is set), plus the retrieval
    loss of the tapped heads when `tap` is given."""
    AttentionTap.current = tap
    try:
        # An explicit all-ones mask, so that no transformers version reads the jump in the
        # position ids as the start of another packed sequence.
        hidden = model.model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=torch.ones_like(batch["input_ids"]),
        ).last_hidden_state
    finally:
        AttentionTap.current = None
    w = batch["weight"][:, 1:]
    where = w > 0
    logits = model.lm_head(hidden[:, :-1][where])
    target = batch["input_ids"][:, 1:][where]
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    ww = w[where]
    loss = (ce * ww).sum() / ww.sum()
    role = batch["role"][:, 1:][where]
    stats = {}
    if tap is not None and len(batch["links"]):
        attn = retrieval_loss(tap, batch["links"], tap.heads)
        loss = loss + retrieval_weight * attn
        stats["attn_loss"] = float(attn.detach())
    if tap is not None and tap.previous and previous_weight > 0:
        prev = retrieval_loss(tap, batch["previous"], tap.previous)
        loss = loss + previous_weight * prev
        stats["prev_loss"] = float(prev.detach())
    if tap is not None:
        tap.kept.clear()
    stats["loss"] = float(loss.detach())
    with torch.no_grad():
        hit = logits.argmax(-1) == target
        for code, name in ((ANSWER, "answer"), (COPY, "copy")):
            mine = role == code
            if bool(mine.any()):
                stats[f"{name}_loss"] = float(ce[mine].mean())
                stats[f"{name}_acc"] = float(hit[mine].float().mean())
        if bool((role == LM).any()):
            stats["lm_loss"] = float(ce[role == LM].mean())
    return loss, stats


def held_out_loss(
    model: Any, tok: Any, texts: Sequence[str], length: int = 512, limit: int = 64
) -> float:
    """Mean next-token loss on held-out docstrings (the LM side of the model)."""
    ids = [i for e in tok.encode_batch(list(texts), add_special_tokens=False) for i in e.ids]
    bos = tok.token_to_id(BOS)
    total, count = 0.0, 0
    with torch.inference_mode():
        for s in range(0, min(len(ids), limit * (length - 1)) - length, length - 1):
            x = torch.tensor([[bos, *ids[s : s + length - 1]]])
            logits = model(input_ids=x).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
            count += length - 1
    return total / max(count, 1)
