"""`bm25`: BM25 retrieval over an inverted index with bm25s' "lucene" scoring, top-k docs.

Float semantics: memory {"term_offsets": int64 [V+1], "doc_ids": int [P], "tfs": int [P],
"doc_lengths": int [N]} (CSR over term ids: the postings of term t are
doc_ids[term_offsets[t]:term_offsets[t+1]], unique doc ids) plus the scalars k1, b (in the
memory mapping or given to `fit`; bm25s' defaults 1.5, 0.75), query {"terms": int [Q, T]
padded with -1, "idf": float [Q, T]}, idf = ln(1 + (N - df + 0.5) / (df + 0.5)) computed by
the method. score(d) = sum_t idf_t * tf_td / (tf_td + k1 * (1 - b + b * dl_d / avgdl)).

Formats:
- impacts uint16 [P], UQ0.16: the length-normalized tf of each posting,
  rint(65535 * tf / (tf + k1 * (1 - b + b * dl / avgdl))), computed at index time with the
  avgdl fitted then (`fit`). On the card the postings are doc_ids uint32 [P] and impacts
  uint16 [P] in two pseudo-channels, term_offsets uint32 [V+1] in a third; dl never leaves
  the host.
- idf uint16 [Q, T] with one absmax scale per query: rint(65535 * idf / max idf); padded
  terms (-1) are skipped.
- score(d) = sum_t IDF_t * IMPACT_td, exact in uint64 (<= T * 65535^2); top-k over all n
  documents (documents that match no term score 0 and tie to the lower index).

Appending documents: the index is CSR, so new postings land inside every term's list and
the card's copy is rewritten (impacts depend only on (tf, dl, fitted avgdl), so postings
quantize the same whichever slice they come in). Existing impacts keep the fitted avgdl;
while the corpus avgdl stays within `AVGDL_TOLERANCE` (5%) of it the ranking error is
that small change of b * dl / avgdl; past it (`drifted` is True) the runtime refits,
re-normalizes every posting and re-sends the memory.

Measured recall of the float64 top-k (tests/test_kernel_quant.py: Zipfian corpus, 8192
documents of ~60 tokens, vocabulary 4000, 16 queries of <= 6 terms, 4 from one document):
1.000 / 1.000 / 1.000 for k = 64 / 256 / 2048 with avgdl current; 0.990 / 0.993 / 0.998
after appending an eighth of 1.3x longer documents without re-normalizing (avgdl +3.5%,
inside the tolerance). The test asserts >= 0.98.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..errors import InputError
from .spec import (
    CAPACITY,
    UINT16_MAX,
    Arg,
    EngineParams,
    KernelInputs,
    KernelSpec,
    as_float64,
    as_int_array,
    check_dim,
    engine_cycles,
)
from .topk import as_k

#: Relative drift of avgdl past which the memory is re-normalized and re-sent.
AVGDL_TOLERANCE = 0.05
DEFAULT_K1 = 1.5
DEFAULT_B = 0.75


@dataclass(frozen=True)
class BM25State:
    """What the impacts were computed with."""

    k1: float
    b: float
    avgdl: float


def drifted(state: BM25State, doc_lengths: Any, tol: float = AVGDL_TOLERANCE) -> bool:
    """True when the corpus avgdl moved more than `tol` (relative) from the fitted one."""
    dl = as_int_array("doc_lengths", doc_lengths, ndim=1)
    avgdl = float(dl.mean()) if dl.size else 0.0
    return abs(avgdl - state.avgdl) > tol * state.avgdl


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated [start, start + length) ranges: (positions, which range each is from)."""
    owner = np.repeat(np.arange(len(lengths)), lengths)
    first = np.cumsum(lengths) - lengths
    return starts[owner] + np.arange(len(owner)) - first[owner], owner


class BM25(KernelSpec):
    name: ClassVar[str] = "bm25"
    args: ClassVar[tuple[Arg, ...]] = (
        Arg("term_offsets", "uint32", "[vocab + 1]", "in", 18, "CSR offsets per term"),
        Arg("doc_ids", "uint32", "[postings]", "in", 19, "posting doc ids, by term"),
        Arg("impacts", "uint16", "[postings]", "in", 20, "UQ0.16 normalized tf"),
        Arg("terms", "int32", "[queries, terms], -1 pads", "in", 21, "query term ids"),
        Arg("idf", "uint16", "[queries, terms]", "in", 22, "per-query scaled idf"),
        Arg("out", "uint32", "[queries, k] ascending", "out", 23, "top-k document ids"),
        Arg("n", "uint32", "scalar", "scalar", None, "documents"),
        Arg("k", "uint32", "scalar", "scalar", None, "documents to select per query"),
        Arg("queries", "uint32", "scalar", "scalar", None, "rows of terms"),
        Arg("terms_per_query", "uint32", "scalar", "scalar", None, "columns of terms"),
        Arg("vocab", "uint32", "scalar", "scalar", None, "terms in the index"),
    )
    memory_args: ClassVar[tuple[str, ...]] = ("term_offsets", "doc_ids", "impacts")
    dims: ClassVar[dict[str, tuple[str, ...]]] = {
        "term_offsets": ("vocab+1",),
        "doc_ids": (CAPACITY,),
        "impacts": (CAPACITY,),
        "terms": ("queries", "terms_per_query"),
        "idf": ("queries", "terms_per_query"),
    }

    def fit(
        self, memory: Mapping[str, Any], k1: float | None = None, b: float | None = None
    ) -> BM25State:
        k1 = float(memory.get("k1", DEFAULT_K1) if k1 is None else k1)
        b = float(memory.get("b", DEFAULT_B) if b is None else b)
        if k1 < 0 or not 0 <= b <= 1:
            raise InputError("k1", f"expected k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        dl = as_int_array("doc_lengths", memory["doc_lengths"], ndim=1)
        avgdl = float(dl.mean()) if dl.size else 1.0
        return BM25State(k1, b, avgdl if avgdl > 0 else 1.0)

    def quantize_memory(self, memory: Mapping[str, Any], state: BM25State) -> dict:
        offsets = as_int_array("term_offsets", memory["term_offsets"], ndim=1)
        docs = as_int_array("doc_ids", memory["doc_ids"], ndim=1)
        tfs = as_int_array("tfs", memory["tfs"], ndim=1)
        dl = as_int_array("doc_lengths", memory["doc_lengths"], ndim=1)
        if offsets.size == 0 or offsets[0] != 0 or (np.diff(offsets) < 0).any():
            raise InputError("term_offsets", "expected non-decreasing CSR offsets from 0")
        if offsets[-1] != docs.size:
            raise InputError("term_offsets", f"ends at {offsets[-1]}, expected {docs.size}")
        check_dim("tfs", tfs, 0, docs.size, "postings")
        if docs.size and (docs.min() < 0 or docs.max() >= dl.size):
            raise InputError("doc_ids", f"expected ids in [0, {dl.size})")
        if (tfs <= 0).any():
            raise InputError("tfs", "expected positive term frequencies")
        if docs.size >= 2**32:
            raise InputError("doc_ids", "more postings than a uint32 offset addresses")
        norm = state.k1 * (1 - state.b + state.b * dl[docs] / state.avgdl)
        impact = tfs / (tfs + norm)
        return {
            "term_offsets": offsets.astype(np.uint32),
            "doc_ids": docs.astype(np.uint32),
            "impacts": np.rint(impact * UINT16_MAX).astype(np.uint16),
        }

    def quantize_query(self, query: Mapping[str, Any], state: BM25State, *, k: int) -> KernelInputs:
        terms = as_int_array("terms", query["terms"], ndim=2)
        idf = as_float64("idf", query["idf"], ndim=2)
        check_dim("idf", idf, 0, terms.shape[0], "queries of terms")
        check_dim("idf", idf, 1, terms.shape[1], "terms of terms")
        if (terms < -1).any() or (terms >= 2**31).any():
            raise InputError("terms", "expected term ids >= 0, or -1 for padding")
        idf = np.where(terms >= 0, idf, 0.0)
        if (idf < 0).any():
            raise InputError("idf", "expected idf >= 0 (lucene idf is positive)")
        top = idf.max(axis=1, keepdims=True) if idf.size else np.zeros((terms.shape[0], 1))
        idf_int = np.rint(idf * UINT16_MAX / np.where(top > 0, top, 1.0)).astype(np.uint16)
        scalars = {"k": as_k(k), "queries": terms.shape[0], "terms_per_query": terms.shape[1]}
        return KernelInputs({"terms": terms.astype(np.int32), "idf": idf_int}, scalars)

    def bind(
        self, memory: Mapping[str, np.ndarray], query: KernelInputs, n: int | None = None
    ) -> KernelInputs:
        """As the base, and sets `vocab` from term_offsets; a quantized memory does not
        record its document count, so give `n` unless `memory` has doc_lengths."""
        inputs = super().bind(memory, query, n)
        inputs.scalars["vocab"] = len(memory["term_offsets"]) - 1
        return inputs

    def candidates(self, memory: Mapping[str, Any]) -> int:
        if "doc_lengths" not in memory:
            raise InputError("n", "give the number of documents: a quantized index lacks it")
        return int(np.shape(memory["doc_lengths"])[0])

    def _postings(self, inputs: KernelInputs) -> tuple[np.ndarray, ...]:
        """(query of each posting read, position in doc_ids/impacts, term slot (q, t))."""
        terms, offsets = inputs.arrays["terms"], inputs.arrays["term_offsets"]
        s = inputs.scalars
        vocab = int(s["vocab"])
        check_dim("terms", terms, 0, int(s["queries"]), "queries")
        check_dim("terms", terms, 1, int(s["terms_per_query"]), "terms_per_query")
        check_dim("idf", inputs.arrays["idf"], 0, terms.shape[0], "queries")
        check_dim("idf", inputs.arrays["idf"], 1, terms.shape[1], "terms_per_query")
        check_dim("term_offsets", offsets, 0, vocab + 1, "vocab + 1")
        if int(offsets[-1]) > inputs.arrays["doc_ids"].size:
            raise InputError("term_offsets", "points past the end of doc_ids")
        if (terms >= vocab).any() or (terms < -1).any():
            raise InputError("terms", f"expected ids in [0, {vocab}) or -1")
        qi, ti = np.nonzero(terms >= 0)
        t = terms[qi, ti].astype(np.int64)
        starts = offsets[t].astype(np.int64)
        pos, owner = _ranges(starts, offsets[t + 1].astype(np.int64) - starts)
        return qi[owner], pos, ti[owner]

    def scores(self, inputs: KernelInputs) -> np.ndarray:
        docs, impacts, idf = (inputs.arrays[a] for a in ("doc_ids", "impacts", "idf"))
        n = int(inputs.scalars["n"])
        check_dim("impacts", impacts, 0, docs.size, "postings of doc_ids")
        q, pos, t = self._postings(inputs)
        d = docs[pos].astype(np.int64)
        if d.size and d.max() >= n:
            raise InputError("doc_ids", f"a posting names a document >= n={n}")
        contrib = idf[q, t].astype(np.int64) * impacts[pos].astype(np.int64)
        out = np.zeros(idf.shape[0] * n, dtype=np.int64)
        np.add.at(out, q * n + d, contrib)
        return out.reshape(idf.shape[0], n)

    def shape(self, inputs: KernelInputs) -> dict[str, Any]:
        s = inputs.scalars
        terms, offsets = inputs.arrays["terms"], inputs.arrays["term_offsets"].astype(np.int64)
        t = terms[terms >= 0].astype(np.int64)
        postings = int((offsets[t + 1] - offsets[t]).sum())
        return {
            "n": s["n"],
            "k": s["k"],
            "queries": s["queries"],
            "postings": postings,
            "terms": int(t.size),
        }

    def cycles(
        self,
        *,
        n: int,
        k: int,
        postings: int,
        terms: int = 0,
        queries: int = 1,
        params: EngineParams | None = None,
    ) -> int:
        """Stream the queries' postings (4 bytes on the doc_ids port, 2 on the impacts
        port; 8 bytes of offsets per term);
        lanes accumulate postings into on-chip scores and then read the n scores of each
        query; per query a bitmap scan of n/32 words and k index writes."""
        p = params or self.engine
        return engine_cycles(
            p,
            port_bytes=(8 * terms, 4 * postings, 2 * postings),
            lane_ops=postings + queries * n,
            n=n,
            k=k,
            queries=queries,
        )
