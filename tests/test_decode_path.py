"""The lean decode path of a wrapped model: one card per model (or layers spread over a few),
HBM accounted per card and bank and checked before anything is written, a typed kernel
binding per method, one plan per step shared by every layer, and at most three PCIe
transactions per layer and step (one query write, one launch, one selection read) whatever
the batch."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from hetmem import plan as plan_module
from hetmem.errors import InputError, PlacementError
from hetmem.fpga.cards import Card, Cards
from hetmem.methods import get
from hetmem.methods.base import KernelBinding
from hetmem.models import unwrap, wrap
from hetmem.models.wrap import cache_kwarg
from hetmem.offload import FpgaStage
from hetmem.selection import budget_units
from test_wrap import METHODS, generate, left_pad, prompts, tiny

HYBRID = "cpu/fpga/fpga/cpu"


def tiny_layers(layers):
    """test_wrap's tiny Llama with more layers (same seed, same shapes otherwise)."""
    from transformers import LlamaForCausalLM

    config = tiny().config
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


#: Sparse: the prompts are longer than the budget, so the card runs every decode step.
BUDGET = 16


def wrapped_run(method, rows, fpga="emu", layers=2, budget=BUDGET, new=4):
    model = tiny() if layers == 2 else tiny_layers(layers)
    wrap(model, method, budget=budget, placement=HYBRID, fpga=fpga, method_options=METHODS[method])
    ids, mask = left_pad(rows)
    out = generate(model, ids, mask, new=new)
    return model, out, getattr(out, cache_kwarg(model))


@pytest.mark.parametrize("method", list(METHODS))
def test_every_layer_shares_one_card_opened_once(method):
    model, out, cache = wrapped_run(method, prompts(40, 33))
    settings = model._hetmem_wrap.settings
    stages = [p.fpga_stage for p in cache.pipelines]
    assert settings.cards.opens == 1  # one device opened (on a card: one xclbin load)
    assert len({id(s.card) for s in stages}) == 1
    device = stages[0].card.device
    # every layer's memory is resident on that one device, each in its own slots
    held = {id(b) for s in stages for b in s.buffers.values()}
    assert len(held) >= len(stages) and all(
        id(b) in {id(x) for x in device._live.values()} for s in stages for b in s.buffers.values()
    )
    assert cache.stats()["sparse_steps"] > 0
    unwrap(model)
    assert settings._cards is None  # unwrap closed the model's card


def test_layers_spread_over_two_cards_decode_like_one():
    rows = prompts(40, 29)
    _, one, _ = wrapped_run("quest", rows, layers=4)
    model, two, cache = wrapped_run("quest", rows, fpga={"target": "emu", "cards": 2}, layers=4)
    cards = model._hetmem_wrap.settings.cards
    assert len(cards) == 2 and cards.opens == 2
    owners = [p.fpga_stage.card for p in cache.pipelines]
    assert owners == [cards[0], cards[0], cards[1], cards[1]]  # contiguous blocks of layers
    for card in cards:
        assert sum(card.device.bank_used()) > 0
    assert torch.equal(one.sequences, two.sequences)  # the cards are bit-exact


def test_a_model_that_does_not_fit_the_card_is_refused_before_anything_is_written():
    # Per layer: 2 rows x 320 rows of capacity x 32-byte int8 indexer keys = 20,480 bytes in
    # bank 0. A card with 30,000-byte banks holds layer 0's slots, not the model's two layers.
    model = tiny()
    wrap(
        model,
        "dsa",
        budget=BUDGET,
        placement=HYBRID,
        fpga={"target": "emu", "bank_bytes": 30_000},
    )
    ids, mask = left_pad(prompts(200, 200))
    with pytest.raises(InputError, match=r"bank 0: needs [\d,]+ bytes, [\d,]+ free") as err:
        generate(model, ids, mask, new=2)
    assert "does not fit the cards' HBM" in str(err.value) and "needs 40,960 bytes" in str(
        err.value
    )
    device = model._hetmem_wrap.settings.cards[0].device
    assert device is None or sum(device.bank_used()) == 0  # nothing was allocated


def test_cards_check_fit_names_every_bank_that_overflows():
    cards = Cards.open({"target": "emu", "bank_bytes": 1000})
    cards.check_fit([{0: 1000, 1: 10}])  # exactly full is fine
    with pytest.raises(InputError, match=r"bank 0: needs 1,001 bytes, 1,000 free; .*bank 3"):
        cards.check_fit([{0: 1001, 3: 5000}])


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("fpga", ["emu", "xrt_emu"])
def test_at_most_three_transactions_per_layer_and_step_whatever_the_batch(method, batch, fpga):
    """On the emulated card and through the xrt driver (its query arguments packed into
    sub-bos of one bo: one write)."""
    _, _, cache = wrapped_run(method, prompts(*[40 + 3 * i for i in range(batch)]), fpga=fpga)
    for pipe in cache.pipelines:
        select = [
            r
            for r in pipe.profile.records
            if r.step
            in ("transfer query -> fpga", "relevancy+retrieval", "transfer selection -> gpu")
        ]
        by_step = {r.step: r.transactions for r in select}
        assert by_step == {
            "transfer query -> fpga": 1,
            "relevancy+retrieval": 1,
            "transfer selection -> gpu": 1,
        }
        launch = next(r for r in select if r.step == "relevancy+retrieval")
        assert "1 launches" in launch.note


def test_one_plan_per_step_shared_by_every_layer(monkeypatch):
    made = []
    original = plan_module.StepPlan.decode

    def counting(lengths, budget, queries=1):
        made.append(budget)
        return original(lengths, budget, queries)

    monkeypatch.setattr(plan_module.StepPlan, "decode", staticmethod(counting))
    model, out, cache = wrapped_run("quest", prompts(40, 33), layers=4, new=4)
    decode_steps = cache.stats()["sparse_steps"] // 4
    assert decode_steps >= 3 and len(made) == decode_steps  # one plan per step, not per layer


def test_the_plan_is_validated_once_at_the_edge(monkeypatch):
    """Inside a planned decode no layer re-validates the query."""
    import hetmem.attention as attention

    calls = []
    original = attention.check_query
    monkeypatch.setattr(
        attention, "check_query", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    monkeypatch.setattr("hetmem.methods._attention.check_query", attention.check_query)
    wrapped_run("seer", prompts(40, 33), new=3)
    assert calls == []


# -- the kernel binding and the budget rule --------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kernel", "layout", "unit"),
    [
        ("dsa", "token_indexer", "slots", 1),
        ("quest", "page_indexer", "slots", 16),
        ("seer", "block_gate", "slots", 64),
        ("dense_rag", "vector_search", "rows", 1),
        ("bm25_rag", "bm25", "index", 1),
    ],
)
def test_each_method_with_a_kernel_declares_its_binding(name, kernel, layout, unit):
    binding = get(name).binding()
    assert isinstance(binding, KernelBinding)
    assert (binding.kernel, binding.layout, binding.unit, binding.threshold) == (
        kernel,
        layout,
        unit,
        False,
    )
    seer = get("seer", mode="threshold", threshold=0.25).binding()
    assert seer.threshold and seer.tau == 0.25


def test_a_method_without_a_binding_cannot_go_on_the_card():
    class Unbound(type(get("quest"))):
        def binding(self):
            return {"kernel": "page_indexer"}  # not a KernelBinding

    with pytest.raises(PlacementError, match="must return a KernelBinding"):
        FpgaStage(Unbound(), "emu")


def test_a_slot_memory_needs_a_kernel_with_a_segment_table():
    import dataclasses

    quest = get("quest")
    binding = dataclasses.replace(quest.binding(), kernel="bm25")  # bm25 takes no segs
    quest.binding = lambda: binding
    with pytest.raises(PlacementError, match="takes no segment table"):
        FpgaStage(quest, "emu")


def test_one_budget_rule_everywhere():
    assert budget_units(130, 16) == 8 and budget_units(5) == 5
    with pytest.raises(InputError, match=r"15 tokens is less than one unit \(16 tokens\)"):
        budget_units(15, 16)
    assert budget_units(4096, 16, candidates=100) == 100  # covers the memory: all of it
    plan = plan_module.StepPlan.decode(torch.tensor([100, 37]), 130)
    assert plan.k(16) == budget_units(130, 16)
    assert plan.seen(16).tolist() == [[7], [3]]  # ceil(100/16), ceil(37/16) units visible


def test_a_card_given_to_several_stages_is_opened_once():
    card = Card("emu")
    stages = [FpgaStage(get("quest"), card) for _ in range(3)]
    assert all(s.card is card for s in stages) and card.opens == 0  # lazily
    from hetmem.synthetic import synthetic_kv

    for stage in stages:
        kv, _ = synthetic_kv(length=256, seed=0)
        stage.load(get("quest").prepare(kv))
    assert card.opens == 1


# -- asynchronous launch and the micro-batch overlap -----------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_overlap_changes_no_result_and_shows_its_timeline(method):
    rows = prompts(40, 33, 47, 29)
    model = tiny()
    wrap(model, method, budget=BUDGET, placement=HYBRID, fpga="emu", method_options=METHODS[method])
    ids, mask = left_pad(rows)
    sequential = generate(model, ids, mask, new=4)
    unwrap(model)
    wrap(
        model,
        method,
        budget=BUDGET,
        placement=HYBRID,
        fpga="emu",
        method_options=METHODS[method],
        overlap=True,
    )
    overlapped = generate(model, ids, mask, new=4)
    assert torch.equal(sequential.sequences, overlapped.sequences)
    for a, b in zip(sequential.scores, overlapped.scores, strict=True):
        assert torch.equal(a, b)  # the logits too, bit for bit
    cache = getattr(overlapped, cache_kwarg(model))
    for pipe in cache.pipelines:
        timeline = pipe.profile.timeline
        assert timeline is not None and {s.lane for s in timeline.spans} == {"host", "fpga", "gpu"}
        assert timeline.makespan <= timeline.serial
        # Apply of the first micro-batch does not wait for the second's selection
        fpga = [s for s in timeline.spans if s.lane == "fpga"]
        gpu = [s for s in timeline.spans if s.lane == "gpu"]
        assert gpu[0].start >= fpga[0].end and gpu[1].start >= fpga[-1].end
        saved = next(r for r in pipe.profile.records if r.step == "overlap: time saved")
        assert saved.source == "composite" and "modeled fpga" in saved.note
        # two launches (one per micro-batch), each at most three transactions
        card = [r for r in pipe.profile.records if r.device == "fpga:emu"]
        assert sum(r.transactions for r in card if r.step != "transfer memory -> fpga") <= 6


def test_run_async_returns_a_launch_to_wait_on():
    import numpy as np

    from hetmem import kernels
    from hetmem.fpga import open_device

    spec = kernels.get("vector_search")
    rng = np.random.default_rng(0)
    memory = {"keys": rng.standard_normal((300, 32))}
    state = spec.fit(memory)
    ints = spec.quantize_memory(memory, state)
    inputs = spec.bind(ints, spec.quantize_query({"q": rng.standard_normal((2, 32))}, state, k=5))
    with open_device("emu") as dev:
        bufs = {}
        for arg, data in inputs.arrays.items():  # the stage is empty: nothing staged
            bufs[arg] = dev.alloc(spec.name, arg, max(64, data.nbytes))
            dev.write(bufs[arg], data)
        bufs["out"] = dev.alloc(spec.name, "out", spec.buffer_nbytes("out", inputs.scalars))
        launch = dev.run_async(spec.name, bufs, inputs.scalars)
        timing = launch.wait()
        assert launch.done and timing.source == "modeled" and timing.cycles > 0
        out, _ = dev.read(bufs["out"], np.uint32, 2 * 5)
        assert out.reshape(2, 5).tolist() == spec.golden(inputs).indices.tolist()
        # the card's modeled timeline: writes, then the run, then the read, in order
        lanes = [(s.lane, s.step) for s in dev.timeline.spans]
        assert lanes[-2:] == [("kernel", "vector_search"), ("pcie", "read out")]
        run, read = list(dev.timeline.spans)[-2:]
        assert run.start >= list(dev.timeline.spans)[-3].end and read.start == run.end
        assert run.seconds == pytest.approx(timing.seconds)
        # a fault is raised by wait(), not by the launch
        launch = dev.run_async(spec.name, bufs, inputs.scalars, timeout_s=1e-9)
        with pytest.raises(Exception, match="no ap_done"):
            launch.wait()


def test_packed_query_buffers_cross_pcie_as_one_transaction():
    import numpy as np

    from hetmem.fpga import open_device

    with open_device("emu") as dev:
        bufs = dev.alloc_packed("token_indexer", {"q": 100, "w": 10, "segs": 16})
        before = dev.transactions
        data = {
            "q": np.arange(100, dtype=np.int8),
            "w": np.arange(5, dtype=np.int16),
            "segs": np.array([[0, 7], [3, 9]], dtype=np.uint32),
        }
        timing = dev.write_packed(data, bufs)
        assert dev.transactions - before == 1 and timing.nbytes >= 126
        for arg, arr in data.items():
            got, _ = dev.read(bufs[arg], arr.dtype, arr.size)
            assert got.tolist() == arr.reshape(-1).tolist()
        parent = bufs["q"].parent
        dev.free(parent)  # frees its sub-buffers with it
        assert dev.bank_used() == [0] * 32


@pytest.mark.parametrize("kind", ["timeout", "device_lost"])
def test_a_card_fault_during_the_overlap_falls_back_with_nothing_lost(kind):
    import warnings

    from hetmem.attention import AttentionQuery, KVCache, KVChunk
    from hetmem.fpga import xrt_emu
    from hetmem.pipeline import Pipeline

    gen = torch.Generator().manual_seed(3)
    keys, values = (
        torch.randn(4, 2, 300, 16, generator=gen),
        torch.randn(4, 2, 300, 16, generator=gen),
    )
    lengths = torch.tensor([300, 260, 280, 240])
    card = Pipeline(get("quest", page_size=8), HYBRID, fpga="xrt_emu", overlap=True)
    host = Pipeline(get("quest", page_size=8), "cpu/cpu/cpu/cpu")
    for pipe in (card, host):
        pipe.prepare(KVCache(keys.clone(), values.clone(), lengths.clone()))
    xrt_emu.clear()
    try:
        for step in range(3):
            chunk = KVChunk(
                torch.randn(4, 2, 1, 16, generator=gen), torch.randn(4, 2, 1, 16, generator=gen)
            )
            q = AttentionQuery(torch.randn(4, 4, 1, 16, generator=gen))
            for pipe in (card, host):
                pipe.append(chunk)
            if step == 1:
                xrt_emu.inject(kind)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got, want = card.step(q, 32), host.step(q, 32)
            if step == 1:  # the step reran on the host path: the float selection, exactly
                assert card.counters["fpga_fallbacks"] == 1 and caught
                assert torch.equal(got, want)
                assert any(r.step == "fpga fault" for r in card.profile.records)
            else:
                assert got.shape == want.shape and card.profile.timeline is not None
        # the card rebuilt its memory from the host's copy: every appended token is there
        assert card.fpga_stage.loaded
        assert [s.rows for s in card.fpga_stage.slots] == [
            -(-int(n) // 8) for n in card.memory.kv.lengths for _ in range(2)
        ]
    finally:
        xrt_emu.clear()
