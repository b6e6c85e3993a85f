"""`hetmem demo`: one decode step of each attention method on synthetic data, and one
retrieval of each RAG method on the pydoc paragraphs, with its profile."""

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
    """One retrieval of a RAG method on real or synthetic documents."""
    from .corpus import pydoc_paragraphs

    corpus = list(pydoc_paragraphs())
    gen = torch.Generator().manual_seed(seed)
    target = int(torch.randint(len(corpus), (1,), generator=gen))
    pipe = Pipeline(get(name), placement, fpga=fpga)
    if name == "dense_rag":
        # Synthetic embeddings (no encoder in this demo): 384-d unit vectors, and a query
        # near the target document's vector.
        from .text import Documents

        emb = torch.nn.functional.normalize(torch.randn(len(corpus), 384, generator=gen), dim=-1)
        pipe.prepare(Documents(corpus[:-64], emb[:-64]))
        pipe.append(Documents(corpus[-64:], emb[-64:]))
        target = len(corpus) - 64 + target % 64  # a document that arrived by append
        query = emb[target : target + 1] + 0.05 * torch.randn(1, 384, generator=gen)
        what = "synthetic 384-d embeddings of the pydoc paragraphs"
    else:
        pipe.prepare(corpus[:-64])
        pipe.append(corpus[-64:])
        words = corpus[target].split()
        query = [" ".join(words[: min(12, len(words))])]
        what = "BM25 over the pydoc paragraphs, query = the start of one paragraph"
    append_profile = pipe.profile
    prompts = pipe.step(query, budget=k)
    profile = Profile()
    profile.extend(append_profile)
    profile.extend(pipe.profile)
    selection = pipe.last_selection
    found = target in selection.indices[0, 0, 0].tolist()
    summary = (
        f"{len(corpus)} documents ({what}); top-{k} holds the source document: {found}; "
        f"prompt of {len(prompts[0])} chars"
    )
    return DemoResult(name, pipe.placement, profile, summary)


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
