"""hetmem's native one-row decode step (`hetmem.native`): built here, equal to the Python
path to the bit (tests/test_lean_decode.py holds each step against the general path both
ways; here a wrapped model's whole generate()), nothing written for a token that is not
finite, the Python path where the ops are switched off or cannot be built."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from hetmem import native
from hetmem.attention import KVCache
from hetmem.errors import InputError
from hetmem.methods import get
from hetmem.models import unwrap, wrap
from hetmem.pipeline import Pipeline
from native_ops import Counted, native_library
from test_wrap import generate, tiny

OPS = {"dsa": "dsa_one_row", "quest": "quest_one_row", "seer": "seer_one_row"}
OPTIONS = {"dsa": {}, "quest": {"page_size": 8}, "seer": {"block_size": 8}}


@pytest.fixture
def fresh_state():
    """The library's settled state forgotten before and after the test."""
    native.reset()
    yield
    native.reset()


def test_python_m_hetmem_native_builds_and_loads():
    native_library()  # (built in this process, or a skip where there is no compiler)
    done = subprocess.run(
        [sys.executable, "-m", "hetmem.native"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert "built and loaded" in done.stdout


@pytest.mark.parametrize("method", ["dsa", "quest", "seer"])
def test_generate_with_the_native_ops_equals_the_python_path(method, monkeypatch):
    """A wrapped model (KV rows wider than DSA's 128-dim index) generates the same tokens
    and logits with the native one-row step as on the Python path, and the method's op and
    the shared attend ran in every layer's every decode step (the cache's buffers sized to
    the tokens generate() will hold, not always whole units)."""
    counted = Counted(native_library())
    model = tiny("llama", heads=4, kv_heads=4, head_dim=64)
    wrap(model, method, budget=16, method_options=OPTIONS[method])
    ids = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(2))
    try:
        with torch.no_grad():
            monkeypatch.setattr(native, "library", lambda: None)
            python = generate(model, ids, new=6)
            monkeypatch.setattr(native, "library", lambda: counted)
            fast = generate(model, ids, new=6)
    finally:
        unwrap(model)
    assert torch.equal(python.sequences, fast.sequences)
    for a, b in zip(python.scores, fast.scores, strict=True):
        assert torch.equal(a, b)
    assert counted.calls.count(OPS[method]) == 5 * 2  # 5 decode steps, 2 layers
    assert counted.calls.count("one_row_attend") == 5 * 2


def _pipeline(method: str, dtype=torch.float32) -> Pipeline:
    gen = torch.Generator().manual_seed(5)
    keys, values = (torch.randn(1, 2, 70, 128, generator=gen).to(dtype) for _ in range(2))
    pipe = Pipeline(get(method, **OPTIONS[method]), "cpu/cpu/cpu/cpu")
    pipe.prepare(KVCache(keys, values))
    return pipe


def _step(pipe: Pipeline, k: torch.Tensor, v: torch.Tensor):
    q = torch.randn(1, 4, 1, 128, generator=torch.Generator().manual_seed(6)).to(k.dtype)
    return pipe.lean_decode(k, v, q, None, None, lambda n: 16)


@pytest.mark.parametrize("method", ["dsa", "quest", "seer"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_token_that_is_not_finite_is_refused_with_nothing_written(method, bad, monkeypatch):
    counted = Counted(native_library())
    monkeypatch.setattr(native, "library", lambda: counted)
    pipe = _pipeline(method)
    kv = pipe.memory.kv
    before = (kv.keys.clone(), kv.values.clone(), kv.lengths.clone(), kv._keys.length)
    k, v = torch.randn(1, 2, 1, 128), torch.randn(1, 2, 1, 128)
    v[0, 1, 0, 5] = bad
    with pytest.raises(InputError, match="values"):
        _step(pipe, k, v)
    assert counted.calls == [OPS[method]]  # the op screened it and wrote nothing
    assert torch.equal(kv.keys, before[0]) and torch.equal(kv.values, before[1])
    assert torch.equal(kv.lengths, before[2]) and kv._keys.length == before[3]
    index = {"dsa": lambda m: m.keys.length, "quest": lambda m: m.pages.blocks}
    index["seer"] = lambda m: m._gate_keys.length
    assert index[method](pipe.memory) == (70 if method == "dsa" else 9)


@pytest.mark.parametrize("method", ["dsa", "quest", "seer"])
def test_finite_values_whose_screen_overflows_are_appended_as_on_the_python_path(
    method, monkeypatch
):
    """Keys and values finite but their dot product beyond float32: the op's screen says
    "not clean", the exact check finds them finite, and the step appends and scores on the
    Python path (the shared op then attends) to the same output and memory as with the ops
    off."""
    k = torch.full((1, 2, 1, 128), 1e30)
    v = torch.full((1, 2, 1, 128), 1e10)  # (each product 1e40: past float32's 3.4e38)
    outs, memories, counted = [], [], Counted(native_library())
    for library in (counted, None):
        monkeypatch.setattr(native, "library", lambda library=library: library)
        pipe = _pipeline(method)
        outs.append(_step(pipe, k, v))
        memories.append(pipe.memory.kv)
    assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1])
    assert torch.equal(memories[0].keys, memories[1].keys)
    assert memories[0].capacity == 71
    # the op declined at its screen; Python appended and scored, the shared op attended
    assert counted.calls == [OPS[method], "one_row_attend"]


def test_switched_off_the_python_path_runs(fresh_state, monkeypatch):
    monkeypatch.setenv("HETMEM_NATIVE", "0")
    assert native.library() is None
    assert "HETMEM_NATIVE=0" in native.reason()
    pipe = _pipeline("seer")
    out = _step(pipe, torch.randn(1, 2, 1, 128), torch.randn(1, 2, 1, 128))
    assert out.shape == (1, 4, 1, 128) and pipe.memory.kv.capacity == 71


def test_a_build_that_fails_warns_once_and_the_python_path_runs(fresh_state, monkeypatch):
    def no_compiler(torch):
        raise RuntimeError("Error building extension 'hetmem_native'\nc++: not found")

    monkeypatch.setattr(native, "_registered", lambda torch: False)
    monkeypatch.setattr(native, "_build", no_compiler)
    with pytest.warns(RuntimeWarning, match="could not be built .*c\\+\\+: not found"):
        assert native.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.library() is None  # settled: no second build, no second warning
    pipe = _pipeline("dsa", torch.bfloat16)
    k, v = (torch.randn(1, 2, 1, 128).to(torch.bfloat16) for _ in range(2))
    assert _step(pipe, k, v).shape == (1, 4, 1, 128)


# The ops' hand-written loops (the block's max and min, the k-th score and the scan, the
# gather, the additive mask) against the ATen operators the Python path runs for them.


def _aten_attend(scores, k, q, kbuf, vbuf, unit, hide_from, scale):
    """`one_row_attend` as the Python path's operators: `_top_indices` (a NaN: None), the
    selected units' token rows gathered (clamped into the buffer, as `_row_index` clamps a
    unit that runs past it), sdpa with a boolean mask hiding the tokens past the end."""
    from hetmem.errors import InputError
    from hetmem.selection import _top_indices

    try:
        rows = _top_indices(scores, k)
    except InputError:
        return None
    hkv, groups, length = kbuf.shape[1], rows.shape[1], kbuf.shape[2]
    tokens = (rows.view(groups, k, 1) * unit + torch.arange(unit)).view(groups, k * unit)
    tokens = tokens.expand(hkv, -1)
    index = (torch.arange(hkv)[:, None] * length + tokens.clamp(max=length - 1)).view(-1)
    ks, vs = (
        buf.reshape(-1, buf.shape[3]).index_select(0, index).view(1, hkv, k * unit, -1)
        for buf in (kbuf, vbuf)
    )
    mask = None if hide_from < 0 else (tokens < hide_from).view(1, hkv, 1, k * unit)
    grouped = q.view(1, hkv, q.shape[1] // hkv, q.shape[3])
    out = torch.nn.functional.scaled_dot_product_attention(
        grouped, ks, vs, attn_mask=mask, scale=scale
    )
    return out.reshape(1, q.shape[1], 1, -1), rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_one_row_attend_equals_its_aten_operators(dtype):
    """Per-row and shared selections, units of 1, 8 and 16 tokens, buffers in whole units
    or not, a partial last unit hidden or not, ties at the k-th score (rounded scores: the
    lower indices fill k), -inf among the scores: the same rows and output bits as the
    Python path's operators; a NaN score: no output (the Python path says so)."""
    lib, gen = native_library(), torch.Generator().manual_seed(11)
    tied = 0
    for trial in range(96):
        unit, groups, k = (1, 8, 16)[trial % 3], (1, 4)[trial % 2], (1, 2, 3, 5)[trial % 4]
        n = 100 + trial  # tokens in use
        units = -(-n // unit)
        length = n + (0, 1, 5)[trial % 3 == 1 and trial % 9 // 3]  # (not always whole units)
        kbuf, vbuf = (torch.randn(1, 4, length, 32, generator=gen).to(dtype) for _ in "kv")
        q = torch.randn(1, 8, 1, 32, generator=gen).to(dtype)
        scores = torch.randn(1, groups, 1, units, generator=gen).to(dtype)
        if trial % 5 == 0:
            scores = scores.round()  # ties
            tied += 1
        if trial % 7 == 0:
            scores[..., :3] = float("-inf")
        if trial % 17 == 0:
            scores[..., -1] = float("nan")
        hide = n if n % unit else -1
        expected = _aten_attend(scores, k, q, kbuf, vbuf, unit, hide, 0.2)
        out, rows, _ = lib.one_row_attend(scores, k, q, kbuf, vbuf, unit, hide, 0.2)
        if expected is None:
            assert out is None and rows is None and bool(scores.isnan().any())
            continue
        assert torch.equal(rows, expected[1]) and torch.equal(out, expected[0])
    assert tied > 10


def test_one_row_attend_refuses_a_selection_per_query_head():
    """One selection, or one per KV head: a selection per query head (Quest's
    `per_query_head`, which the one-row step leaves to the general path) is an error, not a
    gather of the wrong rows."""
    lib = native_library()
    kbuf = vbuf = torch.randn(1, 2, 64, 16)
    scores, q = torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 16)
    with pytest.raises(RuntimeError, match="4 selections for 2 KV heads"):
        lib.one_row_attend(scores, 2, q, kbuf, vbuf, 8, -1, 0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_seer_one_row_equals_its_aten_operators(dtype):
    """The gate key of the token's block, its keys pooled by `pool_blocks` (the op's max and
    min loop, the mean's operator), for every fill of a block, and the gate logits."""
    from hetmem.methods.seer import gate_keys, gate_queries, gate_scores, pool_blocks

    lib, gen = native_library(), torch.Generator().manual_seed(12)
    unit, hkv, d, dg = 8, 2, 16, 8
    wq, wk = torch.randn(hkv, 2 * d, dg, generator=gen), torch.randn(hkv, 3 * d, dg, generator=gen)
    kbuf, vbuf = (torch.zeros(1, hkv, 4 * unit, d, dtype=dtype) for _ in "kv")
    store, lengths = torch.zeros(1, hkv, 4, dg), torch.tensor([0])
    q = torch.randn(1, 2 * hkv, 1, d, generator=gen).to(dtype)
    for n in range(3 * unit + 3):
        keys, values = (torch.randn(1, hkv, 1, d, generator=gen).to(dtype) for _ in "kv")
        blocks = n // unit + 1
        logits, _ = lib.seer_one_row(
            keys, values, q, kbuf, vbuf, lengths, store, wq, wk, n, unit, blocks
        )
        first = (n // unit) * unit
        block = kbuf[:, :, first : n + 1].unsqueeze(2)  # [1, Hkv, 1, count, D]
        assert torch.equal(kbuf[:, :, n : n + 1], keys) and int(lengths) == n + 1
        assert torch.equal(store[:, :, blocks - 1 : blocks], gate_keys(pool_blocks(block), wk))
        expected = gate_scores(gate_queries(q, wq), store[:, :, :blocks])
        assert torch.equal(logits, expected)
