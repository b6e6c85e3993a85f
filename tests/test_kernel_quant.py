"""Quantized kernels against their float semantics: the recall of the float64 top-k by the
quantized golden top-k, on realistic distributions, at the default formats.

Keys: Student-t(3) components with 4 outlier channels at x20 scale. Queries are correlated
with some keys: each query has a direction u and a relevant set of a quarter of the
candidates whose keys gain g * u, g = strength * Pareto(2) (heavy-tailed relevance, like
attention's heavy hitters), so there is a clear but graded top set. BM25 runs on a
synthetic Zipfian corpus. The float references are computed here in float64 numpy from
the kernels' float semantics, independently of hetmem.methods.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from hetmem import kernels
from hetmem.kernels import spec as kspec
from hetmem.kernels.bm25 import drifted

KS = (64, 256, 2048)
MIN_RECALL = 0.98


def float_topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Top-k of float scores by the contract (ties to the lower index), ascending."""
    index = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    order = np.lexsort((index, -scores), axis=1)[:, :k]
    return np.sort(order, axis=1)


def recall(reference: np.ndarray, got: np.ndarray) -> float:
    """Mean over queries of the fraction of the reference's top-k that `got` selects."""
    hits = [np.intersect1d(r, g).size / r.size for r, g in zip(reference, got, strict=True)]
    return float(np.mean(hits))


def heavy_keys(rng, n: int, d: int, outliers: int = 4) -> np.ndarray:
    keys = rng.standard_t(3, (n, d))
    keys[:, rng.choice(d, outliers, replace=False)] *= 20
    return keys


def plant(rng, keys: np.ndarray, directions: np.ndarray, strength: float = 8.0) -> None:
    """For each direction u, a random quarter of the rows gains g * u (in place)."""
    n = keys.shape[0]
    for u in directions:
        rows = rng.choice(n, n // 4, replace=False)
        keys[rows] += strength * (rng.pareto(2.0, rows.size) + 1)[:, None] * u


def unit(rng, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def measure(spec, memory, query, reference, **params) -> list[float]:
    state = spec.fit(memory)
    resident = spec.quantize_memory(memory, state)
    n = spec.candidates(memory)
    out = []
    for k in KS:
        inputs = spec.bind(resident, spec.quantize_query(query, state, k=k, **params), n=n)
        got = spec.golden(inputs)
        out.append(recall(float_topk(reference, k), got.indices))
    return out


def test_vector_search_recall():
    rng = np.random.default_rng(0)
    n, d, queries = 16384, 128, 8
    u = unit(rng, queries, d)
    keys = heavy_keys(rng, n, d)
    plant(rng, keys, u)
    q = u + 0.3 * rng.standard_normal(u.shape) / math.sqrt(d)
    recalls = measure(kernels.get("vector_search"), {"keys": keys}, {"q": q}, q @ keys.T)
    assert min(recalls) >= MIN_RECALL, recalls


def test_token_indexer_recall():
    rng = np.random.default_rng(0)
    n, heads, d, queries = 16384, 8, 128, 4
    u = unit(rng, queries, heads, d)
    keys = heavy_keys(rng, n, d)
    for i in range(queries):  # a relevant token aligns with a random mix of the heads
        rows = rng.choice(n, n // 4, replace=False)
        mix = rng.uniform(0, 1, (rows.size, heads))
        mix /= np.linalg.norm(mix, axis=1, keepdims=True)
        keys[rows] += 8.0 * (rng.pareto(2.0, rows.size) + 1)[:, None] * (mix @ u[i])
    q = u + 0.3 * rng.standard_normal(u.shape) / math.sqrt(d)
    w = rng.uniform(0.2, 1.0, (queries, heads)) * rng.choice(
        [1.0, 1.0, 1.0, -0.5], (queries, heads)
    )
    reference = np.einsum("qh,qhn->qn", w, np.maximum(np.einsum("qhd,nd->qhn", q, keys), 0))
    spec = kernels.get("token_indexer")
    recalls = measure(spec, {"keys": keys}, {"q": q, "w": w}, reference)
    assert min(recalls) >= MIN_RECALL, recalls


def test_page_indexer_recall():
    rng = np.random.default_rng(0)
    pages, size, d, heads, queries = 8192, 8, 128, 4, 4
    u = unit(rng, queries, d)
    keys = heavy_keys(rng, pages * size, d).reshape(pages, size, d)
    for direction in u:  # relevant pages: every key gains its page's g, jittered
        rows = rng.choice(pages, pages // 4, replace=False)
        g = 8.0 * (rng.pareto(2.0, rows.size) + 1)[:, None, None]
        keys[rows] += g * rng.uniform(0.5, 1.0, (rows.size, size, 1)) * direction
    mins, maxs = keys.min(1), keys.max(1)
    q = u[:, None, :] + 0.3 * rng.standard_normal((queries, heads, d)) / math.sqrt(d)
    bound = np.maximum(q[:, :, None, :] * mins, q[:, :, None, :] * maxs).sum(-1).max(1)
    spec = kernels.get("page_indexer")
    recalls = measure(spec, {"mins": mins, "maxs": maxs}, {"q": q}, bound)
    assert min(recalls) >= MIN_RECALL, recalls


def _gate_data():
    rng = np.random.default_rng(1)
    n, d, queries = 8192, 128, 8
    u = unit(rng, queries, d)
    keys = heavy_keys(rng, n, d)
    plant(rng, keys, u)
    q = 0.5 * (u + 0.3 * rng.standard_normal(u.shape) / math.sqrt(d))
    return keys, q


def test_block_gate_topk_recall():
    keys, q = _gate_data()
    logits = q @ keys.T / math.sqrt(keys.shape[1])
    recalls = measure(kernels.get("block_gate"), {"keys": keys}, {"q": q}, logits)
    assert min(recalls) >= MIN_RECALL, recalls


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_block_gate_threshold_matches_float_within_quantization_error(scale):
    """Integer keep (S_j >= S_max - delta) == float keep (logit_j >= max + ln tau) for every
    block, except where the float logit or the maximum is within its error bound of the
    threshold: |logit_j - t 2^-X S_j / sqrt(D)| <= t 2^-x_j (sum|q'/t| + sum|K_j|) / (2 sqrt(D)),
    X = ROW_EXP_MAX, q' the folded query (`fold`: the stored basis and its scales)."""
    rng = np.random.default_rng(2)
    n, d, queries = 8192, 128, 8
    keys = heavy_keys(rng, n, d)
    q = scale * unit(rng, queries, d)  # logits spread ~0.3 (scale 0.5) to ~1.5 (scale 2)
    logits = q @ keys.T / math.sqrt(d)
    spec = kernels.get("block_gate")
    state = spec.fit({"keys": keys})
    resident = spec.quantize_memory({"keys": keys}, state)
    folded = kspec.fold(state, q)  # the stored basis, channel scales folded
    t = np.abs(folded).max(1, keepdims=True) / kspec.INT8_MAX
    exp = kspec.ROW_EXP_MAX - resident["shifts"].astype(np.float64)
    error = (
        t
        * np.exp2(-exp)
        * (np.abs(folded / t).sum(1, keepdims=True) + np.abs(resident["keys"]).sum(1))
        / (2 * math.sqrt(d))
    )
    kept_total = 0
    for tau in (1.0, 0.5, 0.05, 0.005, 1e-6):
        query = spec.quantize_query({"q": q}, state, tau=tau)
        kept = kernels.unpack_bitmap(spec.golden(spec.bind(resident, query)).bitmap, n)
        threshold = logits.max(1, keepdims=True) + math.log(tau)
        differ = kept != (logits >= threshold)
        margin = np.abs(logits - threshold)
        assert (margin[differ] <= (error + error.max(1, keepdims=True))[differ] + 1e-9).all()
        assert differ.mean() <= 0.01, (tau, differ.sum())
        assert kept.any(1).all()  # the maximum is always kept
        if tau == 1.0:
            assert (kept.sum(1) <= 2).all()  # the maximum (and exact integer ties)
        kept_total += int(kept.sum())
    assert kept_total > 10 * queries  # the thresholds cut through the bulk, not just the max


def zipf_corpus(rng, docs: int = 8192, vocab: int = 4000, exponent: float = 1.1, tail: float = 1.0):
    """Documents of lognormal length (~60 tokens) drawn from a Zipfian vocabulary, as a CSR
    inverted index (postings sorted by term, then doc). The last eighth of the documents
    (the appended ones) are `tail` times longer."""
    p = 1.0 / np.arange(1, vocab + 1) ** exponent
    lengths = np.maximum(rng.lognormal(math.log(60), 0.5, docs).astype(np.int64), 5)
    lengths[docs * 7 // 8 :] = np.rint(lengths[docs * 7 // 8 :] * tail).astype(np.int64)
    tokens = rng.choice(vocab, size=int(lengths.sum()), p=p / p.sum())
    owner = np.repeat(np.arange(docs), lengths)
    pairs, tfs = np.unique(tokens * docs + owner, return_counts=True)
    terms = pairs // docs
    memory = {
        "term_offsets": np.searchsorted(terms, np.arange(vocab + 1)),
        "doc_ids": pairs % docs,
        "tfs": tfs,
        "doc_lengths": lengths,
    }
    return memory, tokens, owner


def bm25_float(memory, terms, idf, k1, b, avgdl) -> np.ndarray:
    """bm25s "lucene": sum over the query's terms of idf * tf / (tf + k1 (1 - b + b dl/avgdl))."""
    off, docs, tfs, dl = (memory[a] for a in ("term_offsets", "doc_ids", "tfs", "doc_lengths"))
    scores = np.zeros((terms.shape[0], dl.size))
    for i, row in enumerate(terms):
        for term, weight in zip(row, idf[i], strict=True):
            if term < 0:
                continue
            s = slice(off[term], off[term + 1])
            tf = tfs[s]
            scores[i, docs[s]] += weight * tf / (tf + k1 * (1 - b + b * dl[docs[s]] / avgdl))
    return scores


def bm25_queries(rng, memory, tokens, owner, queries=16, from_doc=4, random=2):
    """Queries of a few distinct terms of one document plus random Zipfian terms, -1 padded."""
    docs = memory["doc_lengths"].size
    df = np.diff(memory["term_offsets"])
    terms = np.full((queries, from_doc + random), -1)
    for i in range(queries):
        mine = np.unique(tokens[owner == rng.integers(docs)])
        picked = rng.choice(mine, min(from_doc, mine.size), replace=False)
        extra = rng.choice(tokens, random)
        row = np.unique(np.concatenate([picked, extra]))
        terms[i, : row.size] = row
    safe = np.maximum(terms, 0)
    idf = np.where(terms >= 0, np.log(1 + (docs - df[safe] + 0.5) / (df[safe] + 0.5)), 0.0)
    return terms, idf


def test_bm25_recall_on_a_zipfian_corpus():
    rng = np.random.default_rng(0)
    memory, tokens, owner = zipf_corpus(rng)
    terms, idf = bm25_queries(rng, memory, tokens, owner)
    k1, b = 1.5, 0.75
    reference = bm25_float(memory, terms, idf, k1, b, memory["doc_lengths"].mean())
    spec = kernels.get("bm25")
    memory = {**memory, "k1": k1, "b": b}
    recalls = measure(spec, memory, {"terms": terms, "idf": idf}, reference)
    assert min(recalls) >= MIN_RECALL, recalls


def test_bm25_appends_within_the_avgdl_tolerance_keep_recall():
    """Impacts fitted on the first 7/8 of the corpus; the appended eighth is 1.3x longer, so
    avgdl moved by ~4%, inside the tolerance: the memory is not re-normalized (existing
    impacts keep the fitted avgdl) and recall against the current float scores holds."""
    rng = np.random.default_rng(1)
    memory, tokens, owner = zipf_corpus(rng, tail=1.3)
    terms, idf = bm25_queries(rng, memory, tokens, owner)
    dl = memory["doc_lengths"]
    spec = kernels.get("bm25")
    state = spec.fit({"doc_lengths": dl[: dl.size * 7 // 8]})
    assert 0.02 < dl.mean() / state.avgdl - 1 < 0.05
    assert not drifted(state, dl)
    resident = spec.quantize_memory(memory, state)
    reference = bm25_float(memory, terms, idf, 1.5, 0.75, dl.mean())
    for k in KS:
        query = spec.quantize_query({"terms": terms, "idf": idf}, state, k=k)
        got = spec.golden(spec.bind(resident, query, n=dl.size)).indices
        assert recall(float_topk(reference, k), got) >= MIN_RECALL
    assert drifted(state, np.concatenate([dl, 3 * dl[: dl.size // 4]]))


# -- stacked states: many slots quantized at once ----------------------------------------------


def _slot_floats(name, rng, rows, dim=24):
    """Float memory and queries of one slot, at a slot-specific scale."""
    scale = rng.uniform(0.1, 10)
    if name == "page_indexer":
        keys = heavy_keys(rng, rows * 4, dim).reshape(rows, 4, dim) * scale
        memory = {"mins": keys.min(1), "maxs": keys.max(1)}
    else:
        memory = {"keys": heavy_keys(rng, rows, dim) * scale}
    return memory


def _slot_query(name, rng, queries, dim=24):
    if name == "token_indexer":
        return {"q": rng.standard_normal((queries, 4, dim)), "w": rng.uniform(-1, 1, (queries, 4))}
    if name == "page_indexer":
        return {"q": rng.standard_normal((queries, 3, dim))}
    return {"q": rng.standard_normal((queries, dim))}


@pytest.mark.parametrize("name", ["token_indexer", "page_indexer", "block_gate", "vector_search"])
def test_stacked_states_quantize_as_each_slot_alone(name):
    """quantize_memory / quantize_query with a stacked state and `slots` equal, bit for bit,
    quantizing each slot's rows and queries with its own state (random slot order)."""
    rng = np.random.default_rng(sum(map(ord, name)))
    spec = kernels.get(name)
    for _ in range(5):
        slots = int(rng.integers(1, 9))
        mems = [_slot_floats(name, rng, int(rng.integers(1, 40))) for _ in range(slots)]
        states = [spec.fit(m) for m in mems]
        stacked = spec.stack_states(states)
        row_slot = np.concatenate(
            [np.full(len(next(iter(m.values()))), s) for s, m in enumerate(mems)]
        )
        order = rng.permutation(len(row_slot))  # rows of the slots interleaved
        memory = {a: np.concatenate([m[a] for m in mems])[order] for a in mems[0]}
        got = spec.quantize_memory(memory, stacked, slots=row_slot[order])
        back = np.argsort(order)  # the rows in slot order again
        for s, m in enumerate(mems):
            alone = spec.quantize_memory(m, states[s])
            for a, arr in alone.items():
                np.testing.assert_array_equal(got[a][back][row_slot == s], arr)
        queries = int(rng.integers(1, 20))
        query = _slot_query(name, rng, queries)
        q_slot = rng.integers(0, slots, queries)
        params = {"tau": 0.05} if name == "block_gate" and rng.random() < 0.5 else {"k": 3}
        got_q = spec.quantize_query(query, stacked, slots=q_slot, **params)
        for i in range(queries):
            one = {a: v[i : i + 1] for a, v in query.items()}
            alone = spec.quantize_query(one, states[q_slot[i]], **params)
            assert alone.scalars == got_q.scalars | {"queries": 1}
            for a, arr in alone.arrays.items():
                np.testing.assert_array_equal(got_q.arrays[a][i : i + 1], arr)


def test_stacked_state_arguments_are_checked():
    spec = kernels.get("vector_search")
    rng = np.random.default_rng(0)
    states = [spec.fit({"keys": rng.standard_normal((10, 8))}) for _ in range(3)]
    stacked = spec.stack_states(states)
    keys = {"keys": rng.standard_normal((4, 8))}
    for bad in (None, [0, 1, 2], [0, 1, 2, 3], [[0, 1, 2, 0]], [0.0, 1.0, 2.0, 0.0]):
        with pytest.raises(kspec.InputError) as err:
            spec.quantize_memory(keys, stacked, slots=bad)
        assert err.value.argument == "slots"
    with pytest.raises(kspec.InputError) as err:
        spec.quantize_memory(keys, states[0], slots=[0, 0, 0, 0])  # not stacked
    assert err.value.argument == "slots"
    with pytest.raises(kspec.InputError) as err:
        spec.stack_states([states[0], spec.fit({"keys": rng.standard_normal((10, 9))})])
    assert err.value.argument == "states"
    with pytest.raises(kspec.InputError):
        spec.stack_states([])
