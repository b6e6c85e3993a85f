"""The hls4ml-generated selector maps: hls4ml converts the bundled model's trained AttnGate
(and DSA indexer) maps at the committed per-layer precisions, g++ compiles them (the C
simulation), and every output equals the golden fixed-point model's bit for bit; the fixed-
point arithmetic of the golden model matches ap_types' for every quantization and overflow
mode; the committed precisions are what hls4ml's profiling chooses; the selection recalls the
float gate's. Skips with the reason where hls4ml or g++ is missing."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
from dataclasses import replace

import numpy as np
import pytest

from hetmem.errors import InputError
from hetmem.fpga.hls import ap_types_dir
from hetmem.fpga.hls4ml_gate.build import build_map, hls4ml_missing
from hetmem.fpga.hls4ml_gate.bundled import (
    SELECTORS,
    bundled_maps,
    bundled_selectors,
    capture_bundled,
    dsa_rows,
    layer_rows,
    load_precisions,
    seer_rows,
    selector_maps,
)
from hetmem.fpga.hls4ml_gate.fixed import (
    WIDTHS,
    Fixed,
    MapPrecision,
    choose_precision,
    golden_dense,
    integer_bits,
)
from hetmem.fpga.hls4ml_gate.maps import profile, profiling_missing, seer_maps
from hetmem.fpga.hls4ml_gate.selection import recall, seer_scores, stress_rows

REASON = hls4ml_missing()
pytestmark = [
    pytest.mark.hls,
    pytest.mark.skipif(REASON is not None, reason=f"hls4ml: {REASON}"),
]

#: Random rows per map compared with the golden model (plus every real activation row).
ROWS = 1000


@pytest.fixture(scope="module")
def precisions():
    return load_precisions()


@pytest.fixture(scope="module")
def selectors():
    return bundled_selectors()


@pytest.fixture(scope="module")
def acts():
    """Held-out activations of the bundled model (seed 1; the profile used seed 0)."""
    return capture_bundled(2, 1024, 16, seed=1)


@pytest.fixture(scope="module")
def seer0(precisions, selectors):
    return bundled_maps("seer", [0], precisions=precisions, selectors=selectors)[0]


# -- the fixed-point arithmetic against ap_types --------------------------------------------------

MODES_Q = ("TRN", "TRN_ZERO", "RND", "RND_ZERO", "RND_INF", "RND_MIN_INF", "RND_CONV")
MODES_O = ("WRAP", "SAT", "SAT_ZERO", "SAT_SYM")
#: (width, integer, signed) of the types checked: a normal, a negative-integer, an unsigned one
SHAPES = ((6, 3, True), (5, -1, True), (6, 2, False))
#: The wider type casts start from (Fixed.cast), as accum_t -> result_t
SRC_W, SRC_I = 40, 20


def _cpp_checker(tmp_path):
    """A g++ program that prints, per type and mode, the raw integers ap_types gives (a) from
    doubles and (b) from ap_fixed<40,20> values (raw integers in)."""
    body = []
    for (w, i, signed), q, o in itertools.product(SHAPES, MODES_Q, MODES_O):
        t = f"ap_{'fixed' if signed else 'ufixed'}<{w},{i},AP_{q},AP_{o}>"
        raw = f"ap_{'int' if signed else 'uint'}<{w}>"
        body.append(
            f'  {{ printf("T"); for (int j = 0; j < n; j++) {{ {t} v = xs[j]; {raw} r; '
            f'r.range({w - 1}, 0) = v.range({w - 1}, 0); printf(" %lld", (long long)r); }}'
            f" for (int j = 0; j < n; j++) {{ ap_fixed<{SRC_W},{SRC_I}> s; "
            f"s.range({SRC_W - 1}, 0) = ap_int<{SRC_W}>(rs[j]); {t} v = s; {raw} r; "
            f'r.range({w - 1}, 0) = v.range({w - 1}, 0); printf(" %lld", (long long)r); }}'
            f' printf("\\n"); }}'
        )
    src = (
        "#include <ap_fixed.h>\n#include <cstdio>\n#include <vector>\n"
        'int main() { int n, m; if (scanf("%d", &n) != 1) return 1;\n'
        "  std::vector<double> xs(n); std::vector<long long> rs(n);\n"
        '  for (int j = 0; j < n; j++) m = scanf("%lf", &xs[j]);\n'
        '  for (int j = 0; j < n; j++) m = scanf("%lld", &rs[j]);\n'
        "  (void)m;\n" + "\n".join(body) + "\n  return 0; }\n"
    )
    (tmp_path / "modes.cpp").write_text(src)
    exe = tmp_path / "modes"
    subprocess.run(
        ["g++", "-O0", "-std=c++14", "-w", f"-I{ap_types_dir()}", "modes.cpp", "-o", str(exe)],
        cwd=tmp_path,
        check=True,
    )
    return exe


def test_fixed_matches_ap_types_every_mode(tmp_path):
    """Fixed.quantize (from double) and Fixed.cast (from a wider fixed) equal ap_types'
    conversions for every quantization x overflow mode, on ties, both signs, in and beyond
    range, for signed, negative-integer and unsigned types."""
    if ap_types_dir() is None:
        pytest.skip("no ap_types headers")
    rng = np.random.default_rng(0)
    # doubles: exact ties and near-ties at several LSB sizes, large values, zero, negatives
    grid = np.arange(-80, 81) / 16.0
    xs = np.concatenate(
        [grid, grid + 1 / 64.0, rng.normal(0, 3, 60), [0.0, 1e-9, -1e-9, 100, -100]]
    )
    # raw integers of ap_fixed<40,20>: ties and rests at the cast's dropped bits, beyond range
    rs = np.concatenate(
        [
            (np.arange(-40, 41) << 16),
            (np.arange(-40, 41) << 16) + (1 << 15),
            rng.integers(-(2**30), 2**30, 80),
            [0, 1, -1, 2**38, -(2**38)],
        ]
    )
    n = min(len(xs), len(rs))
    xs, rs = xs[:n], rs[:n]
    exe = _cpp_checker(tmp_path)
    stdin = f"{n}\n" + " ".join(repr(float(x)) for x in xs) + "\n" + " ".join(map(str, rs))
    out = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True)
    lines = [ln.split()[1:] for ln in out.stdout.splitlines()]
    cases = list(itertools.product(SHAPES, MODES_Q, MODES_O))
    assert len(lines) == len(cases)
    for ((w, i, signed), q, o), line in zip(cases, lines, strict=True):
        got = np.array(line, dtype=np.int64)
        t = Fixed(w, i, signed, q, o)
        want = np.concatenate([t.quantize(xs), t.cast(rs, SRC_W - SRC_I)])
        assert (got == want).all(), (t.hls(), np.flatnonzero(got != want)[:5])


def test_fixed_hand_cases():
    t = Fixed(4, 2, True, "RND_CONV", "SAT")  # LSB 0.25, range [-2, 1.75]
    assert t.hls() == "ap_fixed<4,2,AP_RND_CONV,AP_SAT>"
    assert t.quantize([0.125, 0.375, -0.125, 5.0, -5.0]).tolist() == [0, 2, 0, 7, -8]
    w = Fixed(4, 2)  # TRN, WRAP
    assert w.quantize([0.2, -0.2, 2.0]).tolist() == [0, -1, -8]
    assert t.cast([3, 5, -3], 3).tolist() == [2, 2, -2]  # 0.375, 0.625, -0.375 -> even ties
    with pytest.raises(InputError):
        Fixed(8, 3, rounding="NEAREST")
    with pytest.raises(InputError):
        t.quantize([np.nan])


def test_integer_bits_hold_the_peak():
    for peak in (0.3, 0.5, 1.0, 1.08, 7.17, 8.0, 11.6):
        i = integer_bits(peak)
        t = Fixed(16, i, True, "RND_CONV", "SAT")
        assert t.to_float(t.hi) >= peak * (1 - 2.0**-14) and t.to_float(t.lo) <= -peak
        assert 2.0 ** (i - 2) <= peak  # one bit fewer would not hold it
    with pytest.raises(InputError):
        integer_bits(0.0)


# -- conversion and C simulation -----------------------------------------------------------------


def test_generated_types_are_the_profiled_ones(seer0, precisions):
    """The C++ hls4ml wrote declares the chosen types; the accumulator it inferred is exact
    (product width + log2 of the fan-in); the block-diagonal zeros are declared to HLS."""
    for m, gate in seer0.items():
        chosen = MapPrecision.from_json(precisions["seer"][0][m]["precision"])
        defines = (gate.project / "firmware" / "defines.h").read_text()
        for part in ("input", "result"):
            t = getattr(chosen, part)
            assert gate.types[part] == t
            assert re.search(rf"typedef {re.escape(t.hls()[:-1])},0> \w+;", defines), part
        assert gate.types["weight"] == chosen.weight
        acc = gate.types["accum"]
        assert acc.frac == chosen.input.frac + chosen.weight.frac
        assert acc.width >= chosen.input.width + chosen.weight.width + int(
            np.ceil(np.log2(gate.n_in))
        )
        assert gate.info["n_zeros"] >= gate.n_in * gate.n_out // 2  # 2 KV heads: half is zero


def test_seer_csim_equals_golden(seer0, acts, selectors):
    """Layer 0's key and query maps: the C simulation equals the golden model on ROWS random
    rows (grid values, exact half-LSB ties, saturating inputs and results) and on every real
    activation row."""
    real = seer_rows(acts[0], selectors.block_size)
    for m, gate in seer0.items():
        x = np.concatenate([stress_rows(gate, ROWS, seed=1), real[m]])
        got, want = gate.csim(x), gate.golden(x)
        assert got.shape == (len(x), gate.n_out)
        assert (got == want).all(), f"{m}: {np.argwhere(got != want)[:5]}"
        t = gate.types["result"]
        assert (got == t.hi).any() and (got == t.lo).any()  # saturation was exercised
        assert len(np.unique(got)) > 100
        # ties were exercised in both casts: another rounding mode would disagree
        for part in ("input", "result"):
            other = {**gate.types, part: replace(gate.types[part], rounding="RND")}
            assert (golden_dense(x, gate.weight, other) != got).any(), part


def test_golden_is_not_the_float_map(seer0, acts, selectors):
    """The comparison is not vacuous: the fixed-point result is not the float projection
    rounded once (the input is quantized first), yet stays within a few result LSBs."""
    gate = seer0["key"]
    x = seer_rows(acts[0], selectors.block_size)["key"]
    t = gate.types["result"]
    w = seer_maps(selectors.gates[0].wq, selectors.gates[0].wk)["key"]
    exact = t.quantize(x @ w)
    got = gate.golden(x)
    assert np.abs(got - exact).max() <= 2
    assert (got != exact).any() or (t.quantize(x @ w + 2.0**-t.frac / 3) != exact).any()


def test_dsa_csim_equals_golden(precisions, selectors, acts):
    maps = bundled_maps("dsa", [0], precisions=precisions, selectors=selectors)[0]
    real = dsa_rows(acts[0])
    for m, gate in maps.items():
        x = np.concatenate([stress_rows(gate, ROWS // 4, seed=2), real[m][:512]])
        assert (gate.csim(x) == gate.golden(x)).all(), m


def test_selection_recall(seer0, acts, selectors):
    """The gate's selection from the C-simulated int8 maps (scores = integer dot products,
    the block_gate kernel's) equals the golden model's and recalls the float gate's top-k."""
    act, block = acts[0], selectors.block_size
    scores, visible = seer_scores(act, seer0, block)
    golden, _ = seer_scores(act, seer0, block, golden=True)
    assert (scores == golden).all()
    from hetmem.selectors.objective import block_pools, gate_logits

    ref = gate_logits(selectors.gates[0], act, block_pools(act, block), block).numpy()
    r, rows = recall(ref, scores, visible, 8)
    assert rows > 0 and r >= 0.9, r
    # the measure can fail: the reverse order (the bottom k) recalls next to nothing
    worst, _ = recall(ref, -scores, visible, 8)
    assert worst < 0.2 < r


def test_int8_maps_feed_block_gate(seer0, acts, selectors):
    """The 8-bit gate keys and queries go to the block_gate kernel as they are (int8, row
    shift 0): its golden model and its HLS C++ select exactly the top-k of Q . K that the
    gate's scores give, per (sequence, KV head) memory segment."""
    from hetmem import kernels
    from hetmem.fpga import hls as hls_mod
    from hetmem.kernels import KernelInputs
    from hetmem.kernels.spec import MODE_TOPK
    from hetmem.kernels.topk import topk_mask

    act, block, k = acts[0], selectors.block_size, 8
    assert all(g.types["result"].width == 8 for g in seer0.values())
    n, hkv, s, _ = act.k.shape
    nb, t = s // block, act.q.shape[2]
    rows = seer_rows(act, block)
    keys = seer0["key"].csim(rows["key"][: n * nb])  # the complete blocks
    query = seer0["query"].csim(rows["query"])
    dg = keys.shape[1] // hkv
    keys = keys.reshape(n, nb, hkv, dg).transpose(0, 2, 1, 3).reshape(-1, dg)  # slot-major
    q = query.reshape(n, t, hkv, dg).transpose(0, 2, 1, 3).reshape(-1, dg)
    slot = np.repeat(np.arange(n * hkv), t)
    segs = np.stack([slot * nb, np.full_like(slot, nb)], axis=1).astype(np.uint32)
    inputs = KernelInputs(
        {
            "keys": keys.astype(np.int8),
            "shifts": np.zeros(len(keys), dtype=np.uint8),
            "q": q.astype(np.int8),
            "delta": np.zeros(len(q), dtype=np.uint32),
            "segs": segs,
        },
        {"n": nb, "k": k, "queries": len(q), "dim": dg, "mode": MODE_TOPK},
    )
    scores = np.einsum("qd,qbd->qb", q, keys.reshape(n * hkv, nb, dg)[slot])
    want = np.stack([np.flatnonzero(m) for m in topk_mask(scores, k)])
    golden = kernels.get("block_gate").golden(inputs).indices
    assert np.array_equal(golden, want)
    if hls_mod.missing() is None:
        from hetmem.fpga import open_device

        dev = open_device("hls")
        try:
            got, _ = dev.simulate("block_gate", inputs)
        finally:
            dev.close()
        assert np.array_equal(got, want)


def test_cache_reuses_the_build(seer0, precisions, selectors):
    again = bundled_maps("seer", [0], precisions=precisions, selectors=selectors)[0]
    for m in seer0:
        assert not again[m].built and again[m].key == seer0[m].key
        assert again[m].library == seer0[m].library


def test_bad_input(seer0):
    gate = seer0["key"]
    with pytest.raises(InputError):
        gate.csim(np.zeros((2, gate.n_in + 1)))
    with pytest.raises(InputError):
        gate.golden(np.full((1, gate.n_in), np.inf))
    with pytest.raises(InputError):
        build_map(
            "not an identifier",
            np.eye(2),
            choose_precision({"input": 1.0, "weight": 1.0, "result": 1.0}),
        )


@pytest.mark.skipif(profiling_missing() is not None, reason=str(profiling_missing()))
def test_profile_reproduces_committed_precisions(precisions, selectors):
    """hls4ml's profiling on the committed calibration activations chooses the committed
    types (layer 0 of both selectors)."""
    c = precisions["calibration"]
    act = capture_bundled(c["sequences"], c["tokens"], c["queries"], c["seed"])[0]
    for kind in ("seer", "dsa"):
        maps = selector_maps(selectors, kind, 0)
        rows = layer_rows(act, kind, selectors.block_size)
        for m in SELECTORS[kind]:
            peaks = profile(maps[m], rows[m])
            committed = precisions[kind][0][m]
            assert peaks == pytest.approx(committed["peaks"], rel=1e-5)
            assert choose_precision(peaks).to_json() == committed["precision"]
    assert json.loads(json.dumps(precisions))["widths"] == WIDTHS
