"""`wrap` / `unwrap`: sparse decode for a transformers causal LM, by registration only.

`wrap` touches three things on the model, all undone by `unwrap`:
- `config._attn_implementation` (and that of its sub-configs) becomes `hetmem`, the
  attention function `attention_fn` registers with transformers' `AttentionInterface`;
- `generate()` gets a `HetmemCache` instead of a plain `DynamicCache` (an instance-level
  override of `_prepare_cache_for_generation` that defers to the class's own first, then
  swaps the cache it made under the name the model takes its cache by, `cache_kwarg`);
- the attribute `_hetmem_wrap` holds the settings and what to restore.
Model code and weights are never changed.
"""

from __future__ import annotations

import copy
import inspect
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import methods as registry
from ..checks import check_positive_int
from ..errors import InputError
from ..methods._attention import SparseAttentionMethod
from ..methods.base import STEPS, Method
from ..pipeline import Policy, normalize_placement
from .settings import SparseDecode

if TYPE_CHECKING:
    from .cache import HetmemCache

#: Decoder layer kinds that run softmax attention over the KV cache.
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
_STATE = "_hetmem_wrap"
_HOOK = "_prepare_cache_for_generation"

MethodSpec = str | Method | Callable[[int], Method]


@dataclass
class _Wrapped:
    settings: SparseDecode
    attn: list[tuple[Any, Any]]  # (config, its _attn_implementation_internal before wrap)
    hook: Any  # the instance attribute `_HOOK` had before wrap, or None
    plan: str | None = None  # placement="auto": why the planner chose the placement


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
    Prefill runs exact sdpa; only single-token decode steps run sparse.
    """
    _require_transformers()
    _check_model(model)
    if is_wrapped(model):
        raise InputError("model", "is already wrapped by hetmem; unwrap it first")
    budget = check_positive_int("budget", budget)
    layers = _attention_layers(model.config.get_text_config(decoder=True))
    from .calibrate import trained_spec

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

    from . import attention_fn

    attention_fn.register()
    saved = [(config, config._attn_implementation_internal) for config in _configs(model)]
    try:
        model.set_attn_implementation(attention_fn.NAME)
    except Exception:
        _restore_attn(saved)
        raise
    if model.config._attn_implementation != attention_fn.NAME:
        _restore_attn(saved)
        raise InputError(
            "model",
            f"{type(model).__name__} does not dispatch attention through transformers' "
            "AttentionInterface, so hetmem cannot register with it",
        )
    setattr(model, _STATE, _Wrapped(settings, saved, model.__dict__.get(_HOOK), explanation))
    setattr(model, _HOOK, types.MethodType(_prepare_cache_with_hetmem, model))
    return model


def unwrap(model: Any) -> Any:
    """Undo `wrap` exactly: attention implementation(s) and generate's cache; return `model`."""
    state = _state(model)
    if state is None:
        raise InputError("model", "is not wrapped by hetmem")
    _restore_attn(state.attn)
    state.settings.close()
    if state.hook is None:
        delattr(model, _HOOK)
    else:
        setattr(model, _HOOK, state.hook)
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


def new_cache(model: Any) -> HetmemCache:
    """A fresh `HetmemCache` for a wrapped model, for forward loops outside `generate()`."""
    state = _state(model)
    if state is None:
        raise InputError("model", "is not wrapped by hetmem")
    from .cache import HetmemCache

    return HetmemCache(state.settings)


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


def _attention_layers(text_config: Any) -> int:
    """Number of decoder layers; every one must be a softmax-attention layer."""
    layers = getattr(text_config, "num_hidden_layers", None)
    if not isinstance(layers, int) or layers <= 0:
        raise InputError("model", "its config gives no positive num_hidden_layers")
    kinds = set(getattr(text_config, "layer_types", None) or ())
    other = sorted(kinds - set(ATTENTION_LAYER_TYPES))
    if other:
        raise InputError(
            "model", f"has {other} layers; hetmem wraps models whose layers are all attention"
        )
    return layers


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
        except TypeError as exc:
            raise InputError("method_options", f"{spec}: {exc}") from exc
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
    shape = Shape(config, int(context), int(opts.get("batch", 1)), budget=budget)
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


def _configs(model: Any) -> list[Any]:
    """Every config `set_attn_implementation` may change: submodels' and sub-configs."""
    from transformers import PreTrainedModel

    stack = [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    seen: dict[int, Any] = {}
    while stack:
        config = stack.pop()
        if id(config) in seen:
            continue
        seen[id(config)] = config
        for key in getattr(config, "sub_configs", {}) or {}:
            sub = getattr(config, key, None)
            if sub is not None:
                stack.append(sub)
    return list(seen.values())


def _restore_attn(saved: list[tuple[Any, Any]]) -> None:
    for config, value in saved:
        config._attn_implementation_internal = value


def _prepare_cache_with_hetmem(
    self: Any, generation_config: Any, model_kwargs: dict, *args: Any, **kwargs: Any
) -> Any:
    """generate()'s cache preparation, with the plain dynamic cache it makes swapped for ours.

    Bound to the model (so a deep copy rebinds to the copy) and reading the settings from
    it at call time. A cache the caller passed, a static, quantized or offloaded one is
    left alone: those layers run dense sdpa.
    """
    from transformers import DynamicCache

    from .cache import HetmemCache

    state = _state(self)
    previous = (
        types.MethodType(type(self)._prepare_cache_for_generation, self)
        if state is None or state.hook is None
        else state.hook
    )
    result = previous(generation_config, model_kwargs, *args, **kwargs)
    name = cache_kwarg(self)
    cache = model_kwargs.get(name)
    if (
        state is not None
        and type(cache) is DynamicCache
        and not getattr(cache, "_is_user_defined", False)
        and not cache.offloading
    ):
        model_kwargs[name] = HetmemCache(state.settings)
    return result
