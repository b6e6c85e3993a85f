"""Hybrid placement gpu/fpga/fpga/gpu on the emulated card: every method's selection equals
the golden model's on the same quantized inputs, Apply matches the all-GPU run within the
kernels' stated recall, the memory stays resident (only appended rows cross PCIe), and the
profile names the device and source of every figure."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from hetmem import kernels
from hetmem.attention import AttentionQuery, KVChunk, attention_recall
from hetmem.errors import InputError, PlacementError
from hetmem.methods import get
from hetmem.methods.base import Method
from hetmem.offload import MIN_ROWS, FpgaStage, capacity_for
from hetmem.pipeline import HISTORY, Pipeline
from hetmem.selection import Bitmap, TopK
from hetmem.synthetic import synthetic_kv
from hetmem.text import Documents

#: The kernels' stated recall of the float top-k (their docstrings; tests/test_kernel_quant.py).
MIN_RECALL = 0.98
HYBRID = "gpu/fpga/fpga/gpu"
ATTENTION = {
    "dsa": lambda: get("dsa"),
    "quest": lambda: get("quest", page_size=16),
    "quest_per_head": lambda: get("quest", page_size=16, per_query_head=True),
    "seer": lambda: get("seer", block_size=16),
    "seer_threshold": lambda: get("seer", block_size=16, mode="threshold", threshold=0.5),
}
LENGTHS = [2048, 1500]  # per-row lengths: the second row is padded


def kv_and_chunks(seed: int, appends: int = 3, tokens: int = 5):
    kv, query = synthetic_kv(length=LENGTHS[0], lengths=LENGTHS, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    chunks = [
        KVChunk(
            torch.randn(2, 2, tokens, 64, generator=gen),
            torch.randn(2, 2, tokens, 64, generator=gen),
        )
        for _ in range(appends)
    ]
    return kv, query, chunks


def pair(make, data, chunks=(), target="emu"):
    """The same method and memory under the hybrid placement and all on the GPU."""
    fpga, gpu = Pipeline(make(), HYBRID, fpga=target), Pipeline(make())
    for pipe in (fpga, gpu):
        pipe.prepare(data() if callable(data) else data)
        for chunk in chunks:
            pipe.append(chunk)
    return fpga, gpu


# -- the golden model, recomputed independently of the stage -------------------------------


def numpy_of(value):
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value


def check_card_holds(stage: FpgaStage, slot: int, ints: dict[str, np.ndarray]) -> None:
    """The card's buffers hold exactly the quantization of the host memory's rows."""
    held = stage.resident(slot)
    for arg, arr in ints.items():
        np.testing.assert_array_equal(held[arg][: arr.shape[0]], arr, err_msg=arg)


def check_golden_attention(pipe: Pipeline, query: AttentionQuery, budget: int) -> int:
    """Per (batch, group, query): the stage's selection equals spec.golden over the
    quantized host memory with the slot's fitted state, scanning the units the query sees.
    Returns how many kernel calls the check covered."""
    stage, method, memory = pipe.fpga_stage, pipe.method, pipe.memory
    spec, sel, unit = stage.spec, pipe.last_selection, method.unit
    # a unit's trailing dims are its row (a folded DSA index gives [Hkv, D] per token)
    floats = {name: v.flatten(3) for name, v in method.kernel_memory(memory).items()}
    q = method.kernel_query(memory, query)
    b_, gm = next(iter(floats.values())).shape[:2]
    gq, t_ = next(iter(q.values())).shape[1:3]
    positions = method.positions(memory, query).cpu()
    lengths = memory.kv.lengths.cpu()
    threshold = isinstance(sel, Bitmap)
    k = budget // unit
    runs = 0
    for b in range(b_):
        rows = math.ceil(int(lengths[b]) / unit)
        quantized = []
        for g in range(gm):
            slot = b * gm + g
            part = {name: numpy_of(v[b, g, :rows]) for name, v in floats.items()}
            ints = spec.quantize_memory(part, stage.slots[slot].state)
            check_card_holds(stage, slot, ints)
            quantized.append(ints)
        for g in range(gq):
            slot = b * gm + g // (gq // gm)
            state = stage.slots[slot].state
            for t in range(t_):
                n = min(math.ceil(min(int(positions[b, t]) + 1, int(lengths[b])) / unit), rows)
                one = {name: numpy_of(v[b, g, t : t + 1]) for name, v in q.items()}
                if threshold:
                    inputs = spec.quantize_query(one, state, tau=method.threshold)
                    out = spec.golden(spec.bind(quantized[slot - b * gm], inputs, n=n))
                    mask = sel.mask[b, g, t]
                    assert mask[:n].tolist() == kernels.unpack_bitmap(out.bitmap, n)[0].tolist()
                    assert not mask[n:].any()
                    runs += 1
                elif n > k:
                    inputs = spec.quantize_query(one, state, k=k)
                    out = spec.golden(spec.bind(quantized[slot - b * gm], inputs, n=n))
                    assert sel.indices[b, g, t].tolist() == out.indices[0].tolist()
                    assert bool(sel.valid[b, g, t].all())
                    runs += 1
                else:  # the budget covers every visible unit: all of them, then padding
                    assert sel.indices[b, g, t].tolist() == list(range(k))
                    assert sel.valid[b, g, t].tolist() == [i < n for i in range(k)]
    return runs


def check_golden_rag(pipe: Pipeline, query, budget: int) -> None:
    stage, method, memory = pipe.fpga_stage, pipe.method, pipe.memory
    spec, sel = stage.spec, pipe.last_selection
    floats = {name: numpy_of(v) for name, v in method.kernel_memory(memory).items()}
    state = stage.slots[0].state
    ints = spec.quantize_memory(floats, state)
    check_card_holds(stage, 0, ints)
    q = {name: numpy_of(v) for name, v in method.kernel_query(memory, query).items()}
    out = spec.golden(spec.bind(ints, spec.quantize_query(q, state, k=budget), n=memory.entries))
    assert sel.indices[:, 0, 0].tolist() == out.indices.tolist()
    assert bool(sel.valid.all())


def unit_recall(fpga: TopK, gpu: TopK) -> float:
    """Mean over (batch, group, query) of the share of the float top-k's valid units that
    the FPGA also selected."""
    hits = []
    for idx in np.ndindex(*gpu.indices.shape[:3]):
        want = set(gpu.indices[idx][gpu.valid[idx]].tolist())
        got = set(fpga.indices[idx][fpga.valid[idx]].tolist())
        hits.append(len(want & got) / max(1, len(want)))
    return float(np.mean(hits))


# -- every method, placement gpu/fpga/fpga/gpu ---------------------------------------------


@pytest.mark.parametrize("name", list(ATTENTION))
@pytest.mark.parametrize("seed", [0, 1])
def test_attention_methods_match_golden_and_the_gpu_run(name, seed):
    kv, query, chunks = kv_and_chunks(seed)
    kv_gpu, _, _ = kv_and_chunks(seed)
    fpga = Pipeline(ATTENTION[name](), HYBRID, fpga="emu")
    gpu = Pipeline(ATTENTION[name]())
    fpga.prepare(kv)
    gpu.prepare(kv_gpu)
    for chunk in chunks:
        fpga.append(chunk)
        gpu.append(chunk)
    budget = 256
    out_f, out_g = fpga.step(query, budget), gpu.step(query, budget)
    assert check_golden_attention(fpga, query, budget) > 0
    sel_f, sel_g = fpga.last_selection, gpu.last_selection
    assert type(sel_f) is type(sel_g) and sel_f.unit == sel_g.unit
    if isinstance(sel_g, Bitmap):  # threshold: the same rule on quantized logits
        both = int((sel_f.mask & sel_g.mask).sum())
        assert both >= MIN_RECALL * int(sel_g.mask.sum())
        assert both >= MIN_RECALL * int(sel_f.mask.sum())
    else:
        assert sel_f.indices.shape == sel_g.indices.shape
        assert torch.equal(sel_f.valid, sel_g.valid)  # causality and lengths, exactly
        assert unit_recall(sel_f, sel_g) >= MIN_RECALL
    # Apply on the FPGA's selection keeps the softmax mass of the float selection.
    mass_f = attention_recall(query.q, fpga.memory.kv, sel_f).mean().item()
    mass_g = attention_recall(query.q, gpu.memory.kv, sel_g).mean().item()
    assert mass_f >= mass_g - 0.01
    assert out_f.shape == out_g.shape
    assert float((out_f - out_g).norm() / out_g.norm()) < 0.05


@pytest.mark.parametrize("name", ["dsa", "quest", "seer", "seer_threshold"])
def test_causal_prefixes_and_short_rows(name):
    """Queries at several positions: each sees its own prefix; one sees fewer units than
    the budget (no kernel run: all of them, then invalid padding, as the float top-k)."""
    kv, query, _ = kv_and_chunks(2, appends=0)
    kv_gpu, _, _ = kv_and_chunks(2, appends=0)
    q = torch.randn(2, 8, 3, 64, generator=torch.Generator().manual_seed(5))
    positions = torch.tensor([[40, 700, 2047], [1499, 90, 1200]])
    query = AttentionQuery(q, positions)
    fpga = Pipeline(ATTENTION[name](), HYBRID, fpga="emu")
    gpu = Pipeline(ATTENTION[name]())
    fpga.prepare(kv)
    gpu.prepare(kv_gpu)
    budget = 128
    fpga.step(query, budget)
    gpu.step(query, budget)
    assert check_golden_attention(fpga, query, budget) > 0
    sel_f, sel_g = fpga.last_selection, gpu.last_selection
    if isinstance(sel_g, TopK):
        assert torch.equal(sel_f.valid, sel_g.valid)
        assert not bool(sel_f.valid[0, :, 0].all())  # position 40 sees fewer than 128 tokens
    else:
        n0 = math.ceil(41 / 16)  # position 40 sees 3 blocks
        assert not sel_f.mask[0, :, 0, n0:].any()


def rag_data(n: int, dim: int = 64, seed: int = 0):
    """Embeddings with a planted relevant set per query direction (as the kernel tests)."""
    rng = np.random.default_rng(seed)
    keys = rng.standard_t(3, (n, dim))
    keys[:, rng.choice(dim, 4, replace=False)] *= 20
    u = rng.standard_normal((4, dim))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    for direction in u:
        rows = rng.choice(n, n // 4, replace=False)
        keys[rows] += 8 * (rng.pareto(2.0, rows.size) + 1)[:, None] * direction
    q = u + 0.3 * rng.standard_normal(u.shape) / math.sqrt(dim)
    return torch.tensor(keys, dtype=torch.float32), torch.tensor(q, dtype=torch.float32)


def test_dense_rag_matches_golden_and_the_gpu_run():
    emb, q = rag_data(4000)
    texts = [f"document {i}" for i in range(4000)]
    first, rest = Documents(texts[:3000], emb[:3000]), Documents(texts[3000:], emb[3000:])
    fpga, gpu = pair(lambda: get("dense_rag"), first, [rest])
    budget = 64
    prompts_f, prompts_g = fpga.step(q, budget), gpu.step(q, budget)
    check_golden_rag(fpga, q, budget)
    assert unit_recall(fpga.last_selection, gpu.last_selection) >= MIN_RECALL
    assert len(prompts_f) == len(prompts_g) == 4


def test_bm25_rag_matches_golden_and_the_gpu_run():
    from hetmem.corpus import pydoc_paragraphs

    docs = list(pydoc_paragraphs())
    queries = [
        "exception handling with try and finally",
        "class method decorator",
        "unicode string literal escape sequences",
        "yield generator iterator protocol zzzunknownzzz",
    ]
    fpga, gpu = pair(lambda: get("bm25_rag"), docs[:1500], [docs[1500:]])
    budget = 32
    prompts_f, prompts_g = fpga.step(queries, budget), gpu.step(queries, budget)
    check_golden_rag(fpga, queries, budget)
    assert unit_recall(fpga.last_selection, gpu.last_selection) >= MIN_RECALL
    assert prompts_f == prompts_g or unit_recall(fpga.last_selection, gpu.last_selection) < 1


def test_xrt_driver_over_the_emulated_card_selects_like_emu():
    kv, query, chunks = kv_and_chunks(3, appends=1)
    out = {}
    for target in ("emu", "xrt_emu"):
        pipe = Pipeline(get("quest", page_size=16), HYBRID, fpga=target)
        pipe.prepare(synthetic_kv(length=2048, lengths=LENGTHS, seed=3)[0])
        pipe.append(chunks[0])
        pipe.step(query, 256)
        assert pipe.profile.by_step()["relevancy+retrieval"].device == f"fpga:{target}"
        out[target] = pipe.last_selection
    assert torch.equal(out["emu"].indices, out["xrt_emu"].indices)


# -- residency: only new rows cross PCIe ------------------------------------------------------


def memory_writes(profile) -> list:
    return [r for r in profile.records if r.step == "transfer memory -> fpga"]


@pytest.mark.parametrize("staged", [False, True], ids=["ranges", "staged"])
@pytest.mark.parametrize(
    ("name", "row_bytes"),
    [("dsa", 128 + 1), ("quest", 2 * 2 * 64), ("seer", 64 + 1)],  # keys+shift; min+max
)
def test_an_append_sends_only_the_rows_it_touched(name, row_bytes, staged, monkeypatch):
    """One token per batch row lands in one row (token, or the partial page/block whose
    summary changed) of each slot: exactly those bytes cross PCIe, not the memory; one range
    per slot and memory buffer, or (a card that stages them) the whole 64-byte beats they
    touch, each once, in the step's query write."""
    from hetmem.fpga.emu import EmuDevice
    from hetmem.kernels import spec as kspec

    monkeypatch.setattr(EmuDevice, "stages_appends", staged)
    kv, query, _ = kv_and_chunks(4, appends=0)
    pipe = Pipeline(ATTENTION[name](), HYBRID, fpga="emu")
    pipe.prepare(kv)
    loaded = sum(r.nbytes for r in memory_writes(pipe.profile))
    slots = len(pipe.fpga_stage.slots)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        pipe.append(
            KVChunk(
                torch.randn(2, 2, 1, 64, generator=gen), torch.randn(2, 2, 1, 64, generator=gen)
            )
        )
        assert not memory_writes(pipe.profile)  # an append quantizes; the card waits
        assert "quantize memory" in pipe.profile.by_step()
        stage = pipe.fpga_stage
        # the append touched each slot's last row (the new token, page or block, or the
        # partial one re-summarized): the mirror holds it, the card waits
        last = np.array([s * stage.capacity + slot.rows - 1 for s, slot in enumerate(stage.slots)])
        pipe.step(query, 256)
        if staged:
            assert not memory_writes(pipe.profile)  # the rows ride on the query write
            (note,) = [r.note for r in pipe.profile.records if r.step == "compose staged beats"]
            want = 0
            for host in stage.host.values():
                row = host[0].nbytes
                want += kspec.beats_of(last * row, np.full(slots, row)).size
            assert note == f"{want} memory beats" and want >= slots
            (write,) = [r for r in pipe.profile.records if r.step == "transfer query -> fpga"]
            assert write.transactions == 1 and write.nbytes > want * 68  # query, segs, stage
            # whole beats: a 1-byte shift row takes one, so at this small memory a few %
            assert want * 68 < loaded / 20
        else:
            (write,) = memory_writes(pipe.profile)  # the step sends the appended rows first
            assert write.nbytes == slots * row_bytes and write.note == "appended rows only"
            assert write.source == "modeled" and write.device == "fpga:emu"
            assert write.nbytes < loaded / 100
        pipe.step(query, 256)
        steps = [r.step for r in pipe.profile.records]
        assert "transfer memory -> fpga" not in steps  # the step reuses the resident memory
        check_golden_attention(pipe, query, 256)


def test_full_buffers_regrow_and_resend_only_the_host_copy():
    kv, query = synthetic_kv(length=160, seed=6)
    pipe = Pipeline(get("dsa"), HYBRID, fpga="emu")
    pipe.prepare(kv)
    stage = pipe.fpga_stage
    assert stage.capacity == capacity_for(160) == MIN_ROWS
    gen = torch.Generator().manual_seed(1)
    pipe.append(
        KVChunk(
            torch.randn(2, 2, 100, 64, generator=gen), torch.randn(2, 2, 100, 64, generator=gen)
        )
    )
    assert stage.capacity == capacity_for(260) > 260  # the host mirror regrew
    pipe.step(query, 128)
    (regrow,) = memory_writes(pipe.profile)  # the card's buffers follow, refilled from it
    assert "regrow" in regrow.note
    row = 128 + 1  # int8 indexer key and its shift byte
    assert regrow.nbytes == 2 * 260 * row
    check_golden_attention(pipe, query, 128)


def test_memory_outgrowing_its_fitted_range_still_selects_like_golden():
    """Appended keys far beyond the fitted range saturate (the spec's headroom); the
    selection still equals the golden model on what the card holds."""
    kv, query = synthetic_kv(length=512, seed=7)
    pipe = Pipeline(get("dsa"), HYBRID, fpga="emu")
    pipe.prepare(kv)
    gen = torch.Generator().manual_seed(2)
    big = 50 * torch.randn(2, 2, 8, 64, generator=gen)
    pipe.append(KVChunk(big, torch.randn(2, 2, 8, 64, generator=gen)))
    pipe.step(query, 64)
    check_golden_attention(pipe, query, 64)


# -- the profile ----------------------------------------------------------------------------


def test_profile_names_device_and_source_of_every_step():
    kv, query, chunks = kv_and_chunks(8, appends=1)
    pipe = Pipeline(get("quest", page_size=16), HYBRID, fpga="emu")
    pipe.prepare(kv)
    load = {r.step: r for r in pipe.profile.records}
    assert load["prepare"].source == "measured"
    assert load["transfer memory -> fpga"].source == "modeled"
    assert load["transfer memory -> fpga"].nbytes > 0
    pipe.append(chunks[0])
    pipe.step(query, 256)  # sends the appended rows
    pipe.step(query, 256)
    records = pipe.profile.by_step()
    assert list(records) == [
        "kernel query",
        "quantize query",
        "transfer query -> fpga",
        "relevancy+retrieval",
        "transfer selection -> gpu",
        "build selection",
        "apply",
    ]
    fused = records["relevancy+retrieval"]
    assert fused.device == "fpga:emu" and fused.source == "modeled"
    assert "cycles" in fused.note and fused.seconds > 0
    spec = kernels.get("page_indexer")
    cycles = int(fused.note.split(", ")[-1].split()[0])
    assert fused.seconds == pytest.approx(kernels.seconds(cycles, spec.engine.clock_hz))
    for step in ("transfer query -> fpga", "transfer selection -> gpu"):
        assert records[step].source == "modeled" and records[step].nbytes > 0
    for step in ("kernel query", "quantize query", "build selection", "apply"):
        assert records[step].source == "measured"
    assert records["apply"].device.startswith("gpu")
    totals = pipe.profile.totals()
    assert set(totals) == {"measured", "modeled"}  # never added together
    assert pipe.counters["fpga_fallbacks"] == 0


def test_pipeline_history_is_bounded_and_starts_without_a_selection():
    kv, query = synthetic_kv(length=128, seed=9)
    pipe = Pipeline(get("dsa"), HYBRID, fpga="emu")
    assert pipe.last_selection is None
    assert pipe.history.maxlen == HISTORY
    pipe.prepare(kv)
    pipe.step(query, 32)
    assert isinstance(pipe.last_selection, TopK)


# -- bad input ----------------------------------------------------------------------------------


def test_budget_is_checked_like_the_float_retrieval():
    kv, query = synthetic_kv(length=256, seed=10)
    fpga = Pipeline(get("quest", page_size=16), HYBRID, fpga="emu")
    fpga.prepare(kv)
    for budget in (8, 0, 2.5):  # below one page, zero, float
        with pytest.raises(InputError) as err:
            fpga.step(query, budget)
        assert err.value.argument == "budget"
    assert fpga.counters["fpga_fallbacks"] == 0  # bad input is not a card fault
    gpu = Pipeline(get("quest", page_size=16))
    gpu.prepare(kv)
    # More pages than exist: every page, on the card as on the float path (dense attention).
    assert torch.equal(fpga.step(query, 16 * 17), gpu.step(query, 16 * 17))


def test_stage_arguments_are_checked():
    with pytest.raises(InputError) as err:
        FpgaStage(get("dsa"), "gpu")
    assert err.value.argument == "fpga"
    with pytest.raises(InputError) as err:
        FpgaStage(get("dsa"), 3)
    assert err.value.argument == "fpga"
    with pytest.raises(InputError) as err:
        FpgaStage("dsa", "emu")
    assert err.value.argument == "method"
    with pytest.raises(InputError) as err:
        FpgaStage(get("dsa"), "emu", timeout_s=0)
    assert err.value.argument == "timeout_s"

    class NoKernel(Method):
        name, family, kernel, describe = "none", "rag", None, {}
        prepare = append = relevancy = retrieve = apply = lambda *a: None

    with pytest.raises(PlacementError):
        FpgaStage(NoKernel(), "emu")


def test_stage_on_an_open_device_leaves_it_open():
    from hetmem.fpga import open_device

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fault, no fallback warning
        # (the once-per-process note that "gpu" steps run on the CPU here is no fault)
        warnings.filterwarnings("ignore", message=".*no CUDA or ROCm GPU found")
        with open_device("emu") as device:
            kv, query = synthetic_kv(length=256, seed=11)
            pipe = Pipeline(get("seer", block_size=16), HYBRID, fpga=device)
            pipe.prepare(kv)
            pipe.step(query, 64)
            assert pipe.fpga_stage.device is device
            pipe.fpga_stage.close()
            assert sum(device.used) == 0  # every buffer given back
            assert device.alloc("block_gate", "q", 64).nbytes == 64  # still open


def test_bm25_append_rewrites_the_index_and_refits_past_the_avgdl_tolerance():
    from hetmem.corpus import pydoc_paragraphs

    docs = list(pydoc_paragraphs())
    pipe = Pipeline(get("bm25_rag"), HYBRID, fpga="emu")
    pipe.prepare(docs[:800])
    state = pipe.fpga_stage.slots[0].state
    pipe.append(docs[800:810])  # avgdl within 5%: impacts keep the fitted avgdl
    (quantize,) = [r for r in pipe.profile.records if r.step == "quantize memory"]
    assert quantize.note == "CSR rewritten" and pipe.fpga_stage.slots[0].state is state
    pipe.append([" ".join(docs[i] for i in range(40)) for _ in range(20)])  # long documents
    (quantize,) = [r for r in pipe.profile.records if r.step == "quantize memory"]
    assert "refitted" in quantize.note
    assert pipe.fpga_stage.slots[0].state.avgdl > state.avgdl * 1.05
    queries = ["exception handling with try and finally", "class method decorator"]
    pipe.step(queries, 16)
    check_golden_rag(pipe, queries, 16)
