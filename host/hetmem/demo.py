"""`hetmem demo`: one decode step of each method on synthetic data, with its profile."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .attention import KVChunk, attention_recall
from .checks import check_positive_int
from .errors import InputError
from .methods import ATTENTION_METHODS, RAG_METHODS, get
from .pipeline import Pipeline
from .profile import Profile


@dataclass
class DemoResult:
    method: str
    placement: dict[str, str]
    profile: Profile
    summary: str


def attention_demo(
    name: str, placement: Any, fpga: Any, context: int, budget: int, seed: int
) -> DemoResult:
    from .synthetic import synthetic_kv

    kv, query = synthetic_kv(
        batch=2,
        q_heads=8,
        kv_heads=2,
        length=context,
        dim=64,
        lengths=[context, context * 3 // 4],
        seed=seed,
    )
    pipe = Pipeline(get(name), placement, fpga=fpga)
    pipe.prepare(kv)
    # One decode step: append the new token's key/value, then select and attend.
    gen = torch.Generator().manual_seed(seed + 1)
    pipe.append(
        KVChunk(torch.randn(2, 2, 1, 64, generator=gen), torch.randn(2, 2, 1, 64, generator=gen))
    )
    append_profile = pipe.profile
    out = pipe.step(query, budget)
    profile = Profile()
    profile.extend(append_profile)
    profile.extend(pipe.profile)
    ref = pipe.method.reference(pipe.memory, query)
    recall = float(attention_recall(query.q, pipe.memory.kv, pipe.last_selection).mean())
    err = float((out - ref).abs().max())
    summary = f"context {context}, budget {budget}: attention recall {recall:.3f}, max |out - dense| {err:.3g}"
    return DemoResult(name, pipe.placement, profile, summary)


def rag_demo(name: str, placement: Any, fpga: Any, k: int, seed: int) -> DemoResult:
    from .rag_demo import build_rag_demo

    return build_rag_demo(name, placement, fpga, k, seed)


def run_demo(
    methods: list[str] | None = None,
    placement: Any = None,
    fpga: Any = None,
    context: int = 8192,
    budget: int = 1024,
    k: int = 5,
    seed: int = 0,
    on_result: Callable[[DemoResult], None] | None = None,
) -> list[DemoResult]:
    names = list(methods or [*ATTENTION_METHODS, *RAG_METHODS])
    for name in names:
        if name not in (*ATTENTION_METHODS, *RAG_METHODS):
            raise InputError(
                "methods", f"unknown method {name!r}; methods are {ATTENTION_METHODS + RAG_METHODS}"
            )
    check_positive_int("budget", budget)
    check_positive_int("k", k)
    if check_positive_int("context", context) < 2:  # the second row holds 3/4 of it
        raise InputError("context", f"expected at least 2 tokens, got {context}")
    results = []
    for name in names:
        if name in ATTENTION_METHODS:
            result = attention_demo(name, placement, fpga, context, budget, seed)
        else:
            result = rag_demo(name, placement, fpga, k, seed)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
