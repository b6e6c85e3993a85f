"""DSA's Apply: the shared-selection decode path and the token-major copy of the keys
(kv_layout="token") give what the generic `sparse_attention` gives, under padding, GQA,
invalid slots, a query before the row's end, appends and capacity growth."""

import pytest
import torch

from hetmem import attention
from hetmem.attention import (
    AttentionQuery,
    KVCache,
    KVChunk,
    dense_attention,
    sparse_attention,
)
from hetmem.errors import InputError
from hetmem.methods import dsa, get
from hetmem.methods.dsa import DSA
from hetmem.selection import Bitmap, TopK

LAYOUTS = ["head", "token"]
TOL = {"atol": 1e-5, "rtol": 1e-5}


def make_kv(batch=3, kv_heads=2, tokens=100, dim=16, lengths=(100, 61, 7)):
    keys = torch.randn(batch, kv_heads, tokens, dim)
    values = torch.randn(batch, kv_heads, tokens, dim)
    return KVCache(keys, values, torch.tensor(lengths))


def grow(method, memory, steps=3):
    b, h, _, d = memory.kv.keys.shape
    for step in range(steps):
        t = 1 + step
        method.append(memory, KVChunk(torch.randn(b, h, t, d), torch.randn(b, h, t, d)))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("budget", [1, 5, 40, 106])
def test_decode_apply_equals_sparse_attention(layout, budget):
    method = get("dsa", kv_layout=layout)
    memory = method.prepare(make_kv())
    grow(method, memory)
    query = AttentionQuery(torch.randn(3, 8, 1, 16))
    selection = method.retrieve(method.relevancy(memory, query), budget)
    out = method.apply(memory, selection, query)
    torch.testing.assert_close(out, sparse_attention(query.q, memory.kv, selection), **TOL)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_full_budget_after_appends_equals_dense(layout):
    """The token-major copy follows every append, including the one that reallocates."""
    method = get("dsa", kv_layout=layout)
    memory = method.prepare(make_kv(tokens=256, lengths=(256, 200, 3)))
    grow(method, memory, steps=4)  # 256 -> 266 tokens: past the first capacity
    kv = memory.kv
    query = AttentionQuery(torch.randn(3, 4, 1, 16))
    selection = method.retrieve(method.relevancy(memory, query), kv.capacity)
    out = method.apply(memory, selection, query)
    torch.testing.assert_close(out, dense_attention(query.q, kv), **TOL)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_query_before_the_end_never_sees_later_tokens(layout):
    method = get("dsa", kv_layout=layout)
    kv = make_kv(lengths=(100, 100, 100))
    memory = method.prepare(kv)
    positions = torch.tensor([[10], [99], [0]])
    query = AttentionQuery(torch.randn(3, 8, 1, 16), positions)
    selection = TopK(torch.arange(100).expand(3, 1, 1, 100), torch.ones(3, 1, 1, 100, dtype=bool))
    out = method.apply(memory, selection, query)
    torch.testing.assert_close(out, dense_attention(query.q, kv, positions), **TOL)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_invalid_and_out_of_range_slots_are_masked(layout):
    method = get("dsa", kv_layout=layout)
    kv = make_kv(lengths=(100, 61, 7))
    memory = method.prepare(kv)
    query = AttentionQuery(torch.randn(3, 8, 1, 16))
    indices = torch.tensor([3, 5, 6, 60, 99]).expand(3, 1, 1, 5)  # past rows 1 and 2's ends
    valid = torch.tensor([True, False, True, True, True]).expand(3, 1, 1, 5)
    selection = TopK(indices.contiguous(), valid.contiguous())
    out = method.apply(memory, selection, query)
    torch.testing.assert_close(out, sparse_attention(query.q, kv, selection), **TOL)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_row_that_sees_none_of_its_selection_gives_zeros(layout):
    method = get("dsa", kv_layout=layout)
    kv = make_kv()
    memory = method.prepare(kv)
    query = AttentionQuery(torch.randn(3, 8, 1, 16))
    valid = torch.ones(3, 1, 1, 4, dtype=torch.bool)
    valid[1] = False
    selection = TopK(torch.arange(4).expand(3, 1, 1, 4).contiguous(), valid)
    out = method.apply(memory, selection, query)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all()
    torch.testing.assert_close(out, sparse_attention(query.q, kv, selection), **TOL)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_other_selections_take_the_generic_path(layout):
    """Per-KV-head selections, bitmaps and several queries per row give sparse_attention's
    result (and a bitmap is the same selection as its top-k)."""
    method = get("dsa", kv_layout=layout)
    kv = make_kv()
    memory = method.prepare(kv)
    q = torch.randn(3, 8, 1, 16)
    per_head = TopK(
        torch.stack([torch.arange(0, 20, 2), torch.arange(1, 21, 2)])[:, None].expand(3, 2, 1, 10),
        torch.ones(3, 2, 1, 10, dtype=torch.bool),
    )
    out = method.apply(memory, per_head, AttentionQuery(q))
    torch.testing.assert_close(out, sparse_attention(q, kv, per_head), **TOL)
    mask = torch.zeros(3, 1, 1, 100, dtype=torch.bool)
    mask[..., [2, 3, 5, 50]] = True
    bitmap = Bitmap(mask)
    out = method.apply(memory, bitmap, AttentionQuery(q))
    torch.testing.assert_close(out, sparse_attention(q, kv, bitmap.to_topk()), **TOL)
    q2 = torch.randn(3, 8, 2, 16)
    query2 = AttentionQuery(q2)
    sel2 = method.retrieve(method.relevancy(memory, query2), 20)
    torch.testing.assert_close(method.apply(memory, sel2, query2), sparse_attention(q2, kv, sel2))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_query_dtype_wider_than_the_cache(layout):
    method = get("dsa", kv_layout=layout)
    kv = make_kv()
    memory = method.prepare(kv)
    q = torch.randn(3, 8, 1, 16, dtype=torch.float64)
    query = AttentionQuery(q)
    selection = method.retrieve(method.relevancy(memory, query), 30)
    out = method.apply(memory, selection, query)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, sparse_attention(q, kv, selection))


def test_token_copy_matches_the_cache_and_grows_without_rebuilds():
    method = get("dsa", kv_layout="token")
    memory = method.prepare(make_kv(tokens=256, lengths=(256, 256, 256)))
    buffers = set()
    for _ in range(50):
        method.append(memory, KVChunk(torch.randn(3, 2, 1, 16), torch.randn(3, 2, 1, 16)))
        buffers.add(memory.token_keys.buffer.data_ptr())
    assert len(buffers) <= 1  # 256 -> 512 on the first append, then in place
    kv = memory.kv
    b, h, s, d = kv.keys.shape
    rows = memory.token_keys.data
    torch.testing.assert_close(rows[:, :, : h * d].view(b, s, h, d), kv.keys.transpose(1, 2))
    assert (rows[:, :, h * d :] == 0).all()
    # Keys only (the values are summed straight from the cache): half the KV cache's bytes.
    keys_bytes = kv._keys.buffer.numel() * 4
    pad_bytes = b * kv._keys.buffer.shape[2] * 64  # one cache line per row of keys
    assert memory.token_copy_nbytes == keys_bytes + pad_bytes
    assert get("dsa").prepare(make_kv()).token_copy_nbytes == 0


def test_token_copy_moves_with_the_memory():
    method = get("dsa", kv_layout="token")
    memory = method.prepare(make_kv()).to(torch.device("cpu"))
    assert memory.token_keys is not None
    query = AttentionQuery(torch.randn(3, 8, 1, 16))
    selection = method.retrieve(method.relevancy(memory, query), 20)
    torch.testing.assert_close(
        method.apply(memory, selection, query), sparse_attention(query.q, memory.kv, selection)
    )


def test_nan_padding_stays_out_of_the_token_copy():
    keys, values = torch.randn(2, 2, 40, 8), torch.randn(2, 2, 40, 8)
    keys[1, :, 10:] = float("nan")
    values[1, :, 10:] = float("nan")
    kv = KVCache(keys, values, torch.tensor([40, 10]))
    method = get("dsa", kv_layout="token")
    memory = method.prepare(kv)
    query = AttentionQuery(torch.randn(2, 4, 1, 8))
    selection = TopK(
        torch.arange(40).expand(2, 1, 1, 40).contiguous(), torch.ones(2, 1, 1, 40, dtype=bool)
    )
    out = method.apply(memory, selection, query)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, dense_attention(query.q, kv), **TOL)


def test_unknown_kv_layout_is_rejected():
    with pytest.raises(InputError, match=r"^kv_layout"):
        DSA(kv_layout="rows")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_non_contiguous_query(layout):
    """A model's query is often a transposed view ([B, T, H, D] -> [B, H, T, D])."""
    method = get("dsa", kv_layout=layout)
    kv = make_kv()
    memory = method.prepare(kv)
    q = torch.randn(3, 16, 8, 1).permute(0, 2, 3, 1)  # [3, 8, 1, 16], head dim strided
    assert not q.is_contiguous()
    query = AttentionQuery(q)
    selection = method.retrieve(method.relevancy(memory, query), 30)
    out = method.apply(memory, selection, query)
    torch.testing.assert_close(out, sparse_attention(q.contiguous(), kv, selection), **TOL)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_many_tiles_and_a_partial_last_tile(layout, monkeypatch):
    """Tiles of 1-3 tokens: the gather buffer is reused tile after tile and across calls,
    and the last, shorter tile is gathered into its prefix."""
    monkeypatch.setattr(dsa, "TILE_BYTES", 384)
    monkeypatch.setattr(attention, "SMALL_APPLY", 0)  # these few tokens take the tiles too
    method = get("dsa", kv_layout=layout)
    memory = method.prepare(make_kv())
    grow(method, memory)
    query = AttentionQuery(torch.randn(3, 8, 1, 16))
    for budget in (41, 7):
        selection = method.retrieve(method.relevancy(memory, query), budget)
        out = method.apply(memory, selection, query)
        torch.testing.assert_close(out, sparse_attention(query.q, memory.kv, selection), **TOL)
    assert len(memory.workspace) == 1  # one keys buffer, kept


@pytest.mark.parametrize("trained", [False, True])  # equal head weights; learned ones (ww)
def test_relevancy_over_chunks_equals_the_whole_logits(monkeypatch, trained):
    """A long context's Relevancy scores its indexer keys a chunk at a time (a reused
    buffer); the scores equal those of the whole [B, S, T*H] logits at once, bit for bit,
    padding and a query before its row's end included."""
    gen = torch.Generator().manual_seed(5)
    kv = KVCache(
        torch.randn(2, 2, 2600, 16, generator=gen),
        torch.randn(2, 2, 2600, 16, generator=gen),
        torch.tensor([2600, 1900]),
    )
    weights = dsa.IndexerWeights(
        torch.randn(4 * 16, 4 * 8, generator=gen),
        torch.randn(2 * 16, 8, generator=gen),
        torch.randn(4 * 16, 4, generator=gen) if trained else None,
        heads=4,
    )
    method = DSA(weights)
    memory = method.prepare(kv)
    query = AttentionQuery(
        torch.randn(2, 4, 2, 16, generator=gen), torch.tensor([[2598, 2599], [1200, 1899]])
    )
    whole = method.relevancy(memory, query).values
    monkeypatch.setattr(dsa, "CHUNK_BYTES", 1)  # 1024-token chunks: 3 of them
    assert dsa._chunk_tokens(2, 8) == 1024
    chunked = method.relevancy(memory, query).values
    assert torch.equal(chunked, whole)
    assert ("index_logits", torch.float32, kv.device) in memory.workspace


def _indexed(index_dtype, tokens=3000, seed=7):
    """A DSA memory with its own index (Fk > Di: not folded) and a decode query."""
    gen = torch.Generator().manual_seed(seed)
    kv = KVCache(
        torch.randn(2, 2, tokens, 16, generator=gen),
        torch.randn(2, 2, tokens, 16, generator=gen),
        torch.tensor([tokens, tokens // 2]),
    )
    weights = dsa.IndexerWeights(
        torch.randn(4 * 16, 4 * 8, generator=gen),
        torch.randn(2 * 16, 8, generator=gen),
        None,
        heads=4,
    )
    method = DSA(weights, index_dtype=index_dtype)
    query = AttentionQuery(torch.randn(2, 4, 1, 16, generator=gen))
    return method, method.prepare(kv), query


@pytest.mark.parametrize("name", ["bfloat16", torch.bfloat16, torch.float16])
def test_a_narrow_index_halves_the_bytes_and_keeps_the_selection(name, monkeypatch):
    """index_dtype stores the indexer keys narrower (DeepSeek-V3.2 keeps FP8 indexer keys):
    half the bytes, appends stored alike, scores in float32 and within the rounding of the
    float32 index's, the top-k nearly the same; the chunked Relevancy equals the whole."""
    method, memory, query = _indexed(name)
    wide_method, wide_memory, _ = _indexed(None)
    assert memory.keys.data.dtype == method.index_dtype != torch.float32
    assert memory.index_nbytes * 2 == wide_memory.index_nbytes
    torch.manual_seed(1)
    grow(method, memory)
    torch.manual_seed(1)  # the same appended rows
    grow(wide_method, wide_memory)
    assert memory.keys.data.dtype == method.index_dtype  # appends keep the index's dtype
    narrow = method.relevancy(memory, query).values
    wide = wide_method.relevancy(wide_memory, query).values
    assert narrow.dtype == torch.float32
    assert not torch.equal(narrow, wide)  # the index really is narrower
    seen = wide.isfinite()
    assert torch.equal(narrow.isfinite(), seen)
    top = wide[seen].abs().max()
    assert (narrow[seen] - wide[seen]).abs().max() < 0.02 * top
    k = 256
    picked = narrow.topk(k, -1).indices.sort(-1).values
    ref = wide.topk(k, -1).indices.sort(-1).values
    overlap = sum(
        len(set(a.tolist()) & set(b.tolist()))
        for a, b in zip(picked.reshape(-1, k), ref.reshape(-1, k), strict=True)
    )
    assert overlap >= 0.95 * picked.numel()
    # A long context's chunks run the matmul in the index's dtype, every chunk 1024 tokens
    # (the last one overlapping the one before): the same scores within the rounding.
    monkeypatch.setattr(dsa, "CHUNK_BYTES", 1)
    chunked = method.relevancy(memory, query).values
    assert torch.equal(chunked.isfinite(), seen)
    assert (chunked[seen] - wide[seen]).abs().max() < 0.02 * top
    assert ("index_logits_narrow", method.index_dtype, torch.device("cpu")) in memory.workspace


def test_a_narrow_index_at_full_budget_equals_dense():
    method, memory, query = _indexed("bfloat16", tokens=300)
    selection = method.retrieve(method.relevancy(memory, query), 300)
    out = method.apply(memory, selection, query)
    torch.testing.assert_close(out, dense_attention(query.q, memory.kv), **TOL)


@pytest.mark.parametrize("bad", ["int8", torch.int8, 3, "float99"])
def test_a_bad_index_dtype_is_refused(bad):
    with pytest.raises(InputError, match="index_dtype"):
        DSA(index_dtype=bad)
