"""Threads: a `Pipeline` serializes its calls (steps from several threads each return what
they would alone; a step beside an append sees the memory before or after it, never half of
it); the caches of one wrapped model run side by side in threads; one cache used by two
threads at once is refused with `ConcurrentUse`."""

from __future__ import annotations

import threading

import pytest
import torch

from hetmem.attention import AttentionQuery, KVChunk
from hetmem.errors import ConcurrentUse
from hetmem.methods import get
from hetmem.pipeline import Pipeline
from hetmem.synthetic import synthetic_kv

METHODS = {
    "quest": lambda: get("quest", page_size=16),
    "dsa": lambda: get("dsa"),
    "seer": lambda: get("seer", block_size=16),
}


def run_threads(work, count):
    """Run work(i) on `count` threads started together; re-raise the first error."""
    errors, barrier = [], threading.Barrier(count)

    def body(i):
        try:
            barrier.wait()
            work(i)
        except BaseException as exc:  # handed to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a thread hung"
    if errors:
        raise errors[0]


def queries(count, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [AttentionQuery(torch.randn(2, 8, 1, 64, generator=gen)) for _ in range(count)]


@pytest.mark.parametrize("fpga", [None, "emu"])
@pytest.mark.parametrize("method", list(METHODS))
def test_steps_from_several_threads_equal_the_sequential_ones(method, fpga):
    kv, _ = synthetic_kv(length=1024, lengths=[1024, 700], seed=1)
    placement = "cpu/fpga/fpga/cpu" if fpga else "cpu/cpu/cpu/cpu"
    pipe = Pipeline(METHODS[method](), placement, fpga=fpga)
    pipe.prepare(kv)
    qs = queries(24)
    expected = [pipe.step(q, 128) for q in qs]
    got: list = [None] * len(qs)

    def work(i):
        for j in range(i, len(qs), 4):
            got[j] = pipe.step(qs[j], 128)

    for _ in range(3):
        run_threads(work, 4)
        for e, g in zip(expected, got, strict=True):
            assert torch.equal(e, g)


@pytest.mark.parametrize("fpga", [None, "emu"])
def test_a_step_beside_an_append_sees_whole_appends(fpga):
    """One thread appends tokens while others step: no error, and each step's output is
    the output of a sequential twin at some number of whole appends."""
    kv, _ = synthetic_kv(length=512, lengths=[512, 400], seed=2)
    twin_kv, _ = synthetic_kv(length=512, lengths=[512, 400], seed=2)
    placement = "cpu/fpga/fpga/cpu" if fpga else "cpu/cpu/cpu/cpu"
    pipe = Pipeline(get("quest", page_size=16), placement, fpga=fpga)
    twin = Pipeline(get("quest", page_size=16), placement, fpga=fpga)
    pipe.prepare(kv)
    twin.prepare(twin_kv)
    gen = torch.Generator().manual_seed(3)
    chunks = [
        KVChunk(torch.randn(2, 2, 3, 64, generator=gen), torch.randn(2, 2, 3, 64, generator=gen))
        for _ in range(12)
    ]
    (query,) = queries(1, seed=4)
    outs = [twin.step(query, 64)]
    for chunk in chunks:
        twin.append(chunk)
        outs.append(twin.step(query, 64))
    seen = []

    def work(i):
        if i == 0:
            for chunk in chunks:
                pipe.append(chunk)
        else:
            for _ in range(8):
                seen.append(pipe.step(query, 64))

    run_threads(work, 3)
    assert pipe.memory.kv.lengths.tolist() == [512 + 36, 400 + 36]
    assert torch.equal(pipe.step(query, 64), outs[-1])
    for out in seen:
        assert any(torch.equal(out, o) for o in outs)


def test_two_caches_of_one_wrapped_model_decode_side_by_side():
    pytest.importorskip("transformers")
    from hetmem.models import wrap
    from test_wrap import generate, left_pad, prompts, tiny

    model = tiny()
    wrap(model, "quest", budget=16, method_options={"page_size": 8},
         placement="cpu/fpga/fpga/cpu", fpga="emu")  # fmt: skip
    batches = [left_pad(prompts(40, 33, seed=s)) for s in range(4)]
    expected = [generate(model, ids, mask).sequences for ids, mask in batches]
    got: list = [None] * len(batches)

    def work(i):
        ids, mask = batches[i]
        got[i] = generate(model, ids, mask).sequences

    run_threads(work, len(batches))
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)


def test_one_cache_used_by_two_threads_at_once_is_refused():
    pytest.importorskip("transformers")
    from hetmem.models import HetmemCache, wrap
    from test_wrap import tiny

    model = tiny()
    wrap(model, "quest", budget=16, method_options={"page_size": 8})
    cache = HetmemCache(model._hetmem_wrap.settings)
    states = torch.randn(1, 2, 4, 16)
    entered, release = threading.Event(), threading.Event()

    def owner():
        cache.layers[0].update(states, states)  # a forward begins: layer 0 updated
        entered.set()
        release.wait(30)

    thread = threading.Thread(target=owner)
    thread.start()
    try:
        assert entered.wait(30)
        with pytest.raises(ConcurrentUse, match="give each thread its own"):
            cache.layers[1].update(states, states)
    finally:
        release.set()
        thread.join()
    cache.layers[1].update(states, states)  # the owner is gone: the cache is free
