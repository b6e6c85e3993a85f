"""Dense retrieval: an embedding index, inner-product relevancy, top-k documents, a prompt.

    rag = DenseRAG(encoder=embed)             # or give embeddings in `Documents`
    memory = rag.prepare(Documents(texts))    # the index: embeddings [N, D] + texts
    scores = rag.relevancy(memory, ["what is a tuple?"])   # Scores [B, 1, 1, N]
    prompts = rag.apply(memory, rag.retrieve(scores, 5), ["what is a tuple?"])

The index grows by `append` (a `Growable`, doubling), never rebuilt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..attention import Growable
from ..checks import check_dim, check_tensor
from ..errors import InputError
from ..selection import Bitmap, Scores, Selection, TopK, budget_units, topk_select
from ..text import (
    DEFAULT_MAX_CHARS,
    Documents,
    assemble_prompt,
    best_first,
    check_max_chars,
)
from .base import KernelBinding, Memory, Method

Encoder = Callable[[list[str]], torch.Tensor]

__all__ = ["DenseMemory", "DenseQuery", "DenseRAG", "Documents", "Encoder"]


@dataclass
class DenseQuery:
    """A query batch: embeddings [B, D] and/or question texts (B of them).

    Without embeddings the method's encoder embeds the texts; without texts the prompt
    carries the documents only.
    """

    embeddings: torch.Tensor | None = None
    texts: list[str] | None = None

    def to(self, device: torch.device) -> DenseQuery:
        emb = None if self.embeddings is None else self.embeddings.to(device)
        return DenseQuery(emb, None if self.texts is None else list(self.texts))


@dataclass
class DenseMemory(Memory):
    """The embedding index [N, D] (growable along N) and the document texts."""

    store: Growable
    texts: list[str] = field(default_factory=list)

    @property
    def embeddings(self) -> torch.Tensor:
        return self.store.data

    @property
    def dim(self) -> int:
        return self.store.buffer.shape[1]

    @property
    def device(self) -> torch.device:
        return self.store.buffer.device

    @property
    def entries(self) -> int:
        return self.store.length

    @property
    def index_nbytes(self) -> int:
        emb = self.embeddings
        return emb.numel() * emb.element_size()

    def to(self, device: torch.device) -> DenseMemory:
        return DenseMemory(self.store.to(device), list(self.texts))


def _check_texts(name: str, texts: object) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise InputError(name, f"expected a list of strings, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InputError(name, f"item {i} is {type(t).__name__}, expected str")
    return list(texts)


class DenseRAG(Method):
    """Dense retrieval-augmented generation: the float torch reference."""

    name: ClassVar[str] = "dense_rag"
    family: ClassVar[str] = "rag"
    kernel: ClassVar[str | None] = "vector_search"
    describe: ClassVar[dict[str, str]] = {
        "prepare": "embedding index [N, D] of the documents (growable), plus their texts",
        "relevancy": "inner product of query embeddings [B, D] with every document embedding",
        "retrieval": "top-k documents (ties to the lower index)",
        "apply": "prompt assembly: retrieved documents best first, then the question",
    }

    def __init__(self, encoder: Encoder | None = None, max_chars: int | None = DEFAULT_MAX_CHARS):
        if encoder is not None and not callable(encoder):
            raise InputError("encoder", f"expected a callable, got {type(encoder).__name__}")
        self.encoder = encoder
        self.max_chars = check_max_chars(max_chars)
        self._query_cache: tuple[tuple[Any, ...], torch.Tensor] | None = None

    # -- inputs ----------------------------------------------------------------------------
    def _encode(self, name: str, texts: list[str]) -> torch.Tensor:
        if self.encoder is None:
            raise InputError(name, "texts without embeddings need an encoder on the method")
        emb = check_tensor("encoder", self.encoder(texts), dims=("items", "dim"), floating=True)
        check_dim("encoder", emb, 0, len(texts), f"one embedding per text of {name}")
        return emb

    def _documents(self, data: Any) -> tuple[list[str], torch.Tensor]:
        """Texts and embeddings [N, D] from `Documents` or (with an encoder) a list of texts."""
        if not isinstance(data, Documents):
            data = Documents(_check_texts("documents", data))
        texts = _check_texts("documents.texts", data.texts)
        if data.embeddings is None:
            emb = self._encode("documents", texts)
            emb = emb if data.device is None else emb.to(data.device)
        else:
            emb = check_tensor(
                "documents.embeddings", data.embeddings, dims=("documents", "dim"), floating=True
            )
        check_tensor("documents.embeddings", emb, finite=True)
        if emb.shape[0] != len(texts):
            raise InputError(
                "documents.embeddings",
                f"has {emb.shape[0]} rows but there are {len(texts)} texts",
            )
        return texts, emb

    def _encode_query(self, texts: list[str]) -> torch.Tensor:
        """Embed query texts once per batch: Relevancy and Apply both need them."""
        key = (self.encoder, tuple(texts))
        if self._query_cache is None or self._query_cache[0] != key:
            self._query_cache = (key, self._encode("query", texts))
        return self._query_cache[1]

    def _parse_query(self, memory: DenseMemory, query: Any) -> DenseQuery:
        """Check a query's structure against the index, without running the encoder."""
        if isinstance(query, torch.Tensor):
            query = DenseQuery(query)
        elif not isinstance(query, DenseQuery):
            query = DenseQuery(texts=_check_texts("query", query))
        texts = None if query.texts is None else _check_texts("query.texts", query.texts)
        if query.embeddings is None:
            if texts is None:
                raise InputError("query", "has neither embeddings nor texts")
            if self.encoder is None:
                raise InputError("query", "texts without embeddings need an encoder on the method")
            rows = len(texts)
        else:
            emb = check_tensor(
                "query", query.embeddings, dims=("batch", "dim"), floating=True, finite=True
            )
            check_dim("query", emb, 1, memory.dim, "embedding dim of the index")
            rows = emb.shape[0]
            if texts is not None and len(texts) != rows:
                raise InputError("query.texts", f"has {len(texts)} texts for {rows} embeddings")
        if rows == 0:
            raise InputError("query", "is an empty batch")
        if memory.entries == 0:
            raise InputError("memory", "is empty: prepare or append documents before querying")
        return DenseQuery(query.embeddings, texts)

    def _query(self, memory: DenseMemory, query: Any) -> tuple[torch.Tensor, list[str] | None]:
        """Query embeddings [B, D] on the index's device, and the question texts."""
        parsed = self._parse_query(memory, query)
        emb = parsed.embeddings
        if emb is None:
            assert parsed.texts is not None
            emb = check_tensor("encoder", self._encode_query(parsed.texts), finite=True)
            check_dim("encoder", emb, 1, memory.dim, "embedding dim of the index")
        return emb.to(memory.device), parsed.texts

    # -- the four steps ----------------------------------------------------------------------
    def prepare(self, data: Documents | Sequence[str]) -> DenseMemory:
        texts, emb = self._documents(data)
        return DenseMemory(Growable(emb, axis=0), texts)

    def append(self, memory: DenseMemory, data: Documents | Sequence[str]) -> None:
        texts, emb = self._documents(data)
        check_dim("documents.embeddings", emb, 1, memory.dim, "embedding dim of the index")
        store = memory.store
        store.reserve(store.length + emb.shape[0])
        store.buffer.narrow(0, store.length, emb.shape[0]).copy_(emb)
        store.length += emb.shape[0]
        memory.texts.extend(texts)

    def check_query(self, memory: DenseMemory, query: Any) -> None:
        self._parse_query(memory, query)

    def relevancy(self, memory: DenseMemory, query: Any) -> Scores:
        """Inner products [B, 1, 1, N], in float32 or wider (the wider of query and index)."""
        q, _ = self._query(memory, query)
        index = memory.embeddings
        dtype = torch.promote_types(torch.promote_types(q.dtype, index.dtype), torch.float32)
        scores = q.to(dtype) @ index.to(dtype).T
        return Scores(scores[:, None, None, :])

    def kernel_memory(self, memory: DenseMemory) -> dict[str, torch.Tensor]:
        """The `vector_search` kernel's float memory: keys [N, D]."""
        return {"keys": memory.embeddings}

    def kernel_query(self, memory: DenseMemory, query: Any) -> dict[str, torch.Tensor]:
        """The `vector_search` kernel's float query: q [B, D]."""
        q, _ = self._query(memory, query)
        return {"q": q}

    def binding(self) -> KernelBinding:
        """One memory of document rows, grown at its end by appends."""
        return KernelBinding(self.kernel, "rows", self.kernel_memory, self.kernel_query)

    def retrieve(self, scores: Scores, budget: int) -> TopK:
        indices, valid = topk_select(
            scores.values, budget_units(budget, 1, scores.values.shape[-1]), name="budget"
        )
        return TopK(indices, valid)

    def ranked(self, memory: DenseMemory, selection: Selection, query: Any) -> list[list[int]]:
        """The selected document ids per batch row, best first (ties: lower index first)."""
        q, _ = self._query(memory, query)
        return self._rank(memory, selection, q)

    def _rank(self, memory: DenseMemory, selection: Selection, q: torch.Tensor) -> list[list[int]]:
        """The selection is ascending by index (the top-k contract): recompute the k
        selected documents' scores (k dot products per row) to order them."""
        if isinstance(selection, Bitmap):
            selection = selection.to_topk()
        idx = selection.indices[:, 0, 0, :].to(memory.device)
        valid = selection.valid[:, 0, 0, :].to(memory.device) & (idx < memory.entries)
        if idx.shape[0] != q.shape[0]:
            raise InputError("selection", f"has batch {idx.shape[0]}, the query {q.shape[0]}")
        picked = memory.embeddings[idx.clamp(0, memory.entries - 1)]  # [B, k, D]
        dtype = torch.promote_types(torch.promote_types(q.dtype, picked.dtype), torch.float32)
        scores = torch.einsum("bd,bkd->bk", q.to(dtype), picked.to(dtype))
        return best_first(idx, valid, scores)

    def apply(self, memory: DenseMemory, selection: Selection, query: Any) -> list[str]:
        """One prompt per batch row: the retrieved documents best first, then the question."""
        q, texts = self._query(memory, query)
        rows = self._rank(memory, selection, q)
        questions = texts if texts is not None else [""] * len(rows)
        return [
            assemble_prompt([memory.texts[i] for i in row], question, self.max_chars)
            for row, question in zip(rows, questions, strict=True)
        ]

    def apply_nbytes(self, memory: DenseMemory, selection: Selection) -> int:
        """Bytes of the selected documents' texts (UTF-8)."""
        if isinstance(selection, Bitmap):
            selection = selection.to_topk()
        ids = selection.indices[selection.valid].tolist()
        return sum(len(memory.texts[i].encode()) for i in ids if i < memory.entries)


def _dense_rag_costs(self: DenseRAG, shape: Any) -> dict:
    """Bytes and FLOPs of one retrieval for a batch of `shape.batch` queries over a corpus
    of `shape.documents` documents with `shape.embed_dim`-wide embeddings
    (`hetmem.system.shape.Shape`): Prepare is the index, built once offline (no per-query
    cost; the query's encoding is not modeled), Relevancy reads every embedding (fp16) and
    takes B inner products each, Retrieval a top-k of the N scores, Apply assembles the
    prompt from the k documents' texts (host work: ~4 bytes a token). `fpga` is the
    vector_search launch over the int8 index."""
    from ..system.accounting import INDEX_BYTES, SEG_BYTES, topk_cost
    from ..system.shape import StepCost

    n, dim, b = shape.documents, shape.embed_dim, shape.batch
    k = min(budget_units(shape.rag_k), n)
    return {
        "prepare": StepCost(0, launches=0, note="the index is built once, offline"),
        "relevancy": StepCost(
            n * dim * 2 + b * n * 4, 2 * b * n * dim, launches=1, note=f"{n} documents x {dim}"
        ),
        "retrieval": topk_cost(b * n),
        "apply": StepCost(
            b * k * shape.doc_tokens * 4,
            launches=0,
            note="prompt assembly from the retrieved texts (host)",
        ),
        "to_fpga": StepCost(b * (dim + SEG_BYTES), note="int8 query embeddings, segments"),
        "fpga": StepCost(
            n * (dim + 1), kernel=self.kernel, call={"n": n, "k": k, "dim": dim, "queries": b}
        ),
        "from_fpga": StepCost(b * k * INDEX_BYTES, note="selected document ids"),
    }


DenseRAG.costs = _dense_rag_costs  # type: ignore[attr-defined]
