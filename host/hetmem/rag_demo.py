"""The RAG part of `hetmem demo`: one retrieval per method on real or synthetic documents."""

from __future__ import annotations

from typing import Any

import torch

from .corpus import pydoc_paragraphs
from .methods import get
from .pipeline import Pipeline
from .profile import Profile


def build_rag_demo(name: str, placement: Any, fpga: Any, k: int, seed: int):
    from .demo import DemoResult

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
