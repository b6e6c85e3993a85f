"""Sparse-attention methods against dense attention, and their memories under appends."""

import math

import pytest
import torch
import torch.nn.functional as F

from hetmem.attention import (
    AttentionQuery,
    KVCache,
    KVChunk,
    attention_recall,
    dense_attention,
    sparse_attention,
)
from hetmem.methods import get
from hetmem.selection import Bitmap, TopK

METHODS = {
    "dsa": lambda: get("dsa"),
    "dsa_token": lambda: get("dsa", kv_layout="token"),
    "quest": lambda: get("quest", page_size=16),
    "quest_per_head": lambda: get("quest", page_size=8, per_query_head=True),
    "seer": lambda: get("seer", block_size=16),
    "seer_threshold": lambda: get("seer", block_size=16, mode="threshold", threshold=1e-30),
}


def make_kv(batch=3, q_heads=8, kv_heads=2, tokens=100, dim=16, lengths=(100, 61, 7)):
    keys = torch.randn(batch, kv_heads, tokens, dim)
    values = torch.randn(batch, kv_heads, tokens, dim)
    return KVCache(keys, values, torch.tensor(lengths)), q_heads


def sdpa_reference(q, kv, positions):
    """Dense attention built here from torch SDPA with an explicit per-row causal mask."""
    b, hq, t, d = q.shape
    groups = hq // kv.kv_heads
    keys = kv.keys.repeat_interleave(groups, 1)
    values = kv.values.repeat_interleave(groups, 1)
    s = torch.arange(kv.capacity)
    mask = (s[None, None, :] <= positions[:, :, None]) & (
        s[None, None, :] < kv.lengths[:, None, None]
    )
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None])


def full_budget(method, kv):
    return math.ceil(kv.capacity / method.unit) * method.unit


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("queries", [1, 4])
def test_full_budget_equals_dense(name, queries):
    method = METHODS[name]()
    kv, hq = make_kv()
    memory = method.prepare(kv)
    q = torch.randn(kv.batch, hq, queries, kv.dim)
    positions = kv.lengths[:, None] - queries + torch.arange(queries)[None, :]
    query = AttentionQuery(q, positions)
    selection = method.retrieve(method.relevancy(memory, query), full_budget(method, kv))
    out = method.apply(memory, selection, query)
    ref = sdpa_reference(q, kv, positions)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(METHODS))
def test_causal_mask_is_exact_inside_a_chunk(name):
    """Queries earlier in the sequence never see later tokens, even at full budget."""
    method = METHODS[name]()
    kv, hq = make_kv(lengths=(100, 100, 100))
    memory = method.prepare(kv)
    positions = torch.tensor([[10, 50], [0, 99], [33, 34]])
    q = torch.randn(kv.batch, hq, 2, kv.dim)
    query = AttentionQuery(q, positions)
    selection = method.retrieve(method.relevancy(memory, query), full_budget(method, kv))
    out = method.apply(memory, selection, query)
    torch.testing.assert_close(out, sdpa_reference(q, kv, positions), atol=1e-5, rtol=1e-5)
    # A change to a future token must not change the output of an earlier query.
    kv.keys[0, :, 11:] += 100.0
    out2 = method.apply(memory, selection, query)
    torch.testing.assert_close(out2[0, :, 0], out[0, :, 0])


@pytest.mark.parametrize("name", list(METHODS))
def test_append_equals_fresh_prepare(name):
    method = METHODS[name]()
    kv, hq = make_kv()
    memory = method.prepare(kv)
    for step in range(3):
        chunk = KVChunk(torch.randn(3, 2, 2 + step, 16), torch.randn(3, 2, 2 + step, 16))
        method.append(memory, chunk)
    fresh_kv = KVCache(memory.kv.keys.clone(), memory.kv.values.clone(), memory.kv.lengths.clone())
    fresh = method.prepare(fresh_kv)
    assert memory.entries == fresh.entries
    query = AttentionQuery(torch.randn(3, hq, 1, 16))
    torch.testing.assert_close(
        method.relevancy(memory, query).values, method.relevancy(fresh, query).values
    )


def test_append_writes_each_row_at_its_own_length():
    kv, _ = make_kv()
    before = kv.keys.clone()
    new_k = torch.randn(3, 2, 1, 16)
    positions = kv.append(new_k, torch.randn(3, 2, 1, 16))
    assert positions[:, 0].tolist() == [100, 61, 7]
    assert kv.lengths.tolist() == [101, 62, 8]
    torch.testing.assert_close(kv.keys[1, :, 61], new_k[1, :, 0])
    torch.testing.assert_close(kv.keys[2, :, :7], before[2, :, :7])


def test_append_grows_capacity_geometrically():
    kv, _ = make_kv(lengths=(100, 100, 100))
    buffers = set()
    for _ in range(50):
        kv.append(torch.randn(3, 2, 1, 16), torch.randn(3, 2, 1, 16))
        buffers.add(kv._keys.buffer.data_ptr())
    assert kv.capacity == 150
    assert len(buffers) <= 2  # 100 -> 200: one reallocation, not one per token


@pytest.mark.parametrize("name", ["dsa", "quest", "seer"])
def test_small_budget_selects_at_most_budget_tokens(name):
    method = METHODS[name]()
    kv, hq = make_kv(tokens=256, lengths=(256, 256, 200))
    memory = method.prepare(kv)
    query = AttentionQuery(torch.randn(3, hq, 1, 16))
    selection = method.retrieve(method.relevancy(memory, query), 64)
    assert isinstance(selection, TopK)
    assert selection.k * selection.unit <= 64
    assert (selection.indices.diff(dim=-1) > 0).all()  # ascending, no duplicates


def test_threshold_mode_yields_a_bitmap_of_the_large_gates():
    method = get("seer", block_size=16, mode="threshold", threshold=0.5)
    kv, hq = make_kv(tokens=256, lengths=(256, 256, 200))
    memory = method.prepare(kv)
    query = AttentionQuery(torch.randn(3, hq, 1, 16))
    scores = method.relevancy(memory, query)
    selection = method.retrieve(scores, 64)
    assert isinstance(selection, Bitmap)
    logits = scores.values
    top = logits.amax(-1, keepdim=True)
    expected = torch.softmax(logits, -1) >= 0.5 * torch.softmax(logits, -1).amax(-1, keepdim=True)
    assert torch.equal(selection.mask, expected & torch.isfinite(logits))
    assert selection.mask.any(-1).all()  # the best block always passes
    assert not selection.mask[logits < top + math.log(0.5) - 1e-4].any()


def test_quest_selects_the_page_holding_a_planted_key():
    kv, hq = make_kv(tokens=256, lengths=(256, 256, 256), kv_heads=2, q_heads=4)
    direction = torch.randn(16)
    kv.keys[:, :, 130] = 10 * direction
    method = get("quest", page_size=16)
    memory = method.prepare(kv)
    query = AttentionQuery(direction.expand(3, 4, 1, 16).clone())
    selection = method.retrieve(method.relevancy(memory, query), 16)
    assert (selection.indices[..., 0] == 130 // 16).all()


def test_dense_attention_matches_sdpa_and_handles_gqa():
    kv, hq = make_kv()
    q = torch.randn(3, hq, 1, 16)
    positions = kv.lengths[:, None] - 1
    torch.testing.assert_close(dense_attention(q, kv), sdpa_reference(q, kv, positions))


# -- attention recall on hand-made cases ------------------------------------------------


def one_head_cache(logits):
    """A 1x1 cache whose attention logits for the query e_0 are exactly `logits`."""
    n = len(logits)
    keys = torch.zeros(1, 1, n, 2)
    keys[0, 0, :, 0] = torch.tensor(logits, dtype=torch.float32) * math.sqrt(2)
    return KVCache(keys, torch.zeros(1, 1, n, 2)), torch.tensor([[[[1.0, 0.0]]]])


def select(indices, valid=None):
    idx = torch.tensor(indices).view(1, 1, 1, -1)
    return TopK(idx, torch.ones_like(idx, dtype=torch.bool) if valid is None else valid)


def test_recall_of_everything_is_one():
    kv, q = one_head_cache([0.0, 1.0, 2.0])
    assert attention_recall(q, kv, select([0, 1, 2])).item() == pytest.approx(1.0)


def test_recall_of_uniform_attention_is_the_share_of_tokens():
    kv, q = one_head_cache([0.0] * 8)
    assert attention_recall(q, kv, select([1, 6])).item() == pytest.approx(2 / 8)


def test_recall_is_the_softmax_mass_of_the_selected_tokens():
    logits = [0.0, math.log(3.0), 0.0, 0.0]  # probabilities 1/6, 3/6, 1/6, 1/6
    kv, q = one_head_cache(logits)
    assert attention_recall(q, kv, select([1])).item() == pytest.approx(0.5)
    assert attention_recall(q, kv, select([0, 2])).item() == pytest.approx(2 / 6)


def test_recall_ignores_invalid_slots_and_blocks_expand():
    kv, q = one_head_cache([0.0] * 8)
    valid = torch.tensor([True, False]).view(1, 1, 1, 2)
    assert attention_recall(q, kv, select([0, 3], valid)).item() == pytest.approx(1 / 8)
    blocks = TopK(
        torch.tensor([1]).view(1, 1, 1, 1), torch.ones(1, 1, 1, 1, dtype=torch.bool), unit=4
    )
    assert attention_recall(q, kv, blocks).item() == pytest.approx(4 / 8)


def test_sparse_attention_of_one_token_returns_its_value():
    kv, q = one_head_cache([0.0, 5.0, 1.0])
    kv.values[0, 0, 2] = torch.tensor([7.0, -3.0])
    out = sparse_attention(q, kv, select([2]))
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([7.0, -3.0]))


@pytest.mark.parametrize("name", list(METHODS))
def test_nan_in_padding_slots_does_not_leak(name):
    """A model may leave NaN in padded slots (a fully masked row); outputs stay finite and
    equal those of a cache whose padding is zero."""
    method = METHODS[name]()
    keys = torch.randn(3, 2, 100, 16)
    values = torch.randn(3, 2, 100, 16)
    lengths = torch.tensor([100, 61, 7])
    poisoned_k, poisoned_v = keys.clone(), values.clone()
    for row, n in enumerate(lengths.tolist()):
        poisoned_k[row, :, n:] = float("nan")
        poisoned_v[row, :, n:] = float("nan")
    clean = KVCache(keys, values, lengths)
    dirty = KVCache(poisoned_k, poisoned_v, lengths)
    q = torch.randn(3, 8, 1, 16)
    query = AttentionQuery(q, lengths[:, None] - 1)
    outs = []
    for kv in (clean, dirty):
        memory = method.prepare(kv)
        budget = full_budget(method, kv)
        sel = method.retrieve(method.relevancy(memory, query), budget)
        outs.append(method.apply(memory, sel, query))
        assert torch.isfinite(dense_attention(q, kv, lengths[:, None] - 1)).all()
    assert torch.isfinite(outs[1]).all()
    torch.testing.assert_close(outs[1], outs[0])
