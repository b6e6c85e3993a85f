"""Property: the Quest page bound is never below the true maximum score in its page."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hetmem.attention import AttentionQuery, KVCache
from hetmem.methods import get


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    page=st.sampled_from([1, 3, 8, 16]),
    tokens=st.integers(1, 70),
    dim=st.integers(1, 12),
    groups=st.sampled_from([1, 2, 4]),
    scale=st.floats(0.01, 100.0),
)
def test_quest_bound_dominates_every_key_in_the_page(seed, page, tokens, dim, groups, scale):
    gen = torch.Generator().manual_seed(seed)
    kv_heads = 2
    keys = torch.randn(2, kv_heads, tokens, dim, generator=gen, dtype=torch.float64) * scale
    lengths = torch.tensor([tokens, max(1, tokens // 2)])
    kv = KVCache(keys, torch.zeros_like(keys), lengths)
    q = torch.randn(2, kv_heads * groups, 1, dim, generator=gen, dtype=torch.float64) * scale
    method = get("quest", page_size=page, per_query_head=True)
    memory = method.prepare(kv)
    bounds = method.relevancy(memory, AttentionQuery(q)).values[:, :, 0]  # [B, Hq, P]
    true = (q @ keys.repeat_interleave(groups, 1).transpose(-1, -2))[:, :, 0]  # [B, Hq, S]
    for b in range(2):
        n = int(lengths[b])
        page_of = torch.arange(n) // page
        # max over each page of the true scores, per head
        best = torch.full((q.shape[1], bounds.shape[-1]), float("-inf"), dtype=torch.float64)
        best = best.scatter_reduce(1, page_of.expand(q.shape[1], -1), true[b, :, :n], "amax")
        seen = torch.isfinite(best)
        slack = 1e-9 * (1 + best.abs())
        assert (bounds[b][seen] >= best[seen] - slack[seen]).all()
