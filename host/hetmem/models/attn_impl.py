"""Switching a transformers model's attention implementation, and switching it back.

Shared by the HF adapter (`wrap`) and the selector trainer (`calibrate`, which captures
activations through its own attention function): neither imports the other for it.
"""

from __future__ import annotations

from typing import Any


def attn_configs(model: Any) -> list[Any]:
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


def saved_attn(model: Any) -> list[tuple[Any, Any]]:
    """(config, attention implementation) of every config `attn_configs` finds, for
    `restore_attn`."""
    return [(config, config._attn_implementation_internal) for config in attn_configs(model)]


def restore_attn(saved: list[tuple[Any, Any]]) -> None:
    """Put back the attention implementations `saved_attn` recorded."""
    for config, value in saved:
        config._attn_implementation_internal = value
