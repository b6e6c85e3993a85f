"""BM25RAG against the `bm25s` library on a real corpus, appends, prompts and re-retrieval.

Corpus: the help texts of Python's `pydoc_data.topics`, split into paragraphs (~1800
documents, with some paragraphs repeated across topics: real exact ties).

Tie order. Ours: the top-k contract, equal scores go to the lower index. bm25s (numpy
backend): `np.argpartition`, then an unstable `np.argsort` of the k scores, so among
equal scores its choice and order are unspecified. Where scores tie at the k-th place
the tests compare the sets outside the tie and check that ours took the lowest indices
of the tie. bm25s stores scores in float32: "equal" below means within `RTOL`.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pydoc_data.topics import topics

import bm25s
import numpy as np
import pytest
import torch

from hetmem.errors import InputError
from hetmem.methods.bm25_rag import BM25RAG, BM25Memory, NoMatchWarning, ReRetriever
from hetmem.pipeline import Pipeline
from hetmem.text import Documents, assemble_prompt, tokenize

RTOL = 1e-5
QUERIES = [
    "exception handling with try and finally",
    "class method decorator",
    "the with statement context manager manager",  # a repeated token counts twice
    "unicode string literal escape sequences",
    "integer division modulo operator",
    "yield generator iterator protocol zzzunknownzzz",  # an unknown token adds nothing
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    paragraphs = [p.strip() for text in topics.values() for p in re.split(r"\n\s*\n", text)]
    return [p for p in paragraphs if len(p.split()) >= 8]


@pytest.fixture(scope="module")
def ours(corpus: list[str]) -> tuple[BM25RAG, BM25Memory]:
    method = BM25RAG()
    return method, method.prepare(corpus)


def reference(corpus: list[str], k1: float = 1.5, b: float = 0.75) -> bm25s.BM25:
    retriever = bm25s.BM25(k1=k1, b=b)  # method="lucene" is the default
    retriever.index([tokenize(d) for d in corpus], show_progress=False)
    return retriever


@pytest.fixture(scope="module")
def ref(corpus: list[str]) -> bm25s.BM25:
    return reference(corpus)


def scores_of(method: BM25RAG, memory: BM25Memory, queries: list[str]) -> np.ndarray:
    values = method.relevancy(memory, queries).values
    assert values.shape == (len(queries), 1, 1, memory.entries)
    return values[:, 0, 0].numpy()


def test_corpus_is_large_and_queries_hit_it(corpus, ours) -> None:
    method, memory = ours
    assert len(corpus) > 500
    assert memory.entries == len(corpus)
    for q in QUERIES:
        assert (scores_of(method, memory, [q]) > 0).sum() >= 10, q


def test_scores_are_float64(ours) -> None:
    method, memory = ours
    assert method.relevancy(memory, QUERIES[:1]).values.dtype == torch.float64


@pytest.mark.parametrize("query", QUERIES)
def test_scores_match_bm25s(ours, ref, query: str) -> None:
    method, memory = ours
    expected = ref.get_scores(tokenize(query))
    np.testing.assert_allclose(
        scores_of(method, memory, [query])[0], expected, rtol=RTOL, atol=1e-6
    )


def test_unknown_tokens_contribute_nothing(ours) -> None:
    method, memory = ours
    known, with_unknown = scores_of(method, memory, ["yield generator", "yield zzzqqq generator"])
    np.testing.assert_array_equal(known, with_unknown)


def test_batch_rows_are_independent(ours) -> None:
    method, memory = ours
    batch = scores_of(method, memory, QUERIES)
    for i, q in enumerate(QUERIES):
        np.testing.assert_array_equal(batch[i], scores_of(method, memory, [q])[0])


def check_topk_against_bm25s(ours_scores: np.ndarray, picked: list[int], ref_ids, ref_scores):
    """Same k-th score; every document clearly above it in bm25s is ours; ours are all at
    least the k-th score; inside the tie at the k-th score ours are the lowest indices."""
    k = len(picked)
    kth = float(ref_scores[-1])
    tol = RTOL * max(abs(kth), 1.0)
    np.testing.assert_allclose(np.sort(ours_scores[picked])[::-1], ref_scores, rtol=RTOL, atol=1e-6)
    clearly_in = {int(i) for i, s in zip(ref_ids, ref_scores, strict=True) if s > kth + tol}
    assert clearly_in <= set(picked)
    assert (ours_scores[picked] >= kth - tol).all()
    # The contract, on our own (float64) scores: k largest, ties to the lower index.
    order = np.lexsort((np.arange(len(ours_scores)), -ours_scores))
    assert picked == sorted(order[:k].tolist())
    assert len(picked) == k


@pytest.mark.parametrize("k", [1, 5, 10])
@pytest.mark.parametrize("query", QUERIES)
def test_topk_matches_bm25s(ours, ref, query: str, k: int) -> None:
    method, memory = ours
    selection = method.retrieve(method.relevancy(memory, [query]), k)
    picked = selection.indices[0, 0, 0].tolist()
    assert picked == sorted(picked) and bool(selection.valid.all())
    ref_ids, ref_scores = ref.retrieve([tokenize(query)], k=k, show_progress=False)
    check_topk_against_bm25s(
        scores_of(method, memory, [query])[0], picked, ref_ids[0], ref_scores[0]
    )


@pytest.mark.parametrize(("k1", "b"), [(1.2, 0.5), (0.0, 0.75), (2.0, 0.0), (1.5, 1.0)])
def test_parameters_match_bm25s(corpus, k1: float, b: float) -> None:
    method = BM25RAG(k1=k1, b=b)
    memory = method.prepare(corpus)
    retriever = reference(corpus, k1, b)
    for q in QUERIES[:3]:
        expected = retriever.get_scores(tokenize(q))
        np.testing.assert_allclose(
            scores_of(method, memory, [q])[0], expected, rtol=RTOL, atol=1e-6
        )


def test_real_ties_go_to_lower_index(corpus, ours) -> None:
    """Repeated paragraphs in the corpus score exactly alike; the lower index wins."""
    method, memory = ours
    first = {}
    dup = next((i, first[t]) for i, t in enumerate(corpus) if first.setdefault(t, i) != i)
    later, earlier = dup
    query = " ".join(corpus[later].split()[:12])
    scores = scores_of(method, memory, [query])[0]
    assert scores[later] == scores[earlier]
    above = int((scores > scores[earlier]).sum())
    picked = method.retrieve(method.relevancy(memory, [query]), above + 1).indices[0, 0, 0]
    assert earlier in picked.tolist() and later not in picked.tolist()


def test_synthetic_ties_and_best_first_order() -> None:
    method = BM25RAG()
    docs = ["alpha beta", "gamma delta", "alpha beta", "alpha beta", "alpha alpha beta"]
    memory = method.prepare(docs)
    scores = scores_of(method, memory, ["alpha"])[0]
    assert scores[0] == scores[2] == scores[3] and scores[1] == 0
    selection = method.retrieve(method.relevancy(memory, ["alpha"]), 3)
    assert selection.indices[0, 0, 0].tolist() == [0, 2, 4]
    best = int(np.argmax(scores))
    assert method.ranked(memory, selection, ["alpha"]) == [
        [best, *[i for i in (0, 2) if i != best]]
    ]


def test_stopwords_are_dropped() -> None:
    assert tokenize("The cat and THE hat", stopwords=["the", "and"]) == ["cat", "hat"]
    method = BM25RAG(stopwords=["the"])
    memory = method.prepare(["the cat", "the dog", "a bird"])
    assert "the" not in memory.vocab
    with pytest.warns(NoMatchWarning):
        assert scores_of(method, memory, ["the"])[0].tolist() == [0.0, 0.0, 0.0]


def test_tokenizer_is_bm25s_default(corpus) -> None:
    """bm25s.tokenize's own default adds English stopwords; ours has none by default."""
    docs = corpus[:50]
    expected = bm25s.tokenize(docs, stopwords=None, return_ids=False, show_progress=False)
    assert expected == [tokenize(d) for d in docs]


def test_kernel_inputs_score_like_relevancy(ours) -> None:
    """The `bm25` kernel's float semantics over kernel_memory/kernel_query give our scores."""
    method, memory = ours
    mem = {
        k: v.numpy() if isinstance(v, torch.Tensor) else v
        for k, v in method.kernel_memory(memory).items()
    }
    query = {k: v.numpy() for k, v in method.kernel_query(memory, QUERIES).items()}
    offsets, docs, tfs, dl = mem["term_offsets"], mem["doc_ids"], mem["tfs"], mem["doc_lengths"]
    assert (query["terms"] == -1).any()  # padded: the queries differ in length
    norm = mem["k1"] * (1 - mem["b"] + mem["b"] * dl / dl.mean())
    expected = np.zeros((len(QUERIES), len(dl)))
    for q, (terms, idf) in enumerate(zip(query["terms"], query["idf"], strict=True)):
        for t, w in zip(terms, idf, strict=True):
            if t >= 0:
                d, tf = docs[offsets[t] : offsets[t + 1]], tfs[offsets[t] : offsets[t + 1]]
                expected[q, d] += w * tf / (tf + norm[d])
    np.testing.assert_allclose(scores_of(method, memory, QUERIES), expected, rtol=1e-12, atol=0)


# -- append ---------------------------------------------------------------------------------------


def test_append_equals_fresh_index(corpus) -> None:
    method = BM25RAG()
    docs = [*corpus[:300], "", "a brand-new word: xylophonist xylophonist"]
    fresh = method.prepare(docs)
    grown = method.prepare(docs[:100])
    method.append(grown, docs[100:250])
    method.append(grown, [])
    method.append(grown, docs[250:])
    assert grown.vocab == fresh.vocab
    for name in ("term_ptr", "post_docs", "post_tfs"):
        assert torch.equal(getattr(grown, name), getattr(fresh, name)), name
    for name in ("df", "doc_len", "doc_ptr", "fwd_terms", "fwd_tfs"):
        assert torch.equal(getattr(grown, name).data, getattr(fresh, name).data), name
    assert grown.avgdl == fresh.avgdl and grown.texts == fresh.texts
    queries = [*QUERIES, "xylophonist"]
    np.testing.assert_array_equal(
        scores_of(method, grown, queries), scores_of(method, fresh, queries)
    )


def test_append_changes_idf_of_existing_documents() -> None:
    """df, N and avgdl are read at query time: an append rescores old documents."""
    method = BM25RAG()
    memory = method.prepare(["apple pie", "banana split"])
    before = scores_of(method, memory, ["apple"])[0, 0]
    method.append(memory, ["apple tart", "apple crumble"])
    after = scores_of(method, memory, ["apple"])[0, 0]
    assert after < before
    ref = reference(["apple pie", "banana split", "apple tart", "apple crumble"])
    np.testing.assert_allclose(after, ref.get_scores(["apple"])[0], rtol=RTOL)


# -- Apply ----------------------------------------------------------------------------------------


def test_prompts_hold_retrieved_documents_best_first(corpus, ours) -> None:
    method, memory = ours
    queries = QUERIES[:2]
    selection = method.retrieve(method.relevancy(memory, queries), 4)
    prompts = method.apply(memory, selection, queries)
    scores = scores_of(method, memory, queries)
    assert len(prompts) == 2
    for prompt, question, row, s in zip(
        prompts, queries, method.ranked(memory, selection, queries), scores, strict=True
    ):
        assert sorted(row) == selection.indices[queries.index(question), 0, 0].tolist()
        assert all(s[a] >= s[b] for a, b in itertools.pairwise(row))
        places = [prompt.index(corpus[i]) for i in row]
        assert places == sorted(places)
        assert prompt.rstrip().endswith("Answer:") and prompt.index(question) > places[-1]


def test_max_chars_guard_keeps_best_documents(corpus, ours) -> None:
    method, memory = ours
    q = [QUERIES[0]]
    selection = method.retrieve(method.relevancy(memory, q), 10)
    full = method.apply(memory, selection, q)[0]
    short = BM25RAG(max_chars=len(full) // 2).apply(memory, selection, q)[0]
    assert len(short) <= len(full) // 2
    best = method.ranked(memory, selection, q)[0][0]
    assert corpus[best][:20] in short and q[0] in short


@pytest.mark.parametrize("placement", ["cpu/cpu/cpu/cpu", "gpu/gpu/gpu/gpu"])
def test_through_pipeline(corpus, placement: str) -> None:
    if placement.startswith("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA or ROCm GPU")
    pipe = Pipeline(BM25RAG(), placement=placement)
    memory = pipe.prepare(Documents(corpus[:-1]))
    assert memory.device == pipe.device("prepare")  # Documents.to placed the index
    prompts = pipe.step(QUERIES[:1], budget=3)
    assert len(prompts) == 1 and QUERIES[0] in prompts[0]
    records = pipe.profile.by_step()
    for step in ("relevancy", "retrieval", "apply"):
        assert records[step].source == "measured"
    assert records["relevancy"].nbytes == memory.index_nbytes > 0
    pipe.append(Documents([corpus[-1]]))
    expected = BM25RAG().prepare(corpus)
    q = [" ".join(corpus[-1].split()[:10])]
    np.testing.assert_allclose(  # log1p may differ by an ulp between CPU and GPU
        pipe.method.relevancy(memory, q).values.cpu().numpy(),
        BM25RAG().relevancy(expected, q).values.numpy(),
        rtol=1e-12,
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU")
def test_on_gpu_matches_cpu(corpus, ours) -> None:
    method, memory = ours
    gpu = memory.to(torch.device("cuda"))
    values = method.relevancy(gpu, QUERIES).values
    assert values.device.type == "cuda"
    np.testing.assert_allclose(
        values.cpu().numpy()[:, 0, 0], scores_of(method, memory, QUERIES), rtol=1e-12
    )
    method.append(gpu, ["xylophonist on the gpu"])
    selection = method.retrieve(method.relevancy(gpu, ["xylophonist"]), 1)
    assert method.ranked(gpu, selection, ["xylophonist"]) == [[memory.entries]]


# -- re-retrieval -----------------------------------------------------------------------------------

FACTS = [
    "The Eiffel Tower stands in Paris and was finished in 1889.",
    "Mount Everest is the highest mountain above sea level on Earth.",
    "The Great Barrier Reef lies off the coast of Queensland in Australia.",
    "The Amazon river carries more water than any other river.",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
]


@pytest.fixture
def facts() -> tuple[BM25RAG, BM25Memory]:
    method = BM25RAG()
    return method, method.prepare(FACTS)


def test_reretrieval_fires_on_low_probability(facts) -> None:
    method, memory = facts
    hook = ReRetriever(method, 1, memory=memory, min_prob=0.4, window=6, question="Tell me facts.")
    assert hook("Paris has a famous tower", probs=[0.9, 0.8, 0.95]) is None
    found = hook("Paris has a famous tower. The highest mountain on Earth", probs=[0.9, 0.2])
    assert found is not None and found.indices == [1] and found.texts == [FACTS[1]]
    assert len(hook.log) == 1
    fired = hook.log[0]
    assert fired.reasons == ("low_prob",) and fired.lowest_prob == pytest.approx(0.2)
    assert fired.position == 5 and fired.indices == [1]
    assert fired.query == found.query
    assert found.query.startswith("Tell me facts.") and found.query.endswith("mountain on Earth")
    assert "Paris" not in found.query  # outside the last 6 words


def test_reretrieval_fires_every_n_tokens(facts) -> None:
    method, memory = facts
    hook = ReRetriever(method, 2, memory=memory, every=4, window=5)
    generated = "the coral reef off Queensland is large and light water makes sugar in plants"
    words = generated.split()
    fired_at = []
    for n in range(1, len(words) + 1):
        found = hook(" ".join(words[:n]))
        if found is not None:
            fired_at.append(n)
            assert len(found.indices) == 2
    assert fired_at == [4, 8, 12]
    assert [f.position for f in hook.log] == [4, 8, 12]
    assert all(f.reasons == ("every",) and f.lowest_prob is None for f in hook.log)
    assert hook.log[0].indices[0] == 2  # "coral reef off Queensland" -> the reef
    assert hook.log[2].indices[0] == 4  # "light water makes sugar" -> photosynthesis


def test_reretrieval_counts_tokens_by_probs_and_logs_both_reasons(facts) -> None:
    method, memory = facts
    hook = ReRetriever(method, 1, memory=memory, every=3, min_prob=0.5)
    assert hook("Amazon", probs=[0.9, 0.9]) is None
    found = hook("Amazon river water", probs=[0.1])
    assert found is not None and found.indices == [3]
    assert hook.log[-1].reasons == ("low_prob", "every") and hook.log[-1].position == 3
    hook.reset("new question")
    assert hook.position == 0 and hook("x", probs=[0.9]) is None


def test_reretrieval_through_pipeline_is_profiled() -> None:
    pipe = Pipeline(BM25RAG(), placement="cpu/cpu/cpu/cpu")
    pipe.prepare(FACTS)
    hook = ReRetriever(pipe, 1, min_prob=0.5, window=4)
    found = hook("it is in Paris, the tower", probs=[0.3])
    assert found is not None and found.indices == [0]
    assert found.profile is not None and hook.log[0].profile is found.profile
    records = found.profile.by_step()
    assert records["relevancy"].source == records["retrieval"].source == "measured"


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"k": 0, "every": 2}, "k"),
        ({"k": 1}, "every"),
        ({"k": 1, "every": 0}, "every"),
        ({"k": 1, "min_prob": 0.0}, "min_prob"),
        ({"k": 1, "min_prob": 1.5}, "min_prob"),
        ({"k": 1, "every": 2, "window": 0}, "window"),
    ],
)
def test_reretriever_bad_arguments(facts, kwargs: dict, argument: str) -> None:
    method, memory = facts
    with pytest.raises(InputError) as err:
        ReRetriever(method, memory=memory, **kwargs)
    assert err.value.argument == argument


def test_reretriever_needs_memory_with_a_method(facts) -> None:
    with pytest.raises(InputError) as err:
        ReRetriever(facts[0], 1, every=2)
    assert err.value.argument == "memory"


def test_reretriever_bad_probs(facts) -> None:
    method, memory = facts
    hook = ReRetriever(method, 1, memory=memory, min_prob=0.5)
    with pytest.raises(InputError) as err:
        hook("text", probs=[0.5, float("nan")])
    assert err.value.argument == "probs"


def test_reretriever_k_above_documents(facts) -> None:
    method, memory = facts
    hook = ReRetriever(method, len(FACTS) + 1, memory=memory, every=1)
    with pytest.raises(InputError) as err:
        hook("anything")
    assert err.value.argument == "k"


# -- bad input: one test per case ---------------------------------------------------------------------


@contextmanager
def raises_naming(argument: str) -> Iterator[None]:
    with pytest.raises(InputError) as err:
        yield
    assert err.value.argument == argument, str(err.value)


def test_negative_k1() -> None:
    with raises_naming("k1"):
        BM25RAG(k1=-0.1)


def test_b_above_one() -> None:
    with raises_naming("b"):
        BM25RAG(b=1.01)


def test_b_below_zero() -> None:
    with raises_naming("b"):
        BM25RAG(b=-0.01)


def test_empty_query_list(facts) -> None:
    method, memory = facts
    with raises_naming("query"):
        method.relevancy(memory, [])


def test_non_string_query(facts) -> None:
    method, memory = facts
    with raises_naming("query"):
        method.relevancy(memory, ["fine", 3])


def test_bare_string_query(facts) -> None:
    method, memory = facts
    with raises_naming("query"):
        method.relevancy(memory, "a bare string is not a batch")


def test_empty_memory() -> None:
    method = BM25RAG()
    with raises_naming("memory"):
        method.relevancy(method.prepare([]), ["anything"])


def test_budget_zero(facts) -> None:
    method, memory = facts
    with raises_naming("budget"):
        method.retrieve(method.relevancy(memory, ["tower"]), 0)


def test_budget_above_documents_retrieves_every_document(facts) -> None:
    method, memory = facts
    picked = method.retrieve(method.relevancy(memory, ["tower"]), len(FACTS) + 1)
    assert picked.indices.shape[-1] == len(FACTS)
    assert sorted(picked.indices.flatten().tolist()) == list(range(len(FACTS)))


def test_non_string_document() -> None:
    with raises_naming("documents"):
        BM25RAG().prepare(["fine", None])


def test_unknown_device() -> None:
    with raises_naming("device"):
        BM25RAG(device="not-a-device")


# -- Unicode text ---------------------------------------------------------------------------------

MULTILINGUAL = [
    "Le café de la gare ouvre à six heures.",  # NFC accents
    "Die Straße führt zum Bahnhof.",
    "ＨＥＴＭＥＭ runs on the ＦＰＧＡ card.",  # full-width forms
    "東京大学で機械学習を勉強する。",  # Japanese, no spaces
    "北京是中国的首都。",  # Chinese
    "서울은 한국의 수도입니다.",  # Korean
    "हिन्दी भारत की एक भाषा है।",  # Devanagari vowel signs are combining marks
    "A plain English sentence about trains.",
]


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("cafe\u0301", ["cafe"]),  # NFD equals NFC, accent folded
        ("CAFÉ", ["cafe"]),
        ("Straße STRASSE", ["strasse", "strasse"]),  # case folding
        ("ＢＭ２５ ﬁle", ["bm25", "file"]),  # NFKC
        ("東京", ["東", "京", "東京"]),
        ("ｶﾀｶﾅ", ["カ", "タ", "カ", "ナ", "カタ", "タカ", "カナ"]),  # half-width kana
        ("हिन्दी", ["हिन्दी"]),  # one word, not split at its vowel signs
        ("😀 🎉 !? a", []),  # nothing indexable
        ("Hello, world_wide x", ["hello", "world_wide"]),  # bm25s's split on ASCII
    ],
)
def test_tokenize_unicode(text: str, tokens: list[str]) -> None:
    assert tokenize(text) == tokens


def test_accents_can_be_kept() -> None:
    assert tokenize("año ano") == ["ano", "ano"]
    assert tokenize("año ano", fold_accents=False) == ["año", "ano"]
    assert tokenize("an\u0303o", fold_accents=False) == ["año"]  # still NFC
    method = BM25RAG(fold_accents=False)
    memory = method.prepare(["el año nuevo", "el ano"])
    assert method.ranked(
        memory, method.retrieve(method.relevancy(memory, ["año"]), 2), ["año"]
    ) == [[0]]
    with pytest.raises(InputError, match="fold_accents"):
        BM25RAG(fold_accents="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("query", "best"),
    [
        ("cafe\u0301", 0),  # NFD query, NFC document
        ("CAFE", 0),
        ("strasse", 1),
        ("hetmem fpga", 2),
        ("東京", 3),  # a word inside a sentence without spaces
        ("機械学習", 3),
        ("北京", 4),
        ("中国首都", 4),
        ("서울", 5),
        ("भाषा", 6),
    ],
)
def test_multilingual_queries_find_their_document(query: str, best: int) -> None:
    method = BM25RAG()
    memory = method.prepare(MULTILINGUAL)
    selection = method.retrieve(method.relevancy(memory, [query]), 3)
    assert method.ranked(memory, selection, [query])[0][0] == best


def test_ascii_tokens_are_bm25s_tokens_and_unicode_ones_are_normalized() -> None:
    """On ASCII text the split is bm25s's; where bm25s keeps a CJK sentence as one token
    and an NFD accent as a break, ours gives the terms a reader sees."""
    plain = ["The quick brown fox, 42 times!", "snake_case and CamelCase a b"]
    assert [tokenize(t) for t in plain] == bm25s.tokenize(
        plain, stopwords=None, return_ids=False, show_progress=False
    )
    (theirs,) = bm25s.tokenize(
        ["東京大学で勉強する"], stopwords=None, return_ids=False, show_progress=False
    )
    assert theirs == ["東京大学で勉強する"] and "東京" in tokenize("東京大学で勉強する")


# -- queries with no indexable term ---------------------------------------------------------------

NO_TERM = ["😀🎉", "?!", "zzqx unknownword", "a"]


@pytest.mark.parametrize("query", NO_TERM)
def test_a_query_with_no_indexable_term_retrieves_nothing_and_warns(facts, query: str) -> None:
    method, memory = facts
    with pytest.warns(NoMatchWarning, match="no indexable term") as caught:
        scores = method.relevancy(memory, [query])
    assert caught[0].filename == __file__  # the warning points at the caller
    assert not scores.values.any()
    selection = method.retrieve(scores, 3)
    assert method.ranked(memory, selection, [query]) == [[]]
    (prompt,) = method.apply(memory, selection, [query])
    assert prompt == assemble_prompt([], query)
    assert not any(fact in prompt for fact in FACTS)


def test_only_the_rows_without_a_term_are_empty(facts) -> None:
    method, memory = facts
    queries = ["Paris tower", "😀", "river water"]
    with pytest.warns(NoMatchWarning, match=r"queries 1 \('😀'\)"):
        selection = method.retrieve(method.relevancy(memory, queries), 2)
    rows = method.ranked(memory, selection, queries)
    assert rows[0][0] == 0 and rows[1] == [] and rows[2][0] == 3


def test_documents_that_match_no_term_are_not_results(facts) -> None:
    """k = 4 but only one document has "Everest": one result, not three with score 0."""
    method, memory = facts
    selection = method.retrieve(method.relevancy(memory, ["Everest"]), 4)
    assert selection.valid.sum() == 4  # Retrieval keeps the top-k contract
    assert method.ranked(memory, selection, ["Everest"]) == [[1]]


@pytest.mark.parametrize("placement", ["cpu/cpu/cpu/cpu", "cpu/fpga/fpga/cpu"])
def test_no_term_query_through_a_pipeline(placement: str) -> None:
    pipe = Pipeline(BM25RAG(), placement=placement, fpga="emu")
    pipe.prepare(Documents(list(FACTS)))
    with pytest.warns(NoMatchWarning) as caught:
        (prompt,) = pipe.step(["🙂"], budget=3)
    assert caught[0].filename == __file__
    assert prompt == assemble_prompt([], "🙂")
    reretriever = ReRetriever(pipe, k=2, every=1)
    with pytest.warns(NoMatchWarning):
        found = reretriever.retrieve("🙂")
    assert found.indices == [] and found.texts == []
    (prompt,) = pipe.step(["東京 Everest"], budget=3)  # a known term: found on the card too
    assert FACTS[1] in prompt and FACTS[0] not in prompt
