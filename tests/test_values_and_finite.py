"""Values with a head dim of their own (MLA's shape) work end to end, and NaN or Inf in keys,
values or queries is one named `InputError` at the edge, the same for every method."""

from __future__ import annotations

import pytest
import torch

from hetmem.attention import AttentionQuery, KVCache, KVChunk, dense_attention
from hetmem.errors import InputError
from hetmem.methods import get
from hetmem.pipeline import Pipeline

METHODS = {
    "quest": lambda: get("quest", page_size=16),
    "dsa": lambda: get("dsa"),
    "seer": lambda: get("seer", block_size=16),
}
PLACEMENTS = {"cpu": ("cpu/cpu/cpu/cpu", None), "emu": ("cpu/fpga/fpga/cpu", "emu")}


def cache(dk=16, dv=32, lengths=(256, 200), seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, 2, 256, dk, generator=gen)
    values = torch.randn(2, 2, 256, dv, generator=gen)
    return KVCache(keys, values, lengths=torch.tensor(lengths))


def query(dk=16, seed=1):
    return AttentionQuery(torch.randn(2, 8, 1, dk, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("where", list(PLACEMENTS))
@pytest.mark.parametrize("method", list(METHODS))
def test_values_with_their_own_head_dim(method, where):
    placement, fpga = PLACEMENTS[where]
    pipe = Pipeline(METHODS[method](), placement, fpga=fpga)
    kv = cache()
    pipe.prepare(kv)
    q = query()
    sparse = pipe.step(q, 64)
    assert sparse.shape == (2, 8, 1, 32)  # the values' dim, not the keys'
    full = pipe.step(q, 256)
    torch.testing.assert_close(full, dense_attention(q.q, pipe.memory.kv), rtol=1e-5, atol=1e-5)
    gen = torch.Generator().manual_seed(2)
    pipe.append(
        KVChunk(torch.randn(2, 2, 3, 16, generator=gen), torch.randn(2, 2, 3, 32, generator=gen))
    )
    assert pipe.step(q, 64).shape == (2, 8, 1, 32)
    torch.testing.assert_close(
        pipe.step(q, 512), dense_attention(q.q, pipe.memory.kv), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(InputError, match=r"values: expected shape \(2, 2, 1, 32\)"):
        pipe.append(KVChunk(torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16)))


def test_nan_or_inf_in_a_cache_is_named():
    keys, values = torch.randn(2, 2, 64, 16), torch.randn(2, 2, 64, 16)
    bad = keys.clone()
    bad[1, 0, 5, 3] = float("inf")
    with pytest.raises(InputError, match="keys: contains NaN or Inf"):
        KVCache(bad, values)
    bad = values.clone()
    bad[0, 1, 7, 0] = float("nan")
    with pytest.raises(InputError, match="values: contains NaN or Inf"):
        KVCache(keys, bad)
    padded = keys.clone()
    padded[1, :, 40:] = float("nan")  # padding past the row's length may hold anything
    kv = KVCache(padded, values, lengths=torch.tensor([64, 40]))
    assert bool(torch.isfinite(kv.keys).all())


@pytest.mark.parametrize("where", list(PLACEMENTS))
@pytest.mark.parametrize("method", list(METHODS))
def test_nan_or_inf_is_one_input_error_for_every_method(method, where):
    placement, fpga = PLACEMENTS[where]
    pipe = Pipeline(METHODS[method](), placement, fpga=fpga)
    pipe.prepare(cache(dv=16))
    q = query()
    before = pipe.step(q, 64)
    lengths = pipe.memory.kv.lengths.clone()
    for name, value in (("keys", float("inf")), ("values", float("nan"))):
        chunk = [torch.randn(2, 2, 2, 16), torch.randn(2, 2, 2, 16)]
        chunk[name == "values"][1, 1, 0, 4] = value
        with pytest.raises(InputError, match=f"{name}: contains NaN or Inf"):
            pipe.append(KVChunk(*chunk))
        assert torch.equal(pipe.memory.kv.lengths, lengths)  # nothing appended
    bad = q.q.clone()
    bad[0, 3, 0, 1] = float("nan")
    with pytest.raises(InputError, match="query: contains NaN or Inf"):
        pipe.step(AttentionQuery(bad), 64)
    assert torch.equal(pipe.step(q, 64), before)  # the memory is as it was
