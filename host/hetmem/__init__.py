"""hetmem: the memory-processing steps of long-context LLM inference (Prepare Memory, Compute
Relevancy, Retrieval, Apply to Inference) placed across GPU and FPGA.

    import hetmem
    model = hetmem.wrap(model, method="dsa", budget=2048, placement="gpu/fpga/fpga/gpu")
    model.generate(**inputs)          # prefill dense, decode sparse through hetmem Pipelines
    hetmem.unwrap(model)              # the model exactly as before

`wrap`, `unwrap` and `is_wrapped` are `hetmem.models`'s, imported on first use, so that
`import hetmem` stays light (the CLI, the FPGA layer and the kernels need no transformers).
"""

from __future__ import annotations

from typing import Any

__all__ = ["is_wrapped", "unwrap", "wrap"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
