"""Kernel specs: the top-k contract, golden models against brute-force integer references,
register maps, HBM banks, cycle models, the threshold bitmap and the Quest bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hetmem import kernels
from hetmem.errors import InputError
from hetmem.kernels import spec as kspec
from hetmem.kernels.bm25 import BM25State, drifted
from hetmem.kernels.topk import pack_bitmap, threshold_bitmap, topk, unpack_bitmap

NAMES = ("token_indexer", "page_indexer", "block_gate", "vector_search", "bm25")


def brute_topk(scores: np.ndarray, k: int) -> np.ndarray:
    """The contract, by definition: sort by (-score, index), take k, ascending."""
    rows = []
    for row in scores.tolist():
        best = sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]
        rows.append(sorted(best))
    return np.array(rows, dtype=np.int64).reshape(len(rows), k)


# -- top-k -----------------------------------------------------------------------------------


def _cases():
    rng = np.random.default_rng(1)
    yield "random", rng.integers(-(10**9), 10**9, (3, 1000)), (1, 7, 64, 999, 1000)
    yield "ties", rng.integers(0, 4, (4, 257)), (1, 3, 64, 100, 200, 257)
    yield "all_equal", np.full((2, 131), 5), (1, 64, 130, 131)
    yield "negative", -rng.integers(1, 50, (3, 77)), (1, 10, 76, 77)
    yield "int64_extremes", np.array([[2**62, -(2**62), 0, 2**62, -1]]), (1, 2, 3, 5)
    yield "one_candidate", np.array([[3], [-3]]), (1,)


@pytest.mark.parametrize(("label", "scores", "ks"), list(_cases()), ids=lambda v: str(v)[:12])
def test_topk_matches_the_brute_force_contract(label, scores, ks):
    for k in ks:
        got = topk(scores, k)
        assert got.dtype == np.uint32 and got.shape == (scores.shape[0], k)
        np.testing.assert_array_equal(got, brute_topk(scores, k), err_msg=f"{label} k={k}")
        assert (np.diff(got.astype(np.int64), axis=1) > 0).all()  # strictly ascending


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 200),
    queries=st.integers(1, 3),
    spread=st.sampled_from([1, 3, 1000]),
    data=st.data(),
)
def test_topk_property(seed, n, queries, spread, data):
    scores = np.random.default_rng(seed).integers(-spread, spread + 1, (queries, n))
    k = data.draw(st.integers(1, n))
    np.testing.assert_array_equal(topk(scores, k), brute_topk(scores, k))


@pytest.mark.parametrize("k", [0, -1, 6, 100])
def test_topk_rejects_k_outside_1_to_n(k):
    with pytest.raises(InputError) as err:
        topk(np.zeros((2, 5), dtype=np.int64), k)
    assert err.value.argument == "k"


@pytest.mark.parametrize("k", [0, -2, 2.5, True])
def test_quantize_query_rejects_a_bad_k_before_any_work(k):
    spec = kernels.get("vector_search")
    state = spec.fit({"keys": np.ones((10, 4))})
    with pytest.raises(InputError) as err:
        spec.quantize_query({"q": np.ones((1, 4))}, state, k=k)
    assert err.value.argument == "k"


def test_topk_rejects_float_scores_and_non_int_k():
    with pytest.raises(InputError):
        topk(np.zeros((1, 4)), 2)
    with pytest.raises(InputError):
        topk(np.zeros((1, 4), dtype=np.int64), 2.0)
    with pytest.raises(InputError):
        topk(np.zeros((1, 4), dtype=np.int64), True)


def test_bitmap_packing_roundtrip_and_bit_order():
    rng = np.random.default_rng(2)
    for n in (1, 31, 32, 33, 64, 100):
        mask = rng.random((3, n)) < 0.4
        words = pack_bitmap(mask)
        assert words.dtype == np.uint32 and words.shape == (3, -(-n // 32))
        np.testing.assert_array_equal(unpack_bitmap(words, n), mask)
        for i in range(3):
            for j in range(n):  # bit j % 32 of word j // 32
                assert bool((int(words[i, j // 32]) >> (j % 32)) & 1) == mask[i, j]
            if n % 32:
                assert int(words[i, -1]) >> (n % 32) == 0  # no bits past n


def test_threshold_bitmap_is_the_comparison():
    rng = np.random.default_rng(3)
    scores = rng.integers(-20, 20, (4, 70))
    thr = rng.integers(-20, 20, 4)
    got = unpack_bitmap(threshold_bitmap(scores, thr), 70)
    for i in range(4):
        assert [bool(s >= thr[i]) for s in scores[i]] == got[i].tolist()


# -- brute-force integer references of every kernel ------------------------------------------


def _int_keys(rng, n, d):
    return rng.integers(-127, 128, (n, d)).astype(np.int8)


def _shifts(rng, n):
    return rng.integers(0, kspec.MAX_SHIFT + 1, n).astype(np.uint8)


def _inputs(name, rng, n, queries=2, k=5):
    """Random integer inputs (not from quantization) and a brute-force score function."""
    if name == "token_indexer":
        h, d = 3, 20
        keys, sh = _int_keys(rng, n, d), _shifts(rng, n)
        q = rng.integers(-127, 128, (queries, h, d)).astype(np.int8)
        w = rng.integers(-32767, 32768, (queries, h)).astype(np.int16)
        arrays = {"keys": keys, "shifts": sh, "q": q, "w": w}
        scalars = {"heads": h, "dim": d}

        def ref(i, j):
            dots = [
                max(0, sum(int(a) * int(b) for a, b in zip(q[i, r], keys[j], strict=True)))
                for r in range(h)
            ]
            return sum(int(w[i, r]) * dots[r] for r in range(h)) << int(sh[j])

    elif name == "page_indexer":
        h, d = 3, 20
        a, b = (rng.integers(-32767, 32768, (n, d)).astype(np.int16) for _ in range(2))
        mins, maxs = np.minimum(a, b), np.maximum(a, b)
        q = rng.integers(-127, 128, (queries, h, d)).astype(np.int8)
        arrays = {"mins": mins, "maxs": maxs, "q": q}
        scalars = {"heads": h, "dim": d}

        def ref(i, j):
            return max(
                sum(
                    max(int(x) * int(lo), int(x) * int(hi))
                    for x, lo, hi in zip(q[i, r], mins[j], maxs[j], strict=True)
                )
                for r in range(h)
            )

    elif name in ("block_gate", "vector_search"):
        d = 24
        keys, sh = _int_keys(rng, n, d), _shifts(rng, n)
        q = rng.integers(-127, 128, (queries, d)).astype(np.int8)
        arrays = {"keys": keys, "shifts": sh, "q": q}
        scalars = {"dim": d}
        if name == "block_gate":
            arrays["delta"] = np.zeros(queries, dtype=np.uint32)
            scalars["mode"] = kspec.MODE_TOPK

        def ref(i, j):
            return sum(int(a) * int(b) for a, b in zip(q[i], keys[j], strict=True)) << int(sh[j])

    else:  # bm25
        vocab, t = 30, 4
        per_term = [
            np.sort(rng.choice(n, rng.integers(0, min(n, 40) + 1), replace=False))
            for _ in range(vocab)
        ]
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in per_term])]).astype(np.uint32)
        doc_ids = np.concatenate(per_term).astype(np.uint32)
        impacts = rng.integers(0, 65536, len(doc_ids)).astype(np.uint16)
        terms = rng.integers(-1, vocab, (queries, t)).astype(np.int32)
        idf = rng.integers(0, 65536, (queries, t)).astype(np.uint16)
        arrays = {
            "term_offsets": offsets,
            "doc_ids": doc_ids,
            "impacts": impacts,
            "terms": terms,
            "idf": idf,
        }
        scalars = {"terms_per_query": t, "vocab": vocab}

        def ref(i, j):
            total = 0
            for c in range(t):
                term = int(terms[i, c])
                if term < 0:
                    continue
                for p in range(int(offsets[term]), int(offsets[term + 1])):
                    if int(doc_ids[p]) == j:
                        total += int(idf[i, c]) * int(impacts[p])
            return total

    scalars.update(n=n, k=k, queries=queries)
    return kernels.KernelInputs(arrays, scalars), ref


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", [1, 37, 100])
def test_golden_matches_brute_force_integer_reference(name, n):
    rng = np.random.default_rng(n)
    spec = kernels.get(name)
    for k in sorted({1, min(5, n), n}):
        inputs, ref = _inputs(name, rng, n, k=k)
        brute = np.array([[ref(i, j) for j in range(n)] for i in range(2)], dtype=object)
        np.testing.assert_array_equal(spec.scores(inputs).astype(object), brute)
        out = spec.golden(inputs)
        np.testing.assert_array_equal(out.indices, brute_topk(brute, k))
        assert out.bitmap is None and out.cycles > 0


@pytest.mark.parametrize("name", NAMES)
def test_golden_is_deterministic_and_leaves_inputs_alone(name):
    rng = np.random.default_rng(5)
    inputs, _ = _inputs(name, rng, 300, queries=3, k=17)
    before = {a: v.copy() for a, v in inputs.arrays.items()}
    first = kernels.get(name).golden(inputs)
    second = kernels.get(name).golden(inputs)
    np.testing.assert_array_equal(first.indices, second.indices)
    assert first.cycles == second.cycles
    for a, v in before.items():
        np.testing.assert_array_equal(inputs.arrays[a], v)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [0, -3, 41])
def test_golden_rejects_k_outside_1_to_n(name, k):
    inputs, _ = _inputs(name, np.random.default_rng(0), 40)
    inputs.scalars["k"] = k
    with pytest.raises(InputError) as err:
        kernels.get(name).golden(inputs)
    assert err.value.argument == "k"


@pytest.mark.parametrize("name", NAMES)
def test_golden_is_integer_only(name):
    """Inputs must carry the declared integer dtypes; scores are integers."""
    spec = kernels.get(name)
    inputs, _ = _inputs(name, np.random.default_rng(0), 50)
    assert np.issubdtype(spec.scores(inputs).dtype, np.integer)
    if spec.segmented:
        inputs.arrays["segs"] = kspec.whole_segments(2, 50)
    if spec.staging:
        inputs.arrays["stage"] = kspec.empty_stage()
    for arg in spec.args:
        if arg.direction != "in":
            continue
        bad = kernels.KernelInputs(dict(inputs.arrays), dict(inputs.scalars))
        bad.arrays[arg.name] = bad.arrays[arg.name].astype(np.float64)
        with pytest.raises(InputError) as err:
            spec.golden(bad)
        assert err.value.argument == arg.name
    missing = kernels.KernelInputs(dict(inputs.arrays), dict(inputs.scalars))
    del missing.scalars["n"]
    with pytest.raises(InputError):
        spec.golden(missing)


def test_n_below_the_buffer_rows_scans_only_n():
    rng = np.random.default_rng(9)
    inputs, _ = _inputs("vector_search", rng, 200, k=10)
    spec = kernels.get("vector_search")
    full = spec.scores(inputs)
    inputs.scalars["n"] = 150
    np.testing.assert_array_equal(spec.scores(inputs), full[:, :150])
    assert spec.golden(inputs).indices.max() < 150
    inputs.scalars["n"] = 201
    with pytest.raises(InputError):
        spec.golden(inputs)


# -- threshold mode --------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 31, 32, 100])
def test_threshold_bitmap_agrees_with_brute_force(n):
    rng = np.random.default_rng(n)
    spec = kernels.get("block_gate")
    inputs, ref = _inputs("block_gate", rng, n, queries=3)
    inputs.scalars.update(mode=kspec.MODE_THRESHOLD, k=0)
    inputs.arrays["delta"] = rng.integers(0, 2**20, 3).astype(np.uint32)
    out = spec.golden(inputs)
    assert out.indices is None and out.bitmap.shape == (3, -(-n // 32))
    kept = unpack_bitmap(out.bitmap, n)
    for i in range(3):
        s = [ref(i, j) for j in range(n)]
        limit = max(s) - int(inputs.arrays["delta"][i])
        assert kept[i].tolist() == [v >= limit for v in s]
        assert kept[i].any()  # the maximum is always kept


def test_unsupported_mode_is_an_error():
    rng = np.random.default_rng(0)
    inputs, _ = _inputs("block_gate", rng, 10)
    inputs.scalars["mode"] = 2
    with pytest.raises(InputError):
        kernels.get("block_gate").golden(inputs)


def test_block_gate_query_takes_exactly_one_of_k_and_tau():
    spec = kernels.get("block_gate")
    keys = np.random.default_rng(0).standard_normal((50, 8))
    state = spec.fit({"keys": keys})
    q = {"q": np.ones((1, 8))}
    for bad in ({}, {"k": 3, "tau": 0.5}, {"tau": 0.0}, {"tau": 1.5}):
        with pytest.raises(InputError):
            spec.quantize_query(q, state, **bad)
    tau1 = spec.quantize_query(q, state, tau=1.0)
    assert tau1.scalars["mode"] == kspec.MODE_THRESHOLD and int(tau1.arrays["delta"][0]) == 0
    smaller = spec.quantize_query(q, state, tau=0.01).arrays["delta"][0]
    assert int(smaller) > int(spec.quantize_query(q, state, tau=0.5).arrays["delta"][0])


# -- register map, banks, registry -----------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_register_map(name):
    spec = kernels.get(name)
    regs = spec.registers()
    assert kspec.CTRL == 0x00 and kspec.ARGS_BASE == 0x10
    assert list(regs) == [a.name for a in spec.args]
    offsets = [regs[a.name] for a in spec.args]
    assert offsets[0] == 0x10
    assert len(set(offsets)) == len(offsets)
    assert all(o % 4 == 0 for o in offsets)
    for arg, here, there in zip(spec.args, offsets, offsets[1:], strict=False):
        words = 2 if arg.is_buffer else 1  # a 64-bit address takes two 32-bit words
        assert there - here >= 4 * words
        assert arg.width_bytes == 4 * words
    scalars = set(spec.scalar_args())
    assert {"n", "k", "queries"} <= scalars


@pytest.mark.parametrize("name", NAMES)
def test_banks(name):
    spec = kernels.get(name)
    for arg in spec.args:
        if arg.is_buffer:
            assert arg.bank is not None and 0 <= arg.bank < kspec.HBM_BANKS
        else:
            assert arg.bank is None
    memory = [spec.arg(a).bank for a in spec.memory_args]
    others = [spec.arg(a).bank for a in (*spec.query_args(), *spec.output_args())]
    assert len(set(memory)) == len(memory)  # each memory array has its own pseudo-channel
    assert not set(memory) & set(others)
    assert spec.output_args() == ("out",)
    assert spec.engine.ports == len(spec.memory_args)


def test_kernels_do_not_share_banks():
    """Every buffer has a pseudo-channel of its own, except a kernel's staged beats, which
    ride on the query port in its segments' bank."""
    banks = [
        a.bank for n in NAMES for a in kernels.get(n).args if a.is_buffer and a.name != "stage"
    ]
    assert len(banks) == len(set(banks))
    for name in NAMES:
        spec = kernels.get(name)
        if spec.staging:
            assert spec.arg("stage").bank == spec.arg("segs").bank


def test_registry():
    assert set(kernels.names()) == set(NAMES)
    for name in NAMES:
        assert kernels.get(name).name == name
    with pytest.raises(InputError):
        kernels.get("nope")


# -- cycle model -----------------------------------------------------------------------------


def _shape(name, n, k=16, queries=1):
    dims = {"dim": 128}
    if name in ("token_indexer", "page_indexer"):
        dims["heads"] = 4
    if name == "bm25":
        dims = {"postings": 3 * n, "terms": 8}
    return {"n": n, "k": k, "queries": queries, **dims}


def _row_bytes(name):
    # key bytes + 1 shift byte per row; page_indexer: int16 mins and maxs
    return {"token_indexer": 129, "page_indexer": 512, "block_gate": 129, "vector_search": 129}.get(
        name, 0
    )


@pytest.mark.parametrize("name", NAMES)
def test_cycle_model_is_monotone_and_bandwidth_bound(name):
    spec = kernels.get(name)
    p = spec.engine
    previous = 0
    for n in (16, 100, 1000, 4096, 65536, 131072):
        cycles = spec.cycles(**_shape(name, n))
        assert cycles > previous
        previous = cycles
        stream = 3 * n * 6 if name == "bm25" else n * _row_bytes(name)
        assert cycles >= stream / (p.beat_bytes * p.ports)
    assert spec.cycles(**_shape(name, 4096, k=512)) > spec.cycles(**_shape(name, 4096, k=16))
    assert spec.cycles(**_shape(name, 4096, queries=4)) > spec.cycles(**_shape(name, 4096))
    slow = p.with_(control_overhead=p.control_overhead + 1000)
    assert (
        spec.cycles(**_shape(name, 4096), params=slow) == spec.cycles(**_shape(name, 4096)) + 1000
    )
    assert math.isclose(
        spec.seconds(**_shape(name, 4096)), spec.cycles(**_shape(name, 4096)) / 300e6
    )


def test_cycle_model_formula():
    p = kspec.EngineParams(lanes=4, ports=2, pipeline_latency=10, control_overhead=100)
    # stream-bound: 6400 bytes on the busiest port = 100 beats; 50 lane ops / 4 lanes = 13
    assert kspec.engine_cycles(p, port_bytes=(6400, 64), lane_ops=50, n=64, k=3, queries=2) == (
        100 + 100 + 10 + 2 * (2 + 3)
    )
    # lane-bound, threshold mode (no index drain)
    assert kspec.engine_cycles(
        p, port_bytes=(64,), lane_ops=4000, n=33, k=0, queries=1, bitmap=True
    ) == (100 + 1000 + 10 + 2)
    assert kspec.seconds(300, 300e6) == pytest.approx(1e-6)
    with pytest.raises(InputError):
        kspec.engine_cycles(p, port_bytes=(1, 2, 3), lane_ops=1, n=1, k=1, queries=1)


def test_golden_reports_the_cycle_model():
    inputs, _ = _inputs("token_indexer", np.random.default_rng(0), 300, k=20)
    spec = kernels.get("token_indexer")
    assert spec.golden(inputs).cycles == spec.cycles(n=300, k=20, queries=2, heads=3, dim=20)


# -- quantization API ------------------------------------------------------------------------


def _float_memory(name, rng, n):
    if name == "page_indexer":
        keys = rng.standard_normal((n, 4, 16))
        return {"mins": keys.min(1), "maxs": keys.max(1)}
    return {"keys": rng.standard_t(3, (n, 16))}


@pytest.mark.parametrize("name", ["token_indexer", "page_indexer", "block_gate", "vector_search"])
def test_quantize_memory_is_row_local(name):
    """Appended rows quantize the same alone as within the whole memory."""
    spec = kernels.get(name)
    rng = np.random.default_rng(4)
    memory = _float_memory(name, rng, 300)
    state = spec.fit({a: v[:200] for a, v in memory.items()})
    whole = spec.quantize_memory(memory, state)
    tail = spec.quantize_memory({a: v[200:] for a, v in memory.items()}, state)
    for a in spec.memory_args:
        assert whole[a].dtype == np.dtype(spec.arg(a).dtype)
        np.testing.assert_array_equal(whole[a][200:], tail[a])


def test_row_exponent_headroom_and_saturation():
    spec = kernels.get("vector_search")
    base = np.random.default_rng(0).uniform(-1, 1, (100, 8))
    base[0] = 1.0  # channel maxima are exactly 1
    state = spec.fit({"keys": base})
    new = np.stack([np.full(8, 0.5), np.full(8, 3.9), np.full(8, 40.0)])
    ints = spec.quantize_memory({"keys": new}, state)
    shift = ints["shifts"].astype(int)
    dequant = kspec.dequantize_rows(state, ints["keys"], shift)
    np.testing.assert_allclose(dequant[:2], new[:2], rtol=0.02)  # within 4x: no saturation
    assert shift[0] < shift[1] <= kspec.MAX_SHIFT and shift[2] == kspec.MAX_SHIFT
    assert np.abs(ints["keys"][2]).max() == 127  # 40x the fitted range saturates
    assert np.abs(dequant[2] - new[2]).max() > 10
    assert (spec.quantize_memory({"keys": base}, state)["shifts"] <= kspec.ROW_EXP_MAX).all()


def test_quantize_rejects_bad_floats():
    spec = kernels.get("vector_search")
    keys = np.random.default_rng(0).standard_normal((20, 4))
    state = spec.fit({"keys": keys})
    with pytest.raises(InputError):
        spec.fit({"keys": np.array([[np.nan, 1.0]])})
    with pytest.raises(InputError):
        spec.quantize_memory({"keys": np.ones((3, 5))}, state)
    with pytest.raises(InputError):
        spec.quantize_query({"q": np.full((1, 4), np.inf)}, state, k=1)


def test_zero_query_and_zero_memory_do_not_divide_by_zero():
    spec = kernels.get("token_indexer")
    state = spec.fit({"keys": np.zeros((10, 4))})
    assert np.isfinite(state.scale).all() and (state.scale > 0).all()
    out = spec.emulate(
        {"keys": np.zeros((10, 4))}, {"q": np.zeros((1, 2, 4)), "w": np.ones((1, 2))}, k=3
    )
    np.testing.assert_array_equal(out.indices, [[0, 1, 2]])  # all tie: lowest indices


def test_bm25_memory_checks_and_drift():
    spec = kernels.get("bm25")
    memory = {
        "term_offsets": np.array([0, 2, 3]),
        "doc_ids": np.array([0, 2, 1]),
        "tfs": np.array([1, 3, 2]),
        "doc_lengths": np.array([10, 20, 30]),
    }
    state = spec.fit(memory, k1=1.2, b=0.75)
    assert state == BM25State(1.2, 0.75, 20.0)
    ints = spec.quantize_memory(memory, state)
    tf, dl = 3, 30
    expect = round(65535 * tf / (tf + 1.2 * (1 - 0.75 + 0.75 * dl / 20.0)))
    assert int(ints["impacts"][1]) == expect
    assert not drifted(state, [10, 20, 30, 21])
    assert drifted(state, [10, 20, 30, 60])
    for bad in (
        {"term_offsets": np.array([0, 2, 4])},
        {"tfs": np.array([1, 0, 2])},
        {"doc_ids": np.array([0, 3, 1])},
    ):
        with pytest.raises(InputError):
            spec.quantize_memory({**memory, **bad}, state)
    query = spec.quantize_query(
        {"terms": np.array([[0, 5]]), "idf": np.array([[1.0, 2.0]])}, state, k=1
    )
    with pytest.raises(InputError):  # term 5 is outside the vocabulary
        spec.golden(spec.bind(ints, query, n=3))
    with pytest.raises(InputError):  # a quantized index does not know its document count
        spec.bind(ints, query)


# -- the Quest bound -------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    page=st.sampled_from([1, 3, 8, 16]),
    pages=st.integers(1, 12),
    dim=st.integers(1, 24),
    heads=st.integers(1, 4),
    scale=st.floats(0.01, 100.0),
    beyond=st.sampled_from([1.0, 3.0, 50.0]),
)
def test_quest_integer_bound_dominates_every_key(seed, page, pages, dim, heads, scale, beyond):
    """score(p) >= max_r Q_r . K for every key K of page p in the pages' format, including
    pages appended beyond the fitted range (50x: they saturate); and, because mins round
    down and maxs up, score(p) >= max_r Q_r . (k / s) for every *float* key k of an
    unsaturated page: the bound survives quantizing the memory."""
    rng = np.random.default_rng(seed)
    keys = rng.standard_t(3, (pages, page, dim)) * scale
    keys[pages // 2 :] *= beyond  # appended pages, maybe beyond the fitted range
    mins, maxs = keys.min(1), keys.max(1)
    spec = kernels.get("page_indexer")
    fit_on = max(1, pages // 2)
    state = spec.fit({"mins": mins[:fit_on], "maxs": maxs[:fit_on]})
    memory = spec.quantize_memory({"mins": mins, "maxs": maxs}, state)
    q = rng.standard_normal((2, heads, dim)) * rng.choice([1.0, 30.0], dim)
    inputs = spec.bind(memory, spec.quantize_query({"q": q}, state, k=1))
    bound = np.repeat(spec.scores(inputs), page, axis=1)  # [2, keys]
    q_int = inputs.arrays["q"].astype(np.int64)
    flat = keys.reshape(-1, dim)
    key_ints = spec.quantize_keys(flat, state).astype(np.int64)
    assert (bound >= np.einsum("qrd,nd->qrn", q_int, key_ints).max(1)).all()
    exact = np.einsum("qrd,nd->qrn", q_int, flat / state.scale).max(1)
    inside = np.repeat((np.abs(keys) / state.scale <= 32767).all(axis=(1, 2)), page)
    assert (bound[:, inside] >= exact[:, inside] - 1e-6 * (1 + np.abs(exact[:, inside]))).all()


# -- segments: one call over many slots of one memory ----------------------------------------

SEGMENTED = ("token_indexer", "page_indexer", "block_gate", "vector_search")


def _segmented(name, rng, *, threshold=False):
    """Random integer inputs of a multi-segment call: a memory of several slots at random
    bases, each query a random prefix of one (consecutive queries often share a segment),
    n the largest rows, k at most the smallest."""
    slots = int(rng.integers(1, 5))
    lengths = rng.integers(1, 80, slots)
    bases = np.cumsum(np.concatenate([[0], lengths[:-1]])) + rng.integers(0, 5, slots).cumsum()
    total = int((bases + lengths).max()) + int(rng.integers(0, 10))
    queries = int(rng.integers(1, 9))
    slot = rng.integers(0, slots, queries)
    if rng.random() < 0.5:
        slot = np.sort(slot)
    rows = np.where(rng.random(queries) < 0.5, lengths[slot], rng.integers(1, lengths[slot] + 1))
    k = int(rng.integers(1, rows.min() + 1))
    inputs, _ = _inputs(name, rng, total, queries=queries, k=k)
    inputs.arrays["segs"] = np.stack([bases[slot], rows], axis=1).astype(np.uint32)
    inputs.scalars["n"] = int(rows.max())
    if threshold:
        inputs.scalars.update(mode=kspec.MODE_THRESHOLD, k=0)
        inputs.arrays["delta"] = rng.integers(0, 2**22, queries).astype(np.uint32)
    return inputs


def _one_segment(spec, inputs, i):
    """Query i alone, on the memory rows of its segment: today's single-memory call."""
    base, rows = (int(v) for v in inputs.arrays["segs"][i])
    arrays = {a: inputs.arrays[a][base : base + rows] for a in spec.memory_args}
    for a in spec.query_args():
        if a not in ("segs", "stage"):
            arrays[a] = inputs.arrays[a][i : i + 1]
    return kernels.KernelInputs(arrays, {**inputs.scalars, "n": rows, "queries": 1})


@pytest.mark.parametrize("name", SEGMENTED)
def test_segments_equal_single_calls_concatenated(name):
    """A multi-segment call returns, per query, what today's single-memory call over its
    segment returns (indices relative to the base; bitmap rows ceil(n/32) words, zero past
    the query's rows): several hundred random calls, top-k and block_gate's threshold."""
    rng = np.random.default_rng(hash(name) % 2**32)
    spec = kernels.get(name)
    modes = (False, True) if name == "block_gate" else (False,)
    calls = 0
    for threshold in modes:
        for _ in range(300 // len(modes)):
            inputs = _segmented(name, rng, threshold=threshold)
            out = spec.golden(inputs)
            words = -(-int(inputs.scalars["n"]) // 32)
            for i in range(int(inputs.scalars["queries"])):
                one = spec.golden(_one_segment(spec, inputs, i))
                if threshold:
                    row = np.zeros(words, dtype=np.uint32)
                    row[: one.bitmap.shape[1]] = one.bitmap[0]
                    np.testing.assert_array_equal(out.bitmap[i], row)
                else:
                    np.testing.assert_array_equal(out.indices[i], one.indices[0])
            assert out.cycles == spec.cycles(**spec.shape(inputs))
            calls += 1
    assert calls == 300


@pytest.mark.parametrize("name", SEGMENTED)
def test_bind_fills_single_memory_segments(name):
    """Without segs, every query scans rows [0, n): bind adds segs = (0, n) per query, and
    golden treats inputs without segs the same way."""
    rng = np.random.default_rng(3)
    spec = kernels.get(name)
    inputs, _ = _inputs(name, rng, 60, queries=3, k=4)
    memory = {a: inputs.arrays[a] for a in spec.memory_args}
    query = kernels.KernelInputs(
        {a: inputs.arrays[a] for a in spec.query_args() if a in inputs.arrays},
        {k: v for k, v in inputs.scalars.items() if k != "n"},
    )
    bound = spec.bind(memory, query, n=50)
    np.testing.assert_array_equal(bound.arrays["segs"], [[0, 50]] * 3)
    assert bound.arrays["segs"].dtype == np.uint32
    inputs.scalars["n"] = 50
    np.testing.assert_array_equal(spec.golden(bound).indices, spec.golden(inputs).indices)
    assert "segs" not in inputs.arrays  # golden leaves the caller's inputs alone
    assert spec.buffer_shape("segs", bound.scalars, 0) == (3, 2)
    assert spec.buffer_nbytes("segs", bound.scalars) == 24


@pytest.mark.parametrize("name", SEGMENTED)
@pytest.mark.parametrize(
    ("segs", "k", "argument"),
    [
        ([[0, 40], [10, 0]], 3, "segs"),  # rows 0
        ([[0, 40], [10, 41]], 3, "segs"),  # rows > n
        ([[0, 40], [70, 40]], 3, "segs"),  # past the rows the memory holds (100)
        ([[0, 40], [10, 5]], 6, "k"),  # k > the query's rows (top-k)
        ([[0, 40]], 3, "segs"),  # one segment for two queries
    ],
)
def test_bad_segments_name_the_argument(name, segs, k, argument):
    inputs, _ = _inputs(name, np.random.default_rng(0), 100, queries=2, k=k)
    inputs.scalars["n"] = 40
    inputs.arrays["segs"] = np.array(segs, dtype=np.uint32)
    with pytest.raises(InputError) as err:
        kernels.get(name).golden(inputs)
    assert err.value.argument == argument


def test_segments_in_threshold_mode_need_no_k():
    inputs, _ = _inputs("block_gate", np.random.default_rng(2), 100, queries=2)
    inputs.scalars.update(mode=kspec.MODE_THRESHOLD, k=0, n=40)
    inputs.arrays["segs"] = np.array([[0, 40], [60, 1]], dtype=np.uint32)
    out = kernels.get("block_gate").golden(inputs)
    assert out.bitmap.shape == (2, 2)
    assert out.bitmap[1, 0] == 1 and out.bitmap[1, 1] == 0  # one row: always kept, bit 0


def test_quantize_query_takes_segs():
    spec = kernels.get("vector_search")
    rng = np.random.default_rng(1)
    state = spec.fit({"keys": rng.standard_normal((50, 8))})
    q = {"q": rng.standard_normal((2, 8))}
    inputs = spec.quantize_query(q, state, k=3, segs=[[0, 10], [10, 20]])
    np.testing.assert_array_equal(inputs.arrays["segs"], [[0, 10], [10, 20]])
    assert inputs.arrays["segs"].dtype == np.uint32
    assert "segs" not in spec.quantize_query(q, state, k=3).arrays
    for bad in ([[0, 10]], [[0, -1], [0, 1]], [[0.5, 1], [0, 1]]):
        with pytest.raises(InputError) as err:
            spec.quantize_query(q, state, k=3, segs=bad)
        assert err.value.argument == "segs"


def test_cycle_model_sums_groups_of_consecutive_queries():
    """One launch: one control overhead; per group of consecutive queries with the same
    segment its stream and passes; per query its selection over its own rows."""
    spec = kernels.get("vector_search")
    p = spec.engine
    one = spec.cycles(n=1000, k=8, dim=64, queries=3)
    whole = kspec.whole_segments(3, 1000)
    assert spec.cycles(n=1000, k=8, dim=64, queries=3, segs=whole) == one
    segs = np.array([[0, 1000], [0, 1000], [5000, 300], [0, 1000]])
    got = spec.cycles(n=1000, k=8, dim=64, queries=4, segs=segs)
    a = spec.cycles(n=1000, k=8, dim=64, queries=2) - p.control_overhead
    b = spec.cycles(n=300, k=8, dim=64, queries=1) - p.control_overhead
    c = spec.cycles(n=1000, k=8, dim=64, queries=1) - p.control_overhead
    assert got == p.control_overhead + a + b + c  # the last query is a group of its own
    bg = kernels.get("block_gate")
    bitmap = bg.cycles(n=1000, dim=64, queries=2, mode=1, segs=[[0, 1000], [0, 10]])
    # threshold mode scans n bits per query (the bitmap row), whatever its rows
    assert bitmap > bg.cycles(n=1000, dim=64, queries=1, mode=1)
    assert kspec.engine_passes(p, queries=np.array([1, 8, 9, 17])).tolist() == [1, 1, 2, 3]
