"""The FPGA device interface on the emu target: banks, transfers, appends, runs, timing
sources, argument checks; the PCIe model; buffer shapes of the kernel specs; the bitstream
manifest."""

from __future__ import annotations

import importlib.util
import itertools
import json

import numpy as np
import pytest

from hetmem import kernels
from hetmem.errors import (
    AllocationError,
    FpgaTimeout,
    InputError,
    NoDeviceError,
    XclbinError,
)
from hetmem.fpga import Buffer, FpgaDevice, Timing, list_devices, open_device, pcie
from hetmem.fpga.emu import BANK_BYTES, EmuDevice
from hetmem.fpga.manifest import MANIFEST, Manifest, expected_entry, sha256_file, spec_banks
from hetmem.kernels import spec as kspec
from hetmem.kernels.spec import HBM_BANKS, MODE_THRESHOLD

NAMES = kernels.names()


@pytest.fixture
def dev():
    with open_device("emu") as device:
        yield device


def vector_inputs(rng, n=300, dim=32, queries=3, k=9):
    spec = kernels.get("vector_search")
    memory = {"keys": rng.standard_normal((n, dim))}
    state = spec.fit(memory)
    resident = spec.quantize_memory(memory, state)
    query = spec.quantize_query({"q": rng.standard_normal((queries, dim))}, state, k=k)
    return spec, state, resident, query


# -- the PCIe model ----------------------------------------------------------------------------


def test_pcie_constants_are_gen3_x16():
    assert abs(pcie.RAW_BANDWIDTH - 15.754e9) < 1e7  # 8 GT/s x16, 128b/130b
    assert 11e9 <= pcie.DMA_BANDWIDTH <= 13e9 < pcie.RAW_BANDWIDTH
    assert 1e-6 <= pcie.LATENCY_S <= 10e-6


def test_pcie_curve_latency_plus_size_over_bandwidth():
    link = pcie.GEN3_X16
    assert link.seconds(0) == 0.0
    assert link.seconds(64) == pytest.approx(pcie.LATENCY_S + 64 / pcie.DMA_BANDWIDTH)
    sizes = [2**i for i in range(6, 34, 2)]
    bw = [link.effective_bandwidth(s) for s in sizes]
    assert all(a < b for a, b in itertools.pairwise(bw))  # rises with size
    assert bw[0] < 0.01 * pcie.DMA_BANDWIDTH  # small transfers: latency-bound
    assert bw[-1] > 0.99 * pcie.DMA_BANDWIDTH  # large: toward the DMA bandwidth
    assert max(bw) < pcie.DMA_BANDWIDTH
    half = pcie.LATENCY_S * pcie.DMA_BANDWIDTH
    assert link.effective_bandwidth(int(half)) == pytest.approx(pcie.DMA_BANDWIDTH / 2, rel=1e-3)
    assert pcie.transfer_seconds(10**6) == link.seconds(10**6)


@pytest.mark.parametrize("nbytes", [-1, 1.5, "8", True])
def test_pcie_rejects_bad_sizes(nbytes):
    with pytest.raises(InputError) as err:
        pcie.GEN3_X16.seconds(nbytes)
    assert err.value.argument == "nbytes"


def test_pcie_link_checks_its_constants():
    with pytest.raises(InputError):
        pcie.PcieLink(bandwidth=20e9)  # beyond the raw link
    with pytest.raises(InputError):
        pcie.PcieLink(latency_s=-1.0)


def test_timing_carries_a_known_source():
    assert Timing(1e-6, "modeled").nbytes == 0
    with pytest.raises(InputError):
        Timing(1.0, "guessed")
    with pytest.raises(InputError):
        Timing(-1.0, "measured")


# -- buffer shapes of the specs ----------------------------------------------------------------


def test_buffer_shape_views_memory_by_capacity_and_queries_by_scalars():
    spec = kernels.get("token_indexer")
    scalars = {"n": 10, "k": 3, "queries": 2, "heads": 4, "dim": 8}
    assert spec.buffer_shape("keys", scalars, 8 * 100 + 5) == (100, 8)  # capacity rows
    assert spec.buffer_shape("shifts", scalars, 100) == (100,)
    assert spec.buffer_shape("q", scalars, 10**6) == (2, 4, 8)  # first bytes only
    assert spec.buffer_shape("w", scalars, 10**6) == (2, 4)
    assert spec.buffer_shape("out", scalars, 0) == (2, 3)
    assert spec.buffer_nbytes("keys", scalars, capacity=100) == 800
    assert spec.buffer_nbytes("w", scalars) == 2 * 4 * 2
    assert spec.buffer_nbytes("out", scalars) == 2 * 3 * 4
    with pytest.raises(InputError) as err:
        spec.buffer_nbytes("keys", scalars)
    assert err.value.argument == "capacity"
    with pytest.raises(InputError) as err:
        spec.buffer_shape("q", {"queries": 2}, 100)
    assert err.value.argument == "heads"
    with pytest.raises(InputError):
        spec.buffer_shape("n", scalars, 4)


def test_buffer_shape_of_threshold_bitmaps_and_bm25():
    gate = kernels.get("block_gate")
    scalars = {"n": 70, "k": 0, "queries": 3, "dim": 4, "mode": MODE_THRESHOLD}
    assert gate.buffer_shape("out", scalars, 0) == (3, 3)  # ceil(70 / 32) words
    assert gate.buffer_shape("delta", scalars, 64) == (3,)
    bm25 = kernels.get("bm25")
    scalars = {"n": 5, "k": 2, "queries": 2, "terms_per_query": 3, "vocab": 9}
    assert bm25.buffer_shape("term_offsets", scalars, 400) == (10,)  # vocab + 1
    assert bm25.buffer_shape("doc_ids", scalars, 400) == (100,)  # posting capacity
    assert bm25.buffer_shape("impacts", scalars, 400) == (200,)
    assert bm25.buffer_shape("idf", scalars, 400) == (2, 3)


@pytest.mark.parametrize("name", NAMES)
def test_every_input_buffer_has_dims(name):
    spec = kernels.get(name)
    for arg in spec.args:
        if arg.direction == "in":
            assert arg.name in spec.dims
    for arg in spec.memory_args:
        assert spec.dims[arg][0] == "capacity" or spec.dims[arg] == ("vocab+1",)


# -- emu: banks, transfers, runs -------------------------------------------------------------


def test_open_device_defaults_to_emu_without_a_card(dev):
    if importlib.util.find_spec("pyxrt") is not None:
        pytest.skip("pyxrt is installed here: auto may pick a card")
    auto = open_device()
    assert auto.target == "emu" and isinstance(auto, EmuDevice)
    assert "xilinx_u55c_gen3x16_xdma_3_202210_1" in auto.name
    assert open_device(dev) is dev  # an open device passes through
    with pytest.raises(InputError):
        open_device(dev, clock_hz=1.0)


@pytest.mark.parametrize("name", NAMES)
def test_alloc_places_every_buffer_in_its_spec_bank(dev, name):
    spec = kernels.get(name)
    for arg in spec.args:
        if not arg.is_buffer:
            continue
        buf = dev.alloc(name, arg.name, 4096)
        assert isinstance(buf, Buffer)
        assert (buf.kernel, buf.arg, buf.bank, buf.nbytes) == (name, arg.name, arg.bank, 4096)
        assert dev.used[arg.bank] == 4096
        dev.free(buf)
        assert dev.used[arg.bank] == 0


def test_alloc_beyond_a_bank_raises_allocation_error():
    with open_device("emu", bank_bytes=1000) as dev:
        first = dev.alloc("vector_search", "keys", 600)
        with pytest.raises(AllocationError, match=r"HBM bank 14 \(400 of 1000 bytes free\)"):
            dev.alloc("vector_search", "keys", 600)
        other = dev.alloc("vector_search", "shifts", 1000)  # another pseudo-channel
        dev.free(first)
        dev.alloc("vector_search", "keys", 1000)  # the freed space is back
        dev.free(other)
    assert BANK_BYTES * HBM_BANKS == 16 << 30  # 16 GiB in 32 pseudo-channels


def test_write_and_read_move_only_the_given_bytes(dev):
    buf = dev.alloc("vector_search", "keys", 1000)
    data = np.arange(100, dtype=np.int8)
    timing = dev.write(buf, data, offset=500)
    assert timing == Timing(pcie.GEN3_X16.seconds(100), "modeled", 100)
    back, timing = dev.read(buf, np.int8, 100, offset=500)
    np.testing.assert_array_equal(back, data)
    assert timing.nbytes == 100 and timing.source == "modeled"
    head, _ = dev.read(buf, np.uint8, 500)
    assert not head.any()  # bytes before the offset untouched
    words, _ = dev.read(buf, np.uint32, 2, offset=500)
    assert words.dtype == np.uint32 and words[0] == int.from_bytes(bytes([0, 1, 2, 3]), "little")
    empty, timing = dev.read(buf, np.int8, 0)
    assert empty.size == 0 and timing.seconds == 0.0


def test_run_matches_golden_and_reports_modeled_cycles(dev):
    spec, _, resident, query = vector_inputs(np.random.default_rng(0))
    inputs = spec.bind(resident, query)
    golden = spec.golden(inputs)
    bufs = {}
    for name in ("keys", "shifts", "q", "segs"):
        bufs[name] = dev.alloc("vector_search", name, inputs.arrays[name].nbytes)
        dev.write(bufs[name], inputs.arrays[name])
    bufs["out"] = dev.alloc("vector_search", "out", spec.buffer_nbytes("out", inputs.scalars))
    timing = dev.run("vector_search", bufs, inputs.scalars)
    assert timing.source == "modeled" and timing.cycles == golden.cycles
    assert timing.seconds == pytest.approx(golden.cycles / dev.clock_hz)
    assert timing.nbytes == 0
    out, _ = dev.read(bufs["out"], np.uint32, golden.indices.size)
    np.testing.assert_array_equal(out.reshape(golden.indices.shape), golden.indices)


@pytest.mark.parametrize("name", ["vector_search", "page_indexer"])
def test_resident_memory_grows_by_appends(dev, name):
    """Memory buffers hold a capacity; only appended rows cross PCIe; n says what to scan."""
    rng = np.random.default_rng(1)
    spec = kernels.get(name)
    dim, capacity = 16, 256
    if name == "vector_search":
        memory = {"keys": rng.standard_normal((200, dim))}
        make_query = lambda state: spec.quantize_query(  # noqa: E731
            {"q": rng.standard_normal((2, dim))}, state, k=5
        )
    else:
        lo = rng.standard_normal((200, dim))
        memory = {"mins": lo, "maxs": lo + rng.random((200, dim))}
        make_query = lambda state: spec.quantize_query(  # noqa: E731
            {"q": rng.standard_normal((2, 3, dim))}, state, k=5
        )
    state = spec.fit({k: v[:120] for k, v in memory.items()})
    resident = spec.quantize_memory(memory, state)
    query = make_query(state)
    scalars = {**query.scalars, "n": 0}
    bufs = {}
    for arg in spec.memory_args:
        bufs[arg] = dev.alloc(name, arg, spec.buffer_nbytes(arg, scalars, capacity=capacity))
    for arg, data in query.arrays.items():
        bufs[arg] = dev.alloc(name, arg, data.nbytes)
        dev.write(bufs[arg], data)
    bufs["segs"] = dev.alloc(name, "segs", 2 * 2 * 4)
    bufs["out"] = dev.alloc(name, "out", spec.buffer_nbytes("out", query.scalars))
    rows = 0
    for upto in (120, 200):  # the first load, then an append of 80 rows
        for arg in spec.memory_args:
            row_bytes = resident[arg][0].nbytes
            timing = dev.write(bufs[arg], resident[arg][rows:upto], offset=rows * row_bytes)
            assert timing.nbytes == (upto - rows) * row_bytes
        rows = upto
        dev.write(bufs["segs"], kspec.whole_segments(2, rows))  # both queries scan [0, rows)
        dev.run(name, bufs, {**query.scalars, "n": rows})
        out, _ = dev.read(bufs["out"], np.uint32, 2 * 5)
        golden = spec.golden(spec.bind({k: v[:rows] for k, v in resident.items()}, query))
        np.testing.assert_array_equal(out.reshape(2, 5), golden.indices)


def test_run_past_the_timeout_raises_fpga_timeout(dev):
    spec, _, resident, query = vector_inputs(np.random.default_rng(2))
    inputs = spec.bind(resident, query)
    seconds = spec.golden(inputs).cycles / dev.clock_hz
    with pytest.raises(FpgaTimeout, match="no ap_done within"):
        dev.call("vector_search", inputs, timeout_s=seconds / 2)
    out, timings = dev.call("vector_search", inputs, timeout_s=seconds * 2)
    assert out.shape == (3, 9)
    assert [t.source for t in timings] == ["modeled"] * 6  # 4 writes, the run, the read


def test_call_frees_its_buffers_even_on_failure(dev):
    spec, _, resident, query = vector_inputs(np.random.default_rng(3))
    with pytest.raises(FpgaTimeout):
        dev.call("vector_search", spec.bind(resident, query), timeout_s=1e-12)
    assert dev.used == [0] * HBM_BANKS


# -- argument checks --------------------------------------------------------------------------


def _bound(dev):
    spec, _, resident, query = vector_inputs(np.random.default_rng(4))
    inputs = spec.bind(resident, query)
    bufs = {
        n: dev.alloc("vector_search", n, inputs.arrays[n].nbytes)
        for n in ("keys", "shifts", "q", "segs")
    }
    bufs["out"] = dev.alloc("vector_search", "out", spec.buffer_nbytes("out", inputs.scalars))
    return bufs, dict(inputs.scalars)


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda d: d.alloc("nope", "keys", 8), "kernel"),
        (lambda d: d.alloc("vector_search", "nope", 8), "arg"),
        (lambda d: d.alloc("vector_search", "k", 8), "arg"),
        (lambda d: d.alloc("vector_search", "keys", 0), "nbytes"),
        (lambda d: d.alloc("vector_search", "keys", 2.0), "nbytes"),
        (lambda d: d.write(d.alloc("vector_search", "q", 8), np.zeros(9, np.int8)), "data"),
        (lambda d: d.write(d.alloc("vector_search", "q", 8), [1, 2]), "data"),
        (lambda d: d.write(d.alloc("vector_search", "q", 8), np.zeros(1, np.int8), -1), "offset"),
        (lambda d: d.read(d.alloc("vector_search", "q", 8), np.uint32, 3), "count"),
        (lambda d: d.read(d.alloc("vector_search", "q", 8), "nonsense", 1), "dtype"),
        (lambda d: d.write("buffer", np.zeros(1)), "buf"),
    ],
)
def test_bad_buffer_calls_name_the_argument(dev, call, argument):
    with pytest.raises(InputError) as err:
        call(dev)
    assert err.value.argument == argument


@pytest.mark.parametrize(
    ("change", "argument"),
    [
        (lambda b, s: b.pop("q"), "q"),
        (lambda b, s: b.update(extra=b["q"]), "buffers"),
        (lambda b, s: b.update(q=b["keys"]), "q"),
        (lambda b, s: s.pop("dim"), "dim"),
        (lambda b, s: s.update(k=2**32), "k"),
        (lambda b, s: s.update(k=-1), "k"),
        (lambda b, s: s.update(k=s["n"] + 1), "k"),
        (lambda b, s: s.update(queries=s["queries"] + 1), "q"),  # q buffer too small
        (lambda b, s: s.update(bogus=1), "scalars"),
    ],
)
def test_bad_run_calls_name_the_argument(dev, change, argument):
    bufs, scalars = _bound(dev)
    change(bufs, scalars)
    with pytest.raises(InputError) as err:
        dev.run("vector_search", bufs, scalars)
    assert err.value.argument == argument


def test_run_checks_the_output_size_and_timeout(dev):
    bufs, scalars = _bound(dev)
    dev.free(bufs["out"])
    bufs["out"] = dev.alloc("vector_search", "out", 4)
    with pytest.raises(InputError, match="needs 108 bytes") as err:
        dev.run("vector_search", bufs, scalars)
    assert err.value.argument == "out"
    for timeout in (0, -1.0, float("nan"), "1"):
        with pytest.raises(InputError) as err:
            dev.run("vector_search", _bound(dev)[0], scalars, timeout_s=timeout)
        assert err.value.argument == "timeout_s"


def test_freed_foreign_and_closed(dev):
    buf = dev.alloc("vector_search", "q", 8)
    dev.free(buf)
    with pytest.raises(InputError, match="not allocated"):
        dev.write(buf, np.zeros(1, np.int8))
    with pytest.raises(InputError):
        dev.free(buf)
    with open_device("emu") as other:
        foreign = other.alloc("vector_search", "q", 8)
        with pytest.raises(InputError) as err:
            dev.read(foreign, np.int8, 1)
        assert err.value.argument == "buf"
    dev.close()
    dev.close()  # idempotent
    with pytest.raises(InputError) as err:
        dev.alloc("vector_search", "q", 8)
    assert err.value.argument == "device"


def test_open_device_rejects_unknown_targets_and_reports_missing_ones():
    with pytest.raises(InputError) as err:
        open_device("gpu")
    assert err.value.argument == "target"
    if importlib.util.find_spec("hetmem.fpga.cosim") is None:
        with pytest.raises(NoDeviceError, match="cosim"):
            open_device("cosim")
    if importlib.util.find_spec("pyxrt") is None:
        with pytest.raises(NoDeviceError, match="pyxrt"):
            open_device("xrt")
    if importlib.util.find_spec("pynq") is None:
        with pytest.raises(NoDeviceError, match="PYNQ"):
            open_device("pynq")


def test_list_devices_always_has_emu_and_xrt_emu():
    found = {info.target: info for info in list_devices()}
    assert found["emu"].available and found["xrt_emu"].available
    assert {"emu", "cosim", "xrt", "xrt_emu", "pynq"} <= set(found)
    if importlib.util.find_spec("pyxrt") is None:
        assert not found["xrt"].available and "pyxrt" in found["xrt"].detail


def test_emu_is_an_fpga_device():
    assert issubclass(EmuDevice, FpgaDevice)
    with pytest.raises(InputError):
        EmuDevice(clock_hz=0)


# -- the bitstream manifest ----------------------------------------------------------------------


def test_committed_manifest_matches_the_kernel_specs():
    manifest = Manifest.load()
    assert manifest.path == MANIFEST
    entry = manifest.default()
    assert entry.platform == "xilinx_u55c_gen3x16_xdma_3_202210_1"
    assert set(entry.kernels) == set(NAMES)
    for name in NAMES:
        assert entry.kernels[name] == spec_banks(name)
    entry.check_specs()
    assert entry == expected_entry()  # the manifest is what the specs say
    ignored = (MANIFEST.parent / ".gitignore").read_text().split()
    assert "*.xclbin" in ignored  # built xclbins stay out of git


def test_manifest_checks_name_what_differs(tmp_path):
    entry = expected_entry()
    bad = Manifest({entry.name: entry})
    broken = dict(entry.kernels, vector_search={**entry.kernels["vector_search"], "keys": 3})
    wrong = type(entry)(**{**entry.__dict__, "kernels": broken})
    with pytest.raises(XclbinError, match="disagrees with its kernel spec"):
        wrong.check_specs()
    with pytest.raises(XclbinError, match="not in the manifest"):
        bad.entry("other.xclbin")
    with pytest.raises(XclbinError, match="not found"):
        bad.resolve()
    path = tmp_path / entry.name
    path.write_bytes(b"some bytes")
    with pytest.raises(XclbinError, match="records no checksum"):
        entry.check_checksum(path)
    recorded = bad.with_checksum(entry.name, sha256_file(path)).entry(entry.name)
    assert recorded.check_checksum(path) == sha256_file(path)
    path.write_bytes(b"other bytes")
    with pytest.raises(XclbinError, match="does not match the manifest"):
        recorded.check_checksum(path)


def test_manifest_search_path_and_record(tmp_path, monkeypatch):
    manifest_path = tmp_path / "manifest.json"
    Manifest({"hetmem_hw.xclbin": expected_entry()}).save(manifest_path)
    manifest = Manifest.load(manifest_path)
    assert manifest.status()[0]["path"] is None
    cards = tmp_path / "builds"
    cards.mkdir()
    (cards / "hetmem_hw.xclbin").write_bytes(b"built")
    monkeypatch.setenv("HETMEM_XCLBIN_PATH", str(cards))
    path, entry = manifest.resolve()
    assert path == cards / "hetmem_hw.xclbin" and entry.name == "hetmem_hw.xclbin"
    assert manifest.status()[0]["checksum"] == "unrecorded"
    from hetmem.fpga.manifest import main

    assert main(["record", str(path), "--manifest", str(manifest_path)]) == 0
    saved = json.loads(manifest_path.read_text())
    assert saved["xclbins"][0]["sha256"] == sha256_file(path)
    assert Manifest.load(manifest_path).status()[0]["checksum"] == "match"


def test_manifest_load_errors(tmp_path):
    with pytest.raises(XclbinError, match="no bitstream manifest"):
        Manifest.load(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": 7}')
    with pytest.raises(XclbinError, match="schema"):
        Manifest.load(bad)


# -- segments: one launch over many slots of one memory --------------------------------------


def segmented_inputs(name, rng, rows=(120, 45, 300), queries=7, **params):
    """Slots of one memory, each quantized with its own state (stacked), queries spread over
    them with per-query rows: a layer's launch for every batch row and KV group."""
    spec = kernels.get(name)
    dim = 16
    floats = []
    for r in rows:
        if name == "page_indexer":
            lo = rng.standard_normal((r, dim)) * rng.uniform(0.5, 3)
            floats.append({"mins": lo, "maxs": lo + rng.random((r, dim))})
        else:
            floats.append({"keys": rng.standard_normal((r, dim)) * rng.uniform(0.5, 3)})
    stacked = spec.stack_states([spec.fit(f) for f in floats])
    memory = {a: np.concatenate([f[a] for f in floats]) for a in floats[0]}
    ints = spec.quantize_memory(memory, stacked, slots=np.repeat(np.arange(len(rows)), rows))
    slot = np.sort(rng.integers(0, len(rows), queries))
    bases = np.concatenate([[0], np.cumsum(rows)[:-1]])
    seg_rows = np.array([rows[s] for s in slot])
    seg_rows[1::2] = np.maximum(1, seg_rows[1::2] - 7)
    if name in ("token_indexer", "page_indexer"):
        query = {"q": rng.standard_normal((queries, 2, dim))}
        if name == "token_indexer":
            query["w"] = rng.uniform(-1, 1, (queries, 2))
    else:
        query = {"q": rng.standard_normal((queries, dim))}
    q = spec.quantize_query(
        query, stacked, slots=slot, segs=np.stack([bases[slot], seg_rows], 1), **params
    )
    return spec.bind(ints, q, n=int(seg_rows.max()))


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("token_indexer", {"k": 20}),
        ("page_indexer", {"k": 20}),
        ("vector_search", {"k": 30}),
        ("block_gate", {"k": 5}),
        ("block_gate", {"tau": 0.1}),
    ],
)
def test_segmented_call_on_emu_is_the_golden_model(dev, name, params):
    inputs = segmented_inputs(name, np.random.default_rng(11), **params)
    golden = kernels.get(name).golden(inputs)
    out, timings = dev.call(name, inputs)
    want = golden.indices if golden.indices is not None else golden.bitmap
    np.testing.assert_array_equal(out, want)
    assert timings[-2].cycles == golden.cycles


def test_segments_buffer_is_checked_at_the_run(dev):
    inputs = segmented_inputs("vector_search", np.random.default_rng(12), k=4)
    spec = kernels.get("vector_search")
    bufs = {}
    for arg in spec.args:
        if arg.direction == "in":
            bufs[arg.name] = dev.alloc(spec.name, arg.name, max(1, inputs.arrays[arg.name].nbytes))
            dev.write(bufs[arg.name], inputs.arrays[arg.name])
    bufs["out"] = dev.alloc(spec.name, "out", spec.buffer_nbytes("out", inputs.scalars))
    dev.run(spec.name, bufs, inputs.scalars)
    bad = inputs.arrays["segs"].copy()
    bad[2, 0] = 10**6  # past the rows the memory holds
    dev.write(bufs["segs"], bad)
    with pytest.raises(InputError) as err:
        dev.run(spec.name, bufs, inputs.scalars)
    assert err.value.argument == "segs"
    dev.free(bufs["segs"])
    bufs["segs"] = dev.alloc(spec.name, "segs", 8)  # one entry for 7 queries
    with pytest.raises(InputError) as err:
        dev.run(spec.name, bufs, inputs.scalars)
    assert err.value.argument == "segs"
