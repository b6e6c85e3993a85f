"""The xrt driver end to end over xrt_emu: identical outputs to emu and the golden model for
every kernel, buffer sizes and banks, argument order, sync directions, stale reads,
timeouts, the manifest checks of a loaded xclbin; and the pynq driver over a fake PYNQ."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from hetmem import kernels
from hetmem.errors import AxiError, FpgaTimeout, NoDeviceError, XclbinError
from hetmem.fpga import open_device, xrt_emu
from hetmem.fpga.manifest import Manifest, expected_entry, sha256_file
from hetmem.fpga.xrt import XrtDevice
from hetmem.kernels.spec import MODE_THRESHOLD

TO_DEVICE = xrt_emu.xclBOSyncDirection.XCL_BO_SYNC_BO_TO_DEVICE
FROM_DEVICE = xrt_emu.xclBOSyncDirection.XCL_BO_SYNC_BO_FROM_DEVICE


pytestmark = pytest.mark.usefixtures("no_xrt_faults")


@pytest.fixture
def dev():
    with open_device("xrt_emu") as device:
        yield device


def quantized_cases():
    """(kernel, mode label, KernelInputs) from realistic float data through quantization."""
    rng = np.random.default_rng(0)
    cases = []
    spec = kernels.get("token_indexer")
    memory = {"keys": rng.standard_normal((700, 32))}
    state = spec.fit(memory)
    query = {"q": rng.standard_normal((2, 4, 32)), "w": rng.standard_normal((2, 4))}
    cases.append(("token_indexer", "topk", spec, memory, state, query, {"k": 40}))
    spec = kernels.get("page_indexer")
    lo = rng.standard_normal((300, 32))
    memory = {"mins": lo, "maxs": lo + rng.random((300, 32))}
    query = {"q": rng.standard_normal((2, 4, 32))}
    cases.append(("page_indexer", "topk", spec, memory, spec.fit(memory), query, {"k": 17}))
    for name in ("vector_search", "block_gate"):
        spec = kernels.get(name)
        memory = {"keys": rng.standard_normal((513, 24))}
        query = {"q": rng.standard_normal((3, 24))}
        cases.append((name, "topk", spec, memory, spec.fit(memory), query, {"k": 33}))
    spec = kernels.get("block_gate")
    cases.append(("block_gate", "threshold", spec, memory, spec.fit(memory), query, {"tau": 0.05}))
    spec = kernels.get("bm25")
    docs, vocab = 400, 60
    per_term = [np.sort(rng.choice(docs, rng.integers(1, 40), replace=False)) for _ in range(vocab)]
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in per_term])])
    memory = {
        "term_offsets": offsets,
        "doc_ids": np.concatenate(per_term),
        "tfs": rng.integers(1, 5, int(offsets[-1])),
        "doc_lengths": rng.integers(20, 80, docs),
    }
    query = {"terms": rng.integers(-1, vocab, (3, 5)), "idf": rng.random((3, 5)) * 3}
    cases.append(("bm25", "topk", spec, memory, spec.fit(memory), query, {"k": 12}))
    out = []
    for name, mode, spec, memory, state, query, params in cases:
        resident = spec.quantize_memory(memory, state)
        inputs = spec.bind(
            resident, spec.quantize_query(query, state, **params), n=spec.candidates(memory)
        )
        out.append(pytest.param(name, inputs, id=f"{name}-{mode}"))
    return out


@pytest.mark.parametrize(("name", "inputs"), quantized_cases())
def test_xrt_over_xrt_emu_equals_emu_and_golden(dev, name, inputs):
    spec = kernels.get(name)
    golden = spec.golden(inputs)
    expected = golden.bitmap if inputs.scalars.get("mode") == MODE_THRESHOLD else golden.indices
    with open_device("emu") as emu:
        emu_out, emu_timings = emu.call(name, inputs)
    xrt_out, xrt_timings = dev.call(name, inputs)
    np.testing.assert_array_equal(xrt_out, emu_out)
    np.testing.assert_array_equal(xrt_out, expected)
    assert xrt_timings == emu_timings  # both modeled: the same PCIe and cycle models
    assert all(t.source == "modeled" for t in xrt_timings)
    assert xrt_timings[-2].cycles == golden.cycles
    if inputs.scalars.get("mode") == MODE_THRESHOLD:
        assert xrt_out.shape == (inputs.scalars["queries"], -(-inputs.scalars["n"] // 32))


def test_open_checks_and_names_the_card(dev):
    assert dev.target == "xrt" and dev.emulated
    assert dev.transfer_source == "modeled"
    assert "xrt_emu" in dev.name and "hetmem_hw.xclbin" in dev.name
    assert dev.clock_hz == expected_entry().clock_hz
    assert len(dev.xclbin_sha256) == 64


@pytest.mark.parametrize("name", kernels.names())
def test_buffers_are_bos_of_their_size_in_the_argument_bank(dev, name):
    spec = kernels.get(name)
    for arg in spec.args:
        if not arg.is_buffer:
            continue
        buf = dev.alloc(name, arg.name, 1000)
        assert isinstance(buf.handle, xrt_emu.bo)
        assert buf.handle.size() == 1000 and buf.handle._group == arg.bank == buf.bank
        assert dev._dev.used[arg.bank] == 1000
        dev.free(buf)


def _vector_call(dev):
    spec = kernels.get("vector_search")
    rng = np.random.default_rng(5)
    memory = {"keys": rng.standard_normal((100, 16))}
    state = spec.fit(memory)
    inputs = spec.bind(
        spec.quantize_memory(memory, state),
        spec.quantize_query({"q": rng.standard_normal((2, 16))}, state, k=4),
    )
    bufs = {}
    for name in ("keys", "shifts", "q", "segs", "stage"):
        bufs[name] = dev.alloc("vector_search", name, inputs.arrays[name].nbytes + 64)
        dev.write(bufs[name], inputs.arrays[name])
    bufs["out"] = dev.alloc("vector_search", "out", 64)
    return spec, inputs, bufs


def test_kernel_arguments_go_in_spec_order(dev, monkeypatch):
    spec, inputs, bufs = _vector_call(dev)
    seen = []
    original = xrt_emu.kernel.__call__

    def spy(self, *args):
        seen.append(args)
        return original(self, *args)

    monkeypatch.setattr(xrt_emu.kernel, "__call__", spy)
    dev.run("vector_search", bufs, inputs.scalars)
    (args,) = seen
    names = ["keys", "shifts", "q", "out", "n", "k", "queries", "dim", "segs", "stage", "staged"]
    assert [a.name for a in spec.args] == names
    assert args[:4] == tuple(bufs[n].handle for n in ("keys", "shifts", "q", "out"))
    assert args[4:8] == tuple(inputs.scalars[n] for n in ("n", "k", "queries", "dim"))
    assert args[8] is bufs["segs"].handle
    assert args[9] is bufs["stage"].handle and args[10] == inputs.scalars["staged"] == 0
    # nothing staged and no stage given: a stage buffer of the device's own is bound
    del bufs["stage"]
    dev.run("vector_search", bufs, {**inputs.scalars})
    stage = dev._empty_stages["vector_search"]
    assert seen[-1][9] is stage.handle and stage.bank == spec.arg("stage").bank


def test_sync_directions_sizes_and_offsets(dev):
    buf = dev.alloc("vector_search", "keys", 256)
    log = dev._dev.sync_log
    log.clear()
    dev.write(buf, np.arange(10, dtype=np.int8), offset=100)
    assert log == [(TO_DEVICE, 14, 10, 100)]  # exactly the written bytes, to the device
    data, timing = dev.read(buf, np.int8, 10, offset=100)
    assert log[-1] == (FROM_DEVICE, 14, 10, 100)
    np.testing.assert_array_equal(data, np.arange(10))
    assert timing.nbytes == 10 and timing.source == "modeled"


def test_xrt_emu_reads_are_stale_without_a_sync(tmp_path):
    """Without sync the host copy and the card copy differ, so a missing sync shows."""
    card = xrt_emu.device(0)
    image = xrt_emu.xclbin(str(xrt_emu.write_xclbin(tmp_path / "a.xclbin")))
    card.load_xclbin(image)
    bo = xrt_emu.bo(card, 16, xrt_emu.bo.flags.normal, 14)
    bo.write(np.full(16, 7, np.uint8), 0)
    assert (bo._card == 0).all()  # not on the card before the sync
    bo.sync(TO_DEVICE, 16, 0)
    assert (bo._card == 7).all()
    bo._card[:] = 9  # the kernel writes the card copy
    assert (bo.read(16, 0) == 7).all()  # stale without a sync from the device
    bo.sync(FROM_DEVICE)
    assert (bo.read(16, 0) == 9).all()


class NoSyncBack(XrtDevice):
    """A broken driver that forgets the sync from the device before reading."""

    def _sync(self, buf, direction, nbytes, offset):
        if direction == "XCL_BO_SYNC_BO_FROM_DEVICE":
            return 0.0
        return super()._sync(buf, direction, nbytes, offset)


def test_a_missing_sync_is_caught(tmp_path):
    entry = expected_entry()
    path = xrt_emu.write_xclbin(tmp_path / entry.name)
    manifest = Manifest({entry.name: entry}).with_checksum(entry.name, sha256_file(path))
    with NoSyncBack(xrt_emu, xclbin=path, manifest=manifest) as broken:
        spec, inputs, bufs = _vector_call(broken)
        broken.run("vector_search", bufs, inputs.scalars)
        out, _ = broken.read(bufs["out"], np.uint32, 8)
        assert not np.array_equal(out.reshape(2, 4), spec.golden(inputs).indices)
        assert not out.any()  # the stale host copy


def test_wait_timeout_maps_to_fpga_timeout(dev):
    spec, inputs, bufs = _vector_call(dev)
    seconds = spec.golden(inputs).cycles / dev.clock_hz
    assert seconds * 1e3 < 1  # a short run completes within the smallest wait
    dev.run("vector_search", bufs, inputs.scalars, timeout_s=1e-3)
    slow = xrt_emu.run(xrt_emu.ert_cmd_state.ERT_CMD_STATE_COMPLETED, 3 * 10**8, 1.0)
    assert slow.wait(500) == xrt_emu.ert_cmd_state.ERT_CMD_STATE_TIMEOUT
    assert slow.wait(2000) == slow.wait(0) == xrt_emu.ert_cmd_state.ERT_CMD_STATE_COMPLETED


def test_long_run_times_out_through_the_driver(dev):
    rng = np.random.default_rng(6)
    spec = kernels.get("vector_search")
    n, dim = 1 << 16, 256
    keys = rng.integers(-127, 128, (n, dim), dtype=np.int8)
    inputs = kernels.KernelInputs(
        {"keys": keys, "shifts": np.zeros(n, np.uint8), "q": keys[:64].copy()},
        {"n": n, "k": 1, "queries": 64, "dim": dim},
    )
    inputs = spec.complete(inputs)  # built without bind: segs (0, n) per query
    cycles = spec.cycles(n=n, k=1, dim=dim, queries=64)
    assert cycles / dev.clock_hz > 1e-3
    with pytest.raises(FpgaTimeout, match="ERT_CMD_STATE_TIMEOUT"):
        dev.call("vector_search", inputs, timeout_s=1e-3)


def test_a_bo_in_the_wrong_bank_is_an_axi_error(dev):
    spec, inputs, bufs = _vector_call(dev)
    wrong = xrt_emu.bo(dev._dev, bufs["q"].nbytes, xrt_emu.bo.flags.normal, 3)
    bufs["q"].handle = wrong  # a driver bug: the bo is not where the port reads
    with pytest.raises(AxiError, match=r"HBM\[3\].*HBM\[16:17\].*DECERR"):
        dev.run("vector_search", bufs, inputs.scalars)


def test_xrt_emu_kernel_call_checks_types_like_pybind(dev):
    spec, inputs, bufs = _vector_call(dev)
    handle = dev._kernels["vector_search"]
    args = [bufs[a.name].handle if a.is_buffer else inputs.scalars[a.name] for a in spec.args]
    with pytest.raises(TypeError, match="expected 11 arguments"):
        handle(*args[:-1])
    with pytest.raises(TypeError, match="must be a bo"):
        handle(5, *args[1:])
    with pytest.raises(TypeError, match="must be an int"):
        handle(*args[:4], bufs["q"].handle, *args[5:])
    assert handle(*args).wait(1000) == xrt_emu.ert_cmd_state.ERT_CMD_STATE_COMPLETED


# -- the manifest check of a loaded xclbin -------------------------------------------------------


def _open(tmp_path, manifest_entry=None, record=True, **xclbin):
    entry = manifest_entry or expected_entry()
    path = xrt_emu.write_xclbin(tmp_path / entry.name, **xclbin)
    manifest = Manifest({entry.name: entry}, tmp_path / "manifest.json")
    if record:
        manifest = manifest.with_checksum(entry.name, sha256_file(path))
    return open_device("xrt_emu", xclbin=path, manifest=manifest)


def test_a_matching_emulated_xclbin_opens(tmp_path):
    with _open(tmp_path) as dev:
        assert dev.xclbin_path == tmp_path / "hetmem_hw.xclbin"
    with _open(tmp_path, platform="xilinx_u55c_gen3x16_xdma_3_202210_1") as dev:
        assert dev.entry.platform == "xilinx_u55c_gen3x16_xdma_3_202210_1"


@pytest.mark.parametrize(
    ("xclbin", "message"),
    [
        ({"platform": "xilinx_u280_gen3x16_xdma_1_202211_1"}, "built for platform 'xilinx_u280"),
        (
            {"kernels": {n: xrt_emu.kernel_args(n) for n in kernels.names() if n != "bm25"}},
            r"kernels \['bm25'\] are missing",
        ),
        (
            {
                "kernels": {
                    **{n: xrt_emu.kernel_args(n) for n in kernels.names()},
                    "bm25": [["x", 0]],
                }
            },
            "kernel bm25 has 1 arguments, its spec 11",
        ),
        (
            {
                "kernels": {
                    n: xrt_emu.kernel_args(n, {"q": 30} if n == "page_indexer" else None)
                    for n in kernels.names()
                }
            },
            r"page_indexer.q is connected to HBM\[30\], the manifest expects HBM\[7\]",
        ),
    ],
)
def test_a_mismatched_xclbin_is_refused(tmp_path, xclbin, message):
    with pytest.raises(XclbinError, match=message):
        _open(tmp_path, **xclbin)


def test_checksum_and_file_checks(tmp_path):
    with pytest.raises(XclbinError, match="records no checksum"):
        _open(tmp_path, record=False)
    entry = expected_entry()
    path = xrt_emu.write_xclbin(tmp_path / entry.name)
    manifest = Manifest({entry.name: entry}).with_checksum(entry.name, sha256_file(path))
    xrt_emu.write_xclbin(path, clock_hz=250e6)  # rebuilt: another file
    with pytest.raises(XclbinError, match="does not match the manifest"):
        open_device("xrt_emu", xclbin=path, manifest=manifest)
    with pytest.raises(XclbinError, match="not found"):
        open_device("xrt_emu", xclbin=tmp_path / "gone" / entry.name, manifest=manifest)
    junk = tmp_path / "junk" / entry.name
    junk.parent.mkdir()
    junk.write_bytes(b"xclbin2\x00\xff\xfe binary")
    junk_manifest = manifest.with_checksum(entry.name, sha256_file(junk))
    with pytest.raises(XclbinError, match="not a loadable xclbin"):
        open_device("xrt_emu", xclbin=junk, manifest=junk_manifest)
    other = tmp_path / "other.xclbin"
    other.write_bytes(b"x")
    with pytest.raises(XclbinError, match="not in the manifest"):
        open_device("xrt_emu", xclbin=other, manifest=manifest)


def test_no_card_is_no_device_error(tmp_path):
    entry = expected_entry()
    path = xrt_emu.write_xclbin(tmp_path / entry.name)
    manifest = Manifest({entry.name: entry}).with_checksum(entry.name, sha256_file(path))
    with pytest.raises(NoDeviceError, match="cannot open card 3"):
        open_device("xrt_emu", xclbin=path, manifest=manifest, index=3)


def test_xrt_target_uses_real_pyxrt_when_it_imports(tmp_path, monkeypatch):
    """`open_device("xrt")` and "auto" import pyxrt by name: here xrt_emu stands in for it."""
    monkeypatch.setitem(sys.modules, "pyxrt", xrt_emu)
    entry = expected_entry()
    path = xrt_emu.write_xclbin(tmp_path / entry.name)
    manifest = Manifest({entry.name: entry}).with_checksum(entry.name, sha256_file(path))
    with open_device("auto", xclbin=path, manifest=manifest) as dev:
        assert isinstance(dev, XrtDevice) and dev._xrt is xrt_emu
    monkeypatch.setattr(xrt_emu, "CARDS", [])  # pyxrt imports, but no card: emu
    assert open_device("auto").target == "emu"


# -- pynq over a fake PYNQ -----------------------------------------------------------------------


class FakeBuffer(np.ndarray):
    """A PynqBuffer stand-in: a uint8 array whose slices sync only their range."""

    log: list

    def sync_to_device(self):
        self.log.append(("to_device", self.bank, self._offset(), self.nbytes))

    def sync_from_device(self):
        self.log.append(("from_device", self.bank, self._offset(), self.nbytes))

    def _offset(self):
        return self.__array_interface__["data"][0] - self.base_address

    def __array_finalize__(self, obj):
        for name in ("log", "bank", "base_address"):
            if hasattr(obj, name):
                setattr(self, name, getattr(obj, name))


def fake_pynq(log):
    module = types.ModuleType("pynq")

    class Bank:
        def __init__(self, index):
            self.index = index

    class Handle:
        done = True

        def wait(self):
            return None

    class IP:
        def __init__(self, name):
            self.name = name

        def start(self, *args):
            log.append(("start", self.name, args))
            return Handle()

    class Overlay:
        def __init__(self, path, device=None):
            log.append(("overlay", path, device))
            self.ip_dict = {f"{k}_1": {} for k in kernels.names()}
            for k in kernels.names():
                setattr(self, f"{k}_1", IP(k))
            for i in range(32):
                setattr(self, f"HBM{i}", Bank(i))

        def free(self):
            log.append(("free",))

    def allocate(shape, dtype, target=None):
        log.append(("allocate", shape, np.dtype(dtype), target.index))
        buf = np.zeros(shape, dtype).view(FakeBuffer)
        buf.log, buf.bank = log, target.index
        buf.base_address = buf.__array_interface__["data"][0]
        return buf

    module.Overlay = Overlay
    module.allocate = allocate
    module.Device = types.SimpleNamespace(
        devices=[types.SimpleNamespace(name="xilinx_u55c_gen3x16_xdma_base_3")]
    )
    return module


def test_pynq_allocates_in_banks_syncs_in_direction_and_passes_args_in_order(tmp_path):
    from hetmem.fpga.pynq import PynqDevice

    log: list = []
    entry = expected_entry()
    path = tmp_path / entry.name
    path.write_bytes(b"a real xclbin would be here")
    manifest = Manifest({entry.name: entry}).with_checksum(entry.name, sha256_file(path))
    with PynqDevice(xclbin=path, manifest=manifest, pynq=fake_pynq(log)) as dev:
        assert dev.target == "pynq" and dev.transfer_source == "measured"
        assert log[0][0] == "overlay" and log[0][1] == str(path)
        keys = dev.alloc("vector_search", "keys", 1024)
        assert log[-1] == ("allocate", (1024,), np.dtype(np.uint8), 14)
        q = dev.alloc("vector_search", "q", 64)
        shifts = dev.alloc("vector_search", "shifts", 64)
        out = dev.alloc("vector_search", "out", 64)
        segs = dev.alloc("vector_search", "segs", 64)
        assert [e[3] for e in log if e[0] == "allocate"] == [14, 16, 15, 27, 17]
        timing = dev.write(keys, np.arange(32, dtype=np.int8), offset=256)
        assert log[-1] == ("to_device", 14, 256, 32)
        assert timing.source == "measured" and timing.nbytes == 32
        np.testing.assert_array_equal(keys.handle[256:288].view(np.int8), np.arange(32))
        data, timing = dev.read(keys, np.int8, 32, offset=256)
        assert log[-1] == ("from_device", 14, 256, 32)
        np.testing.assert_array_equal(data, np.arange(32))
        scalars = {"n": 4, "k": 2, "queries": 1, "dim": 16}
        bufs = {"keys": keys, "shifts": shifts, "q": q, "out": out, "segs": segs}
        timing = dev.run("vector_search", bufs, scalars)
        start = [e for e in log if e[0] == "start"][-1]
        assert start[1] == "vector_search"
        assert start[2][:4] == (keys.handle, shifts.handle, q.handle, out.handle)
        stage = dev._empty_stages["vector_search"]  # nothing staged: the device's own
        assert log[-2] == ("allocate", (64,), np.dtype(np.uint8), 17)
        assert start[2][4:] == (4, 2, 1, 16, segs.handle, stage.handle, 0)
        assert timing.source == "measured" and timing.cycles is not None
    assert log[-1] == ("free",)


def test_pynq_missing_kernel_and_checksum(tmp_path):
    from hetmem.fpga.pynq import PynqDevice

    entry = expected_entry()
    path = tmp_path / entry.name
    path.write_bytes(b"bytes")
    with pytest.raises(XclbinError, match="records no checksum"):
        PynqDevice(xclbin=path, manifest=Manifest({entry.name: entry}), pynq=fake_pynq([]))
    module = fake_pynq([])
    base = module.Overlay

    class Partial(base):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            del self.ip_dict["bm25_1"]

    module.Overlay = Partial
    manifest = Manifest({entry.name: entry}).with_checksum(entry.name, sha256_file(path))
    with pytest.raises(XclbinError, match="no compute unit of kernel bm25"):
        PynqDevice(xclbin=path, manifest=manifest, pynq=module)
    module.Device.devices = []
    with pytest.raises(NoDeviceError, match="no card 0"):
        PynqDevice(xclbin=path, manifest=manifest, pynq=module)


def test_segmented_call_through_the_driver_is_the_golden_model(dev):
    """A multi-segment launch (segs buffer) through the xrt driver over xrt_emu."""
    from test_fpga_device import segmented_inputs

    for name, params in (("vector_search", {"k": 9}), ("block_gate", {"tau": 0.2})):
        inputs = segmented_inputs(name, np.random.default_rng(4), **params)
        golden = kernels.get(name).golden(inputs)
        out, _ = dev.call(name, inputs)
        want = golden.indices if golden.indices is not None else golden.bitmap
        np.testing.assert_array_equal(out, want)


def test_a_packed_query_is_sub_bos_of_one_bo_written_in_one_transaction(dev):
    """The query side's arguments (q, segs, stage) ride on one AXI master connected to the
    HBM range of their banks: the driver packs them as sub-bos of one bo (`pyxrt.bo(parent,
    size, offset)`), writes them with one sync, and the card computes the golden result
    from them. Memory arguments, each on its own master, are never packed together."""
    spec, inputs, bufs = _vector_call(dev)
    sizes = {a: inputs.arrays[a].nbytes for a in ("q", "segs")} | {"stage": 64}
    packed = dev.alloc_packed("vector_search", sizes)
    parent = packed["q"].parent
    assert parent is not None and all(b.parent is parent for b in packed.values())
    assert all(b.handle._parent is parent.handle for b in packed.values())
    assert {b.handle._group for b in packed.values()} == {spec.arg("q").bank}
    before, syncs = dev.transactions, len(dev._dev.sync_log)
    dev.write_packed({a: inputs.arrays[a] for a in ("q", "segs")}, packed)
    assert dev.transactions - before == 1 and len(dev._dev.sync_log) - syncs == 1
    bufs.update(packed)  # (the separately written q, segs and stage no longer bound)
    dev.run("vector_search", bufs, inputs.scalars)
    out, _ = dev.read(bufs["out"], np.uint32, 2 * 4)
    np.testing.assert_array_equal(out.reshape(2, 4), spec.golden(inputs).indices)
    memory_side = dev.alloc_packed("vector_search", {"keys": 64, "shifts": 64})
    assert all(b.parent is None for b in memory_side.values())
