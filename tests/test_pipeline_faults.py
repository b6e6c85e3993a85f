"""FPGA faults seen from the pipeline, each injected through xrt_emu (the xrt driver over the
emulated card): kernel timeout, missing or mismatched xclbin, bank allocation failure, the
card lost mid-run or mid-transfer, an AXI error response. Under on_fpga_error="raise" each
raises its hetmem error; under the default "fallback" the step reruns on the GPU path with
a warning and a counter, and the card's memory is rebuilt from the host's copy, with every
appended entry."""

from __future__ import annotations

import warnings

import pytest
import torch

from hetmem import kernels
from hetmem.errors import (
    AllocationError,
    AxiError,
    DeviceLost,
    FpgaError,
    FpgaTimeout,
    XclbinError,
)
from hetmem.fpga import xrt_emu
from hetmem.fpga.manifest import Manifest, expected_entry, sha256_file
from hetmem.methods import get
from hetmem.pipeline import Pipeline
from hetmem.synthetic import synthetic_kv
from test_hybrid import HYBRID, check_golden_attention, check_golden_rag, kv_and_chunks

#: Faults of a kernel run: (xrt_emu kind, the hetmem error it raises).
RUN_FAULTS = [("timeout", FpgaTimeout), ("axi_error", AxiError), ("device_lost", DeviceLost)]


@pytest.fixture(autouse=True)
def _no_faults():
    xrt_emu.clear()
    yield
    xrt_emu.clear()


def pipelines(name="quest", seed=0, policy="fallback", fpga="xrt_emu", appends=2):
    """A hybrid pipeline over xrt_emu and an all-GPU twin, both prepared and appended to."""
    kv, query, chunks = kv_and_chunks(seed, appends=appends)
    kv_gpu, _, _ = kv_and_chunks(seed, appends=appends)
    make = {"quest": lambda: get("quest", page_size=16), "dsa": lambda: get("dsa")}[name]
    hybrid = Pipeline(make(), HYBRID, fpga=fpga, on_fpga_error=policy)
    gpu = Pipeline(make())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hybrid.prepare(kv)
        for chunk in chunks:
            hybrid.append(chunk)
    gpu.prepare(kv_gpu)
    for chunk in chunks:
        gpu.append(chunk)
    return hybrid, gpu, query, caught


def assert_fell_back(pipe, exc_type, count=1):
    records = pipe.profile.by_step()
    assert pipe.profile.counters["fpga_fallbacks"] == 1
    assert pipe.counters["fpga_fallbacks"] == count
    fault = records["fpga fault"]
    assert fault.device == "fpga:xrt_emu" and exc_type.__name__ in fault.note


def assert_back_on_the_card(pipe, query, budget=256, reloads=True):
    """The next step (re)loads the card from the host's memory and runs there again."""
    pipe.step(query, budget)
    steps = [r.step for r in pipe.profile.records]
    assert "fpga fault" not in steps
    assert ("transfer memory -> fpga" in steps) == reloads  # rebuilt from the host copy
    assert pipe.profile.by_step()["relevancy+retrieval"].device == "fpga:xrt_emu"
    assert check_golden_attention(pipe, query, budget) > 0


# -- faults of a kernel run ----------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "error"), RUN_FAULTS)
def test_run_fault_falls_back_to_the_gpu_path_then_recovers(kind, error):
    hybrid, gpu, query, _ = pipelines()
    expected = gpu.step(query, 256)
    with xrt_emu.inject(kind) as fault, pytest.warns(RuntimeWarning, match=error.__name__):
        out = hybrid.step(query, 256)
    assert fault.fired == 1
    assert_fell_back(hybrid, error)
    records = hybrid.profile.by_step()
    assert (
        records["relevancy"].device.startswith("gpu") and records["relevancy"].source == "measured"
    )
    assert torch.equal(out, expected)  # the GPU path is the float reference itself
    assert torch.equal(hybrid.last_selection.indices, gpu.last_selection.indices)
    assert_back_on_the_card(hybrid, query)
    assert hybrid.counters["fpga_fallbacks"] == 1


@pytest.mark.parametrize(("kind", "error"), RUN_FAULTS)
def test_run_fault_raises_under_the_raise_policy_and_the_card_rebuilds(kind, error):
    hybrid, _, query, _ = pipelines(policy="raise")
    with xrt_emu.inject(kind), pytest.raises(error) as err:
        hybrid.step(query, 256)
    assert isinstance(err.value, FpgaError)
    assert hybrid.counters["fpga_fallbacks"] == 0
    assert_back_on_the_card(hybrid, query)


def test_device_lost_stays_lost_until_the_stage_reopens_it():
    hybrid, _, query, _ = pipelines()
    first = hybrid.fpga_stage.device
    with xrt_emu.inject("device_lost"), pytest.warns(RuntimeWarning, match="DeviceLost"):
        hybrid.step(query, 256)
    assert hybrid.fpga_stage.device is None  # the lost handle was dropped
    hybrid.step(query, 256)
    assert hybrid.fpga_stage.device is not None and hybrid.fpga_stage.device is not first


# -- faults while the memory moves: no appended entry is lost -----------------------------------


@pytest.mark.parametrize(
    ("kind", "on", "error"),
    [("device_lost", "sync", DeviceLost), ("alloc", "alloc", AllocationError)],
)
def test_fault_during_an_append_loses_no_entry(kind, on, error):
    """The card fails while appended rows cross PCIe (or while a buffer regrows): the host
    memory has them; the next step rebuilds the card from it, appended rows included."""
    hybrid, _, query, _ = pipelines(name="dsa", appends=0)
    kv_more, _ = synthetic_kv(length=1100, seed=4)  # a chunk long enough to regrow buffers
    chunk = (kv_more.keys, kv_more.values)
    with xrt_emu.inject(kind, on=on) as fault, pytest.warns(RuntimeWarning, match=error.__name__):
        hybrid.append(chunk)
    assert fault.fired == 1
    assert_fell_back(hybrid, error)
    lengths = hybrid.memory.kv.lengths.tolist()
    assert lengths == [2048 + 1100, 1500 + 1100]
    assert not hybrid.fpga_stage.loaded
    _, more = kv_and_chunks(9, appends=1)[1:]
    hybrid.append(more[0])  # a later append with nothing on the card: it reloads it all
    (load,) = [r for r in hybrid.profile.records if r.step == "transfer memory -> fpga"]
    assert load.note.startswith("load")
    assert_back_on_the_card(hybrid, query, reloads=False)
    stage = hybrid.fpga_stage
    assert [s.rows for s in stage.slots] == [x + 5 for x in lengths]


def test_allocation_failure_at_load_falls_back_and_the_next_step_loads():
    with xrt_emu.inject("alloc") as fault:
        hybrid, gpu, query, caught = pipelines(appends=0)
    assert fault.fired == 1
    assert any("AllocationError" in str(w.message) for w in caught)
    assert hybrid.history[0].counters["fpga_fallbacks"] == 1  # the prepare's profile
    assert_back_on_the_card(hybrid, query)


def test_allocation_failure_of_a_query_buffer_falls_back():
    hybrid, gpu, query, _ = pipelines()
    expected = gpu.step(query, 256)
    with xrt_emu.inject("alloc"), pytest.warns(RuntimeWarning, match="AllocationError"):
        out = hybrid.step(query, 256)  # the first select allocates its query buffers
    assert torch.equal(out, expected)
    assert_back_on_the_card(hybrid, query)


# -- the xclbin ---------------------------------------------------------------------------------


def test_xclbin_refused_by_the_card_falls_back_at_prepare():
    with xrt_emu.inject("xclbin", times=None):
        hybrid, gpu, query, caught = pipelines(appends=0)
        assert any("XclbinError" in str(w.message) for w in caught)
        with pytest.warns(RuntimeWarning, match="XclbinError"):
            out = hybrid.step(query, 256)
        assert torch.equal(out, gpu.step(query, 256))
        assert hybrid.counters["fpga_fallbacks"] == 2
    assert_back_on_the_card(hybrid, query)


def test_xclbin_missing_raises_under_the_raise_policy(tmp_path, monkeypatch):
    monkeypatch.setenv("HETMEM_XCLBIN_PATH", str(tmp_path))
    kv, query, _ = kv_and_chunks(1, appends=0)
    fpga = {"target": "xrt_emu", "xclbin": "hetmem_hw.xclbin"}
    pipe = Pipeline(get("seer", block_size=16), HYBRID, fpga=fpga, on_fpga_error="raise")
    with pytest.raises(XclbinError, match="not found"):
        pipe.prepare(kv)
    assert pipe.memory is not None  # the host memory is built; only the card is missing


def test_xclbin_mismatched_falls_back_on_every_step(tmp_path):
    entry = expected_entry()
    banks = {n: xrt_emu.kernel_args(n) for n in kernels.names()}
    banks["page_indexer"] = xrt_emu.kernel_args("page_indexer", {"maxs": 30})
    path = xrt_emu.write_xclbin(tmp_path / entry.name, kernels=banks)
    manifest = Manifest({entry.name: entry}).with_checksum(entry.name, sha256_file(path))
    fpga = {"target": "xrt_emu", "xclbin": path, "manifest": manifest}
    hybrid, gpu, query, caught = pipelines(fpga=fpga, appends=1)
    assert any("XclbinError" in str(w.message) and "maxs" in str(w.message) for w in caught)
    for step in range(2):
        with pytest.warns(RuntimeWarning, match="XclbinError"):
            out = hybrid.step(query, 256)
        assert torch.equal(out, gpu.step(query, 256))
        assert_fell_back(hybrid, XclbinError, count=3 + step)  # prepare, append, steps


# -- RAG ------------------------------------------------------------------------------------------


def test_bm25_fault_mid_run_falls_back_and_rebuilds_the_index():
    from hetmem.corpus import pydoc_paragraphs

    docs = list(pydoc_paragraphs())
    hybrid = Pipeline(get("bm25_rag"), HYBRID, fpga="xrt_emu")
    gpu = Pipeline(get("bm25_rag"))
    for pipe in (hybrid, gpu):
        pipe.prepare(docs[:1000])
    queries = ["exception handling with try and finally", "class method decorator"]
    with xrt_emu.inject("device_lost", on="sync"), pytest.warns(RuntimeWarning, match="DeviceLost"):
        hybrid.append(docs[1000:1200])  # the CSR rewrite fails midway
    gpu.append(docs[1000:1200])
    with xrt_emu.inject("axi_error"), pytest.warns(RuntimeWarning, match="AxiError"):
        assert hybrid.step(queries, 16) == gpu.step(queries, 16)
    hybrid.step(queries, 16)
    assert hybrid.profile.by_step()["relevancy+retrieval"].device == "fpga:xrt_emu"
    check_golden_rag(hybrid, queries, 16)
    assert hybrid.fpga_stage.slots[0].rows == 1200


def test_a_stage_used_alone_forgets_the_card_after_a_fault():
    from hetmem.offload import FpgaStage

    kv, query, _ = kv_and_chunks(5, appends=0)
    method = get("dsa")
    memory = method.prepare(kv)
    stage = FpgaStage(method, "xrt_emu")
    stage.load(memory)
    with xrt_emu.inject("timeout"), pytest.raises(FpgaTimeout):
        stage.select(memory, query, 256)
    assert not stage.loaded and stage.slots == [] and stage.device is None
    selection, profile = stage.select(memory, query, 256)  # reloads, then selects
    assert [r.step for r in profile.records][:2] == ["quantize memory", "transfer memory -> fpga"]
    assert selection.indices.shape == (2, 1, 1, 256)
