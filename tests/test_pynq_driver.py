"""The pynq driver end to end over `pynq_emu` (PYNQ 3.0.1's API on xrt_emu's emulated card):
outputs bit-exact with emu and the golden model for every kernel, buffers in their banks,
slices synced by range, packed sub-buffers passed by address, PYNQ's wait semantics, every
fault kind mapped to its hetmem error, and a pipeline whose card faults falling back to
the same result; the `hw` extra pins a PYNQ release that drives Alveo cards."""

from __future__ import annotations

import time
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from hetmem import kernels
from hetmem.errors import AllocationError, AxiError, DeviceLost, FpgaTimeout, XclbinError
from hetmem.fpga import open_device, pynq_emu, xrt_emu
from hetmem.fpga.manifest import expected_entry
from hetmem.fpga.pynq import PynqDevice, open_pynq_emu
from hetmem.fpga.targets import TARGETS, register_target
from hetmem.kernels.spec import MODE_THRESHOLD
from test_fpga_faults import prepared, result
from test_xrt_driver import quantized_cases

TO_DEVICE = xrt_emu.xclBOSyncDirection.XCL_BO_SYNC_BO_TO_DEVICE
FROM_DEVICE = xrt_emu.xclBOSyncDirection.XCL_BO_SYNC_BO_FROM_DEVICE


pytestmark = pytest.mark.usefixtures("no_xrt_faults")


@pytest.fixture
def dev():
    with open_pynq_emu() as device:
        yield device


@pytest.mark.parametrize(("name", "inputs"), quantized_cases())
def test_pynq_over_pynq_emu_equals_emu_and_golden(dev, name, inputs):
    spec = kernels.get(name)
    golden = spec.golden(inputs)
    expected = golden.bitmap if inputs.scalars.get("mode") == MODE_THRESHOLD else golden.indices
    with open_device("emu") as emu:
        emu_out, emu_timings = emu.call(name, inputs)
    out, timings = dev.call(name, inputs)
    np.testing.assert_array_equal(out, emu_out)
    np.testing.assert_array_equal(out, expected)
    assert timings == emu_timings  # both modeled: the same PCIe and cycle models
    assert timings[-2].cycles == golden.cycles


def test_open_names_the_card_and_checks_the_xclbin(dev):
    assert isinstance(dev, PynqDevice) and dev.target == "pynq" and dev.emulated
    assert dev.transfer_source == "modeled"
    assert "pynq over pynq_emu" in dev.name and expected_entry().name in dev.name
    assert len(dev.xclbin_sha256) == 64
    assert set(dev._ips) == set(expected_entry().kernels)


@pytest.mark.parametrize("name", kernels.names())
def test_buffers_are_allocated_in_the_argument_bank(dev, name):
    for arg in kernels.get(name).args:
        if arg.is_buffer:
            buf = dev.alloc(name, arg.name, 1000)
            assert isinstance(buf.handle, pynq_emu.PynqBuffer)
            assert buf.handle.bo._group == arg.bank == buf.bank and buf.handle.nbytes == 1000
            dev.free(buf)


def test_writes_and_reads_sync_only_their_range(dev):
    buf = dev.alloc("vector_search", "keys", 1024)
    card = buf.handle.bo._device
    dev.write(buf, np.arange(32, dtype=np.int8), offset=256)
    assert card.sync_log[-1] == (TO_DEVICE, buf.bank, 32, 256)
    np.testing.assert_array_equal(buf.handle.bo._card[256:288].view(np.int8), np.arange(32))
    assert not buf.handle.bo._card[:256].any() and not buf.handle.bo._card[288:].any()
    data, timing = dev.read(buf, np.int8, 8, offset=260)
    assert card.sync_log[-1] == (FROM_DEVICE, buf.bank, 8, 260)
    np.testing.assert_array_equal(data, np.arange(4, 12))
    assert timing.source == "modeled" and timing.nbytes == 8


def test_kernel_arguments_go_in_spec_order_as_device_addresses(dev, monkeypatch):
    bufs, scalars, golden = prepared(dev)
    seen = []
    original = pynq_emu.DefaultIP.start

    def spy(self, *args):
        seen.append(args)
        return original(self, *args)

    monkeypatch.setattr(pynq_emu.DefaultIP, "start", spy)
    dev.run("vector_search", bufs, scalars)
    (args,) = seen
    spec = kernels.get("vector_search")
    for arg, value in zip(spec.args, args, strict=True):
        if arg.is_buffer:
            assert value is bufs[arg.name].handle
        else:
            assert value == scalars[arg.name]
    np.testing.assert_array_equal(result(dev, bufs), golden)


def test_a_packed_allocation_is_one_buffer_per_argument_in_its_bank(dev):
    """A PYNQ buffer is a numpy array, yet a slice of the query allocation would hand the
    segment table to the kernel in the query's bank, which the card rejects (DECERR): the
    driver allocates each argument in its own bank, as the manifest maps it."""
    spec = kernels.get("vector_search")
    rng = np.random.default_rng(3)
    memory = {"keys": rng.standard_normal((200, 16))}
    state = spec.fit(memory)
    inputs = spec.bind(
        spec.quantize_memory(memory, state),
        spec.quantize_query({"q": rng.standard_normal((3, 16))}, state, k=7),
    )
    bufs = {}
    for arg in ("keys", "shifts"):
        bufs[arg] = dev.alloc("vector_search", arg, inputs.arrays[arg].nbytes)
        dev.write(bufs[arg], inputs.arrays[arg])
    packed = dev.alloc_packed("vector_search", {a: inputs.arrays[a].nbytes for a in ("q", "segs")})
    for arg, buf in packed.items():
        assert buf.parent is None and buf.handle.bo._group == spec.arg(arg).bank
    dev.write_packed({a: inputs.arrays[a] for a in packed}, packed)
    bufs.update(packed)
    bufs["stage"] = dev.alloc("vector_search", "stage", 64)  # staged = 0: never read
    bufs["out"] = dev.alloc("vector_search", "out", 3 * 7 * 4)
    dev.run("vector_search", bufs, inputs.scalars)
    out, _ = dev.read(bufs["out"], np.uint32, 21)
    np.testing.assert_array_equal(out.reshape(3, 7), spec.golden(inputs).indices)
    # What the check guards against: the segment table as a slice of the query's buffer.
    segs = bufs["q"].handle[: inputs.arrays["segs"].nbytes]
    args = [
        segs if a.name == "segs" else bufs[a.name].handle if a.is_buffer else inputs.scalars[a.name]
        for a in spec.args
    ]
    handle = dev._ips["vector_search"].start(*args)
    handle.wait()
    with pytest.raises(RuntimeError, match="Execution failed: 5"):
        handle._future.result()


def test_pynq_wait_handles_complete_only_in_wait_and_do_not_raise(dev):
    """What the driver copes with: `done` stays False until `wait()` handles the events,
    and a failed run's `wait()` returns, the failure left in the handle's future."""
    bufs, scalars, _ = prepared(dev)
    spec = kernels.get("vector_search")
    args = [bufs[a.name].handle if a.is_buffer else scalars[a.name] for a in spec.args]
    ip = dev._ips["vector_search"]
    handle = ip.start(*args)
    time.sleep(0.01)
    assert not handle.done
    handle.wait()
    assert handle.done and handle._future.result() is None
    with xrt_emu.inject("axi_error"):
        handle = ip.start(*args)
    assert handle.wait() is None  # no exception from wait()
    with pytest.raises(RuntimeError, match="Execution failed: 5"):
        handle._future.result()


# -- faults ----------------------------------------------------------------------------------


def test_a_hung_run_times_out_and_the_card_must_reopen(dev):
    bufs, scalars, golden = prepared(dev)
    with xrt_emu.inject("timeout") as fault:
        start = time.perf_counter()
        with pytest.raises(FpgaTimeout, match=r"vector_search: no ap_done within 0\.2 s"):
            dev.run("vector_search", bufs, scalars, timeout_s=0.2)
        assert time.perf_counter() - start < 5
        assert fault.fired == 1
    with pytest.raises(DeviceLost, match=r"never completed.*open it again"):
        dev.run("vector_search", bufs, scalars)  # a hung compute unit runs nothing more
    with open_pynq_emu() as fresh:  # a reopened card runs again
        bufs, scalars, golden = prepared(fresh)
        fresh.run("vector_search", bufs, scalars)
        np.testing.assert_array_equal(result(fresh, bufs), golden)


def test_a_run_longer_than_its_timeout_by_the_cycle_model(dev):
    bufs, scalars, _ = prepared(dev)
    with pytest.raises(FpgaTimeout, match="modeled cycles"):
        dev.run("vector_search", bufs, scalars, timeout_s=1e-9)


def test_axi_error_response(dev):
    bufs, scalars, golden = prepared(dev)
    with xrt_emu.inject("axi_error"), pytest.raises(AxiError, match=r"Execution failed: 5.*SLVERR"):
        dev.run("vector_search", bufs, scalars)
    dev.run("vector_search", bufs, scalars)
    np.testing.assert_array_equal(result(dev, bufs), golden)


def test_device_lost_mid_run_stays_lost_until_reopened(dev):
    bufs, scalars, golden = prepared(dev)
    xrt_emu.inject("device_lost", after=1)
    dev.run("vector_search", bufs, scalars)
    with pytest.raises(DeviceLost, match=r"during a run of vector_search.*ABORT"):
        dev.run("vector_search", bufs, scalars)
    for call in (
        lambda: dev.run("vector_search", bufs, scalars),
        lambda: dev.write(bufs["q"], np.zeros(4, np.int8)),
        lambda: dev.read(bufs["out"], np.uint32, 1),
        lambda: dev.alloc("vector_search", "q", 8),
    ):
        with pytest.raises(DeviceLost, match="open it again"):
            call()
    with open_pynq_emu() as fresh:
        bufs, scalars, golden = prepared(fresh)
        fresh.run("vector_search", bufs, scalars)
        np.testing.assert_array_equal(result(fresh, bufs), golden)


@pytest.mark.parametrize("direction", ["write", "read"])
def test_device_lost_during_a_sync(dev, direction):
    bufs, _, _ = prepared(dev)
    method = "sync_to_device" if direction == "write" else "sync_from_device"
    with xrt_emu.inject("device_lost", on="sync"), pytest.raises(DeviceLost, match=method):
        if direction == "write":
            dev.write(bufs["q"], np.ones(4, np.int8))
        else:
            dev.read(bufs["q"], np.int8, 4)
    with pytest.raises(DeviceLost, match="open it again"):
        dev.read(bufs["q"], np.int8, 4)


def test_bank_allocation_failure_then_the_card_is_fine(dev):
    with xrt_emu.inject("alloc", after=1):
        dev.alloc("vector_search", "keys", 64)
        with pytest.raises(
            AllocationError, match=r"vector_search.keys: cannot allocate 64 bytes in HBM bank 14"
        ):
            dev.alloc("vector_search", "keys", 64)
    dev.alloc("vector_search", "keys", 64)


def test_device_lost_during_an_allocation(dev):
    """PYNQ reports a failed allocation alike whatever the cause ("Allocate failed"): the
    driver raises AllocationError, and the lost card shows at the next transfer."""
    bufs, _, _ = prepared(dev)
    with xrt_emu.inject("device_lost", on="alloc"), pytest.raises(AllocationError):
        dev.alloc("vector_search", "keys", 64)
    with pytest.raises(DeviceLost, match="sync_to_device"):
        dev.write(bufs["q"], np.ones(4, np.int8))
    with pytest.raises(DeviceLost, match="open it again"):
        dev.alloc("vector_search", "keys", 64)


def test_xclbin_refused_by_the_card():
    with xrt_emu.inject("xclbin"), pytest.raises(XclbinError, match="Programming Device failed"):
        open_pynq_emu()


def test_xclbin_without_a_kernel_is_refused(tmp_path):
    from hetmem.fpga.manifest import Manifest, sha256_file

    entry = expected_entry()
    table = {n: xrt_emu.kernel_args(n) for n in kernels.names() if n != "bm25"}
    path = xrt_emu.write_xclbin(tmp_path / entry.name, kernels=table)
    manifest = Manifest({entry.name: entry}).with_checksum(entry.name, sha256_file(path))
    with pytest.raises(XclbinError, match="no compute unit of kernel bm25"):
        open_pynq_emu(xclbin=path, manifest=manifest)


# -- a pipeline on the pynq path -----------------------------------------------------------------


@pytest.fixture
def pynq_target():
    register_target("pynq_emu", open_pynq_emu)
    yield "pynq_emu"
    TARGETS.pop("pynq_emu", None)


@pytest.mark.parametrize(
    ("kind", "error"),
    [("timeout", FpgaTimeout), ("axi_error", AxiError), ("device_lost", DeviceLost)],
)
def test_a_pipeline_on_pynq_equals_emu_and_a_fault_changes_no_result(pynq_target, kind, error):
    from hetmem.methods import get
    from hetmem.pipeline import Pipeline
    from test_hybrid import HYBRID, kv_and_chunks

    outs = {}
    for target in ("emu", pynq_target):
        kv, query, chunks = kv_and_chunks(0, appends=1)
        pipe = Pipeline(get("quest", page_size=16), HYBRID, fpga=target)
        pipe.prepare(kv)
        for chunk in chunks:
            pipe.append(chunk)
        outs[target] = (pipe.step(query, 256), pipe.last_selection.indices.clone())
    assert torch.equal(outs["emu"][0], outs[pynq_target][0])
    assert torch.equal(outs["emu"][1], outs[pynq_target][1])
    # A fault of the card: the step falls back and the next one runs on the card again.
    pipe.fpga_stage.timeout_s = 0.2  # a hung run is given up after 0.2 s
    with xrt_emu.inject(kind), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pipe.step(query, 256)
    assert any(error.__name__ in str(w.message) for w in caught)
    assert pipe.counters["fpga_fallbacks"] == 1
    assert torch.equal(pipe.last_selection.indices, outs["emu"][1])
    assert torch.allclose(out, outs["emu"][0])
    pipe.step(query, 256)
    assert pipe.profile.by_step()["relevancy+retrieval"].device.startswith("fpga")
    assert torch.equal(pipe.last_selection.indices, outs["emu"][1])


def test_a_bm25_pipeline_on_pynq_rewrites_its_index_and_equals_emu(pynq_target):
    """The "index" layout (an inverted index rewritten whole on every append)."""
    from hetmem.corpus import pydoc_paragraphs
    from hetmem.methods import get
    from hetmem.pipeline import Pipeline

    docs = list(pydoc_paragraphs())[:300]
    queries = ["exception handling with try", "class method decorator"]
    picked = {}
    for target in ("emu", pynq_target):
        pipe = Pipeline(get("bm25_rag"), "cpu/fpga/fpga/cpu", fpga=target)
        pipe.prepare(docs[:200])
        pipe.append(docs[200:])
        prompts = pipe.step(queries, budget=5)
        picked[target] = (prompts, pipe.last_selection.indices.clone())
        assert pipe.profile.by_step()["relevancy+retrieval"].device.startswith("fpga")
    assert picked["emu"][0] == picked[pynq_target][0]
    assert torch.equal(picked["emu"][1], picked[pynq_target][1])


def test_the_hw_extra_pins_a_pynq_that_drives_alveo():
    """PYNQ's Alveo guide: Alveo is supported only in v3.0.1 and earlier."""
    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    (pynq,) = [
        Requirement(r)
        for r in project["project"]["optional-dependencies"]["hw"]
        if Requirement(r).name == "pynq"
    ]
    assert pynq.specifier.contains("3.0.1")
    assert not any(pynq.specifier.contains(v) for v in ("3.1.0", "3.1.2", "4.0.0"))
