"""The hls target: the HLS C++ kernels of hls/ C-simulated with g++ (against hls4ml's
ap_types headers) return exactly the golden model's outputs on random calls, through the
device API as on emu, and a pipeline on hls selects as on emu. Skips with the reason where
g++ or the headers are missing."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from hetmem import kernels
from hetmem.errors import InputError, XclbinError
from hetmem.fpga import hls as hls_mod
from hetmem.fpga import list_devices, open_device
from hetmem.kernels import KernelInputs
from hetmem.kernels.spec import MODE_THRESHOLD, MODE_TOPK

REASON = hls_mod.missing()
pytestmark = [
    pytest.mark.hls,
    pytest.mark.skipif(REASON is not None, reason=f"hls: {REASON}"),
]

HYBRID = "gpu/fpga/fpga/gpu"
#: Random calls per kernel compared with the golden model.
CASES = 1000


@pytest.fixture(scope="module")
def hls():
    dev = open_device("hls")
    yield dev
    dev.close()


@pytest.fixture(scope="module")
def emu():
    dev = open_device("emu")
    yield dev
    dev.close()


# -- random integer calls ------------------------------------------------------------------------


def bm25_case(rng: np.random.Generator) -> KernelInputs:
    """A random inverted index and query batch; small value sets make many equal scores."""
    n = int(rng.integers(1, 400))
    vocab = int(rng.integers(1, 60))
    lengths = rng.integers(0, min(n, 40) + 1, vocab)
    docs = np.concatenate([rng.choice(n, size=int(c), replace=False) for c in lengths] + [[]])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.uint32)
    spread = rng.choice([3, 50, 65536])
    impacts = rng.integers(0, spread, docs.size).astype(np.uint16)
    queries, terms_per_query = int(rng.integers(1, 5)), int(rng.integers(1, 8))
    terms = rng.integers(-1, vocab, (queries, terms_per_query)).astype(np.int32)
    idf = rng.integers(0, rng.choice([2, 9, 65536]), (queries, terms_per_query))
    spare = int(rng.integers(0, 5))  # postings capacity beyond the index: never read
    arrays = {
        "term_offsets": offsets,
        "doc_ids": np.concatenate([docs, np.zeros(spare)]).astype(np.uint32),
        "impacts": np.concatenate([impacts, np.zeros(spare)]).astype(np.uint16),
        "terms": terms,
        "idf": idf.astype(np.uint16),
    }
    k = int(rng.choice([1, n, rng.integers(1, n + 1)]))
    scalars = {
        "n": n,
        "k": k,
        "queries": queries,
        "terms_per_query": terms_per_query,
        "vocab": vocab,
    }
    return KernelInputs(arrays, scalars)


def block_gate_case(rng: np.random.Generator) -> KernelInputs:
    """Random int8 blocks (full range, -128 too), shifts, queries and segments over one
    memory, top-k or threshold; a narrow value range makes many equal scores."""
    capacity = int(rng.integers(1, 300))
    dim = int(rng.choice([1, 7, 64, 65, 130, rng.integers(1, 200)]))
    queries = int(rng.integers(1, 5))
    lo, hi = (-128, 128) if rng.random() < 0.7 else (-1, 2)
    keys = rng.integers(lo, hi, (capacity, dim)).astype(np.int8)
    shifts = rng.integers(0, 8 if rng.random() < 0.7 else 1, capacity).astype(np.uint8)
    q = rng.integers(lo, hi, (queries, dim)).astype(np.int8)
    if rng.random() < 0.3:  # one segment, the whole memory
        segs = kernels.spec.whole_segments(queries, capacity)
    else:
        rows = rng.integers(1, capacity + 1, queries)
        base = (rng.random(queries) * (capacity - rows + 1)).astype(np.int64)
        segs = np.stack([base, rows], axis=1).astype(np.uint32)
    n = int(segs[:, 1].max())
    threshold = rng.random() < 0.4
    if threshold:
        delta = rng.integers(0, rng.choice([1, 1000, 2**20, 2**32]), queries, dtype=np.int64)
        k, mode = 0, MODE_THRESHOLD
    else:
        delta = np.zeros(queries, dtype=np.int64)
        rows_min = int(segs[:, 1].min())
        k, mode = int(rng.choice([1, rows_min, rng.integers(1, rows_min + 1)])), MODE_TOPK
    arrays = {
        "keys": keys,
        "shifts": shifts,
        "q": q,
        "delta": delta.astype(np.uint32),
        "segs": segs,
    }
    scalars = {"n": n, "k": k, "queries": queries, "dim": dim, "mode": mode}
    return KernelInputs(arrays, scalars)


MAKERS = {"bm25": bm25_case, "block_gate": block_gate_case}


@pytest.mark.parametrize("kernel", list(MAKERS))
def test_hls_equals_golden_on_random_calls(kernel, hls):
    spec = kernels.get(kernel)
    rng = np.random.default_rng(sum(map(ord, kernel)))
    modes = set()
    for case in range(CASES):
        inputs = MAKERS[kernel](rng)
        want = spec.golden(inputs)
        got, cycles = hls.simulate(kernel, inputs)
        expect = want.indices if want.indices is not None else want.bitmap
        assert got.dtype == np.uint32 and got.shape == expect.shape, case
        assert np.array_equal(got, expect), (kernel, case, inputs.scalars)
        assert cycles > 0
        modes.add(int(inputs.scalars.get("mode", MODE_TOPK)))
    assert modes == ({MODE_TOPK, MODE_THRESHOLD} if kernel == "block_gate" else {MODE_TOPK})


def test_hls_equals_golden_on_larger_calls(hls):
    """Realistic sizes: a Zipfian index of 20k documents; 8k blocks of 128 channels."""
    rng = np.random.default_rng(2)
    n, vocab = 20000, 3000
    df = np.minimum(n, (n / np.arange(1, vocab + 1) ** 0.9).astype(np.int64) // 4 + 1)
    docs = np.concatenate([rng.choice(n, size=int(c), replace=False) for c in df])
    bm = KernelInputs(
        {
            "term_offsets": np.concatenate([[0], np.cumsum(df)]).astype(np.uint32),
            "doc_ids": docs.astype(np.uint32),
            "impacts": rng.integers(1, 65536, docs.size).astype(np.uint16),
            "terms": rng.integers(-1, vocab, (4, 6)).astype(np.int32),
            "idf": rng.integers(0, 65536, (4, 6)).astype(np.uint16),
        },
        {"n": n, "k": 100, "queries": 4, "terms_per_query": 6, "vocab": vocab},
    )
    blocks, dim = 8192, 128
    bg = KernelInputs(
        {
            "keys": rng.integers(-127, 128, (blocks, dim)).astype(np.int8),
            "shifts": rng.integers(0, 8, blocks).astype(np.uint8),
            "q": rng.integers(-127, 128, (3, dim)).astype(np.int8),
            "delta": np.zeros(3, dtype=np.uint32),
        },
        {"n": blocks, "k": 256, "queries": 3, "dim": dim, "mode": MODE_TOPK},
    )
    for kernel, inputs in (("bm25", bm), ("block_gate", bg)):
        want = kernels.get(kernel).golden(inputs).indices
        got, cycles = hls.simulate(kernel, inputs)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kernel", list(MAKERS))
def test_emu_and_hls_devices_return_identical_outputs(kernel, hls, emu):
    """Through the device API (buffers in banks, a launch, a read), with modeled times."""
    rng = np.random.default_rng(11)
    for _ in range(20):
        inputs = MAKERS[kernel](rng)
        want, t_emu = emu.call(kernel, inputs)
        got, t_hls = hls.call(kernel, inputs)
        np.testing.assert_array_equal(got, want)
        run = t_hls[-2]
        assert run.source == "modeled" and run.cycles > 0
        assert run.seconds == pytest.approx(run.cycles / hls.clock_hz)
    assert hls.stats.calls >= 20


def test_rtl_only_kernels_are_missing_from_the_hls_target(hls):
    with pytest.raises(XclbinError, match="token_indexer has no HLS implementation"):
        hls.alloc("token_indexer", "keys", 1024)
    with pytest.raises(XclbinError, match="no HLS"):
        hls.simulate("vector_search", KernelInputs({}, {}))


def test_bad_calls_are_input_errors_naming_the_argument(hls):
    rng = np.random.default_rng(5)
    inputs = block_gate_case(rng)
    held = inputs.arrays["keys"].shape[0]
    inputs.arrays["segs"] = np.array([[1, held]] * inputs.scalars["queries"], dtype=np.uint32)
    inputs.scalars.update(n=held, k=1)  # one row past the memory
    with pytest.raises(InputError) as err:
        hls.simulate("block_gate", inputs)
    assert err.value.argument == "segs"
    bm = bm25_case(rng)
    bm.scalars["k"] = bm.scalars["n"] + 1
    with pytest.raises(InputError) as err:
        hls.simulate("bm25", bm)
    assert err.value.argument == "k"
    bm = bm25_case(np.random.default_rng(6))
    while not (bm.arrays["terms"] >= 0).any() or bm.arrays["doc_ids"].size == 0:
        bm = bm25_case(np.random.default_rng(int(bm.scalars["n"])))
    bm.arrays["doc_ids"] = np.full_like(bm.arrays["doc_ids"], bm.scalars["n"])  # past n
    bm.arrays["terms"][:] = np.argmax(np.diff(bm.arrays["term_offsets"].astype(np.int64)))
    with pytest.raises(InputError) as err:  # the kernel itself refuses it
        hls.simulate("bm25", bm)
    assert err.value.argument == "doc_ids" and "refused" in str(err.value)


def test_the_library_is_built_once_and_found_in_the_cache(hls):
    first = hls.library
    stamp = first.path.stat().st_mtime_ns
    again = hls_mod.build_library()
    assert not again.built and again.path == first.path and again.key == first.key
    assert again.path.stat().st_mtime_ns == stamp and again.build_seconds > 0
    with open_device("hls") as second:
        assert second.library.path == first.path and not second.library.built


def test_make_csim_runs_the_testbench(tmp_path):
    """`make -C hls csim` (the command the README gives) builds and self-checks."""
    proc = subprocess.run(
        ["make", "-C", str(hls_mod.HLS_DIR), "csim", f"BUILD={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "C-simulation passed" in proc.stdout
    assert (tmp_path / hls_mod.LIBRARY).is_file()


def test_list_devices_reports_hls():
    found = {info.target: info for info in list_devices()}
    assert found["hls"].available and "modeled" in found["hls"].detail


# -- pipelines on the hls target ------------------------------------------------------------------


def test_bm25_rag_on_hls_selects_as_on_emu():
    from hetmem.corpus import pydoc_paragraphs
    from hetmem.methods import get
    from hetmem.pipeline import Pipeline

    docs = list(pydoc_paragraphs())
    queries = [
        "exception handling with try and finally",
        "class method decorator",
        "yield generator iterator protocol zzzunknownzzz",
    ]
    selections, prompts = {}, {}
    for target in ("emu", "hls"):
        pipe = Pipeline(get("bm25_rag"), HYBRID, fpga=target, on_fpga_error="raise")
        pipe.prepare(docs[:1200])
        pipe.append(docs[1200:1300])
        prompts[target] = pipe.step(queries, 24)
        selections[target] = pipe.last_selection
        fused = pipe.profile.by_step()["relevancy+retrieval"]
        assert fused.device == f"fpga:{target}" and fused.source == "modeled"
        assert pipe.counters["fpga_fallbacks"] == 0
        if target == "hls":
            assert pipe.fpga_stage.device.stats.calls > 0
        pipe.fpga_stage.close()
    assert torch.equal(selections["hls"].indices, selections["emu"].indices)
    assert prompts["hls"] == prompts["emu"]


@pytest.mark.parametrize(
    "options",
    [{"block_size": 16}, {"block_size": 16, "mode": "threshold", "threshold": 0.5}],
    ids=["seer", "seer_threshold"],
)
def test_seer_on_hls_selects_as_on_emu(options):
    from hetmem.attention import KVChunk
    from hetmem.methods import get
    from hetmem.pipeline import Pipeline
    from hetmem.synthetic import synthetic_kv

    selections, outputs = {}, {}
    for target in ("emu", "hls"):
        kv, query = synthetic_kv(q_heads=4, kv_heads=2, length=1024, lengths=[1024, 700], seed=5)
        gen = torch.Generator().manual_seed(6)
        chunk = KVChunk(
            torch.randn(2, 2, 3, 64, generator=gen), torch.randn(2, 2, 3, 64, generator=gen)
        )
        pipe = Pipeline(get("seer", **options), HYBRID, fpga=target, on_fpga_error="raise")
        pipe.prepare(kv)
        pipe.append(chunk)
        outputs[target] = pipe.step(query, 128)
        selections[target] = pipe.last_selection
        assert pipe.profile.by_step()["relevancy+retrieval"].device == f"fpga:{target}"
        assert pipe.counters["fpga_fallbacks"] == 0
        if target == "hls":
            assert pipe.fpga_stage.device.stats.calls > 0
        pipe.fpga_stage.close()
    emu_sel, hls_sel = selections["emu"], selections["hls"]
    for name in ("indices", "valid", "mask"):
        if hasattr(emu_sel, name):
            assert torch.equal(getattr(hls_sel, name), getattr(emu_sel, name)), name
    assert torch.equal(outputs["hls"], outputs["emu"])
