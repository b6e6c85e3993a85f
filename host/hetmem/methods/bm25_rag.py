"""BM25 retrieval: an inverted index, BM25(k1, b) relevancy, top-k documents, a prompt.
The FLARE/DRAGIN-style re-retrieval hook for use during generation (`ReRetriever`, for
either RAG method) lives in `hetmem.methods.reretrieve` and is re-exported here.

Scoring is that of the `bm25s` library's default method ("lucene"), which is:

    idf(t)      = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))
    w(t, d)     = tf(t, d) / (tf(t, d) + k1 * (1 - b + b * dl(d) / avgdl))
    score(q, d) = sum over the query's tokens t (repeats count) of idf(t) * w(t, d)

with dl the number of tokens of d and avgdl their mean over the N documents. Note
that the lucene variant has no (k1 + 1) factor in w. Query tokens absent from the
index contribute nothing. Text is split by `hetmem.text.tokenize` (NFKC, case and accent
folding, CJK bigrams; bm25s's split on ASCII).

A document that matches none of a query's terms scores 0 and is not a result: Apply (and
`ranked`) keep only documents with a positive score, so a query with no indexable term
(emoji, punctuation, words absent from the index) gets no documents, not the first k, and
Relevancy warns about it (`NoMatchWarning`, pointing at the caller). Retrieval's selection
itself stays the top-k contract's (the card and the float path select the same ids).

The memory stores only counts (tf, df, dl); idf and the length normalization are computed
at query time, so `append` never rescores existing postings, and k1 and b can change
without touching the index.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..attention import Growable
from ..errors import InputError
from ..selection import Bitmap, Scores, Selection, TopK, budget_units, topk_select
from ..text import (
    DEFAULT_MAX_CHARS,
    Documents,
    assemble_prompt,
    best_first,
    check_max_chars,
    tokenize,
)
from ..warn import warn
from .base import KernelBinding, Memory, Method
from .reretrieve import Firing, Reason, ReRetriever, Retrieved

__all__ = [
    "BM25RAG",
    "BM25Memory",
    "Firing",
    "NoMatchWarning",
    "ReRetriever",
    "Reason",
    "Retrieved",
]

#: Scores are float64 so the reference's ties are exact (bm25s computes in float32).
SCORE_DTYPE = torch.float64


class NoMatchWarning(UserWarning):
    """A BM25 query has no term in the index: it retrieves no document."""


def _ranges(starts: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate the index ranges [start, start + length): (positions, which range)."""
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    first = torch.cumsum(lengths, 0) - lengths
    pos = starts[owner] + torch.arange(len(owner), device=lengths.device) - first[owner]
    return pos, owner


@dataclass
class BM25Memory(Memory):
    """The BM25 index: counts only, so appends never rescore.

    Inverted index (what Relevancy reads), CSR over term ids: postings of term t are
    `post_docs[term_ptr[t]:term_ptr[t+1]]` (doc ids ascending) with `post_tfs`.
    Forward index (what Apply reads to order the k retrieved documents), CSR over doc
    ids: `fwd_terms`, `fwd_tfs` of document d at `doc_ptr[d]:doc_ptr[d+1]`; it grows
    by appends only. Plus df per term, dl per document, the vocabulary and the texts.
    """

    vocab: dict[str, int]
    term_ptr: torch.Tensor
    post_docs: torch.Tensor
    post_tfs: torch.Tensor
    df: Growable
    doc_len: Growable
    doc_ptr: Growable
    fwd_terms: Growable
    fwd_tfs: Growable
    texts: list[str] = field(default_factory=list)
    total_len: int = 0

    @property
    def device(self) -> torch.device:
        return self.post_docs.device

    @property
    def entries(self) -> int:
        return self.doc_len.length

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def avgdl(self) -> float:
        return self.total_len / self.entries if self.entries else 0.0

    @property
    def index_nbytes(self) -> int:
        """The inverted index, df and dl: what a BM25 kernel reads."""
        tensors = (self.term_ptr, self.post_docs, self.post_tfs, self.df.data, self.doc_len.data)
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device) -> BM25Memory:
        return BM25Memory(
            dict(self.vocab),
            self.term_ptr.to(device),
            self.post_docs.to(device),
            self.post_tfs.to(device),
            self.df.to(device),
            self.doc_len.to(device),
            self.doc_ptr.to(device),
            self.fwd_terms.to(device),
            self.fwd_tfs.to(device),
            list(self.texts),
            self.total_len,
        )


def _check_texts(name: str, texts: object, *, allow_empty: bool = True) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise InputError(name, f"expected a list of strings, got {type(texts).__name__}")
    if not allow_empty and len(texts) == 0:
        raise InputError(name, "is empty: expected at least one string")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(name, f"item {i} is {type(t).__name__}, expected str")
    return list(texts)


def _document_texts(data: Any) -> list[str]:
    """Accept a list of strings or `text.Documents` (whose embeddings are ignored)."""
    if isinstance(data, Documents):
        return _check_texts("documents.texts", data.texts)
    return _check_texts("documents", data)


class BM25RAG(Method):
    """BM25 retrieval-augmented generation: the float torch reference (scores float64)."""

    name: ClassVar[str] = "bm25_rag"
    family: ClassVar[str] = "rag"
    kernel: ClassVar[str | None] = "bm25"
    describe: ClassVar[dict[str, str]] = {
        "prepare": "inverted index: postings (doc id, tf) per term as CSR, df, doc lengths",
        "relevancy": "BM25 (lucene variant, k1, b) of each query's tokens over the postings",
        "retrieval": "top-k documents (ties to the lower index)",
        "apply": "prompt assembly: retrieved documents best first, then the question",
    }

    def __init__(
        self,
        k1: float = 1.5,
        b: float = 0.75,
        stopwords: Iterable[str] | None = None,
        max_chars: int | None = DEFAULT_MAX_CHARS,
        device: torch.device | str = "cpu",
        fold_accents: bool = True,
    ):
        """`fold_accents`: "café" and "cafe" are one term (default); False keeps them apart
        (for languages where the accent makes another word)."""
        if isinstance(k1, bool) or not isinstance(k1, (int, float)) or not 0 <= k1 < math.inf:
            raise InputError("k1", f"expected a finite number >= 0, got {k1!r}")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b <= 1:
            raise InputError("b", f"expected a number in [0, 1], got {b!r}")
        self.k1 = float(k1)
        self.b = float(b)
        if not isinstance(fold_accents, bool):
            raise InputError("fold_accents", f"expected a bool, got {fold_accents!r}")
        self.fold_accents = fold_accents
        if stopwords is not None:
            words = None
            if not isinstance(stopwords, str) and isinstance(stopwords, Iterable):
                words = list(stopwords)
            if words is None or not all(isinstance(w, str) for w in words):
                raise InputError("stopwords", f"expected an iterable of words, got {stopwords!r}")
            stopwords = words
        self.stopwords = frozenset(stopwords) if stopwords else frozenset()
        self.max_chars = check_max_chars(max_chars)
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise InputError("device", f"not a torch device: {device!r}") from exc

    def tokenize(self, text: str) -> list[str]:
        return tokenize(text, self.stopwords, fold_accents=self.fold_accents)

    # -- Prepare -------------------------------------------------------------------------------
    def prepare(self, data: Sequence[str] | Documents) -> BM25Memory:
        """Build the index on `data.device` for `Documents` placed by `to` (as `Pipeline`
        does), else on the method's `device`."""
        texts = _document_texts(data)
        dev = data.device if isinstance(data, Documents) and data.device else self.device

        def empty() -> torch.Tensor:
            return torch.zeros(0, dtype=torch.long, device=dev)

        memory = BM25Memory(
            vocab={},
            term_ptr=torch.zeros(1, dtype=torch.long, device=dev),
            post_docs=empty(),
            post_tfs=empty(),
            df=Growable(empty(), axis=0),
            doc_len=Growable(empty(), axis=0),
            doc_ptr=Growable(torch.zeros(1, dtype=torch.long, device=dev), axis=0),
            fwd_terms=Growable(empty(), axis=0),
            fwd_tfs=Growable(empty(), axis=0),
        )
        self._add(memory, texts)
        return memory

    def append(self, memory: BM25Memory, data: Sequence[str] | Documents) -> None:
        """Add documents: new postings merge into the CSR, df, N and avgdl update.

        Existing postings are moved into their grown term ranges by one vectorized copy;
        they are never recounted or rescored (scores depend on N and avgdl only at query time).
        """
        self._add(memory, _document_texts(data))

    def _count(self, memory: BM25Memory, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenize new documents, growing the vocabulary. Returns per posting `terms`
        (distinct and ascending within a document) and `tfs`; per document `lengths` (dl)
        and `distinct` (its number of postings)."""
        out: dict[str, list[int]] = {"terms": [], "tfs": [], "lengths": [], "distinct": []}
        for text in texts:
            tokens = self.tokenize(text)
            counts = Counter(memory.vocab.setdefault(t, len(memory.vocab)) for t in tokens)
            ids = sorted(counts)
            out["terms"].extend(ids)
            out["tfs"].extend(counts[i] for i in ids)
            out["lengths"].append(len(tokens))
            out["distinct"].append(len(ids))
        return {
            key: torch.tensor(values, dtype=torch.long, device=memory.device)
            for key, values in out.items()
        }

    def _add(self, memory: BM25Memory, texts: list[str]) -> None:
        n_old, v_old = memory.entries, memory.vocab_size
        new = self._count(memory, texts)
        dev, vocab = memory.device, memory.vocab_size
        # Forward index, dl and df: appends only.
        _extend(memory.doc_ptr, memory.fwd_terms.length + torch.cumsum(new["distinct"], 0))
        _extend(memory.fwd_terms, new["terms"])
        _extend(memory.fwd_tfs, new["tfs"])
        _extend(memory.doc_len, new["lengths"])
        _extend(memory.df, torch.zeros(vocab - v_old, dtype=torch.long, device=dev))
        memory.df.data.add_(torch.bincount(new["terms"], minlength=vocab))
        memory.total_len += int(new["lengths"].sum())
        memory.texts.extend(texts)
        # Inverted index: merge the new postings in.
        doc_ids = torch.arange(n_old, n_old + len(texts), device=dev)
        memory.term_ptr, memory.post_docs, memory.post_tfs = _merge_postings(
            memory.term_ptr,
            memory.post_docs,
            memory.post_tfs,
            new["terms"],
            torch.repeat_interleave(doc_ids, new["distinct"]),
            new["tfs"],
            vocab,
        )

    # -- Relevancy -------------------------------------------------------------------------------
    def _query_terms(
        self, memory: BM25Memory, queries: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(batch row, term id, count, slot) of every distinct known query token, rows
        ascending and term ids ascending within a row; `slot` is the position within the row.
        Unknown tokens are dropped (they contribute nothing)."""
        entries: list[tuple[int, int, int, int]] = []
        for row, text in enumerate(queries):
            known = Counter(memory.vocab[t] for t in self.tokenize(text) if t in memory.vocab)
            entries.extend((row, term, known[term], j) for j, term in enumerate(sorted(known)))
        columns = list(zip(*entries, strict=True)) if entries else [(), (), (), ()]
        return tuple(  # type: ignore[return-value]
            torch.tensor(c, dtype=torch.long, device=memory.device) for c in columns
        )

    def _weights(
        self, memory: BM25Memory, terms: torch.Tensor, docs: torch.Tensor, tfs: torch.Tensor
    ) -> torch.Tensor:
        """idf(t) * tf / (tf + k1 * (1 - b + b * dl / avgdl)) per posting, float64."""
        n = float(memory.entries)
        df = memory.df.data[terms].to(SCORE_DTYPE)
        idf = torch.log1p((n - df + 0.5) / (df + 0.5))
        tf = tfs.to(SCORE_DTYPE)
        dl = memory.doc_len.data[docs].to(SCORE_DTYPE)
        norm = self.k1 * ((1 - self.b) + self.b * dl / memory.avgdl)
        return idf * tf / (tf + norm)

    def check_query(self, memory: BM25Memory, query: Any) -> None:
        _check_texts("query", query, allow_empty=False)
        if memory.entries == 0:
            raise InputError("memory", "is empty: prepare or append documents before querying")

    def relevancy(self, memory: BM25Memory, query: Sequence[str]) -> Scores:
        """BM25 of every document for each query string: Scores [B, 1, 1, N], float64.

        Vectorized over the postings of the query terms (no loop over documents).
        """
        self.check_query(memory, query)
        queries = list(query)
        rows, terms, counts, slots = self._query_terms(memory, queries)
        _warn_unmatched(queries, rows)
        pos, owner = _ranges(memory.term_ptr[terms], memory.df.data[terms])
        docs = memory.post_docs[pos]
        weights = counts[owner] * self._weights(memory, terms[owner], docs, memory.post_tfs[pos])
        rows, slots = rows[owner], slots[owner]
        scores = torch.zeros(len(queries), memory.entries, dtype=SCORE_DTYPE, device=memory.device)
        # One pass per query-term slot: (row, doc) pairs are unique within a slot, so every
        # document sums its terms in the same order on any device, and equal documents tie
        # exactly.
        for j in range(int(slots.max()) + 1 if len(slots) else 0):
            m = slots == j
            scores.index_put_((rows[m], docs[m]), weights[m], accumulate=True)
        return Scores(scores[:, None, None, :])

    def kernel_memory(self, memory: BM25Memory) -> dict[str, Any]:
        """The index in the `bm25` kernel's float semantics (CSR over terms, counts, k1, b)."""
        return {
            "term_offsets": memory.term_ptr,
            "doc_ids": memory.post_docs,
            "tfs": memory.post_tfs,
            "doc_lengths": memory.doc_len.data,
            "k1": self.k1,
            "b": self.b,
        }

    def kernel_query(self, memory: BM25Memory, query: Sequence[str]) -> dict[str, torch.Tensor]:
        """The `bm25` kernel's query: terms int64 [B, T] padded with -1, idf float64 [B, T].

        A token repeated in a query counts once per repeat (as in bm25s): its idf is
        multiplied by the count, so T is the most distinct known terms of any query.
        """
        self.check_query(memory, query)
        queries = list(query)
        rows, terms, counts, slots = self._query_terms(memory, queries)
        _warn_unmatched(queries, rows)
        width = int(slots.max()) + 1 if len(slots) else 1
        dev = memory.device
        out_terms = torch.full((len(queries), width), -1, dtype=torch.long, device=dev)
        out_idf = torch.zeros(len(queries), width, dtype=SCORE_DTYPE, device=dev)
        n = float(memory.entries)
        df = memory.df.data[terms].to(SCORE_DTYPE)
        out_terms[rows, slots] = terms
        out_idf[rows, slots] = counts * torch.log1p((n - df + 0.5) / (df + 0.5))
        return {"terms": out_terms, "idf": out_idf}

    # -- Retrieval and Apply -----------------------------------------------------------------------
    def binding(self) -> KernelBinding:
        """The CSR index, rewritten whole on append (postings move)."""
        return KernelBinding(self.kernel, "index", self.kernel_memory, self.kernel_query)

    def retrieve(self, scores: Scores, budget: int) -> TopK:
        indices, valid = topk_select(
            scores.values, budget_units(budget, 1, scores.values.shape[-1]), name="budget"
        )
        return TopK(indices, valid)

    def selected_scores(
        self, memory: BM25Memory, selection: Selection, query: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indices [B, k] ascending, valid [B, k], BM25 scores [B, k]) of the selection.

        Scores only the k selected documents, from the forward index: the cost is their
        length, not a second pass over the postings. A selected document that matches no
        query term (score 0) is not valid: it is no result.
        """
        self.check_query(memory, query)
        queries = list(query)
        if isinstance(selection, Bitmap):
            selection = selection.to_topk()
        idx = selection.indices[:, 0, 0, :].to(memory.device)
        valid = selection.valid[:, 0, 0, :].to(memory.device) & (idx < memory.entries)
        if idx.shape[0] != len(queries):
            raise InputError("selection", f"has batch {idx.shape[0]}, the query {len(queries)}")
        batch, k = idx.shape
        docs = idx.clamp(0, memory.entries - 1).flatten()
        ptr = memory.doc_ptr.data
        lengths = ptr[docs + 1] - ptr[docs]
        pos, slot = _ranges(ptr[docs], lengths)
        terms, tfs = memory.fwd_terms.data[pos], memory.fwd_tfs.data[pos]
        # Padded [B*k, longest] so each document sums its terms in one fixed order.
        # Match (row, term) of the documents' postings against the query's (row, term).
        q_rows, q_terms, q_counts, _ = self._query_terms(memory, queries)
        padded = torch.zeros(batch * k, int(lengths.max()), dtype=SCORE_DTYPE, device=idx.device)
        if len(q_terms):
            vocab = memory.vocab_size
            q_keys = q_rows * vocab + q_terms  # ascending: rows, then terms
            keys = torch.div(slot, k, rounding_mode="floor") * vocab + terms
            at = torch.searchsorted(q_keys, keys).clamp(max=len(q_keys) - 1)
            weights = q_counts[at] * self._weights(memory, terms, docs[slot], tfs)
            column = pos - ptr[docs][slot]  # the posting's place within its document
            padded[slot, column] = torch.where(q_keys[at] == keys, weights, 0.0)
        scores = padded.sum(-1).view(batch, k)
        return idx, valid & (scores > 0), scores

    def ranked(
        self, memory: BM25Memory, selection: Selection, query: Sequence[str]
    ) -> list[list[int]]:
        """The selected document ids per query, best first (ties: lower index first)."""
        return best_first(*self.selected_scores(memory, selection, query))

    def apply(self, memory: BM25Memory, selection: Selection, query: Sequence[str]) -> list[str]:
        """One prompt per query: the retrieved documents best first, then the question."""
        rows = self.ranked(memory, selection, query)
        return [
            assemble_prompt([memory.texts[i] for i in row], question, self.max_chars)
            for row, question in zip(rows, query, strict=True)
        ]

    def apply_nbytes(self, memory: BM25Memory, selection: Selection) -> int:
        """Bytes of the selected documents' texts (UTF-8)."""
        if isinstance(selection, Bitmap):
            selection = selection.to_topk()
        ids = selection.indices[selection.valid].tolist()
        return sum(len(memory.texts[i].encode()) for i in ids if i < memory.entries)


def _warn_unmatched(queries: list[str], rows: torch.Tensor) -> None:
    """Warn, once per call, about the queries with no term in the index."""
    hit = set(rows.tolist())
    missing = [i for i in range(len(queries)) if i not in hit]
    if missing:
        shown = ", ".join(f"{i} ({queries[i][:40]!r})" for i in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        warn(
            f"hetmem: BM25 queries {shown}{more} have no indexable term in the index "
            "(no word of 2+ characters, CJK character or known term): they retrieve no "
            "document",
            NoMatchWarning,
        )


def _merge_postings(
    term_ptr: torch.Tensor,
    docs: torch.Tensor,
    tfs: torch.Tensor,
    new_terms: torch.Tensor,
    new_docs: torch.Tensor,
    new_tfs: torch.Tensor,
    vocab: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge postings of new documents into a CSR over terms: (term_ptr, docs, tfs).

    The new documents' ids are above every old one, so within each term the old postings
    keep their order and offset and the new ones follow in doc order: one scatter of the
    old postings, one stable sort of the new ones, no re-sort of the old.
    """
    dev = term_ptr.device
    v_old = term_ptr.numel() - 1
    old_count = torch.zeros(vocab, dtype=torch.long, device=dev)
    old_count[:v_old] = torch.diff(term_ptr)
    new_count = torch.bincount(new_terms, minlength=vocab)
    ptr = torch.zeros(vocab + 1, dtype=torch.long, device=dev)
    ptr[1:] = torch.cumsum(old_count + new_count, 0)
    out_docs = torch.empty(int(ptr[-1]), dtype=torch.long, device=dev)
    out_tfs = torch.empty_like(out_docs)
    old_pos, old_term = _ranges(term_ptr[:-1], old_count[:v_old])
    old_dst = ptr[old_term] + old_pos - term_ptr[old_term]
    out_docs[old_dst], out_tfs[old_dst] = docs, tfs
    order = torch.sort(new_terms, stable=True).indices
    term = new_terms[order]
    rank = torch.arange(len(order), device=dev) - (torch.cumsum(new_count, 0) - new_count)[term]
    new_dst = ptr[term] + old_count[term] + rank
    out_docs[new_dst], out_tfs[new_dst] = new_docs[order], new_tfs[order]
    return ptr, out_docs, out_tfs


def _extend(store: Growable, values: torch.Tensor) -> None:
    """Append along axis 0 of a Growable (amortized O(1) per element)."""
    n = values.shape[0]
    store.reserve(store.length + n)
    store.buffer.narrow(0, store.length, n).copy_(values)
    store.length += n


def _bm25_costs(self: BM25RAG, shape: Any) -> dict:
    """Bytes and FLOPs of one retrieval for a batch of `shape.batch` queries of
    `shape.query_terms` terms over `shape.documents` documents, each term in `shape.term_df`
    of them (`hetmem.system.shape.Shape`): Prepare is the inverted index, built once (no
    per-query cost), Relevancy gathers each query term's postings (doc id, tf) and the
    documents' lengths and accumulates BM25 into N scores per query, Retrieval a top-k of
    them, Apply assembles the prompt from the k documents' texts (host work). `fpga` is the
    bm25 launch over the quantized postings."""
    from ..system.accounting import INDEX_BYTES, topk_cost
    from ..system.shape import StepCost

    n, b, terms = shape.documents, shape.batch, shape.query_terms
    postings = int(b * terms * max(1, round(shape.term_df * n)))
    k = min(budget_units(shape.rag_k), n)
    return {
        "prepare": StepCost(0, launches=0, note="the inverted index is built once, offline"),
        "relevancy": StepCost(
            postings * (8 + 8 + 8) + b * n * 8,
            8 * postings,
            launches=2 * terms,
            dtype="fp32",
            note=f"{postings} postings scattered into {n} scores per query",
        ),
        "retrieval": topk_cost(b * n),
        "apply": StepCost(
            b * k * shape.doc_tokens * 4,
            launches=0,
            note="prompt assembly from the retrieved texts (host)",
        ),
        "to_fpga": StepCost(b * terms * (4 + 2), note="term ids, idf"),
        "fpga": StepCost(
            postings * 6 + b * terms * 8,
            kernel=self.kernel,
            call={"n": n, "k": k, "postings": postings, "terms": b * terms, "queries": b},
        ),
        "from_fpga": StepCost(b * k * INDEX_BYTES, note="selected document ids"),
    }


BM25RAG.costs = _bm25_costs  # type: ignore[attr-defined]
