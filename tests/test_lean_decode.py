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
from native_ops import one_row_path

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
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("path", ["python", "native"])
def test_dsa_lean_steps_equal_the_general_step(dtype, index_dtype, ties, path, monkeypatch):
    """DSA's lean decode at B=1 over its own index, both ways `Pipeline.lean_decode` takes
    it (the one-row step, `lean_one`, on the Python path or hetmem's native ops, and the
    planned one, `lean_step`, each over DSA's one-row scores), gives the general step's
    output, selection, index and profile steps, to the bit; scores that tie at the k-th
    take `_top_indices`' slow path on the Python path, and the native op's scan fills k
    from the ties the same way."""
    from hetmem.methods.dsa import DSA

    native = one_row_path(path, monkeypatch)

    ones, steps, rows = [], [], []  # each lean_one's, lean_step's, one-row scoring's result
    one, step = attention_methods.SparseAttentionMethod.lean_one, DSA.lean_step
    scores = DSA._one_row_scores
    monkeypatch.setattr(DSA, "lean_one", lambda *a: ones.append(one(*a)) or ones[-1])
    monkeypatch.setattr(DSA, "lean_step", lambda *a: steps.append(step(*a)) or steps[-1])
    monkeypatch.setattr(DSA, "_one_row_scores", lambda *a: rows.append(scores(*a)) or rows[-1])

    def pipeline(way: str):
        gen = torch.Generator().manual_seed(3)
        keys, values = (torch.randn(1, 2, 300, 128, generator=gen).to(dtype) for _ in range(2))
        if ties:  # every key the same: every score equal, a tie straddles the k-th
            keys = torch.ones_like(keys)
        kv = KVCache(keys, values)
        method = DSA(index_dtype=index_dtype)
        if way != "one":  # the planned lean step
            method.lean_one = lambda *a: None
        if way == "general":  # the three steps, as a masked step runs them, after `append`
            method.lean_step = lambda *a: None
            method.lean_append = lambda *a: False
        pipe = Pipeline(method, "cpu/cpu/cpu/cpu")
        pipe.prepare(kv)
        return pipe

    lean, planned, general = pipeline("one"), pipeline("planned"), pipeline("general")
    gen = torch.Generator().manual_seed(4)
    for _ in range(4):
        k, v = (torch.randn(1, 2, 1, 128, generator=gen).to(dtype) for _ in range(2))
        k = torch.ones_like(k) if ties else k
        q = torch.randn(1, 4, 1, 128, generator=gen).to(dtype)
        outs = [
            pipe.lean_decode(k, v, q, None, lambda kv: StepPlan.decode(kv.lengths, 64), lambda n: 64)
            for pipe in (lean, planned)
        ]  # fmt: skip
        general.append(KVChunk(k, v))
        plan = StepPlan.decode(general.memory.kv.lengths, 64)
        expected = general.decode(AttentionQuery(q, plan.positions, None, plan), plan)
        for out, pipe in zip(outs, (lean, planned), strict=True):
            assert torch.equal(out, expected)
            assert torch.equal(pipe.last_selection.indices, general.last_selection.indices)
            assert [r.step for r in pipe.profile.records] == ["relevancy", "retrieval", "apply"]
            assert [r.step for r in pipe.history[-2].records] == ["append"]
            assert torch.equal(pipe.memory.keys.data, general.memory.keys.data)
            assert torch.equal(pipe.memory.kv.keys, general.memory.kv.keys)
    # every step lean: 4 one-row steps, 4 planned ones; each scored by the one-row scores
    # (the planned step's and the general Relevancy's through `_one_query_scores`)
    assert len(ones) == 4 and all(r is not None for r in ones)
    assert len(steps) == 4 and all(r is not None for r in steps)
    if native is None:
        assert len(rows) == 12
    else:  # the one-row steps scored and selected by the ops (ties too)
        assert len(rows) == 8
        assert native.calls == ["dsa_one_row", "one_row_attend"] * 4
    if ties:  # the lowest indices fill the budget
        assert lean.last_selection.indices.flatten().tolist() == list(range(64))


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("growth", [None, "unit"])
@pytest.mark.parametrize("length", [27, 32, 61])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["python", "native"])
def test_the_one_row_step_equals_the_general_step(method, growth, length, dtype, path, monkeypatch):
    """At one batch row, `Pipeline.lean_decode` runs the method's `lean_one` (append and
    step in one call, no plan), on the Python path or hetmem's native ops: output,
    selection, memory and profile as the general path's (`append`, then `decode` with the
    lean calls off), to the bit, for every attention method over buffers in whole units
    and not."""
    native = one_row_path(path, monkeypatch)
    unit = METHODS[method]().unit
    grow = Growth(align=unit) if growth == "unit" else None
    gen = torch.Generator().manual_seed(length)
    d = 128 if method == "dsa" else 16  # (DSA's own index: KV rows wider than its 128)
    keys, values = (torch.randn(1, 2, length, d, generator=gen).to(dtype) for _ in range(2))

    def pipeline(lean: bool):
        m = METHODS[method]()
        if not lean:
            m.lean_one = m.lean_step = lambda *a: None
            m.lean_append = lambda *a: False
        pipe = Pipeline(m, "cpu/cpu/cpu/cpu")
        pipe.prepare(KVCache(keys.clone(), values.clone(), growth=grow))
        return pipe

    lean, general = pipeline(True), pipeline(False)
    calls = []
    one = lean.method.lean_one
    lean.method.lean_one = lambda *a: calls.append(one(*a)) or calls[-1]
    budget = 16

    def unplanned(kv):
        raise AssertionError("the one-row step needs no plan")

    for _ in range(5):
        k, v = (torch.randn(1, 2, 1, d, generator=gen).to(dtype) for _ in range(2))
        q = torch.randn(1, 4, 1, d, generator=gen).to(dtype)
        out = lean.lean_decode(k, v, q, None, unplanned, lambda n: budget)
        general.append(KVChunk(k, v))
        plan = StepPlan.decode(general.memory.kv.lengths, budget)
        expected = general.decode(AttentionQuery(q, plan.positions, None, plan), plan)
        assert torch.equal(out, expected)
        assert torch.equal(lean.last_selection.indices, general.last_selection.indices)
        assert torch.equal(lean.memory.kv.keys, general.memory.kv.keys)
        assert torch.equal(lean.memory.kv.values, general.memory.kv.values)
        assert [r.step for r in lean.history[-2].records] == ["append"]
        records = lean.profile.records
        assert [r.step for r in records] == ["relevancy", "retrieval", "apply"]
        assert [r.nbytes for r in records] == [r.nbytes for r in general.profile.records]
        assert lean.history[-2].records[0].note == general.history[-2].records[0].note
    assert len(calls) == 5 and all(c is not None for c in calls)
    if native is not None:  # the method's op appended and scored every step
        assert native.calls.count(f"{method}_one_row") == 5
    index = {"quest": "summaries", "seer": "gate_keys", "dsa": None}[method]
    if index is not None:
        assert torch.equal(getattr(lean.memory, index), getattr(general.memory, index))
    else:
        assert torch.equal(lean.memory.keys.data, general.memory.keys.data)


@pytest.mark.parametrize("batch", [1, 3])
def test_a_full_plan_equals_the_decode_plan(batch):
    """`StepPlan.full` (rows of one length, made from the numbers, tensors on first read)
    says what `StepPlan.decode` over the same lengths says."""
    full = StepPlan.full(batch, 37, 16)
    decoded = StepPlan.decode(torch.full((batch,), 37), 16)
    assert full.batch == decoded.batch == batch and full.queries == decoded.queries == 1
    assert full.at_end and decoded.at_end and full.budget == decoded.budget == 16
    assert full.lengths_list == decoded.lengths_list == [37] * batch
    for unit, candidates in ((1, 37), (1, 38), (8, 5), (8, 6)):
        assert full.all_visible(unit, candidates) == decoded.all_visible(unit, candidates)
    assert torch.equal(full.positions, decoded.positions)
    assert torch.equal(full.lengths, decoded.lengths) and full.lengths.dtype == torch.long
    assert torch.equal(full.seen(8), decoded.seen(8))
    assert torch.equal(full.rows(slice(0, 1)).positions, decoded.rows(slice(0, 1)).positions)
    assert full.full_length == 37 and decoded.full_length is None


def test_a_measured_profile_equals_the_profile_of_its_records():
    """`MeasuredProfile` (records made on first read) reads as the `Profile` of the same
    records: records, totals, table, dict, equality both ways, counters."""
    from hetmem.profile import MeasuredProfile, Profile, StepRecord

    lazy = MeasuredProfile("gpu (cpu)", ("append", 2e-5, 96, 41), ("apply", 3e-5, 10, None))
    eager = Profile(
        [
            StepRecord("append", "gpu (cpu)", 2e-5, "measured", 96, "41 entries"),
            StepRecord("apply", "gpu (cpu)", 3e-5, "measured", 10, ""),
        ]
    )
    assert lazy == eager and eager == lazy
    assert lazy.totals() == eager.totals() and lazy.to_dict() == eager.to_dict()
    assert str(lazy) == str(eager)
    lazy.counters["x"] += 1
    assert lazy != eager and lazy.counters == {"x": 1}
    lazy.records.append(StepRecord("more", "gpu (cpu)", 1.0, "modeled"))
    assert lazy.totals()["modeled"] == 1.0
