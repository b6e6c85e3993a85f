"""Quest's pages kept current token by token (`page_bounds_step`, `BlockSummary.append_token`):
after every decode append the page summaries equal those of a memory prepared from the whole
cache, to the bit, across page boundaries, for float32 and bf16 keys; appends that are not a
decode step (several tokens, rows of different lengths) take the block reduction."""

import pytest
import torch

from hetmem.attention import KVCache, KVChunk
from hetmem.methods import get
from hetmem.methods._attention import BlockSummary


def _fresh(memory, method):
    """The summaries of a memory prepared from the same cache from scratch."""
    return method.prepare(memory.kv).summaries


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [16, 21, 31])
def test_token_by_token_equals_a_prepared_memory(dtype, length):
    gen = torch.Generator().manual_seed(length)
    method = get("quest", page_size=8)
    keys = torch.randn(2, 3, length, 16, generator=gen).to(dtype)
    memory = method.prepare(KVCache(keys, torch.randn_like(keys)))
    steps = []
    original = BlockSummary.append_token
    BlockSummary.append_token = lambda self, kv, pos: steps.append(pos) or original(self, kv, pos)
    try:
        for _ in range(19):  # crosses two page boundaries whatever the start
            new = torch.randn(2, 3, 1, 16, generator=gen).to(dtype)
            method.append(memory, KVChunk(new, torch.randn_like(new)))
            assert torch.equal(memory.summaries, _fresh(memory, method))
    finally:
        BlockSummary.append_token = original
    assert steps == list(range(length, length + 19))
    assert any(p % 8 == 0 for p in steps) and any(p % 8 for p in steps)


def test_other_appends_take_the_block_reduction():
    gen = torch.Generator().manual_seed(1)
    method = get("quest", page_size=8)
    keys = torch.randn(2, 3, 13, 16, generator=gen)
    memory = method.prepare(KVCache(keys, torch.randn_like(keys), torch.tensor([13, 9])))
    assert not memory.kv.full
    new = torch.randn(2, 3, 1, 16, generator=gen)
    method.append(memory, KVChunk(new, torch.randn_like(new)))  # rows of different lengths
    method.append(memory, KVChunk(torch.randn(2, 3, 3, 16), torch.randn(2, 3, 3, 16)))
    assert torch.equal(memory.summaries, _fresh(memory, method))
