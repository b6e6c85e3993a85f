"""Wrapping inference models (Hugging Face transformers) with hetmem's sparse attention.

    model = hetmem.models.wrap(model, method="quest", budget=2048)
    model.generate(**inputs)      # prefill dense, decode sparse through hetmem Pipelines
    cache = hetmem.models.new_cache(model)  # or a cache of one's own, passed to generate()
    model.generate(**inputs, **{hetmem.models.cache_kwarg(model): cache})  # or forward()
    hetmem.models.unwrap(model)   # the model exactly as before

Importing this package does not import transformers; `wrap` does.
"""

from __future__ import annotations

from typing import Any

from .wrap import cache_kwarg, is_wrapped, new_cache, unwrap, wrap

__all__ = ["HetmemCache", "cache_kwarg", "is_wrapped", "new_cache", "unwrap", "wrap"]


def __getattr__(name: str) -> Any:
    if name == "HetmemCache":  # needs transformers: imported on first use
        from .cache import HetmemCache

        return HetmemCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
