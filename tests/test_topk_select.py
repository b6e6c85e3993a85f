"""`topk_select`'s contract on both of its paths (a partial top-k for a few of many scores,
a stable sort for a large share or few scores in all): the k highest scores' indices ascending, ties to the lower index,
-inf picks invalid; equal to one stable descending sort on every input."""

import pytest
import torch

from hetmem import selection
from hetmem.errors import InputError
from hetmem.selection import topk_select


@pytest.fixture(params=["partial", "sort"], autouse=True)
def path(request, monkeypatch):
    """Every test on both sides of `SMALL_SORT`: "partial" sends every input with 4k <= n to
    the partial top-k, "sort" sends every input to the one stable sort."""
    monkeypatch.setattr(selection, "SMALL_SORT", 0 if request.param == "partial" else 1 << 30)
    return request.param


def reference(scores, k):
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return order.sort(dim=-1).values


@pytest.mark.parametrize("levels", [3, 50, 10**6])  # many ties, some, almost none
@pytest.mark.parametrize("n,k", [(1, 1), (64, 1), (64, 16), (64, 40), (1027, 128), (5000, 7)])
def test_equals_a_stable_sort_with_ties(levels, n, k):
    gen = torch.Generator().manual_seed(n * 31 + k + levels)
    scores = torch.randint(0, levels, (3, 2, n), generator=gen).float()
    indices, valid = topk_select(scores, k)
    assert torch.equal(indices, reference(scores, k))
    assert bool(valid.all())


def test_ties_at_the_kth_score_go_to_the_lower_indices():
    scores = torch.zeros(1, 1, 1, 400)
    scores[..., 390:] = 2.0  # 10 clear winners, then 390 equal scores for 90 places
    indices, _ = topk_select(scores, 100)
    assert indices[0, 0, 0].tolist() == list(range(90)) + list(range(390, 400))


def test_masked_scores_are_picked_last_and_marked_invalid():
    scores = torch.full((2, 1, 1, 500), float("-inf"))
    scores[0, ..., 7] = 1.0
    scores[1, ..., 100:200] = torch.arange(100.0)
    indices, valid = topk_select(scores, 50)
    assert indices[0, 0, 0].tolist() == list(range(50))  # 7, then -inf ones, lowest first
    assert valid[0, 0, 0].tolist() == [i == 7 for i in indices[0, 0, 0].tolist()]
    assert indices[1, 0, 0].tolist() == list(range(150, 200)) and bool(valid[1].all())


@pytest.mark.parametrize("n,k", [(2051, 128), (4096, 512), (300, 64)])
def test_bf16_scores_tie_often_and_still_equal_the_stable_sort(n, k):
    """bf16 keeps 8 bits of mantissa: thousands of scores share values, the k-th's among
    them (the path that fills k from the ties by index, no sort)."""
    gen = torch.Generator().manual_seed(n + k)
    scores = torch.randn(4, 8, 1, n, generator=gen).to(torch.bfloat16)
    kth = scores.float().topk(k, -1).values[..., -1:]
    assert bool(((scores.float() == kth).sum(-1) > 1).any())  # ties at the k-th do occur
    indices, _ = topk_select(scores, k)
    assert torch.equal(indices, reference(scores, k))


@pytest.mark.parametrize("n,k", [(64, 8), (5000, 7), (5000, 2000)])
@pytest.mark.parametrize("where", [0, 3, -1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_scores_are_refused_on_every_path(n, k, where, dtype):
    """NaN is found on the way (the k-th score of a row with NaN is NaN, or its first sorted
    one), not by a pass of its own: whatever the row, the path and the NaN's place."""
    scores = torch.randn(2, 3, 1, n).to(dtype)
    scores[1, 2, 0, where] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        topk_select(scores, k)
    scores[1, 2, 0, where] = 0.0
    assert torch.equal(topk_select(scores, k)[0], reference(scores, k))
