"""DenseRAG: top-k against a brute-force numpy reference, ties, appends, prompts, the
pipeline, and bad input."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from hetmem.errors import InputError
from hetmem.methods.dense_rag import DenseMemory, DenseQuery, DenseRAG, Documents
from hetmem.pipeline import Pipeline
from hetmem.text import assemble_prompt


def texts(n: int, start: int = 0) -> list[str]:
    return [f"document number {i}" for i in range(start, start + n)]


def numpy_topk(index: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """Brute force: scores in float64, stable argsort (ties to the lower index), ascending."""
    scores = query.astype(np.float64) @ index.astype(np.float64).T
    order = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
    return np.sort(order, axis=-1)


def select(method: DenseRAG, memory: DenseMemory, query, k: int) -> np.ndarray:
    selection = method.retrieve(method.relevancy(memory, query), k)
    assert bool(selection.valid.all())
    return selection.indices[:, 0, 0].numpy()


@pytest.mark.parametrize("k", [1, 7, 50])
@pytest.mark.parametrize("seed", [0, 1])
def test_topk_equals_numpy_on_gaussian_embeddings(seed: int, k: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(500, 32, generator=gen)
    q = torch.randn(4, 32, generator=gen)
    method = DenseRAG()
    memory = method.prepare(Documents(texts(500), emb))
    scores = method.relevancy(memory, q)
    assert scores.values.shape == (4, 1, 1, 500)
    np.testing.assert_array_equal(
        select(method, memory, q, k), numpy_topk(emb.numpy(), q.numpy(), k)
    )


@pytest.mark.parametrize("k", [1, 5, 40])
def test_topk_equals_numpy_with_exact_ties(k: int) -> None:
    """Small integer embeddings: exact products, so many exact ties; the lower index wins."""
    gen = torch.Generator().manual_seed(3)
    emb = torch.randint(-2, 3, (300, 8), generator=gen).float()
    q = torch.randint(-2, 3, (3, 8), generator=gen).float()
    method = DenseRAG()
    memory = method.prepare(Documents(texts(300), emb))
    ours = select(method, memory, q, k)
    np.testing.assert_array_equal(ours, numpy_topk(emb.numpy(), q.numpy(), k))
    # The ties are real: at least one row's k-th score is shared by an unselected document.
    s = (q @ emb.T).numpy()
    kth = np.sort(s, axis=-1)[:, ::-1][:, k - 1]
    assert (
        (s == kth[:, None]).sum(-1) > np.array([(s[i, ours[i]] == kth[i]).sum() for i in range(3)])
    ).any()


def test_duplicate_documents_tie_to_lower_index() -> None:
    emb = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    method = DenseRAG()
    memory = method.prepare(Documents(["a", "b", "c", "d"], emb))
    assert select(method, memory, torch.tensor([[0.0, 2.0]]), 2).tolist() == [[0, 2]]


def test_float64_index_scores_in_float64() -> None:
    emb = torch.randn(10, 4, dtype=torch.float64)
    method = DenseRAG()
    memory = method.prepare(Documents(texts(10), emb))
    assert method.relevancy(memory, torch.randn(1, 4)).values.dtype == torch.float64


def test_kernel_inputs_score_like_relevancy() -> None:
    method = DenseRAG()
    memory = method.prepare(Documents(texts(20), torch.randn(20, 6)))
    q = torch.randn(3, 6)
    mem, query = method.kernel_memory(memory), method.kernel_query(memory, q)
    torch.testing.assert_close(
        query["q"] @ mem["keys"].T, method.relevancy(memory, q).values[:, 0, 0]
    )


def test_append_equals_fresh_index() -> None:
    gen = torch.Generator().manual_seed(5)
    emb = torch.randn(200, 16, generator=gen)
    q = torch.randn(3, 16, generator=gen)
    method = DenseRAG()
    fresh = method.prepare(Documents(texts(200), emb))
    grown = method.prepare(Documents(texts(1), emb[:1]))
    for lo, hi in ((1, 3), (3, 3), (3, 90), (90, 200)):
        method.append(grown, Documents(texts(hi - lo, lo), emb[lo:hi]))
    assert grown.entries == 200 and grown.texts == fresh.texts
    assert torch.equal(grown.embeddings, fresh.embeddings)
    assert torch.equal(method.relevancy(grown, q).values, method.relevancy(fresh, q).values)
    np.testing.assert_array_equal(select(method, grown, q, 10), select(method, fresh, q, 10))


def test_encoder_embeds_documents_and_queries() -> None:
    vocab = ["cat", "dog", "fish", "bird"]

    def encode(items: list[str]) -> torch.Tensor:
        return torch.tensor([[float(w in s.split()) for w in vocab] for s in items])

    docs = ["cat dog", "fish", "bird bird", "dog fish bird"]
    method = DenseRAG(encoder=encode)
    memory = method.prepare(docs)
    assert torch.equal(memory.embeddings, encode(docs))
    picked = method.ranked(
        memory, method.retrieve(method.relevancy(memory, ["dog fish"]), 2), ["dog fish"]
    )
    assert picked == [[3, 0]]  # doc 3 shares two words, docs 0 and 1 one each: lower wins
    method.append(memory, ["cat dog fish"])
    picked = method.ranked(
        memory, method.retrieve(method.relevancy(memory, ["cat fish"]), 1), ["cat fish"]
    )
    assert picked == [[4]]


def test_prompt_holds_retrieved_texts_best_first() -> None:
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [0.9, 0.1], [-1.0, 0.0]])
    docs = ["zero", "one", "two", "three", "four"]
    method = DenseRAG()
    memory = method.prepare(Documents(docs, emb))
    query = DenseQuery(torch.tensor([[1.0, 0.2], [0.0, 1.0]]), ["first question?", "second?"])
    selection = method.retrieve(method.relevancy(memory, query), 3)
    assert selection.indices[:, 0, 0].tolist() == [[0, 2, 3], [1, 2, 3]]  # ascending
    prompts = method.apply(memory, selection, query)
    scores = (query.embeddings @ emb.T).tolist()
    for prompt, question, row, s in zip(
        prompts, query.texts, selection.indices[:, 0, 0].tolist(), scores, strict=True
    ):
        best_first = sorted(row, key=lambda i: -s[i])
        places = [prompt.index(f"] {docs[i]}\n") for i in best_first]
        assert places == sorted(places)
        assert prompt.index(question) > places[-1]
        assert "four" not in prompt
    assert prompts[0] == assemble_prompt([docs[i] for i in (0, 3, 2)], "first question?")


def test_tensor_query_prompt_has_no_question() -> None:
    method = DenseRAG()
    memory = method.prepare(Documents(["x", "y"], torch.eye(2)))
    q = torch.tensor([[0.0, 1.0]])
    (prompt,) = method.apply(memory, method.retrieve(method.relevancy(memory, q), 1), q)
    assert "] y\n" in prompt and "Question" not in prompt


def test_max_chars_guard_cuts_the_worst_documents() -> None:
    docs = ["best " * 20, "middle " * 20, "worst " * 20]
    full = assemble_prompt(docs, "why?", max_chars=None)
    cut = assemble_prompt(docs, "why?", max_chars=len(full) - 50)
    assert len(cut) <= len(full) - 50
    assert docs[0] in cut and docs[1] in cut and "worst" in cut and docs[2] not in cut
    assert cut.endswith("Question: why?\nAnswer:")
    with pytest.raises(InputError) as err:
        assemble_prompt(docs, "why?" * 100, max_chars=50)
    assert err.value.argument == "max_chars"


@pytest.mark.parametrize("placement", ["cpu/cpu/cpu/cpu", "gpu/gpu/gpu/gpu"])
def test_through_pipeline(placement: str) -> None:
    if placement.startswith("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA or ROCm GPU")
    gen = torch.Generator().manual_seed(7)
    emb = torch.randn(64, 8, generator=gen)
    q = torch.randn(2, 8, generator=gen)
    pipe = Pipeline(DenseRAG(), placement=placement)
    memory = pipe.prepare(Documents(texts(64), emb))
    assert memory.entries == 64
    prompts = pipe.step(DenseQuery(q, ["q0", "q1"]), budget=4)
    expected = numpy_topk(emb.numpy(), q.numpy(), 4)
    assert pipe.last_selection.indices[:, 0, 0].cpu().numpy().tolist() == expected.tolist()
    for prompt, row in zip(prompts, expected, strict=True):
        assert all(f"] document number {i}\n" in prompt for i in row)
    records = pipe.profile.by_step()
    for step in ("relevancy", "retrieval", "apply"):
        assert records[step].source == "measured"
    assert records["relevancy"].nbytes == 64 * 8 * 4
    pipe.append(Documents(["the new one"], q[:1] * 100))
    pipe.step(DenseQuery(q[:1], ["again"]), budget=1)
    assert pipe.last_selection.indices.flatten().tolist() == [64]


# -- bad input: one test per case ---------------------------------------------------------------------


@contextmanager
def raises_naming(argument: str) -> Iterator[None]:
    with pytest.raises(InputError) as err:
        yield
    assert err.value.argument == argument, str(err.value)


@pytest.fixture
def small() -> tuple[DenseRAG, DenseMemory]:
    method = DenseRAG()
    return method, method.prepare(Documents(texts(6), torch.randn(6, 4)))


def test_query_of_wrong_rank(small) -> None:
    method, memory = small
    with raises_naming("query"):
        method.relevancy(memory, torch.randn(1, 1, 4))


def test_query_dim_mismatch(small) -> None:
    method, memory = small
    with raises_naming("query"):
        method.relevancy(memory, torch.randn(2, 5))


def test_query_with_nan(small) -> None:
    method, memory = small
    q = torch.randn(2, 4)
    q[1, 2] = float("nan")
    with raises_naming("query"):
        method.relevancy(memory, q)


def test_query_with_inf(small) -> None:
    method, memory = small
    with raises_naming("query"):
        method.relevancy(memory, torch.tensor([[0.0, float("inf"), 0.0, 0.0]]))


def test_integer_query(small) -> None:
    method, memory = small
    with raises_naming("query"):
        method.relevancy(memory, torch.ones(1, 4, dtype=torch.long))


def test_text_query_without_encoder(small) -> None:
    method, memory = small
    with raises_naming("query"):
        method.relevancy(memory, ["no encoder to embed me"])


def test_query_texts_count_mismatch(small) -> None:
    method, memory = small
    with raises_naming("query.texts"):
        method.relevancy(memory, DenseQuery(torch.randn(2, 4), ["only one"]))


def test_embeddings_with_nan() -> None:
    emb = torch.randn(3, 4)
    emb[0, 0] = float("nan")
    with raises_naming("documents.embeddings"):
        DenseRAG().prepare(Documents(texts(3), emb))


def test_embeddings_of_wrong_rank() -> None:
    with raises_naming("documents.embeddings"):
        DenseRAG().prepare(Documents(texts(3), torch.randn(3)))


def test_texts_embeddings_count_mismatch() -> None:
    with raises_naming("documents.embeddings"):
        DenseRAG().prepare(Documents(texts(3), torch.randn(4, 4)))


def test_append_dim_mismatch(small) -> None:
    method, memory = small
    with raises_naming("documents.embeddings"):
        method.append(memory, Documents(texts(1), torch.randn(1, 5)))
    assert memory.entries == 6 and len(memory.texts) == 6


def test_encoder_with_wrong_count() -> None:
    method = DenseRAG(encoder=lambda items: torch.randn(len(items) + 1, 4))
    with raises_naming("encoder"):
        method.prepare(["a", "b"])


def test_empty_memory() -> None:
    method = DenseRAG()
    memory = method.prepare(Documents([], torch.zeros(0, 4)))
    with raises_naming("memory"):
        method.relevancy(memory, torch.randn(1, 4))


def test_budget_zero(small) -> None:
    method, memory = small
    with raises_naming("budget"):
        method.retrieve(method.relevancy(memory, torch.randn(1, 4)), 0)


def test_budget_above_documents_retrieves_every_document(small) -> None:
    method, memory = small
    scores = method.relevancy(memory, torch.randn(1, 4))
    picked = method.retrieve(scores, 7)
    docs = scores.values.shape[-1]
    assert docs < 7 and picked.indices.shape[-1] == docs
    assert sorted(picked.indices.flatten().tolist()) == list(range(docs))


def test_max_chars_not_positive() -> None:
    with raises_naming("max_chars"):
        DenseRAG(max_chars=0)
