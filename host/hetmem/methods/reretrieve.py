"""Re-retrieval during generation (FLARE / DRAGIN style), for either RAG method.

`ReRetriever` watches the text a model generates and queries the index again when a token
was improbable or on a fixed schedule. It runs the query through a pipeline (placed and
profiled) or through the method itself. It lives among the methods and names the pipeline
only by what it uses of it (`SelectingPipeline`), so methods/ never imports pipeline.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from ..checks import check_k, check_positive_int
from ..errors import InputError
from ..profile import Profile
from ..selection import Selection
from ..text import last_words
from .base import Memory, Method


class SelectingPipeline(Protocol):
    """What re-retrieval uses of a `hetmem.Pipeline`: its method, its memory, and Relevancy +
    Retrieval under its placement."""

    method: Method
    memory: Memory | None

    def select(self, query: Any, budget: Any, profile: Profile | None = None) -> Selection: ...


def _is_pipeline(source: Any) -> bool:
    return (
        not isinstance(source, Method)
        and isinstance(getattr(source, "method", None), Method)
        and callable(getattr(source, "select", None))
    )


Reason = Literal["low_prob", "every"]


@dataclass
class Retrieved:
    """What one re-retrieval returns: the query it ran and the documents, best first."""

    query: str
    indices: list[int]
    texts: list[str]
    #: Relevancy and Retrieval timings when run through a Pipeline.
    profile: Profile | None = None


@dataclass
class Firing:
    """One entry of the re-retrieval log: when (in generated tokens), why, and what."""

    position: int
    reasons: tuple[Reason, ...]
    lowest_prob: float | None
    query: str
    indices: list[int]
    profile: Profile | None = None


class ReRetriever:
    """Decides, during generation, when to query the index again, and does it.

    It fires when a token generated since the last call has probability below `min_prob`
    (FLARE's active retrieval trigger), or when `every` tokens have been generated since
    it last fired (the fixed schedule of IRCoT-like methods). The query is the original
    question plus the last `window` words of the generated text. Every firing is logged
    in `log` with its reasons. Unlike FLARE it does not mask the uncertain tokens out of
    the query, and unlike DRAGIN it does not weigh tokens by attention.

    `source` is a `hetmem.Pipeline` over a RAG method (its memory and placement are used),
    or a RAG method with its `memory`. The method must take queries as a list of strings
    (BM25RAG; DenseRAG with an encoder) and offer `ranked(memory, selection, queries)`.
    """

    def __init__(
        self,
        source: SelectingPipeline | Method,
        k: int,
        *,
        memory: Memory | None = None,
        question: str = "",
        every: int | None = None,
        min_prob: float | None = None,
        window: int = 16,
    ):
        if _is_pipeline(source):
            if memory is not None:
                raise InputError(
                    "memory", "a Pipeline brings its own memory; pass one or the other"
                )
            self.pipeline: SelectingPipeline | None = source
            self.method = source.method
        elif isinstance(source, Method):
            if not isinstance(memory, Memory):
                raise InputError("memory", "a method needs the memory to search (memory=...)")
            self.pipeline, self.method = None, source
        else:
            raise InputError(
                "source", f"expected a Pipeline or a Method, got {type(source).__name__}"
            )
        if not hasattr(self.method, "ranked"):
            raise InputError("source", f"method {self.method.name!r} cannot rank documents")
        self.memory = memory
        self.k = check_positive_int("k", k)
        if every is None and min_prob is None:
            raise InputError("every", "set every=..., min_prob=... or both, or it never fires")
        self.every = None if every is None else check_positive_int("every", every)
        if min_prob is not None and (
            isinstance(min_prob, bool)
            or not isinstance(min_prob, (int, float))
            or not 0 < min_prob <= 1
        ):
            raise InputError("min_prob", f"expected a probability in (0, 1], got {min_prob!r}")
        self.min_prob = None if min_prob is None else float(min_prob)
        self.window = check_positive_int("window", window)
        self.log: list[Firing] = []
        self.reset(question)

    def reset(self, question: str = "") -> None:
        """Start a new generation for `question`: the token count and schedule restart."""
        if not isinstance(question, str):
            raise InputError("question", f"expected a str, got {type(question).__name__}")
        self.question = question
        self.position = 0
        self._last_fired = 0
        self._words = 0

    def __call__(
        self, generated: str, probs: Sequence[float] | torch.Tensor | None = None
    ) -> Retrieved | None:
        """Observe the generation so far; return new documents when it fires, else None.

        `probs`: the probabilities of the tokens generated since the previous call, one per
        token; they also count the tokens. Without them, tokens are counted as the
        whitespace-separated words the text gained.
        """
        if not isinstance(generated, str):
            raise InputError("generated", f"expected a str, got {type(generated).__name__}")
        words = len(generated.split())
        lowest = None
        if probs is None:
            new_tokens = max(words - self._words, 0)
        else:
            p = torch.as_tensor(probs, dtype=torch.float64).flatten()
            if not bool(torch.isfinite(p).all()) or bool(((p < 0) | (p > 1)).any()):
                raise InputError("probs", "expected probabilities in [0, 1]")
            new_tokens = p.numel()
            lowest = float(p.min()) if new_tokens else None
        self._words = words
        self.position += new_tokens
        reasons: list[Reason] = []
        if self.min_prob is not None and lowest is not None and lowest < self.min_prob:
            reasons.append("low_prob")
        if self.every is not None and self.position - self._last_fired >= self.every:
            reasons.append("every")
        if not reasons:
            return None
        self._last_fired = self.position
        query = " ".join(s for s in (self.question, last_words(generated, self.window)) if s)
        found = self.retrieve(query)
        self.log.append(
            Firing(self.position, tuple(reasons), lowest, query, found.indices, found.profile)
        )
        return found

    def retrieve(self, query: str) -> Retrieved:
        """Run one query through the pipeline (profiled) or the method; best first."""
        memory = self.pipeline.memory if self.pipeline is not None else self.memory
        if memory is None:
            raise InputError("memory", "is empty: call prepare() on the pipeline first")
        k = check_k("k", self.k, memory.entries)
        profile = None
        if self.pipeline is not None:
            profile = Profile()
            selection = self.pipeline.select([query], k, profile)
        else:
            selection = self.method.retrieve(self.method.relevancy(memory, [query]), k)
        (ids,) = self.method.ranked(memory, selection, [query])  # type: ignore[attr-defined]
        texts = [memory.texts[i] for i in ids]  # type: ignore[attr-defined]
        return Retrieved(query, ids, texts, profile)
