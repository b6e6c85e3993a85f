"""Capturing a frozen model's attention activations: the queries and keys each attention
layer receives (after the rotary embedding), at sampled query positions, through an
attention function registered with transformers (model code is never edited)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

from ..checks import check_positive_int, check_tensor
from ..errors import InputError
from ..models.attn_impl import restore_attn, saved_attn

CAPTURE = "hetmem_capture"


@dataclass
class LayerActivations:
    """One attention layer's activations over N sequences of S tokens.

    q [N, Hq, T, D]: the queries at the T sampled `positions` [N, T]; k [N, Hkv, S, D]: every
    key. Both after the rotary embedding, as the attention function receives them.
    `scale` is the layer's softmax scale; `causal` says whether a query sees later tokens.
    """

    q: torch.Tensor
    k: torch.Tensor
    positions: torch.Tensor
    scale: float
    causal: bool = True

    @property
    def q_heads(self) -> int:
        return self.q.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    def subset(self, rows: torch.Tensor | slice) -> LayerActivations:
        return LayerActivations(
            self.q[rows], self.k[rows], self.positions[rows], self.scale, self.causal
        )

    def attention(self) -> torch.Tensor:
        """Dense softmax attention of the sampled queries, [N, Hq, T, S]."""
        return dense_probs(self.q, self.k, self.positions, self.scale, self.causal)


def dense_probs(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, scale: float, causal: bool = True
) -> torch.Tensor:
    """Softmax attention [N, Hq, T, S] of queries q [N, Hq, T, D] over keys k [N, Hkv, S, D]."""
    groups = q.shape[1] // k.shape[1]
    keys = k.repeat_interleave(groups, dim=1)
    logits = (q @ keys.transpose(-1, -2)) * scale
    if causal:
        logits = logits.masked_fill(~visible(positions, k.shape[2])[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1)


def visible(positions: torch.Tensor, tokens: int) -> torch.Tensor:
    """[N, T, S]: key s is visible to the query at position p when s <= p."""
    return torch.arange(tokens, device=positions.device)[None, None, :] <= positions[..., None]


_RECORDER: ContextVar[_Recorder | None] = ContextVar("hetmem_capture", default=None)


class _Recorder:
    """Collects (q at sampled positions, k, scale) per layer during one forward pass."""

    def __init__(self, positions: torch.Tensor):
        self.positions = positions  # [B, T]
        self.layers: list[tuple[torch.Tensor, torch.Tensor, float, bool]] = []

    def add(
        self, module: Any, query: torch.Tensor, key: torch.Tensor, scaling: float | None
    ) -> None:
        b, hq, _, d = query.shape
        index = self.positions.to(query.device)[:, None, :, None].expand(b, hq, -1, d)
        q = query.detach().gather(2, index).float().cpu()
        scale = 1.0 / math.sqrt(d) if scaling is None else float(scaling)
        causal = bool(getattr(module, "is_causal", True))
        self.layers.append((q, key.detach().float().cpu(), scale, causal))


def _capture_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """sdpa, after recording the layer's queries and keys (same contract as sdpa)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    recorder = _RECORDER.get()
    if recorder is not None:
        recorder.add(module, query, key, scaling)
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


@contextmanager
def _capturing(model: Any) -> Iterator[None]:
    """Route the model's attention through `_capture_forward`; restore it afterwards."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(CAPTURE, _capture_forward)
    AttentionMaskInterface.register(CAPTURE, sdpa_mask)
    saved = saved_attn(model)
    try:
        model.set_attn_implementation(CAPTURE)
        if model.config._attn_implementation != CAPTURE:
            raise InputError(
                "model",
                f"{type(model).__name__} does not dispatch attention through transformers' "
                "AttentionInterface, so its activations cannot be captured",
            )
        yield
    finally:
        restore_attn(saved)


def sample_positions(
    sequences: int, tokens: int, queries: int, seed: int = 0, first: int | None = None
) -> torch.Tensor:
    """[N, T] ascending query positions per sequence: the last token and T-1 drawn from
    [first, S-1) (default first = S/8: decode queries see long contexts)."""
    check_positive_int("queries", queries)
    first = max(tokens // 8, 1) if first is None else first
    span = tokens - 1 - first
    if span < queries - 1:
        raise InputError(
            "queries", f"{queries} query positions do not fit {tokens}-token sequences"
        )
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(sequences):
        drawn = torch.randperm(span, generator=gen)[: queries - 1] + first
        rows.append(torch.sort(torch.cat([drawn, torch.tensor([tokens - 1])])).values)
    return torch.stack(rows)


@torch.no_grad()
def capture(
    model: Any,
    input_ids: torch.Tensor,
    *,
    queries: int = 64,
    seed: int = 0,
    batch_size: int = 1,
    progress: Callable[[int], None] | None = None,
    positions: torch.Tensor | None = None,
) -> list[LayerActivations]:
    """Run the frozen model over `input_ids` [N, S] and return each attention layer's
    activations, with `queries` sampled query positions per sequence, or at `positions`
    [N, T] (ascending, each in [0, S)) when given."""
    check_tensor("input_ids", input_ids, dims=("sequences", "tokens"), floating=False)
    n, s = input_ids.shape
    if n == 0 or s < 2:
        raise InputError("input_ids", f"expected at least one sequence of 2+ tokens, got {n}x{s}")
    if positions is None:
        positions = sample_positions(n, s, min(queries, s - 1 - max(s // 8, 1) + 1), seed)
    else:
        check_tensor("positions", positions, dims=("sequences", "queries"), floating=False)
        if positions.shape[0] != n or positions.shape[1] == 0:
            raise InputError(
                "positions", f"expected [{n}, T>0] query positions, got {tuple(positions.shape)}"
            )
        if bool((positions < 0).any() | (positions >= s).any()):
            raise InputError("positions", f"expected positions in [0, {s}), got out of range")
        positions = positions.long().cpu()
    device = next(model.parameters()).device
    per_batch: list[list[tuple[torch.Tensor, torch.Tensor, float, bool]]] = []
    model_was_training = model.training
    model.eval()
    try:
        with _capturing(model):
            for start in range(0, n, batch_size):
                recorder = _Recorder(positions[start : start + batch_size])
                token = _RECORDER.set(recorder)
                try:
                    model(
                        input_ids=input_ids[start : start + batch_size].to(device), use_cache=False
                    )
                finally:
                    _RECORDER.reset(token)
                if not recorder.layers:
                    raise InputError("model", "ran no attention layer through the interface")
                per_batch.append(recorder.layers)
                if progress is not None:
                    progress(min(batch_size, n - start))
    finally:
        model.train(model_was_training)
    layers = []
    for i in range(len(per_batch[0])):
        q = torch.cat([b[i][0] for b in per_batch])
        k = torch.cat([b[i][1] for b in per_batch])
        _, _, scale, causal = per_batch[0][i]
        layers.append(LayerActivations(q, k, positions.clone(), scale, causal))
    return layers


def merge_activations(parts: Sequence[list[LayerActivations]]) -> list[LayerActivations]:
    """One list of layer activations from captures at several context lengths: keys
    zero-padded to the longest (no query sees past its own position, so never padding)."""
    if not parts:
        raise InputError("parts", "expected at least one capture")
    longest = max(p[0].k.shape[2] for p in parts)
    width = {p[0].q.shape[2] for p in parts}
    if len(width) != 1:
        raise InputError("parts", f"captures have different query counts {sorted(width)}")
    out = []
    for layer in range(len(parts[0])):
        acts = [p[layer] for p in parts]
        k = torch.cat(
            [torch.nn.functional.pad(a.k, (0, 0, 0, longest - a.k.shape[2])) for a in acts]
        )
        out.append(
            LayerActivations(
                torch.cat([a.q for a in acts]),
                k,
                torch.cat([a.positions for a in acts]),
                acts[0].scale,
                acts[0].causal,
            )
        )
    return out
