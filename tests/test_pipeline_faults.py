"""FPGA faults seen from the pipeline, each injected through xrt_emu (the xrt driver over the
emulated card): kernel timeout, missing or mismatched xclbin, bank allocation failure, the
card lost mid-run or mid-transfer, an AXI error response. Under on_fpga_error="raise" each
raises its hetmem error; under the default "fallback" the host runs the kernel's golden model
over its mirror of the card's memory, with a warning and a counter, so the step returns
exactly what the card would have (a fault changes no output); the card is then restored from
the host's mirror, every appended entry included. An append touches no device (the card takes
the new rows at the next select), so it cannot fault halfway. After `fault_limit` faults in a
row the card's circuit breaker skips it for `cooldown` selects."""

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


pytestmark = pytest.mark.usefixtures("no_xrt_faults")


def pipelines(name="quest", seed=0, policy="fallback", fpga="xrt_emu", appends=2):
    """A hybrid pipeline over xrt_emu and a fault-free twin on emu (the card's answer: the
    targets are bit-exact), both prepared and appended to."""
    kv, query, chunks = kv_and_chunks(seed, appends=appends)
    kv_twin, _, _ = kv_and_chunks(seed, appends=appends)
    make = {"quest": lambda: get("quest", page_size=16), "dsa": lambda: get("dsa")}[name]
    hybrid = Pipeline(make(), HYBRID, fpga=fpga, on_fpga_error=policy)
    card = Pipeline(make(), HYBRID, fpga="emu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hybrid.prepare(kv)
        for chunk in chunks:
            hybrid.append(chunk)
    card.prepare(kv_twin)
    for chunk in chunks:
        card.append(chunk)
    return hybrid, card, query, caught


def assert_exact_fallback(pipe, card, out, expected):
    """The fallback step ran the kernel's golden model on the host and returned exactly the
    card's selection and output."""
    records = pipe.profile.by_step()
    host = records["relevancy+retrieval (golden model)"]
    assert host.device == "host (cpu)" and host.source == "measured"
    assert "relevancy" not in records  # not the float path
    assert torch.equal(out, expected)
    assert torch.equal(pipe.last_selection.indices, card.last_selection.indices)


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
@pytest.mark.parametrize("name", ["quest", "dsa"])
def test_run_fault_returns_the_cards_answer_then_recovers(kind, error, name):
    hybrid, card, query, _ = pipelines(name)
    expected = card.step(query, 256)
    with xrt_emu.inject(kind) as fault, pytest.warns(RuntimeWarning, match=error.__name__):
        out = hybrid.step(query, 256)
    assert fault.fired == 1
    assert_fell_back(hybrid, error)
    assert_exact_fallback(hybrid, card, out, expected)
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
@pytest.mark.parametrize("policy", ["fallback", "raise"])
def test_fault_while_appended_rows_move_loses_no_entry(kind, on, error, policy):
    """An append touches no device; the card fails at the next step while the appended rows
    cross PCIe (or while a buffer regrows): the host mirror has them, so the step returns
    the card's answer (fallback) or raises with the memory complete (raise), and the next
    step restores the card from the mirror, appended rows included."""
    hybrid, card, query, _ = pipelines(name="dsa", appends=0, policy=policy)
    kv_more, _ = synthetic_kv(length=1100, seed=4)  # a chunk long enough to regrow buffers
    chunk = (kv_more.keys, kv_more.values)
    with xrt_emu.inject(kind, on=on) as fault:
        hybrid.append(chunk)  # no device touched: nothing to fault
        assert fault.fired == 0
        card.append(chunk)
        lengths = hybrid.memory.kv.lengths.tolist()
        assert lengths == [2048 + 1100, 1500 + 1100]
        expected = card.step(query, 256)
        if policy == "raise":
            with pytest.raises(error):
                hybrid.step(query, 256)
        else:
            with pytest.warns(RuntimeWarning, match=error.__name__):
                out = hybrid.step(query, 256)
    assert fault.fired == 1
    assert hybrid.memory.kv.lengths.tolist() == lengths  # nothing appended twice or lost
    if policy == "fallback":
        assert_fell_back(hybrid, error)
        assert_exact_fallback(hybrid, card, out, expected)
    assert not hybrid.fpga_stage.loaded
    _, more = kv_and_chunks(9, appends=1)[1:]
    hybrid.append(more[0])
    card.append(more[0])
    assert torch.equal(hybrid.step(query, 256), card.step(query, 256))  # restored, then synced
    (load,) = [r for r in hybrid.profile.records if r.step == "transfer memory -> fpga"]
    assert load.note.startswith("restored")
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
    hybrid, card, query, _ = pipelines()
    expected = card.step(query, 256)
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
        assert "relevancy+retrieval (golden model)" in hybrid.profile.by_step()
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
        assert_fell_back(hybrid, XclbinError, count=2 + step)  # prepare, steps


# -- RAG ------------------------------------------------------------------------------------------


def test_bm25_fault_mid_run_falls_back_and_rebuilds_the_index():
    from hetmem.corpus import pydoc_paragraphs

    docs = list(pydoc_paragraphs())
    hybrid = Pipeline(get("bm25_rag"), HYBRID, fpga="xrt_emu")
    gpu = Pipeline(get("bm25_rag"))
    for pipe in (hybrid, gpu):
        pipe.prepare(docs[:1000])
    queries = ["exception handling with try and finally", "class method decorator"]
    hybrid.append(docs[1000:1200])
    gpu.append(docs[1000:1200])
    with xrt_emu.inject("device_lost", on="sync"), pytest.warns(RuntimeWarning, match="DeviceLost"):
        assert hybrid.step(queries, 16) == gpu.step(queries, 16)  # the CSR rewrite fails
    with xrt_emu.inject("axi_error"), pytest.warns(RuntimeWarning, match="AxiError"):
        assert hybrid.step(queries, 16) == gpu.step(queries, 16)
    hybrid.step(queries, 16)
    assert hybrid.profile.by_step()["relevancy+retrieval"].device == "fpga:xrt_emu"
    check_golden_rag(hybrid, queries, 16)
    assert hybrid.fpga_stage.slots[0].rows == 1200


def test_a_stage_used_alone_restores_the_card_from_its_mirror_after_a_fault():
    from hetmem.offload import FpgaStage

    kv, query, _ = kv_and_chunks(5, appends=0)
    method = get("dsa")
    memory = method.prepare(kv)
    stage = FpgaStage(method, "xrt_emu")
    stage.load(memory)
    with xrt_emu.inject("timeout"), pytest.raises(FpgaTimeout):
        stage.select(memory, query, 256)
    assert not stage.loaded and stage.device is None and stage.slots  # the mirror stays
    selection, profile = stage.select(memory, query, 256)  # restores, then selects
    assert profile.records[0].step == "transfer memory -> fpga"
    assert profile.records[0].note.startswith("restored")  # no requantization: same formats
    assert selection.indices.shape == (2, 1, 1, 256)
    host, _ = stage.select_host(memory, query, 256)
    assert torch.equal(host.indices, selection.indices)


# -- the circuit breaker ------------------------------------------------------------------------


def test_a_dead_card_is_skipped_after_fault_limit_faults_then_tried_again():
    """Three faults in a row open the breaker: the next `cooldown` selects run the golden
    model on the host without touching the card (a dead card costs no more timeouts), each
    returning the card's answer; then one select tries the card, and a success closes it."""
    fpga = {"target": "xrt_emu", "fault_limit": 3, "cooldown": 2}
    hybrid, card, query, _ = pipelines(fpga=fpga)
    breaker = hybrid.fpga_stage.card.breaker
    assert (breaker.limit, breaker.cooldown) == (3, 2)
    expected = card.step(query, 256)
    with xrt_emu.inject("timeout", times=None) as fault:
        for _ in range(3):
            with pytest.warns(RuntimeWarning, match="FpgaTimeout"):
                assert torch.equal(hybrid.step(query, 256), expected)
        assert fault.fired == 3 and breaker.open
        for _ in range(2):  # skipped: no fault fires, no warning, the same answer
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert torch.equal(hybrid.step(query, 256), expected)
            skipped = hybrid.profile.by_step()["fpga skipped"]
            assert "circuit open after 3 faults" in skipped.note
            assert "relevancy+retrieval (golden model)" in hybrid.profile.by_step()
        assert fault.fired == 3 and hybrid.counters["fpga_skipped"] == 2
        with pytest.warns(RuntimeWarning, match="FpgaTimeout"):  # the trial step faults
            hybrid.step(query, 256)
        assert fault.fired == 4 and breaker.open  # reopened at once
    for _ in range(2):
        hybrid.step(query, 256)  # still cooling down, card healthy by now
    assert torch.equal(hybrid.step(query, 256), expected)
    assert hybrid.profile.by_step()["relevancy+retrieval"].device == "fpga:xrt_emu"
    assert not breaker.open and breaker.faults == 0 and breaker.opened == 2


def test_breaker_options_are_checked():
    from hetmem.errors import InputError

    with pytest.raises(InputError, match="fault_limit"):
        Pipeline(get("quest"), HYBRID, fpga={"target": "emu", "fault_limit": 0})
    with pytest.raises(InputError, match="cooldown"):
        Pipeline(get("quest"), HYBRID, fpga={"target": "emu", "cooldown": "long"})


def test_the_fault_warning_points_at_the_caller():
    hybrid, _, query, _ = pipelines()
    with xrt_emu.inject("timeout"), pytest.warns(RuntimeWarning, match="FpgaTimeout") as caught:
        hybrid.step(query, 256)
    assert caught[0].filename == __file__
