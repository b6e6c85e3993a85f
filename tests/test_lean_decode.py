"""The lean decode path: when a step's plan puts every query at the end of rows of equal
length (`StepPlan.at_end`, `KVCache.full`), Relevancy masks nothing, Retrieval knows every
pick is valid, Apply builds no mask (only a partial last unit's tokens past the end are
hidden) and an append writes one slice. Its outputs equal the masked path's exactly, over
cache layouts whose buffers are and are not whole units, for every attention method."""

from __future__ import annotations

import pytest
import torch

import hetmem.attention as hetmem_attention
import hetmem.methods._attention as attention_methods
from hetmem.attention import AttentionQuery, Growth, KVCache, KVChunk, dense_attention
from hetmem.methods import get
from hetmem.pipeline import Pipeline
from hetmem.plan import StepPlan

METHODS = {
    "quest": lambda: get("quest", page_size=8),
    "seer": lambda: get("seer", block_size=8),
    "dsa": lambda: get("dsa"),
}


def decode(method, length, growth, budget, batch=1, steps=6, seed=0):
    """Outputs of `steps` decode steps (append one token, then select and attend)."""
    gen = torch.Generator().manual_seed(seed)
    kv = KVCache(
        torch.randn(batch, 2, length, 16, generator=gen),
        torch.randn(batch, 2, length, 16, generator=gen),
        growth=growth,
    )
    pipe = Pipeline(METHODS[method](), "cpu/cpu/cpu/cpu")
    pipe.prepare(kv)
    outs = []
    for _ in range(steps):
        pipe.append(
            KVChunk(
                torch.randn(batch, 2, 1, 16, generator=gen),
                torch.randn(batch, 2, 1, 16, generator=gen),
            )
        )
        q = torch.randn(batch, 4, 1, 16, generator=gen)
        plan = StepPlan.decode(pipe.memory.kv.lengths, budget)
        outs.append(pipe.decode(AttentionQuery(q, plan.positions, None, plan), plan))
        if budget >= length + steps:
            torch.testing.assert_close(outs[-1], dense_attention(q, pipe.memory.kv))
    return outs, pipe


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("growth", [None, "unit"])
@pytest.mark.parametrize("length", [27, 32, 40, 61])
@pytest.mark.parametrize("budget", [16, 24, 128])
@pytest.mark.parametrize("apply", ["tiled", "small"])
def test_the_lean_path_equals_the_masked_path(method, growth, length, budget, apply, monkeypatch):
    """Equal to the bit on both Apply paths: the tiled one (chunks of gathered keys, a fused
    value sum) and the small one (one sdpa over the gathered rows), each taken by the lean
    and the masked path alike."""
    unit = METHODS[method]().unit
    growth = Growth(align=unit) if growth == "unit" else None
    if apply == "tiled":
        monkeypatch.setattr(hetmem_attention, "SMALL_APPLY", 0)
    taken, whole, one_row = [], [], []
    small, lean_attention = hetmem_attention._small_attention, hetmem_attention._lean_attention
    row = hetmem_attention._one_row_attention
    monkeypatch.setattr(
        hetmem_attention, "_small_attention", lambda *a, **k: taken.append(1) or small(*a, **k)
    )
    monkeypatch.setattr(
        hetmem_attention, "_one_row_attention", lambda *a: one_row.append(1) or row(*a)
    )

    def lean_spy(q, kv, selection, *rest):
        whole.append(kv._keys.buffer.shape[2] % selection.unit == 0)
        return lean_attention(q, kv, selection, *rest)

    monkeypatch.setattr(hetmem_attention, "_lean_attention", lean_spy)
    lean_steps, lean_step = [], attention_methods.SparseAttentionMethod.lean_step

    def step_spy(self, *args):
        lean_steps.append(lean_step(self, *args))
        return lean_steps[-1]

    monkeypatch.setattr(attention_methods.SparseAttentionMethod, "lean_step", step_spy)
    lean, pipe = decode(method, length, growth, budget)
    assert pipe.memory.kv.full
    # The small path serves every lean step here (at most 128 tokens) unless turned off,
    # over buffers laid out in whole units (unit rows, a partial last unit's tail hidden)
    # and not (bounded growth: token rows, those past the end hidden); a step at B=1 with
    # nothing to hide (DSA's tokens always) takes its one-row form.
    assert len(whole) == 6 and (growth is not None or all(whole))
    assert len(taken) + len(one_row) == (0 if apply == "tiled" else 6)
    if method == "dsa":
        assert len(one_row) == (0 if apply == "tiled" else 6)
    monkeypatch.setattr(attention_methods.SparseAttentionMethod, "sees_all", lambda *a: False)
    monkeypatch.setattr(attention_methods.SparseAttentionMethod, "unmasked", lambda *a: False)
    assert len(lean_steps) == 6  # the lean path: every step in `lean_step`
    lean_rows = len(one_row)
    masked, _ = decode(method, length, growth, budget)
    # the masked path takes the small path too, never the one-row form
    assert len(one_row) == lean_rows
    assert len(taken) + lean_rows == (0 if apply == "tiled" else 12)
    assert len(lean_steps) == 12 and lean_steps[6:] == [None] * 6  # the masked path's: none
    assert all(s is not None for s in lean_steps[:6])
    for a, b in zip(lean, masked, strict=True):
        assert torch.equal(a, b)


def test_the_lean_path_is_taken_only_when_nothing_needs_a_mask(monkeypatch):
    """A full cache's decode step runs as one `lean_step`; rows of different lengths (a
    padding mask) take the three steps, whose `unmasked` says False."""
    steps, masks = [], []
    lean_step = attention_methods.SparseAttentionMethod.lean_step
    unmasked = attention_methods.SparseAttentionMethod.unmasked

    def step_spy(self, *args):
        steps.append(lean_step(self, *args))
        return steps[-1]

    def mask_spy(self, *args):
        masks.append(unmasked(self, *args))
        return masks[-1]

    monkeypatch.setattr(attention_methods.SparseAttentionMethod, "lean_step", step_spy)
    monkeypatch.setattr(attention_methods.SparseAttentionMethod, "unmasked", mask_spy)
    _, lean = decode("quest", 40, None, 16, batch=1, steps=2)
    assert len(steps) == 2 and all(s is not None for s in steps) and masks == []
    records = lean.profile.records  # the same accounting as the three steps'
    assert [r.step for r in records] == ["relevancy", "retrieval", "apply"]
    assert all(r.seconds > 0 and r.nbytes > 0 and r.source == "measured" for r in records)
    steps.clear()
    gen = torch.Generator().manual_seed(1)
    kv = KVCache(
        torch.randn(2, 2, 40, 16, generator=gen),
        torch.randn(2, 2, 40, 16, generator=gen),
        lengths=torch.tensor([40, 33]),
    )
    pipe = Pipeline(METHODS["quest"](), "cpu/cpu/cpu/cpu")
    pipe.prepare(kv)
    assert not pipe.memory.kv.full
    pipe.step(AttentionQuery(torch.randn(2, 4, 1, 16, generator=gen)), 16)
    assert steps == [None] and masks == [False]  # rows of different lengths: the masked path
    assert [r.step for r in pipe.profile.records] == ["relevancy", "retrieval", "apply"]


def test_full_follows_the_lengths():
    kv = KVCache(torch.randn(2, 2, 10, 4), torch.randn(2, 2, 10, 4))
    assert kv.full
    kv.append(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4))
    assert kv.full and kv.lengths.tolist() == [11, 11]
    kv.truncate(torch.tensor([11, 7]))
    assert not kv.full
    kv.append(torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4))
    assert kv.lengths.tolist() == [15, 11] and not kv.full
    kv.select_rows(torch.tensor([0, 0]))
    assert kv.full and kv.lengths.tolist() == [15, 15]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("length", [40, 255, 300])
def test_dsa_one_query_relevancy_equals_the_general_one(dtype, index_dtype, length, monkeypatch):
    """DSA's Relevancy of a decode step at B=1 over its own index (KV rows wider than the
    indexer keys: not folded) takes its few-operator form, whose scores equal the general
    form's to the bit, over index lengths across the padded matmul's shape quantum."""
    from hetmem.methods.dsa import DSA

    gen = torch.Generator().manual_seed(length)
    kv = KVCache(
        torch.randn(1, 2, length, 128, generator=gen).to(dtype),
        torch.randn(1, 2, length, 128, generator=gen).to(dtype),
    )
    method = DSA(index_dtype=index_dtype)
    memory = method.prepare(kv)
    assert memory.keys is not None  # 2 x 128 channels > 128 indexer dims: an index of its own
    taken = []
    fast = DSA._one_query_scores

    def spy(self, *args):
        taken.append(fast(self, *args))
        return taken[-1]

    monkeypatch.setattr(DSA, "_one_query_scores", spy)
    for step in range(3):
        method.append(memory, KVChunk(*(torch.randn(1, 2, 1, 128, generator=gen).to(dtype),) * 2))
        plan = StepPlan.decode(memory.kv.lengths, 16)
        query = AttentionQuery(torch.randn(1, 4, 1, 128, generator=gen).to(dtype), None, None, plan)
        lean = method.relevancy(memory, query)
        assert taken[-1] is not None
        monkeypatch.setattr(DSA, "_one_query_scores", lambda *a: None)
        general = method.relevancy(memory, query)
        monkeypatch.setattr(DSA, "_one_query_scores", spy)
        assert lean.values.shape == general.values.shape == (1, 1, 1, length + step + 1)
        assert torch.equal(lean.values, general.values) and lean.masked == general.masked


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("ties", [False, True])
def test_dsa_lean_step_equals_the_general_step(dtype, index_dtype, ties, monkeypatch):
    """DSA's lean decode step at B=1 over its own index (`lean_step` with DSA's one-query
    scores, reached by `Pipeline.lean_decode`) gives the general step's
    output, selection and profile steps, to the bit; scores that tie at the k-th take
    `_top_indices`' slow path in both."""
    from hetmem.methods.dsa import DSA

    steps, one_query = [], []  # each lean step's result; each one-query scoring's
    step, scores = attention_methods.SparseAttentionMethod.lean_step, DSA._one_query_scores
    monkeypatch.setattr(
        attention_methods.SparseAttentionMethod,
        "lean_step",
        lambda *a: steps.append(step(*a)) or steps[-1],
    )
    monkeypatch.setattr(
        DSA, "_one_query_scores", lambda *a: one_query.append(scores(*a)) or one_query[-1]
    )

    def pipeline(lean: bool):
        gen = torch.Generator().manual_seed(3)
        keys, values = (torch.randn(1, 2, 300, 128, generator=gen).to(dtype) for _ in range(2))
        if ties:  # every key the same: every score equal, a tie straddles the k-th
            keys = torch.ones_like(keys)
        kv = KVCache(keys, values)
        method = DSA(index_dtype=index_dtype)
        if not lean:  # the three steps, as a masked step runs them, after `append`'s own
            method.lean_step = lambda *a: None
            method.lean_append = lambda *a: False
        pipe = Pipeline(method, "cpu/cpu/cpu/cpu")
        pipe.prepare(kv)
        return pipe

    lean, general = pipeline(True), pipeline(False)
    gen = torch.Generator().manual_seed(4)
    for _ in range(4):
        k, v = (torch.randn(1, 2, 1, 128, generator=gen).to(dtype) for _ in range(2))
        k = torch.ones_like(k) if ties else k
        q = torch.randn(1, 4, 1, 128, generator=gen).to(dtype)
        out = lean.lean_decode(k, v, q, None, lambda kv: StepPlan.decode(kv.lengths, 64))
        general.append(KVChunk(k, v))
        plan = StepPlan.decode(general.memory.kv.lengths, 64)
        expected = general.decode(AttentionQuery(q, plan.positions, None, plan), plan)
        assert torch.equal(out, expected)
        assert torch.equal(lean.last_selection.indices, general.last_selection.indices)
        assert [r.step for r in lean.profile.records] == ["relevancy", "retrieval", "apply"]
        assert [r.step for r in lean.history[-2].records] == ["append"]
        assert torch.equal(lean.memory.keys.data, general.memory.keys.data)
    # every step lean (the general run's lean calls are off), over DSA's one-query scores,
    # which the general run's Relevancy takes too
    assert len(steps) == 4 and all(r is not None for r in steps)
    assert len(one_query) == 8 and all(r is not None for r in one_query)
    if ties:  # the lowest indices fill the budget
        assert lean.last_selection.indices.flatten().tolist() == list(range(64))
