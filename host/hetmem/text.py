"""Text helpers shared by the RAG methods: the tokenizer and the prompt template.

Both live here so that the BM25 index, its queries and the tests that compare against
the `bm25s` library split text the same way, and so that every RAG method builds its
prompt from one template.

The tokenizer is bm25s's default (lowercase, then the words of two or more characters,
scikit-learn's pattern) made Unicode-aware with the Unicode database that Python ships
(`unicodedata`), because bm25s's split alone misses text that is the same to a reader:

- NFKC, then case folding (Unicode's caseless matching: full-width "ＢＭ２５" is "bm25",
  the ligature "ﬁ" is "fi", "Straße" is "strasse"), and canonical equivalence: a word typed
  with combining accents (NFD, as macOS file names are) equals its precomposed form.
- Accents folded (default): the generic combining diacritics (the Combining Diacritical
  Marks blocks, which Latin, Greek and Cyrillic use) are dropped after decomposition, so
  "café", "cafe\u0301" and "cafe" are one term, as in Lucene's ASCII folding. The marks
  of scripts whose vowels are marks (Devanagari, Thai, ...) are kept and stay inside their
  words (Python's word class alone splits a Hindi word at every vowel sign).
- CJK: Han, kana and Hangul runs have no spaces between words, so each run gives its
  characters and its overlapping character bigrams (Lucene's CJK bigram filter with
  unigrams): "東京大学" gives 東, 京, 大, 学, 東京, 京大, 大学, and the query "東京" finds it.

On ASCII text the tokens are exactly bm25s's (a test checks it on a real corpus).
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .errors import InputError

#: The default token pattern of `bm25s` (and scikit-learn): words of two or more characters.
TOKEN_PATTERN = r"(?u)\b\w\w+\b"

#: Scripts written without spaces between words: Hiragana, Katakana (and its phonetic
#: extensions), CJK Unified Ideographs (extension A, the main block, extensions B-G and the
#: compatibility ideographs) and Hangul syllables, as Unicode's block ranges.
CJK_RANGES = (
    (0x3040, 0x309F),
    (0x30A0, 0x30FF),
    (0x31F0, 0x31FF),
    (0x3400, 0x4DBF),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7AF),
    (0xF900, 0xFAFF),
    (0x20000, 0x2FA1F),
    (0x30000, 0x3134F),
)
#: The combining diacritics that accent folding drops: the Combining Diacritical Marks
#: blocks (basic, extended, supplement, for symbols, half marks).
DIACRITIC_RANGES = (
    (0x0300, 0x036F),
    (0x1AB0, 0x1AFF),
    (0x1DC0, 0x1DFF),
    (0x20D0, 0x20FF),
    (0xFE20, 0xFE2F),
)


def _char_class(ranges: Iterable[tuple[int, int]]) -> str:
    return "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)


_ASCII_RE = re.compile(TOKEN_PATTERN)
_CJK = _char_class(CJK_RANGES)
_DIACRITICS = re.compile(f"[{_char_class(DIACRITIC_RANGES)}]+")


#: CJK runs, captured, so that `split` keeps them between the other text's pieces.
_CJK_SPLIT = re.compile(f"([{_CJK}]+)")


@functools.cache
def _word_re() -> re.Pattern[str]:
    """Words: word characters plus the combining marks (Mn, Mc, Me) that Python's word
    class leaves out, so a word with vowel signs stays whole (one character class: fast).
    Built on first use (one pass over the Unicode database, ~0.1 s)."""
    marks: list[tuple[int, int]] = []
    for cp in range(sys.maxunicode + 1):
        if unicodedata.category(chr(cp)).startswith("M"):
            if marks and marks[-1][1] == cp - 1:
                marks[-1] = (marks[-1][0], cp)
            else:
                marks.append((cp, cp))
    return re.compile(f"[\\w{_char_class(marks)}]+")


def normalize(text: str, fold_accents: bool = True) -> str:
    """NFKC, case folded, accents folded (unless `fold_accents` is False)."""
    _check_str("text", text)
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    if fold_accents:
        text = unicodedata.normalize("NFC", _DIACRITICS.sub("", unicodedata.normalize("NFD", text)))
    return text


def tokenize(
    text: str, stopwords: Iterable[str] | None = None, *, fold_accents: bool = True
) -> list[str]:
    """The index terms of `text`: normalized (`normalize`), then words of two or more
    characters (bm25s's default split) and, for CJK runs, characters and bigrams.

    `stopwords` (default none) are normalized the same way and dropped.
    """
    _check_str("text", text)
    tokens: list[str] = []
    if text.isascii():  # nothing to normalize, no marks, no CJK: bm25s's split as it is
        tokens = _ASCII_RE.findall(text.lower())
    else:
        words = _word_re()
        # split() with a captured group: CJK runs at odd places, the text between at even
        for i, part in enumerate(_CJK_SPLIT.split(normalize(text, fold_accents))):
            if i % 2:
                tokens.extend(part)
                tokens.extend(part[j : j + 2] for j in range(len(part) - 1))
            else:
                tokens.extend(w for w in words.findall(part) if len(w) >= 2)
    if stopwords:
        stop = {normalize(w, fold_accents) for w in stopwords}
        tokens = [t for t in tokens if t not in stop]
    return tokens


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


def last_words(text: str, window: int) -> str:
    """The last `window` whitespace-separated words of `text` (the re-retrieval query)."""
    _check_str("text", text)
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise InputError("window", f"expected an int >= 0, got {window!r}")
    words = text.split()
    return " ".join(words[-window:]) if window > 0 else ""


def _check_str(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise InputError(name, f"expected a str, got {type(value).__name__}")


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
