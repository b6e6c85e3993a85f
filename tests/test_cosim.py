"""The cosim target: each kernel's RTL (fpga/rtl) in Verilator through the harness of
fpga/cosim. emu (golden models), cosim (the RTL) and the xrt driver over xrt_emu executed by
cosim return identical outputs on the same inputs; a hybrid pipeline on cosim selects as on
emu; models are built once and found in the cache afterwards; faults map to the card's
errors. Skips with the reason where Verilator or g++ is missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hetmem import kernels
from hetmem.errors import (
    AxiError,
    DeviceLost,
    FpgaTimeout,
    InputError,
    NoDeviceError,
    XclbinError,
)
from hetmem.fpga import cosim as cosim_mod
from hetmem.fpga import list_devices, open_device
from hetmem.kernels import KernelInputs

REASON = cosim_mod.missing()
pytestmark = pytest.mark.rtl
needs_sim = pytest.mark.skipif(REASON is not None, reason=f"cosim: {REASON}")

HYBRID = "gpu/fpga/fpga/gpu"


@pytest.fixture(scope="module")
def cosim():
    if REASON is not None:
        pytest.skip(f"cosim: {REASON}")
    dev = open_device("cosim")
    yield dev
    dev.close()


@pytest.fixture(scope="module")
def emu():
    dev = open_device("emu")
    yield dev
    dev.close()


@pytest.fixture(scope="module")
def xrt_cosim(cosim):
    """The xrt driver over xrt_emu, its kernels run by the shared cosim device."""
    dev = open_device("xrt_emu", executor=cosim)
    yield dev
    dev.close()


# -- inputs: floats quantized the way the pipeline does ----------------------------------------


def _student(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_t(3, shape)
    x[..., rng.choice(shape[-1], 2, replace=False)] *= 10  # outlier channels
    return x


def float_case(kernel: str, rng: np.random.Generator, n: int, **kw) -> KernelInputs:
    """Quantized inputs of `kernel` from realistic floats (fit, quantize, bind)."""
    spec = kernels.get(kernel)
    queries, dim, heads = kw.get("queries", 2), kw.get("dim", 64), kw.get("heads", 3)
    if kernel == "token_indexer":
        memory = {"keys": _student(rng, n, dim)}
        query = {
            "q": rng.standard_normal((queries, heads, dim)),
            "w": rng.uniform(-1, 1, (queries, heads)),
        }
    elif kernel == "page_indexer":
        centre = _student(rng, n, dim)
        spread = np.abs(rng.standard_normal((n, dim)))
        memory = {"mins": centre - spread, "maxs": centre + spread}
        query = {"q": rng.standard_normal((queries, heads, dim))}
    else:
        memory = {"keys": _student(rng, n, dim)}
        query = {"q": rng.standard_normal((queries, dim))}
    state = spec.fit(memory)
    ints = spec.quantize_memory(memory, state)
    params = {"tau": kw["tau"]} if "tau" in kw else {"k": kw.get("k", 32)}
    return spec.bind(ints, spec.quantize_query(query, state, **params))


def tie_case(kernel: str, rng: np.random.Generator, n: int, k: int) -> KernelInputs:
    """Integer inputs with many equal scores: ties must go to the lower index."""
    dim, queries = 32, 3
    arrays: dict[str, np.ndarray] = {
        "keys": rng.integers(-1, 2, (n, dim)).astype(np.int8),
        "shifts": np.zeros(n, dtype=np.uint8),
        "q": rng.integers(-2, 3, (queries, dim)).astype(np.int8),
    }
    scalars = {"n": n, "k": k, "queries": queries, "dim": dim}
    if kernel == "block_gate":
        arrays["delta"] = np.zeros(queries, dtype=np.uint32)
        scalars["mode"] = kernels.spec.MODE_TOPK
    return kernels.get(kernel).complete(KernelInputs(arrays, scalars))


def segment_case(kernel: str, rng: np.random.Generator, rows: list[int], **kw) -> KernelInputs:
    """A multi-segment call: one memory holding a slot per entry of `rows` (each fitted and
    quantized with its own state, through a stacked state), queries spread over the slots
    (consecutive ones share a slot), each scanning its slot or a prefix of it."""
    spec = kernels.get(kernel)
    queries, dim, heads = kw.get("queries", 6), kw.get("dim", 48), kw.get("heads", 3)
    floats = []
    for r in rows:
        if kernel == "page_indexer":
            centre = _student(rng, r, dim)
            spread = np.abs(rng.standard_normal((r, dim)))
            floats.append({"mins": centre - spread, "maxs": centre + spread})
        else:
            floats.append({"keys": _student(rng, r, dim) * rng.uniform(0.2, 5)})
    states = [spec.fit(f) for f in floats]
    stacked = spec.stack_states(states)
    memory = {a: np.concatenate([f[a] for f in floats]) for a in floats[0]}
    row_slot = np.repeat(np.arange(len(rows)), rows)
    ints = spec.quantize_memory(memory, stacked, slots=row_slot)
    slot = np.sort(rng.integers(0, len(rows), queries))
    bases = np.concatenate([[0], np.cumsum(rows)[:-1]])
    seg_rows = np.array([rows[i] for i in slot])
    seg_rows[::3] = np.maximum(1, seg_rows[::3] * 2 // 3)  # some queries see a prefix
    if kernel == "token_indexer":
        query = {
            "q": rng.standard_normal((queries, heads, dim)),
            "w": rng.uniform(-1, 1, (queries, heads)),
        }
    elif kernel == "page_indexer":
        query = {"q": rng.standard_normal((queries, heads, dim))}
    else:
        query = {"q": rng.standard_normal((queries, dim))}
    params = {"tau": kw["tau"]} if "tau" in kw else {"k": min(kw.get("k", 16), seg_rows.min())}
    segs = np.stack([bases[slot], seg_rows], axis=1)
    q = spec.quantize_query(query, stacked, slots=slot, segs=segs, **params)
    return spec.bind(ints, q, n=int(seg_rows.max()))


CASES = {
    "token_indexer": lambda rng: float_case("token_indexer", rng, 1500, heads=3, k=40),
    "token_indexer one head": lambda rng: float_case(
        "token_indexer", rng, 1500, heads=1, queries=1, k=40
    ),
    "page_indexer": lambda rng: float_case("page_indexer", rng, 700, heads=4, k=24),
    "vector_search": lambda rng: float_case("vector_search", rng, 2500, dim=96, k=64),
    "vector_search ties": lambda rng: tie_case("vector_search", rng, 1200, 100),
    "block_gate top-k": lambda rng: float_case("block_gate", rng, 1000, k=16),
    "block_gate threshold": lambda rng: float_case("block_gate", rng, 1000, queries=3, tau=0.02),
    "block_gate threshold one query": lambda rng: float_case(
        "block_gate", rng, 1000, queries=1, tau=0.02
    ),
    "block_gate ties": lambda rng: tie_case("block_gate", rng, 777, 50),
    # one launch over several slots of one memory (segments)
    "token_indexer segments": lambda rng: segment_case("token_indexer", rng, [300, 170, 420]),
    "page_indexer segments": lambda rng: segment_case("page_indexer", rng, [90, 260, 200]),
    "vector_search segments": lambda rng: segment_case(
        "vector_search", rng, [500, 333, 64, 700], queries=12, k=60
    ),
    "block_gate threshold segments": lambda rng: segment_case(
        "block_gate", rng, [400, 150, 610], queries=7, tau=0.02
    ),
}


@pytest.mark.parametrize(
    "case",
    list(CASES),
)
def test_emu_cosim_and_xrt_over_cosim_return_identical_outputs(case, emu, cosim, xrt_cosim):
    kernel = case.split()[0]
    inputs = CASES[case](np.random.default_rng(sum(map(ord, case))))
    want, t_emu = emu.call(kernel, inputs)
    got, t_cosim = cosim.call(kernel, inputs)
    via_xrt, t_xrt = xrt_cosim.call(kernel, inputs)
    if "threshold" in case:  # a bitmap that keeps some blocks and drops others
        bits = kernels.unpack_bitmap(want, inputs.scalars["n"])
        assert 0 < bits.sum() < bits.size
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(via_xrt, want)
    run_emu, run_cosim, run_xrt = t_emu[-2], t_cosim[-2], t_xrt[-2]
    assert run_emu.source == "modeled"
    assert run_cosim.source == run_xrt.source == "simulated"
    # The RTL is deterministic: the same call takes the same cycles on either path.
    assert run_cosim.cycles == run_xrt.cycles and run_cosim.cycles > 0
    assert run_cosim.seconds == pytest.approx(run_cosim.cycles / cosim.clock_hz)
    assert all(t.source == "modeled" for t in t_cosim if t.cycles is None)  # PCIe model


def test_resident_memory_appends_and_a_longer_capacity(emu, cosim):
    """Memory buffers with room beyond `n`, filled by appends at byte offsets, scanned with
    growing n back to back (the model is not reset between calls)."""
    rng = np.random.default_rng(7)
    spec = kernels.get("vector_search")
    full = float_case("vector_search", rng, 1800, dim=64, queries=3, k=20)
    capacity = 4096
    outs = {}
    for name, dev in (("emu", emu), ("cosim", cosim)):
        keys = dev.alloc("vector_search", "keys", capacity * 64)
        shifts = dev.alloc("vector_search", "shifts", capacity)
        q = dev.alloc("vector_search", "q", full.arrays["q"].nbytes)
        segs = dev.alloc("vector_search", "segs", 3 * 8)
        out = dev.alloc("vector_search", "out", 4 * 3 * 20)
        dev.write(q, full.arrays["q"])
        got = []
        for start, stop in ((0, 1000), (1000, 1800)):
            dev.write(keys, full.arrays["keys"][start:stop], offset=start * 64)
            dev.write(shifts, full.arrays["shifts"][start:stop], offset=start)
            dev.write(segs, kernels.spec.whole_segments(3, stop))
            scalars = {**full.scalars, "n": stop}
            bufs = {"keys": keys, "shifts": shifts, "q": q, "segs": segs, "out": out}
            timing = dev.run("vector_search", bufs, scalars)
            assert timing.cycles > 0
            data, _ = dev.read(out, np.uint32, 60)
            got.append(data.reshape(3, 20))
        for buf in (keys, shifts, q, segs, out):
            dev.free(buf)
        outs[name] = got
    for want, got in zip(outs["emu"], outs["cosim"], strict=True):
        np.testing.assert_array_equal(got, want)
    assert outs["cosim"][0].max() < 1000 <= outs["cosim"][1].max()
    assert spec.buffer_shape("out", full.scalars, 0) == (3, 20)


def test_models_are_built_once_and_found_in_the_cache(cosim):
    """A second device (and a second build request) reuses the cached executable."""
    first = cosim.model("vector_search")
    stamp = first.binary.stat().st_mtime_ns
    with open_device("cosim", prebuild=["vector_search"]) as again:
        second = again.models["vector_search"]
        assert not second.built
        assert second.binary == first.binary and second.key == first.key
        assert second.binary.stat().st_mtime_ns == stamp
        assert second.build_seconds == first.build_seconds > 0
    third = cosim_mod.build_model("vector_search")
    assert not third.built and third.binary.stat().st_mtime_ns == stamp
    # The key follows the sources: another parameter set is another build.
    other = cosim_mod.model_key("vector_search", {**first.params, "NMAX": 4096})
    assert other != first.key


def test_bm25_has_no_rtl_and_says_so(cosim, xrt_cosim):
    with pytest.raises(XclbinError, match="bm25 has no RTL"):
        cosim.alloc("bm25", "doc_ids", 1024)
    # The driver over cosim loads the RTL-only xclbin: bm25 is missing from the card.
    assert "hetmem_rtl_hw.xclbin" in xrt_cosim.name
    with pytest.raises(XclbinError, match="no kernel bm25"):
        xrt_cosim.alloc("bm25", "doc_ids", 1024)
    with pytest.raises(XclbinError, match="no RTL"):
        cosim_mod.build_model("bm25")


def test_calls_beyond_the_build_are_input_errors(cosim):
    nmax = cosim.model("vector_search").params["NMAX"]
    n = nmax + 1
    inputs = KernelInputs(
        {
            "keys": np.zeros((n, 1), np.int8),
            "shifts": np.zeros(n, np.uint8),
            "q": np.ones((1, 1), np.int8),
        },
        {"n": n, "k": 1, "queries": 1, "dim": 1},
    )
    inputs = kernels.get("vector_search").complete(inputs)
    with pytest.raises(InputError) as err:
        cosim.call("vector_search", inputs)
    assert err.value.argument == "n" and "NMAX" in str(err.value)


def test_invalid_segments_are_input_errors_before_the_rtl(cosim):
    """The RTL refuses an invalid segment by writing nothing; cosim names it first."""
    inputs = segment_case("vector_search", np.random.default_rng(8), [100, 50], queries=2, k=5)
    inputs.arrays["segs"] = np.array([[0, 100], [100, 60]], dtype=np.uint32)  # past 150 rows
    with pytest.raises(InputError) as err:
        cosim.call("vector_search", inputs)
    assert err.value.argument == "segs"


def test_timeout_hang_and_lost_simulator(cosim, emu):
    rng = np.random.default_rng(3)
    inputs = float_case("block_gate", rng, 600, k=8)
    want, _ = emu.call("block_gate", inputs)
    # 1 us of simulated time is 300 cycles: the call cannot finish.
    with pytest.raises(FpgaTimeout, match="no ap_done within 1e-06 s"):
        cosim.call("block_gate", inputs, timeout_s=1e-6)
    got, _ = cosim.call("block_gate", inputs)  # the model was reset and runs again
    np.testing.assert_array_equal(got, want)
    # The simulator process dies: DeviceLost, then a fresh process serves the next call.
    cosim._sims["block_gate"]._proc.kill()
    with pytest.raises(DeviceLost, match="stopped answering"):
        cosim.call("block_gate", inputs)
    got, _ = cosim.call("block_gate", inputs)
    np.testing.assert_array_equal(got, want)


def test_an_access_outside_the_buffers_is_an_axi_error(cosim, emu, monkeypatch):
    """Unmap the shifts buffer: the engine's reads on m_axi_mem_b answer DECERR."""
    rng = np.random.default_rng(4)
    inputs = float_case("vector_search", rng, 500, k=8)
    real = cosim_mod.CosimDevice._regions

    def without_port_b(self, spec, raw, scalars):
        regions, addrs, need = real(self, spec, raw, scalars)
        return [r for r in regions if r.port != cosim_mod.PORT_B], addrs, need

    monkeypatch.setattr(cosim_mod.CosimDevice, "_regions", without_port_b)
    bank = kernels.get("vector_search").arg("shifts").bank  # HBM[15]: above 4 GiB
    addr = bank * cosim_mod.BANK_BYTES
    with pytest.raises(AxiError, match=rf"m_axi_mem_b: read at {addr:#x} .*\(DECERR\)"):
        cosim.call("vector_search", inputs)
    monkeypatch.undo()
    got, _ = cosim.call("vector_search", inputs)
    want, _ = emu.call("vector_search", inputs)
    np.testing.assert_array_equal(got, want)


def test_cosim_says_why_it_cannot_open(tmp_path):
    """Without the simulator, or without RTL, opening cosim names what is missing."""
    with pytest.raises(NoDeviceError, match="cosim: ") as err:
        open_device("cosim", rtl_dir=tmp_path)
    assert str(err.value).removeprefix("cosim: ") == cosim_mod.missing(tmp_path)
    with pytest.raises(InputError) as bad:
        open_device("xrt_emu", executor="gpu")
    assert bad.value.argument == "executor"


def test_xrt_emu_still_defaults_to_the_golden_models():
    with open_device("xrt_emu", executor="emu") as dev:
        assert "cosim" not in dev.name
        inputs = float_case("vector_search", np.random.default_rng(1), 300, k=4)
        _, timings = dev.call("vector_search", inputs)
        assert timings[-2].source == "modeled"


@needs_sim
def test_list_devices_reports_cosim_available():
    found = {info.target: info for info in list_devices()}
    assert found["cosim"].available


# -- a pipeline on the cosim target ----------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda get: get("dsa"), id="dsa"),
        pytest.param(lambda get: get("quest", page_size=16), id="quest"),
        pytest.param(lambda get: get("seer", block_size=16), id="seer"),
        pytest.param(
            lambda get: get("seer", block_size=16, mode="threshold", threshold=0.5),
            id="seer_threshold",
        ),
    ],
)
@needs_sim
def test_pipeline_on_cosim_selects_as_on_emu(make):
    """Relevancy and Retrieval on the RTL: the selection equals the emu run's exactly, and
    the fused kernel's profile row is `simulated`."""
    from hetmem.attention import KVChunk
    from hetmem.methods import get
    from hetmem.pipeline import Pipeline
    from hetmem.synthetic import synthetic_kv

    selections, outputs = {}, {}
    for target in ("emu", "cosim"):
        kv, query = synthetic_kv(q_heads=4, kv_heads=2, length=1024, lengths=[1024, 700], seed=5)
        gen = torch.Generator().manual_seed(6)
        chunk = KVChunk(
            torch.randn(2, 2, 3, 64, generator=gen), torch.randn(2, 2, 3, 64, generator=gen)
        )
        pipe = Pipeline(make(get), HYBRID, fpga=target, on_fpga_error="raise")
        pipe.prepare(kv)
        pipe.append(chunk)
        outputs[target] = pipe.step(query, 128)
        selections[target] = pipe.last_selection
        fused = pipe.profile.by_step()["relevancy+retrieval"]
        assert fused.device == f"fpga:{target}"
        assert fused.source == ("simulated" if target == "cosim" else "modeled")
        assert pipe.counters["fpga_fallbacks"] == 0
        if target == "cosim":  # the kernel ran on the RTL, not only the short-prefix path
            assert pipe.fpga_stage.device.stats.calls > 0
        pipe.fpga_stage.close()
    emu_sel, cosim_sel = selections["emu"], selections["cosim"]
    assert type(emu_sel) is type(cosim_sel)
    for name in ("indices", "valid", "mask"):
        if hasattr(emu_sel, name):
            assert torch.equal(getattr(cosim_sel, name), getattr(emu_sel, name)), name
    assert torch.equal(outputs["cosim"], outputs["emu"])
