"""What a model's attention does, as `wrap` reads it before changing anything: the
features hetmem supports (sliding windows, sinks, softcapping) and the ones it refuses with
an `UnsupportedModel` that names the architecture, the feature and the reason."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError, UnsupportedModel

#: Decoder layer kinds that run softmax attention over the KV cache.
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
#: Layer kinds transformers gives a decoder (`layer_types`, or inferred by its cache) that
#: hetmem refuses: the feature's name and why.
REFUSED_LAYER_TYPES = {
    "linear_attention": (
        "hybrid or linear attention layers",
        "linear-attention, state-space or convolution layers keep a recurrent state, not a "
        "KV cache of tokens to select from",
    ),
    "conv": (
        "hybrid or linear attention layers",
        "convolution layers keep a recurrent state, not a KV cache of tokens to select from",
    ),
    "hybrid": (
        "hybrid or linear attention layers",
        "its layers run attention beside a state-space mixer that keeps a recurrent state; "
        "hetmem's cache holds only attention keys and values",
    ),
    "hybrid_sliding": (
        "hybrid or linear attention layers",
        "its layers run attention beside a state-space mixer that keeps a recurrent state; "
        "hetmem's cache holds only attention keys and values",
    ),
    "chunked_attention": (
        "chunked attention",
        "each query sees only its own chunk of the context; hetmem selects over the whole "
        "visible prefix",
    ),
    "indexed_attention": (
        "indexed (learned sparse) attention",
        "the model selects its own tokens with its own indexer, over a compressed cache",
    ),
    "dummy": (
        "layers without their own KV cache",
        "some layers reuse another layer's keys and values (or attend nothing); hetmem's cache "
        "holds one memory per decoder layer",
    ),
}


@dataclass(frozen=True)
class AttentionFeatures:
    """What a model's attention does beyond causal softmax attention, as `wrap` read it.

    windows: layer -> sliding window in tokens (each query sees its last `window` keys).
    sinks: whether its attention has a learned sink logit per head (GPT-OSS).
    softcap: the logit softcapping c, logits -> c * tanh(logits / c) (Gemma 2), or None.
    context: the model's maximum positions (None: not in its config)."""

    architecture: str
    layers: int
    windows: dict[int, int] = field(default_factory=dict)
    sinks: bool = False
    softcap: float | None = None
    context: int | None = None

    def notes(self, budget: int) -> list[str]:
        """What hetmem does with these features that a user should know (said once, when
        the model is wrapped): sliding windows shorter than the model's context."""
        windows = {
            i: w for i, w in self.windows.items() if self.context is None or w < self.context
        }
        if not windows:
            return []
        sizes = sorted(set(windows.values()))
        size = " / ".join(str(w) for w in sizes)
        within = (
            "within the budget" if max(sizes) <= budget else f"more than the {budget}-token budget"
        )
        rest = self.layers - len(windows)
        where = (
            f"hetmem selects in the other {rest} layer{'s' if rest != 1 else ''}"
            if rest
            else "hetmem selects in no layer of this model then"
        )
        return [
            f"{self.architecture}: {len(windows)} of {self.layers} layers use a sliding window "
            f"of {size} tokens; once the context is longer, each of those layers attends its "
            f"whole window exactly (dense, {within}), and {where}"
        ]


def attention_features(model: Any) -> AttentionFeatures:
    """Read what the model's attention does from its config and attention modules: the
    features hetmem supports, or an `UnsupportedModel` naming the one it refuses."""
    text = model.config.get_text_config(decoder=True)
    arch = type(model).__name__
    layers = getattr(text, "num_hidden_layers", None)
    if not isinstance(layers, int) or layers <= 0:
        raise InputError("model", "its config gives no positive num_hidden_layers")
    if getattr(text, "kv_lora_rank", None) is not None:
        raise UnsupportedModel(
            arch,
            "multi-head latent attention (MLA)",
            f"its cache holds each token's compressed latent (kv_lora_rank="
            f"{text.kv_lora_rank}, plus {getattr(text, 'qk_rope_head_dim', '?')} rotary "
            "channels), expanded into per-head keys and values only inside attention; hetmem "
            "selects over cached per-head keys",
        )
    kinds, windows = _layer_kinds(text, layers)
    for kind in dict.fromkeys(kinds):
        if kind in ATTENTION_LAYER_TYPES:
            continue
        feature, reason = REFUSED_LAYER_TYPES.get(
            kind, (f"{kind!r} layers", "hetmem decodes softmax attention layers only")
        )
        where = [i for i, k in enumerate(kinds) if k == kind]
        raise UnsupportedModel(arch, feature, f"{reason} (layers {_span(where)} are {kind!r})")
    if getattr(text, "use_bidirectional_attention", False):
        raise UnsupportedModel(
            arch, "bidirectional attention", "hetmem's selection and cache are causal"
        )
    attn_config = getattr(text, "attn_config", None)
    if getattr(text, "alibi", False) or getattr(attn_config, "alibi", False):
        raise UnsupportedModel(
            arch,
            "ALiBi position biases",
            "a bias by distance is added to every logit; hetmem's selection and sparse "
            "softmax do not add it",
        )
    softcap = getattr(text, "attn_logit_softcapping", None)
    sinks = any(
        isinstance(getattr(module, "sinks", None), torch.Tensor) for module in model.modules()
    )
    context = getattr(text, "max_position_embeddings", None)
    return AttentionFeatures(
        arch,
        layers,
        windows,
        sinks,
        None if softcap is None else float(softcap),
        context if isinstance(context, int) else None,
    )


def _layer_kinds(text: Any, layers: int) -> tuple[list[str], dict[int, int]]:
    """Each decoder layer's kind as transformers' own cache reads it from the config (its
    `layer_types`, else inferred), and the sliding window of each sliding layer."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        kinds, kwargs = get_layer_types_and_kwargs(text)
        kinds, kwargs = list(kinds), list(kwargs)
    except (ImportError, AttributeError, TypeError):  # an older transformers
        window = getattr(text, "sliding_window", None)
        inferred = "full_attention" if window is None else "sliding_attention"
        kinds = list(getattr(text, "layer_types", None) or [inferred] * layers)
        kwargs = [{"sliding_window": window} if k == "sliding_attention" else {} for k in kinds]
    if len(kinds) != layers:
        raise InputError("model", f"its config gives {len(kinds)} layer types for {layers} layers")
    windows = {}
    for i, (kind, extra) in enumerate(zip(kinds, kwargs, strict=True)):
        window = extra.get("sliding_window") if kind == "sliding_attention" else None
        if window is not None:
            windows[i] = int(window)
    return kinds, windows


def _span(indices: list[int]) -> str:
    shown = ", ".join(str(i) for i in indices[:8])
    return shown + (f", ... ({len(indices)} in all)" if len(indices) > 8 else "")
