"""Half-precision decode on the CPU: a bf16 matmul there builds its kernel per shape and copies
an operand that is not one contiguous block, so Relevancy pads its matmuls over a growing
index (`Growable.padded`) and transposes small results instead of large operands. The scores
are those of the plain formulas, computed here in float64 from the same stored values; the
rows the padding adds never reach a score."""

import math

import pytest
import torch

from hetmem.attention import AttentionQuery, Growable, Growth, KVCache, KVChunk
from hetmem.methods import get, seer
from hetmem.methods.dsa import DSA, IndexerWeights

BF16 = torch.bfloat16


def test_padded_is_the_whole_buffer_or_a_multiple_of_the_quantum():
    tight = Growable(torch.ones(2, 100, 3), axis=1, growth=Growth(expected=110))
    assert tight.padded(16).shape[1] == tight.capacity == 110  # one shape, contiguous
    assert tight.padded(16).is_contiguous()
    loose = Growable(torch.ones(2, 100, 3), axis=1, min_capacity=400)
    assert loose.padded(16).shape[1] == 112  # 100 rounded up to 16s
    loose.length = 112
    assert loose.padded(16).shape[1] == 112
    loose.length = 113
    assert loose.padded(16).shape[1] == 128
    assert torch.equal(loose.padded(16)[:, :100], torch.ones(2, 100, 3))


def _grown_cache(tokens=300, steps=5, dtype=BF16, seed=0):
    """A bf16 cache with room beyond its length (padding for the matmuls to read), grown by
    a few appends."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, 2, tokens, 16, generator=gen).to(dtype)
    values = torch.randn(2, 2, tokens, 16, generator=gen).to(dtype)
    chunks = [
        KVChunk(
            torch.randn(2, 2, 1, 16, generator=gen).to(dtype),
            torch.randn(2, 2, 1, 16, generator=gen).to(dtype),
        )
        for _ in range(steps)
    ]
    query = AttentionQuery(torch.randn(2, 8, 1, 16, generator=gen).to(dtype))
    # Allocated for twice its length: the indexes over it have room to pad into.
    return KVCache(keys, values, growth=Growth(expected=2 * tokens)), chunks, query


def test_quest_bounds_in_bf16_are_the_formula_over_the_stored_pages():
    kv, chunks, query = _grown_cache()
    method = get("quest", page_size=16)
    memory = method.prepare(kv)
    for chunk in chunks:
        method.append(memory, chunk)
    bounds = method.bounds(memory, query.q)  # [B, Hkv, R, T, P]
    p = memory.mins.shape[2]
    assert memory.pages.stores["bounds"].padded(16).shape[2] > p  # padding was read
    assert bounds.shape == (2, 2, 4, 1, p) and bounds.dtype == BF16
    q = query.q.double().view(2, 2, 4, 1, 16)
    mins, maxs = memory.mins.double()[:, :, None, None], memory.maxs.double()[:, :, None, None]
    ref = torch.where(q[..., None, :] < 0, mins, maxs)  # [B, Hkv, R, T, P, D]
    ref = (q[..., None, :] * ref).sum(-1)
    assert torch.allclose(bounds.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max())


def test_dsa_in_bf16_scores_the_index_it_holds():
    kv, chunks, query = _grown_cache(tokens=700)
    gen = torch.Generator().manual_seed(3)
    weights = IndexerWeights(
        torch.randn(8 * 16, 4 * 8, generator=gen).to(BF16),
        torch.randn(2 * 16, 8, generator=gen).to(BF16),
        None,
        heads=4,
    )
    method = DSA(weights)
    memory = method.prepare(kv)
    for chunk in chunks:
        method.append(memory, chunk)
    assert memory.keys.data.dtype == BF16 and memory.keys.capacity > memory.keys.length
    scores = method.relevancy(memory, query).values[:, 0]  # [B, T, S]
    assert scores.shape == (2, 1, kv.capacity)
    qi, _ = method.indexer_query(memory, query)  # [B, T, H, Di]
    logits = memory.keys.data.double() @ qi.double().flatten(1, 2).transpose(1, 2)
    ref = logits.relu().sum(-1) / (4 * math.sqrt(8))  # [B, S]
    top = ref.abs().max()
    assert torch.allclose(scores[:, 0].double(), ref, rtol=0, atol=2e-2 * top)


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_seer_gate_scores_take_either_order(dtype):
    gen = torch.Generator().manual_seed(1)
    qg = torch.randn(3, 2, 1, 8, generator=gen).to(dtype)
    kg = torch.randn(3, 2, 40, 8, generator=gen).to(dtype)
    got = seer.gate_scores(qg, kg)
    assert got.shape == (3, 2, 1, 40) and got.dtype == dtype
    ref = qg.double() @ kg.double().transpose(-1, -2) / math.sqrt(8)
    tol = 2e-2 if dtype == BF16 else 1e-5
    assert torch.allclose(got.double(), ref, rtol=tol, atol=tol * ref.abs().max())
