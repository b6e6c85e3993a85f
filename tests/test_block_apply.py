"""The block Apply path of `sparse_attention` (per-KV-head page and block selections: Quest,
SeerAttention-R) and `bag_values`: chunked key gathers into a reused buffer and the values
summed by pieces give what a plain gather-then-softmax gives, under padding, rows of
different lengths, invalid and future blocks, GQA, and full budget."""

import math

import pytest
import torch

from hetmem import attention
from hetmem.attention import (
    AttentionQuery,
    KVCache,
    bag_values,
    dense_attention,
    expand_units,
    sparse_attention,
)
from hetmem.methods import get
from hetmem.selection import TopK

TOL = {"atol": 1e-5, "rtol": 1e-5}


def naive_sparse(q, kv, selection, positions):
    """Gather every selected token per (row, query head), mask, softmax: the plain math."""
    tokens, valid = expand_units(selection)  # [B, G, T, n]
    b, hq, t, d = q.shape
    rep = hq // tokens.shape[1]
    groups = hq // kv.kv_heads
    out = torch.zeros_like(q)
    for i in range(b):
        for h in range(hq):
            for j in range(t):
                tok = tokens[i, h // rep, j]
                ok = valid[i, h // rep, j] & (tok <= positions[i, j]) & (tok < kv.lengths[i])
                if not bool(ok.any()):
                    continue
                tok = tok[ok]
                keys = kv.keys[i, h // groups, tok]
                values = kv.values[i, h // groups, tok]
                p = torch.softmax(keys @ q[i, h, j] / math.sqrt(d), dim=-1)
                out[i, h, j] = p @ values
    return out


def make_kv(batch=3, kv_heads=2, tokens=256, dim=16, lengths=(256, 137, 9)):
    keys = torch.randn(batch, kv_heads, tokens, dim)
    values = torch.randn(batch, kv_heads, tokens, dim)
    return KVCache(keys, values, torch.tensor(lengths))


@pytest.mark.parametrize("unit", [1, 16, 64])
@pytest.mark.parametrize("chunk_bytes", [1, 5000, 2 << 20, "small"])
def test_block_path_equals_the_naive_gather(unit, chunk_bytes, monkeypatch):
    """Chunks of one item, of a few, and of all; blocks past a row's end and invalid slots;
    and the small path ("small": one sdpa over the gathered rows, no workspace)."""
    if chunk_bytes == "small":
        monkeypatch.setattr(attention, "SMALL_APPLY", 1 << 20)
    else:  # the tiled path, whatever the size
        monkeypatch.setattr(attention, "SMALL_APPLY", 0)
        monkeypatch.setattr(attention, "CHUNK_BYTES", chunk_bytes)
    kv = make_kv()
    units = -(-256 // unit)
    m = min(units, 5)
    gen = torch.Generator().manual_seed(unit)
    idx = torch.stack([torch.randperm(units, generator=gen)[:m] for _ in range(3 * 2)])
    idx = idx.view(3, 2, 1, m)
    valid = torch.ones(3, 2, 1, m, dtype=torch.bool)
    valid[0, 1, 0, 0] = False
    selection = TopK(idx, valid, unit)
    q = torch.randn(3, 8, 1, 16)
    positions = kv.lengths[:, None] - 1
    workspace = {}
    for _ in range(2):  # the second call reuses the buffer
        out = sparse_attention(q, kv, selection, workspace=workspace)
        torch.testing.assert_close(out, naive_sparse(q, kv, selection, positions), **TOL)
    assert len(workspace) == (0 if chunk_bytes == "small" else 1)


def test_block_path_with_a_query_before_the_end_and_several_queries():
    kv = make_kv(lengths=(256, 256, 200))
    selection = TopK(
        torch.tensor([0, 3, 7, 12]).expand(3, 2, 2, 4).contiguous(),
        torch.ones(3, 2, 2, 4, dtype=torch.bool),
        16,
    )
    q = torch.randn(3, 4, 2, 16)
    positions = torch.tensor([[20, 60], [0, 199], [130, 199]])
    out = sparse_attention(q, kv, selection, positions)
    torch.testing.assert_close(out, naive_sparse(q, kv, selection, positions), **TOL)


@pytest.mark.parametrize("small", [True, False])
def test_a_fully_hidden_row_gives_zeros_not_nan(small, monkeypatch):
    monkeypatch.setattr(attention, "SMALL_APPLY", 1 << 20 if small else 0)
    keys, values = torch.randn(2, 2, 64, 8), torch.randn(2, 2, 64, 8)
    keys[1] = float("nan")
    values[1] = float("nan")
    kv = KVCache(keys, values, torch.tensor([64, 0]))
    selection = TopK(
        torch.tensor([0, 2]).expand(2, 2, 1, 2).contiguous(),
        torch.ones(2, 2, 1, 2, dtype=torch.bool),
        16,
    )
    q = torch.randn(2, 4, 1, 8)
    out = sparse_attention(q, kv, selection, torch.tensor([[63], [0]]))
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all()


@pytest.mark.parametrize("n", [1, 127, 128, 129, 300, 2048])
def test_bag_values_by_pieces_equals_the_weighted_sum(n):
    """Pieces of about PIECE rows, with a padded last piece (row 0 at weight 0)."""
    table = torch.randn(4096, 8)
    rows = torch.randint(0, 4096, (3, n))
    probs = torch.rand(3, 4, n)
    want = torch.einsum("irn,ind->ird", probs, table[rows])
    torch.testing.assert_close(bag_values(probs, rows, table), want, atol=1e-4, rtol=1e-4)


def test_bag_values_of_nothing_is_zero():
    out = bag_values(torch.zeros(2, 4, 0), torch.zeros(2, 0, dtype=torch.long), torch.ones(5, 8))
    assert out.shape == (2, 4, 8) and (out == 0).all()


@pytest.mark.parametrize(
    "make", [lambda: get("quest", page_size=16), lambda: get("seer", block_size=64)]
)
def test_full_budget_with_rows_of_different_lengths_equals_dense(make):
    method = make()
    kv = make_kv(batch=3, tokens=300, lengths=(300, 171, 5))
    memory = method.prepare(kv)
    query = AttentionQuery(torch.randn(3, 8, 1, 16))
    budget = -(-kv.capacity // method.unit) * method.unit
    selection = method.retrieve(method.relevancy(memory, query), budget)
    out = method.apply(memory, selection, query)
    torch.testing.assert_close(out, dense_attention(query.q, kv), **TOL)
    assert len(memory.workspace) == 1  # the gather buffer, kept for the next step
