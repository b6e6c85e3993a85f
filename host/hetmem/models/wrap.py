"""`wrap` / `unwrap`: sparse decode for a transformers causal LM, by registration only.

`wrap` touches three things on the model, all undone by `unwrap`:
- `config._attn_implementation` (and that of its sub-configs) becomes `hetmem`, the
  attention function `attention_fn` registers with transformers' `AttentionInterface`;
- `generate()` gets a `HetmemCache` instead of a plain `DynamicCache`: the instance
  attribute `generate` becomes a thin function that passes `new_cache(model, length)` (the
  prompt's length plus `max_new_tokens`: allocated once, as a static cache) to the class's
  own `generate` under the name the model takes its cache by (`cache_kwarg`), as a caller
  may, when the caller passed no cache and asked for the default dynamic one;
- the attribute `_hetmem_wrap` holds the settings and what to restore.
Model code and weights are never changed, and only transformers' public API is used: the
attention function goes through `AttentionInterface` and `set_attn_implementation`, the
cache through `generate`'s own cache argument (transformers has no public registry of
cache implementations that `generate` would build by name).

Before anything is changed, `wrap` reads the architecture's attention (`features.py`):
what hetmem decodes exactly it accepts (causal softmax attention, grouped queries, attention
sinks, logit softcapping, sliding-window layers), and anything else it refuses with an
`UnsupportedModel` that names the architecture, the feature and the reason.
"""

from __future__ import annotations

import copy
import inspect
import types
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .. import methods as registry
from ..checks import check_positive_int
from ..errors import InputError, UnsupportedModel  # noqa: F401 - raised by wrap, re-exported
from ..methods._attention import SparseAttentionMethod
from ..methods.base import STEPS, Method
from ..pipeline import Policy, normalize_placement
from .attn_impl import restore_attn, saved_attn
from .features import AttentionFeatures, attention_features
from .settings import SparseDecode

if TYPE_CHECKING:
    from .cache import HetmemCache

_STATE = "_hetmem_wrap"
_GENERATE = "generate"
#: `cache_implementation` values for which `generate` would build a plain dynamic cache,
#: the one hetmem's cache replaces ("hybrid" only as the model's own default, which
#: transformers drops; asked for explicitly it is a static cache).
_DYNAMIC = (None, "dynamic", "dynamic_full")

MethodSpec = str | Method | Callable[[int], Method]


@dataclass
class _Wrapped:
    settings: SparseDecode
    attn: list[tuple[Any, Any]]  # (config, its _attn_implementation_internal before wrap)
    generate: Any  # the instance attribute `generate` had before wrap, or None
    plan: str | None = None  # placement="auto": why the planner chose the placement
    features: AttentionFeatures | None = None


def wrap(
    model: Any,
    method: MethodSpec = "dsa",
    budget: int = 2048,
    placement: Mapping[str, str] | str | None = None,
    fpga: Any = None,
    *,
    method_options: Mapping[str, Any] | None = None,
    on_fpga_error: Policy = "fallback",
    overlap: bool = False,
    auto_options: Mapping[str, Any] | None = None,
) -> Any:
    """Make `model.generate()` decode with a hetmem sparse-attention method; return `model`.

    method: "dsa", "quest" or "seer" (built with `method_options`, e.g. {"page_size": 32}),
        a `Method` (copied per layer), or a callable `layer_idx -> Method` (per-layer
        trained weights). "dsa" and "seer" use the weights `hetmem calibrate` saved beside
        the model's directory when there are some (and `method_options` names no weights).
    budget: tokens each decode query attends, per layer (rounded down to whole pages or
        blocks). A context that fits the budget selects everything: decode equals dense.
    placement: step -> device for each layer's `Pipeline` (default: every step on the
        model's device).
    fpga: the card(s) every layer shares: a target name ("emu", "xrt", ...), a mapping
        {"target": name, "cards": n, **options} (layers spread over n cards in contiguous
        blocks), an open `FpgaDevice`, or a list of those; opened once per wrapped model.
    overlap: split each decode step's batch into two micro-batches so that the card's
        selection for one overlaps the GPU's Apply of the other (same results).
    placement="auto": `hetmem.system.planner` picks it for the model's config (its layers,
        heads, FFN...) at the shape of `auto_options` {"context" (default the config's
        max_position_embeddings), "batch" (1), "objective" ("latency" or "energy"),
        "system" (a `hetmem.system.System`) or "gpu"/"card" (profile names or files;
        default the local GPU and a U55C)}; `plan_explanation(model)` says why.
    Prefill runs exact attention; only single-token decode steps run sparse.

    Supported attention: causal softmax attention with grouped queries, attention sinks
    (added to the softmax over the selected tokens), logit softcapping, and sliding-window
    layers (past its window a layer attends the window exactly, dense; said once, as a
    warning). Refused with `UnsupportedModel`, before anything is changed: multi-head latent
    attention (MLA), hybrid or linear attention layers, chunked, indexed or bidirectional
    attention, ALiBi, layers sharing another layer's cache (`attention_features`).
    """
    _require_transformers()
    _check_model(model)
    if is_wrapped(model):
        raise InputError("model", "is already wrapped by hetmem; unwrap it first")
    features = attention_features(model)
    layers = features.layers
    budget = check_positive_int("budget", budget)
    from ..selectors.weights import trained_spec

    # "dsa" / "seer" by name: the trained selectors beside the model's directory, if any.
    spec = trained_spec(model, method, method_options)
    options = None if spec is not method else method_options
    methods = [_build_method(spec, options, i) for i in range(layers)]
    unit = max(m.unit for m in methods)
    if budget < unit:
        raise InputError(
            "budget", f"{budget} tokens is less than one {unit}-token unit of method {method!r}"
        )
    if on_fpga_error not in ("fallback", "raise"):
        raise InputError("on_fpga_error", f"expected 'fallback' or 'raise', got {on_fpga_error!r}")
    explanation = None
    if isinstance(placement, str) and placement == "auto":
        placement, explanation = _auto_placement(model, methods[0], budget, auto_options)
    elif auto_options is not None:
        raise InputError("auto_options", "only with placement='auto'")
    placement = normalize_placement(_default_placement(model) if placement is None else placement)
    if not isinstance(overlap, bool):
        raise InputError("overlap", f"expected True or False, got {overlap!r}")
    settings = SparseDecode(methods, budget, placement, fpga, on_fpga_error, overlap)
    notes = features.notes(budget)

    from . import attention_fn

    attention_fn.register()
    saved = saved_attn(model)
    try:
        model.set_attn_implementation(attention_fn.NAME)
    except Exception:
        restore_attn(saved)
        raise
    if model.config._attn_implementation != attention_fn.NAME:
        restore_attn(saved)
        raise InputError(
            "model",
            f"{type(model).__name__} does not dispatch attention through transformers' "
            "AttentionInterface, so hetmem cannot register with it",
        )
    state = _Wrapped(settings, saved, model.__dict__.get(_GENERATE), explanation, features)
    setattr(model, _STATE, state)
    setattr(model, _GENERATE, types.MethodType(_generate_with_hetmem, model))
    for note in notes:
        warnings.warn(f"hetmem: {note}", UserWarning, stacklevel=2)
    return model


def unwrap(model: Any) -> Any:
    """Undo `wrap` exactly: attention implementation(s) and generate's cache; return `model`."""
    state = _state(model)
    if state is None:
        raise InputError("model", "is not wrapped by hetmem")
    restore_attn(state.attn)
    state.settings.close()
    if state.generate is None:
        delattr(model, _GENERATE)
    else:
        setattr(model, _GENERATE, state.generate)
    delattr(model, _STATE)
    return model


def is_wrapped(model: Any) -> bool:
    return _state(model) is not None


def cache_kwarg(model: Any) -> str:
    """The keyword the model's `forward` (and `generate()`'s model kwargs) takes its cache by.

    transformers 5.24 renamed `past_key_values` to `cache` (the old name is deprecated, and
    generate() keeps the cache it makes under the new one); the model's own signature says
    which of the two this installed version uses.
    """
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def new_cache(model: Any, max_length: int | None = None) -> HetmemCache:
    """A fresh `HetmemCache` for a wrapped model, for forward loops outside `generate()`;
    `max_length` (the tokens a row will hold at most, when known) is allocated at prefill."""
    state = _state(model)
    if state is None:
        raise InputError("model", "is not wrapped by hetmem")
    from .cache import HetmemCache

    return HetmemCache(state.settings, max_length)


# -- checks ------------------------------------------------------------------------------


def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("hetmem.wrap needs transformers: pip install 'hetmem[models]'") from exc


def _check_model(model: Any) -> None:
    from transformers import PreTrainedModel

    if (
        not isinstance(model, PreTrainedModel)
        or not model.can_generate()
        or getattr(model.config, "is_encoder_decoder", False)
    ):
        raise InputError(
            "model",
            f"expected a transformers causal LM (e.g. LlamaForCausalLM), got {type(model).__name__}",
        )


def _build_method(spec: MethodSpec, options: Mapping[str, Any] | None, layer_idx: int) -> Method:
    if isinstance(spec, str):
        if spec not in registry.ATTENTION_METHODS:
            raise InputError(
                "method",
                f"unknown sparse-attention method {spec!r}; expected one of "
                f"{list(registry.ATTENTION_METHODS)}",
            )
        try:
            method = registry.get(spec, **dict(options or {}))
        except InputError as exc:  # an option the method does not take: the user's argument
            if exc.argument != "options":
                raise
            raise InputError("method_options", str(exc).split(": ", 1)[1]) from None
    elif options:
        raise InputError("method_options", "apply only to a method given by name")
    elif isinstance(spec, Method):
        method = copy.deepcopy(spec)
    elif callable(spec):
        method = spec(layer_idx)
    else:
        raise InputError(
            "method",
            f"expected a method name, a Method or a callable layer_idx -> Method, "
            f"got {type(spec).__name__}",
        )
    if not isinstance(method, SparseAttentionMethod):
        raise InputError("method", f"{type(method).__name__} is not a sparse-attention method")
    return method


# -- what wrap changes ---------------------------------------------------------------------


def plan_explanation(model: Any) -> str | None:
    """Why `placement="auto"` chose the wrapped model's placement (None: not "auto")."""
    state = _state(model)
    return None if state is None else state.plan


def _auto_placement(model: Any, method: Method, budget: int,
                    options: Mapping[str, Any] | None) -> tuple[dict[str, str] | None, str]:  # fmt: skip
    """The planner's placement for the model's config, on the model's own device where a
    step stays on the GPU side."""
    from ..system import Shape
    from ..system import auto as auto_mod

    opts = dict(options or {})
    unknown = set(opts) - {"context", "batch", "objective", "system", "gpu", "card"}
    if unknown:
        raise InputError("auto_options", f"unknown keys {sorted(unknown)}")
    text = model.config.get_text_config(decoder=True)
    config = auto_mod.model_from_hf_config(text)
    context = opts.get("context") or getattr(text, "max_position_embeddings", None) or 4096
    sizes = {"context": context, "batch": opts.get("batch", 1)}
    for key, value in sizes.items():
        try:
            sizes[key] = int(value)
        except (TypeError, ValueError):
            raise InputError("auto_options", f"{key}: expected an int, got {value!r}") from None
    shape = Shape(config, sizes["context"], sizes["batch"], budget=budget)
    system = opts.get("system")
    if system is None:
        system = auto_mod.auto_system(opts.get("gpu"), opts.get("card", auto_mod.DEFAULT_CARD))
    choice = auto_mod.resolve(method, shape, system=system,
                              objective=opts.get("objective", "latency"))  # fmt: skip
    local = _default_placement(model)
    if choice.placement == "gpu/gpu/gpu/gpu":
        return local, choice.explanation
    base = local or dict.fromkeys(STEPS, "gpu")
    return {**base, "relevancy": "fpga", "retrieval": "fpga"}, choice.explanation


def _state(model: Any) -> _Wrapped | None:
    state = getattr(model, "__dict__", {}).get(_STATE)
    return state if isinstance(state, _Wrapped) else None


def _default_placement(model: Any) -> dict[str, str] | None:
    """Every step on the model's own device (None: hetmem's default, `gpu`)."""
    device = model.device
    if device.type == "cpu":
        return dict.fromkeys(STEPS, "cpu")
    if device.type == "cuda":
        return dict.fromkeys(STEPS, str(device))
    return None


def _generate_with_hetmem(self: Any, *args: Any, **kwargs: Any) -> Any:
    """`generate()` with a fresh `HetmemCache` passed as the cache, when the caller passed
    none and `generate` would have built a plain dynamic one.

    Bound to the model (so a deep copy rebinds to the copy) and reading the settings from
    it at call time. A cache the caller passed, `use_cache=False`, a static, quantized or
    offloaded `cache_implementation` are left to `generate`: those layers run dense sdpa.
    """
    state = _state(self)
    previous = (
        types.MethodType(type(self).generate, self)
        if state is None or state.generate is None
        else state.generate
    )
    if state is not None:
        args = _give_cache(self, state, previous, args, kwargs)
    return previous(*args, **kwargs)


def _give_cache(model: Any, state: _Wrapped, generate: Any, args: tuple, kwargs: dict) -> tuple:
    """Put a `HetmemCache` into `kwargs` (edited in place) where `generate` would build a
    plain dynamic cache of its own; return the positional arguments to call it with."""
    from .cache import HetmemCache

    if any(kwargs.get(name) is not None for name in ("cache", "past_key_values")):
        return args  # the caller's own cache (by either name, old or new)
    try:
        bound = inspect.signature(generate).bind_partial(*args, **kwargs).arguments
    except TypeError:
        return args  # arguments generate itself refuses, with its own error
    given = bound.get("generation_config")
    config = model.generation_config if given is None else given
    if kwargs.get("use_cache", getattr(config, "use_cache", True)) is False:
        return args
    if "cache_implementation" in kwargs:
        implementation = kwargs["cache_implementation"]
    else:
        implementation = getattr(config, "cache_implementation", None)
        if implementation == "hybrid" and given is None:
            implementation = None  # the model's own default, which generate drops
    if implementation not in _DYNAMIC:
        return args
    if implementation is not None:  # generate refuses a cache beside a cache_implementation
        if "cache_implementation" in kwargs or given is None:
            kwargs["cache_implementation"] = None
        else:  # the caller's generation config: a copy without it
            config = copy.deepcopy(given)
            config.cache_implementation = None
            if "generation_config" in kwargs:
                kwargs["generation_config"] = config
            else:
                at = list(bound).index("generation_config")
                args = (*args[:at], config, *args[at + 1 :])
    kwargs[cache_kwarg(model)] = HetmemCache(state.settings, _final_length(bound, config))
    return args


def _final_length(bound: Mapping[str, Any], config: Any) -> int | None:
    """The tokens a row holds at the end of this `generate()` (prompt + max_new_tokens, or
    max_length), or None when the arguments do not say it plainly."""
    inputs = bound.get("inputs")
    extra = bound.get("kwargs") or {}
    if inputs is None:
        inputs = extra.get("input_ids", extra.get("inputs_embeds"))
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
        return None
    prompt = int(inputs.shape[1])
    new = extra.get("max_new_tokens", getattr(config, "max_new_tokens", None))
    if "max_length" in extra and "max_new_tokens" not in extra:
        new = None
    if isinstance(new, int) and not isinstance(new, bool) and new >= 0:
        return max(prompt + new, 1)
    total = extra.get("max_length", getattr(config, "max_length", None))
    if isinstance(total, int) and not isinstance(total, bool) and total > prompt:
        return total
    return None
