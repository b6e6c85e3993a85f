"""Text helpers shared by the RAG methods: the tokenizer and the prompt template.

Both live here so that the BM25 index, its queries and the tests that compare against
the `bm25s` library split text the same way, and so that every RAG method builds its
prompt from one template.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .errors import InputError

#: The default token pattern of `bm25s` (and scikit-learn): words of two or more characters.
TOKEN_PATTERN = r"(?u)\b\w\w+\b"
_TOKEN_RE = re.compile(TOKEN_PATTERN)

#: The prompt: a header, one line per document (best first), then the question.
PROMPT_HEADER = "Answer the question using the documents below.\n\n"
PROMPT_DOCUMENT = "[{rank}] {text}\n"
PROMPT_QUESTION = "\nQuestion: {question}\nAnswer:"
#: Prompts longer than this are cut (documents last-ranked first); None disables the guard.
DEFAULT_MAX_CHARS = 16_000
#: Marks a document cut short by the `max_chars` guard.
TRUNCATION_MARK = " ..."


@dataclass
class Documents:
    """Raw documents for a RAG method's Prepare Memory.

    `embeddings` [N, D] serve dense retrieval (or its encoder computes them); `device` is
    where the index is built: `to(device)` sets it, which is how `Pipeline` places Prepare
    even for text-only documents.
    """

    texts: list[str]
    embeddings: torch.Tensor | None = None
    device: torch.device | None = None

    def to(self, device: torch.device | str) -> Documents:
        emb = None if self.embeddings is None else self.embeddings.to(device)
        return Documents(list(self.texts), emb, torch.device(device))


def tokenize(text: str, stopwords: Iterable[str] | None = None) -> list[str]:
    """Lowercase, then keep the words of two or more characters (bm25s's default split).

    `stopwords` (default none) are dropped after lowercasing.
    """
    tokens = _TOKEN_RE.findall(text.lower())
    if stopwords:
        stop = {w.lower() for w in stopwords}
        tokens = [t for t in tokens if t not in stop]
    return tokens


def last_words(text: str, window: int) -> str:
    """The last `window` whitespace-separated words of `text` (the re-retrieval query)."""
    words = text.split()
    return " ".join(words[-window:]) if window > 0 else ""


def best_first(indices: torch.Tensor, valid: torch.Tensor, scores: torch.Tensor) -> list[list[int]]:
    """Order selected documents by score, best first; equal scores keep the lower index first.

    `indices`, `valid`, `scores`: [batch, k], indices ascending (the top-k contract). A
    stable descending sort over ascending indices gives the tie rule for free.
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ranked = torch.gather(indices, -1, order).tolist()
    keep = torch.gather(valid, -1, order).tolist()
    return [
        [i for i, ok in zip(row, oks, strict=True) if ok]
        for row, oks in zip(ranked, keep, strict=True)
    ]


def check_max_chars(max_chars: object) -> int | None:
    if max_chars is None:
        return None
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars <= 0:
        raise InputError("max_chars", f"expected a positive int or None, got {max_chars!r}")
    return max_chars


def assemble_prompt(
    documents: Sequence[str], question: str = "", max_chars: int | None = DEFAULT_MAX_CHARS
) -> str:
    """The augmented prompt: the documents in the order given (callers pass best first),
    then the question.

    Under `max_chars` the question is always kept whole; documents are added in order
    while they fit, the first one that does not is cut (with a mark) and the rest dropped,
    so the best documents survive. An empty question leaves the question lines out.
    """
    check_max_chars(max_chars)
    tail = PROMPT_QUESTION.format(question=question) if question else ""
    room = None if max_chars is None else max_chars - len(PROMPT_HEADER) - len(tail)
    if room is not None and room < 0:
        raise InputError(
            "max_chars", f"{max_chars} leaves no room for the template and the question"
        )
    lines: list[str] = []
    for rank, text in enumerate(documents, start=1):
        line = PROMPT_DOCUMENT.format(rank=rank, text=text)
        if room is not None and len(line) > room:
            cut = room - len(PROMPT_DOCUMENT.format(rank=rank, text="")) - len(TRUNCATION_MARK)
            if cut > 0:
                lines.append(PROMPT_DOCUMENT.format(rank=rank, text=text[:cut] + TRUNCATION_MARK))
            break
        lines.append(line)
        if room is not None:
            room -= len(line)
    return PROMPT_HEADER + "".join(lines) + tail
