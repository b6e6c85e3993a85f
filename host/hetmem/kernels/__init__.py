"""FPGA kernel specs, one per kernel: argument list and HBM banks, register map, integer
formats and quantization, a bit-exact numpy golden model, and a cycle model.

    spec = kernels.get("token_indexer")
    state = spec.fit(memory)                                   # once, with headroom
    resident = spec.quantize_memory(memory, state)             # whole memory, or appended rows
    out = spec.golden(spec.bind(resident, spec.quantize_query(query, state, k=2048)))
"""

from __future__ import annotations

from ..errors import InputError
from .block_gate import BlockGate
from .bm25 import BM25
from .page_indexer import PageIndexer
from .spec import (
    DEFAULT_CLOCK_HZ,
    ENGINES,
    MODE_THRESHOLD,
    MODE_TOPK,
    Arg,
    EngineParams,
    KernelInputs,
    KernelOutputs,
    KernelSpec,
    engine_cycles,
    seconds,
)
from .token_indexer import TokenIndexer
from .topk import check_k, pack_bitmap, threshold_bitmap, topk, unpack_bitmap
from .vector_search import VectorSearch

_SPECS: dict[str, KernelSpec] = {
    spec.name: spec for spec in (TokenIndexer(), PageIndexer(), BlockGate(), VectorSearch(), BM25())
}


def names() -> tuple[str, ...]:
    """Names of every kernel spec."""
    return tuple(_SPECS)


def get(name: str) -> KernelSpec:
    """The spec of kernel `name` (a shared, stateless instance)."""
    try:
        return _SPECS[name]
    except (KeyError, TypeError):
        raise InputError("kernel", f"unknown kernel {name!r}; kernels are {names()}") from None


__all__ = [
    "DEFAULT_CLOCK_HZ",
    "ENGINES",
    "MODE_THRESHOLD",
    "MODE_TOPK",
    "Arg",
    "EngineParams",
    "KernelInputs",
    "KernelOutputs",
    "KernelSpec",
    "check_k",
    "engine_cycles",
    "get",
    "names",
    "pack_bitmap",
    "seconds",
    "threshold_bitmap",
    "topk",
    "unpack_bitmap",
]
