"""The methods: one module each, with its four steps in float torch (the reference)."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from .base import STEPS, Memory, Method

#: name -> "module:Class", imported on first use so one method's deps never block another.
REGISTRY: dict[str, str] = {
    "dsa": "hetmem.methods.dsa:DSA",
    "seer": "hetmem.methods.seer:SeerAttention",
    "quest": "hetmem.methods.quest:Quest",
    "dense_rag": "hetmem.methods.dense_rag:DenseRAG",
    "bm25_rag": "hetmem.methods.bm25_rag:BM25RAG",
}

ATTENTION_METHODS = ("dsa", "seer", "quest")
RAG_METHODS = ("dense_rag", "bm25_rag")


def method_class(name: str) -> type[Method]:
    from ..errors import InputError

    if name not in REGISTRY:
        raise InputError("method", f"unknown method {name!r}; expected one of {sorted(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get(name: str, **kwargs: Any) -> Method:
    """Build a method by name, e.g. get("quest", page_size=16). An option the method does
    not take is an `InputError` naming it."""
    cls = method_class(name)
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as exc:
        from ..errors import InputError

        raise InputError("options", f"{name}: {exc}") from None
    return cls(**kwargs)


def names() -> list[str]:
    return list(REGISTRY)


__all__ = ["REGISTRY", "STEPS", "Memory", "Method", "get", "method_class", "names"]
