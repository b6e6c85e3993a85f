"""A catalogue of bad inputs across the Python API, the CLI and files: each one ends in its
named error (the exact hetmem error type, naming the argument or saying what is wrong), never
a bare Python error, a traceback, a hang or a silently wrong result.

Every case is one `pytest.param` with a readable id, in three tables (API, CLI, FILES). A
case runs in a thread joined with a timeout, so that a hang fails the case instead of the
run. Inputs are tiny; prepared objects are built once per module."""

from __future__ import annotations

import functools
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from hetmem import cli
from hetmem.attention import AttentionQuery, KVCache, KVChunk, dense_attention
from hetmem.errors import InputError, PlacementError, XclbinError
from hetmem.methods import get
from hetmem.pipeline import Pipeline

TIMEOUT_S = 60.0


# -- the runner ---------------------------------------------------------------------------------


def outcome(fn, *args):
    """Run fn(*args) in a thread; return ("value", v) or ("error", exc); fail on a hang."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(TIMEOUT_S)
    assert not thread.is_alive(), f"hung for {TIMEOUT_S} s"
    return ("error", box["error"]) if "error" in box else ("value", box.get("value"))


def expect(fn, error, fragment, *args):
    kind, got = outcome(fn, *args)
    assert kind == "error", f"no error: returned {got!r}"
    assert type(got) is error, f"expected {error.__name__}, got {type(got).__name__}: {got}"
    assert fragment in str(got), f"{fragment!r} not in {str(got)!r}"


def case(id, fn, error, fragment, marks=()):
    return pytest.param(fn, error, fragment, id=id, marks=marks)


# -- tiny inputs --------------------------------------------------------------------------------

B, HKV, HQ, S, D = 2, 2, 4, 32, 8


def kv(batch=B, heads=HKV, tokens=S, dim=D, dv=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return KVCache(
        torch.randn(batch, heads, tokens, dim, generator=gen),
        torch.randn(batch, heads, tokens, dv or dim, generator=gen),
    )


def q(batch=B, heads=HQ, t=1, dim=D, **kw):
    return AttentionQuery(torch.randn(batch, heads, t, dim), **kw)


def chunk(batch=B, heads=HKV, t=1, dim=D, dv=None):
    return KVChunk(torch.randn(batch, heads, t, dim), torch.randn(batch, heads, t, dv or dim))


def with_(t, index, value):
    t = t.clone()
    t[index] = value
    return t


OPTIONS = {"dsa": {}, "quest": {"page_size": 4}, "seer": {"block_size": 4}}


def method(name):
    return get(name, **OPTIONS.get(name, {}))


def pipe(name, placement="cpu/cpu/cpu/cpu", **kw):
    """A fresh pipeline over a fresh tiny memory (a bad call must not touch a shared one)."""
    p = Pipeline(method(name), placement, **kw)
    p.prepare(kv())
    return p


def step(name, query, budget=8):
    return pipe(name).step(query, budget)


def append(name, data):
    return pipe(name).append(data)


def docs(n=6):
    return [f"document {i} about topic {i % 3} and words" for i in range(n)]


def embed(texts):
    gen = torch.Generator().manual_seed(len(texts))
    return torch.randn(len(texts), 16, generator=gen)


def rag(name, **kw):
    from hetmem.methods.dense_rag import DenseRAG

    m = DenseRAG(encoder=embed, **kw) if name == "dense_rag" else get("bm25_rag", **kw)
    p = Pipeline(m, "cpu/cpu/cpu/cpu")
    p.prepare(docs())
    return p


def dense_query(embeddings=None, texts=None):
    from hetmem.methods.dense_rag import DenseQuery

    return DenseQuery(embeddings, texts)


def documents(texts, embeddings=None):
    from hetmem.text import Documents

    return Documents(texts, embeddings)


# -- a tiny transformers model ------------------------------------------------------------------


@functools.cache
def _tiny_state():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def tiny():
    """The shared tiny model, unwrapped (a case that wrapped it is undone here)."""
    import hetmem

    model = _tiny_state()
    if hetmem.is_wrapped(model):
        hetmem.unwrap(model)
    return model


def wrap(**kw):
    import hetmem

    return hetmem.wrap(tiny(), **kw)


def wrap_twice():
    import hetmem

    model = tiny()
    hetmem.wrap(model, method="quest", budget=64, method_options={"page_size": 8})
    try:
        hetmem.wrap(model, method="quest", budget=64)
    finally:
        hetmem.unwrap(model)


def unsupported(name, **extra):
    transformers = pytest.importorskip("transformers")
    config_cls = getattr(transformers, f"{name}Config")
    model_cls = getattr(transformers, f"{name}ForCausalLM")
    config = config_cls(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=128,
        **extra,
    )
    import hetmem

    return hetmem.wrap(model_cls(config).eval(), method="quest", budget=64)


# -- FPGA helpers -------------------------------------------------------------------------------


def fpga_pipe(fpga, name="quest"):
    return Pipeline(method(name), "cpu/fpga/fpga/cpu", fpga=fpga)


def stage(**kw):
    from hetmem.offload import FpgaStage

    return FpgaStage(kw.pop("method", method("quest")), kw.pop("fpga", "emu"), **kw)


def card(**options):
    from hetmem.fpga.cards import Card

    return Card("emu", options)


# -- kernels ------------------------------------------------------------------------------------


@functools.cache
def _token_inputs():
    from hetmem import kernels

    spec = kernels.get("token_indexer")
    rng = np.random.default_rng(0)
    memory = {"keys": rng.standard_normal((40, 8))}
    state = spec.fit(memory)
    resident = spec.quantize_memory(memory, state)
    query = spec.quantize_query({"q": rng.standard_normal((2, 3, 8)), "w": np.ones((2, 3))},
                                state, k=4)  # fmt: skip
    return spec, state, spec.bind(resident, query)


KERNEL_MEMORY = {
    "vector_search": (lambda r: {"keys": r.standard_normal((40, 8))}, (2, 8)),
    "page_indexer": (lambda r: {"mins": -np.abs(r.standard_normal((10, 8))),
                                "maxs": np.abs(r.standard_normal((10, 8)))}, (2, 3, 8)),
    "block_gate": (lambda r: {"keys": r.standard_normal((10, 8))}, (2, 8)),
}  # fmt: skip


@functools.cache
def _kernel_inputs(name):
    from hetmem import kernels

    spec = kernels.get(name)
    rng = np.random.default_rng(1)
    make, qshape = KERNEL_MEMORY[name]
    memory = make(rng)
    state = spec.fit(memory)
    query = spec.quantize_query({"q": rng.standard_normal(qshape)}, state, k=3)
    return spec, state, memory, spec.bind(spec.quantize_memory(memory, state), query)


def kernel_golden(name, arrays=None, scalars=None):
    from hetmem.kernels import KernelInputs

    spec, _, _, inputs = _kernel_inputs(name)
    return spec.golden(KernelInputs({**inputs.arrays, **(arrays or {})},
                                    {**inputs.scalars, **(scalars or {})}))  # fmt: skip


def kernel_query(name, query, **params):
    spec, state, _, _ = _kernel_inputs(name)
    return spec.quantize_query(query, state, **{"k": 3, **params})


def kernel_memory(name, memory):
    spec, state, _, _ = _kernel_inputs(name)
    return spec.quantize_memory(memory, state)


def golden_with(arrays=None, scalars=None, drop=None):
    from hetmem.kernels import KernelInputs

    spec, _, inputs = _token_inputs()
    a = {**inputs.arrays, **(arrays or {})}
    s = {**inputs.scalars, **(scalars or {})}
    if drop:
        a.pop(drop, None)
        s.pop(drop, None)
    return spec.golden(KernelInputs(a, s))


def token_query(q=None, w=None, **params):
    spec, state, _ = _token_inputs()
    q = np.ones((2, 3, 8)) if q is None else q
    w = np.ones((2, 3)) if w is None else w
    return spec.quantize_query({"q": q, "w": w}, state, **{"k": 4, **params})


def token_fit(keys):
    from hetmem import kernels

    return kernels.get("token_indexer").fit({"keys": keys})


# -- system model -------------------------------------------------------------------------------


def shape(**kw):
    from hetmem.system import Shape, get_model

    return Shape(get_model("Llama-3.1-8B"), **{"context": 4096, **kw})


def system(gpu="MI210", card="U55C"):
    from hetmem.system import System

    return System.of(gpu, card)


def compare(**kw):
    from hetmem.system.compare import compare as run

    return run(**{"contexts": [4096], "batches": [1], "methods": ["quest"], **kw})


def plan(method_name="quest", **kw):
    from hetmem.system import plan as run

    return run(method_name, shape(), system(), **kw)


def _system_mod():
    import hetmem.system

    return hetmem.system


def _synthetic(**kw):
    from hetmem.synthetic import synthetic_kv

    return synthetic_kv(**kw)


def _tasks():
    import hetmem.tasks

    return hetmem.tasks


def _text():
    import hetmem.text

    return hetmem.text


def _models():
    import hetmem.models

    return hetmem.models


def _reretriever(*args, **kw):
    from hetmem.methods.bm25_rag import ReRetriever

    return ReRetriever(*args, **kw)


def _reretriever_both():
    p = rag("bm25_rag")
    return _reretriever(p, 2, every=1, memory=p.memory)


def _growth(**kw):
    from hetmem.attention import Growth

    return Growth(**kw)


def _step_empty(name):
    p = Pipeline(method(name))
    p.prepare(kv(tokens=0))
    return p.step(q(), 8)


def _profile_error():
    from hetmem.system import ProfileError

    return ProfileError


def _config_error():
    from hetmem.system import ConfigError

    return ConfigError


def _unsupported_model():
    from hetmem.errors import UnsupportedModel

    return UnsupportedModel


def _open_card(options):
    from hetmem.fpga.cards import Cards

    cards = Cards.open(options)
    try:
        return cards[0].open()
    finally:
        cards.close()


def card_of(target, **options):
    from hetmem.fpga.cards import Card

    return Card(target, options)


def _cards_layer():
    from hetmem.fpga.cards import Cards

    return Cards.open("emu").for_layer(5, 2)


def _device_with_options():
    from hetmem.fpga.cards import Card
    from hetmem.fpga.targets import open_device

    device = open_device("emu")
    try:
        return Card(device, {"clock_hz": 1e8})
    finally:
        device.close()


def _indexer(*args):
    from hetmem.methods.dsa import IndexerWeights

    return IndexerWeights(*args)


def _gate(*args):
    from hetmem.methods.seer import GateWeights

    return GateWeights(*args)


def _dense(encoder):
    from hetmem.methods.dense_rag import DenseRAG

    return DenseRAG(encoder=encoder)


def _bm25_empty():
    p = Pipeline(get("bm25_rag"))
    p.prepare([])
    return p.step(["topic"], 2)


def _wrapped_fpga(fpga):
    return wrap(method="quest", budget=64, method_options={"page_size": 8},
                placement="cpu/fpga/fpga/cpu", fpga=fpga)  # fmt: skip


def _wrapped_forward(bad):
    """A wrapped model's cache after a 40-token prefill of 2 rows, then a decode step with a
    third row (`batch`) or a NaN in the new token's embedding (`nan`)."""
    import hetmem
    from hetmem.models import new_cache
    from hetmem.models.wrap import cache_kwarg

    model = hetmem.wrap(tiny(), method="quest", budget=16, method_options={"page_size": 4})
    try:
        kw = cache_kwarg(model)
        cache = new_cache(model)
        gen = torch.Generator().manual_seed(0)
        model(torch.randint(3, 60, (2, 40), generator=gen), **{kw: cache}, use_cache=True)
        if bad == "batch":
            return model(torch.randint(3, 60, (3, 1), generator=gen), **{kw: cache},
                         use_cache=True)  # fmt: skip
        embeds = model.get_input_embeddings()(torch.randint(3, 60, (2, 1), generator=gen))
        embeds[0, 0, 3] = NAN
        return model(inputs_embeds=embeds.detach(), **{kw: cache}, use_cache=True)
    finally:
        hetmem.unwrap(model)


def _budget_units(*args):
    from hetmem.selection import budget_units

    return budget_units(*args)


def _topk(*args):
    from hetmem.selection import topk_select

    return topk_select(*args)


def _kernel(name):
    from hetmem import kernels

    return kernels.get(name)


def _get_model(name):
    from hetmem.system import get_model

    return get_model(name)


def _link(name):
    from hetmem.system import get_link

    return get_link(name)


def _systems_of(gpus, cards):
    from hetmem.system.compare import systems_of

    return systems_of(gpus, cards)


def _parse_tokens(text):
    from hetmem.system.compare import parse_tokens

    return parse_tokens(text)


# -- the API table ------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
ATTENTION = ("dsa", "quest", "seer")

API = [
    # KVCache
    case(
        "kvcache-int-keys",
        lambda: KVCache(torch.ones(B, HKV, S, D, dtype=torch.int32), torch.randn(B, HKV, S, D)),
        InputError,
        "keys",
    ),
    case(
        "kvcache-keys-3d",
        lambda: KVCache(torch.randn(B, S, D), torch.randn(B, S, D)),
        InputError,
        "keys",
    ),
    case(
        "kvcache-values-3d",
        lambda: KVCache(torch.randn(B, HKV, S, D), torch.randn(B, S, D)),
        InputError,
        "values",
    ),
    case(
        "kvcache-keys-not-tensor",
        lambda: KVCache([[1.0]], torch.randn(B, HKV, S, D)),
        InputError,
        "keys",
    ),
    case(
        "kvcache-token-mismatch",
        lambda: KVCache(torch.randn(B, HKV, S, D), torch.randn(B, HKV, S + 1, D)),
        InputError,
        "values",
    ),
    case(
        "kvcache-batch-mismatch",
        lambda: KVCache(torch.randn(B, HKV, S, D), torch.randn(B + 1, HKV, S, D)),
        InputError,
        "values",
    ),
    case(
        "kvcache-heads-mismatch",
        lambda: KVCache(torch.randn(B, HKV, S, D), torch.randn(B, HKV + 1, S, D)),
        InputError,
        "values",
    ),
    case(
        "kvcache-lengths-batch",
        lambda: KVCache(torch.randn(B, HKV, S, D), torch.randn(B, HKV, S, D), torch.tensor([4])),
        InputError,
        "lengths",
    ),
    case(
        "kvcache-lengths-negative",
        lambda: KVCache(
            torch.randn(B, HKV, S, D), torch.randn(B, HKV, S, D), torch.tensor([-1, 4])
        ),
        InputError,
        "lengths",
    ),
    case(
        "kvcache-lengths-too-long",
        lambda: KVCache(
            torch.randn(B, HKV, S, D), torch.randn(B, HKV, S, D), torch.tensor([S + 1, 4])
        ),
        InputError,
        "lengths",
    ),
    case(
        "kvcache-lengths-float",
        lambda: KVCache(
            torch.randn(B, HKV, S, D), torch.randn(B, HKV, S, D), torch.tensor([4.0, 4.0])
        ),
        InputError,
        "lengths",
    ),
    case(
        "kvcache-lengths-bool",
        lambda: KVCache(
            torch.randn(B, HKV, S, D), torch.randn(B, HKV, S, D), torch.tensor([True, True])
        ),
        InputError,
        "lengths: expected an integer dtype, got torch.bool",
    ),
    case(
        "kvcache-lengths-2d",
        lambda: KVCache(
            torch.randn(B, HKV, S, D), torch.randn(B, HKV, S, D), torch.full((B, 1), 4)
        ),
        InputError,
        "lengths",
    ),
    case(
        "kvcache-nan-keys",
        lambda: KVCache(
            with_(torch.randn(B, HKV, S, D), (1, 1, 3, 2), NAN), torch.randn(B, HKV, S, D)
        ),
        InputError,
        "keys: contains NaN or Inf",
    ),
    case(
        "kvcache-inf-values",
        lambda: KVCache(
            torch.randn(B, HKV, S, D), with_(torch.randn(B, HKV, S, D), (0, 0, 0, 0), -INF)
        ),
        InputError,
        "values: contains NaN or Inf",
    ),
    case(
        "kvcache-no-kv-heads",
        lambda: KVCache(torch.randn(B, 0, S, D), torch.randn(B, 0, S, D)),
        InputError,
        "keys: needs at least one KV head and channel",
    ),
    case(
        "kvcache-no-channels",
        lambda: KVCache(torch.randn(B, HKV, S, 0), torch.randn(B, HKV, S, 0)),
        InputError,
        "keys: needs at least one KV head and channel",
    ),
    case(
        "kvcache-no-value-channels",
        lambda: KVCache(torch.randn(B, HKV, S, D), torch.randn(B, HKV, S, 0)),
        InputError,
        "values: needs at least one KV head and channel",
    ),
    case(
        "kvcache-growth-str",
        lambda: KVCache(torch.randn(B, HKV, S, D), torch.randn(B, HKV, S, D), growth="double"),
        InputError,
        "growth",
    ),
    case("kvcache-growth-align-zero", lambda: _growth(align=0), InputError, "growth"),
    case(
        "kvcache-growth-align-str",
        lambda: _growth(align="16"),
        InputError,
        "growth: align and fraction must be ints >= 1",
    ),
    case(
        "kvcache-append-wrong-dim",
        lambda: kv().append(torch.randn(B, HKV, 1, D + 1), torch.randn(B, HKV, 1, D)),
        InputError,
        "keys",
    ),
    case(
        "kvcache-truncate-too-long",
        lambda: kv().truncate(torch.tensor([S + 5, S])),
        InputError,
        "lengths",
    ),
    # AttentionQuery through Pipeline.step, for every attention method
    *[
        case(
            f"{m}-query-rank-3",
            lambda m=m: step(m, AttentionQuery(torch.randn(B, HQ, D))),
            InputError,
            "query",
        )
        for m in ATTENTION
    ],
    *[
        case(f"{m}-query-dim", lambda m=m: step(m, q(dim=D + 2)), InputError, "query")
        for m in ATTENTION
    ],
    *[
        case(f"{m}-query-batch", lambda m=m: step(m, q(batch=B + 1)), InputError, "query")
        for m in ATTENTION
    ],
    *[
        case(
            f"{m}-query-no-queries",
            lambda m=m: step(m, q(t=0)),
            InputError,
            "query: needs at least one head and one query",
        )
        for m in ATTENTION
    ],
    *[
        case(
            f"{m}-query-no-heads",
            lambda m=m: step(m, q(heads=0)),
            InputError,
            "query: needs at least one head and one query",
        )
        for m in ATTENTION
    ],
    *[
        case(f"{m}-query-heads-not-multiple", lambda m=m: step(m, q(heads=3)), InputError, "query")
        for m in ATTENTION
    ],
    *[
        case(
            f"{m}-query-nan",
            lambda m=m: step(m, AttentionQuery(with_(torch.randn(B, HQ, 1, D), (0, 1, 0, 2), NAN))),
            InputError,
            "query: contains NaN or Inf",
        )
        for m in ATTENTION
    ],
    *[
        case(
            f"{m}-query-int",
            lambda m=m: step(m, AttentionQuery(torch.ones(B, HQ, 1, D, dtype=torch.int64))),
            InputError,
            "query",
        )
        for m in ATTENTION
    ],
    *[
        case(
            f"{m}-query-raw-tensor",
            lambda m=m: step(m, torch.randn(B, HQ, 1, D)),
            InputError,
            "query",
        )
        for m in ATTENTION
    ],
    *[
        case(
            f"{m}-positions-negative",
            lambda m=m: step(m, q(positions=torch.tensor([[-1], [3]]))),
            InputError,
            "positions",
        )
        for m in ATTENTION
    ],
    *[
        case(
            f"{m}-positions-float",
            lambda m=m: step(m, q(positions=torch.tensor([[1.0], [3.0]]))),
            InputError,
            "positions",
        )
        for m in ATTENTION
    ],
    *[
        case(
            f"{m}-positions-bool",
            lambda m=m: step(m, q(positions=torch.tensor([[True], [False]]))),
            InputError,
            "positions: expected an integer dtype, got torch.bool",
        )
        for m in ATTENTION
    ],
    *[
        case(
            f"{m}-positions-shape",
            lambda m=m: step(m, q(positions=torch.zeros(B, 3, dtype=torch.long))),
            InputError,
            "positions",
        )
        for m in ATTENTION
    ],
    *[
        case(f"{m}-budget-zero", lambda m=m: step(m, q(), 0), InputError, "budget")
        for m in ATTENTION
    ],
    *[
        case(f"{m}-budget-negative", lambda m=m: step(m, q(), -8), InputError, "budget")
        for m in ATTENTION
    ],
    *[
        case(f"{m}-budget-float", lambda m=m: step(m, q(), 8.5), InputError, "budget")
        for m in ATTENTION
    ],
    *[
        case(f"{m}-budget-bool", lambda m=m: step(m, q(), True), InputError, "budget")
        for m in ATTENTION
    ],
    *[
        case(f"{m}-budget-str", lambda m=m: step(m, q(), "8"), InputError, "budget")
        for m in ATTENTION
    ],
    case(
        "quest-budget-under-a-page",
        lambda: step("quest", q(), 3),
        InputError,
        "budget: 3 tokens is less than one unit (4 tokens)",
    ),
    case(
        "seer-budget-under-a-block",
        lambda: step("seer", q(), 2),
        InputError,
        "budget: 2 tokens is less than one unit (4 tokens)",
    ),
    case(
        "dsa-features-wrong-shape",
        lambda: step("dsa", q(features=torch.randn(B, 1, 3))),
        InputError,
        "features",
    ),
    # append / prepare
    *[
        case(f"{m}-append-heads", lambda m=m: append(m, chunk(heads=HKV + 1)), InputError, "keys")
        for m in ATTENTION
    ],
    *[
        case(f"{m}-append-dim", lambda m=m: append(m, chunk(dim=D + 1, dv=D)), InputError, "keys")
        for m in ATTENTION
    ],
    *[
        case(f"{m}-append-value-dim", lambda m=m: append(m, chunk(dv=D + 3)), InputError, "values")
        for m in ATTENTION
    ],
    *[
        case(f"{m}-append-batch", lambda m=m: append(m, chunk(batch=B + 1)), InputError, "keys")
        for m in ATTENTION
    ],
    *[
        case(
            f"{m}-append-inf",
            lambda m=m: append(
                m,
                KVChunk(
                    with_(torch.randn(B, HKV, 1, D), (0, 0, 0, 0), INF), torch.randn(B, HKV, 1, D)
                ),
            ),
            InputError,
            "keys: contains NaN or Inf",
        )
        for m in ATTENTION
    ],
    *[
        case(
            f"{m}-append-tensor",
            lambda m=m: append(m, torch.randn(B, HKV, 1, D)),
            InputError,
            "data",
        )
        for m in ATTENTION
    ],
    *[
        case(
            f"{m}-prepare-tensor",
            lambda m=m: Pipeline(method(m)).prepare(torch.randn(B, HKV, S, D)),
            InputError,
            "data",
        )
        for m in ATTENTION
    ],
    *[
        case(
            f"{m}-step-before-prepare",
            lambda m=m: Pipeline(method(m)).step(q(), 8),
            InputError,
            "memory",
        )
        for m in ATTENTION
    ],
    *[
        case(
            f"{m}-append-before-prepare",
            lambda m=m: Pipeline(method(m)).append(chunk()),
            InputError,
            "memory",
        )
        for m in ATTENTION
    ],
    *[
        case(
            f"{m}-empty-memory",
            lambda m=m: (Pipeline(method(m)).prepare(kv(tokens=0)) and None) or _step_empty(m),
            InputError,
            "memory",
        )
        for m in ATTENTION
    ],
    case(
        "dsa-append-features-wrong",
        lambda: append(
            "dsa",
            KVChunk(torch.randn(B, HKV, 1, D), torch.randn(B, HKV, 1, D), torch.randn(B, 2, 5)),
        ),
        InputError,
        "features",
    ),
    case(
        "dsa-prepare-features-wrong",
        lambda: Pipeline(method("dsa")).prepare((kv(), torch.randn(B, S - 1, 4))),
        InputError,
        "features",
    ),
    case("select-budget-zero", lambda: pipe("quest").select(q(), 0), InputError, "budget"),
    # Pipeline construction and placements
    case("pipeline-method-str", lambda: Pipeline("quest"), PlacementError, "method"),
    case(
        "pipeline-on-fpga-error",
        lambda: Pipeline(method("quest"), on_fpga_error="ignore"),
        PlacementError,
        "on_fpga_error",
    ),
    case(
        "pipeline-overlap-str",
        lambda: Pipeline(method("quest"), overlap="yes"),
        PlacementError,
        "overlap",
    ),
    case(
        "placement-three-steps",
        lambda: Pipeline(method("quest"), "gpu/gpu/gpu"),
        PlacementError,
        "placement",
    ),
    case(
        "placement-unknown-device",
        lambda: Pipeline(method("quest"), {"relevancy": "tpu"}),
        PlacementError,
        "placement",
    ),
    case(
        "placement-unknown-step",
        lambda: Pipeline(method("quest"), {"rerank": "gpu"}),
        PlacementError,
        "placement",
    ),
    case(
        "placement-apply-on-fpga",
        lambda: Pipeline(method("quest"), {"apply": "fpga"}),
        PlacementError,
        "placement",
    ),
    case(
        "placement-prepare-on-fpga",
        lambda: Pipeline(method("quest"), "fpga/fpga/fpga/cpu"),
        PlacementError,
        "placement",
    ),
    case(
        "placement-fused-split",
        lambda: Pipeline(method("quest"), "cpu/fpga/cpu/cpu"),
        PlacementError,
        "placement",
    ),
    case("placement-int", lambda: Pipeline(method("quest"), 42), PlacementError, "placement"),
    case("placement-empty-str", lambda: Pipeline(method("quest"), ""), PlacementError, "placement"),
    case(
        "placement-auto-objective",
        lambda: Pipeline(method("quest"), "auto", objective="speed"),
        InputError,
        "objective",
    ),
    case(
        "placement-auto-unknown-gpu",
        lambda: Pipeline(method("quest"), "auto", system=("NoSuchGPU",)),
        _profile_error(),
        "NoSuchGPU",
    ),
    # FPGA stage, cards and options
    case("fpga-unknown-target", lambda: fpga_pipe("bogus"), InputError, "fpga: unknown FPGA"),
    case("fpga-mapping-unknown-target", lambda: fpga_pipe({"target": "bogus"}), InputError, "fpga"),
    case(
        "fpga-fault-limit-zero",
        lambda: fpga_pipe({"target": "emu", "fault_limit": 0}),
        InputError,
        "fpga fault_limit",
    ),
    case(
        "fpga-fault-limit-bool",
        lambda: fpga_pipe({"target": "emu", "fault_limit": True}),
        InputError,
        "fpga fault_limit",
    ),
    case(
        "fpga-fault-limit-str",
        lambda: fpga_pipe({"target": "emu", "fault_limit": "3"}),
        InputError,
        "fpga fault_limit",
    ),
    case(
        "fpga-cooldown-negative",
        lambda: fpga_pipe({"target": "emu", "cooldown": -1}),
        InputError,
        "fpga cooldown",
    ),
    case(
        "fpga-cooldown-float",
        lambda: fpga_pipe({"target": "emu", "cooldown": 2.5}),
        InputError,
        "fpga cooldown",
    ),
    case("fpga-cards-zero", lambda: fpga_pipe({"target": "emu", "cards": 0}), InputError, "cards"),
    case(
        "fpga-unknown-option",
        lambda: _open_card({"target": "emu", "bogus": 1}),
        InputError,
        "bogus",
    ),
    case(
        "fpga-emu-clock-zero",
        lambda: _open_card({"target": "emu", "clock_hz": 0}),
        InputError,
        "clock_hz",
    ),
    case(
        "fpga-emu-clock-str",
        lambda: _open_card({"target": "emu", "clock_hz": "fast"}),
        InputError,
        "clock_hz",
    ),
    case(
        "fpga-emu-clock-inf",
        lambda: _open_card({"target": "emu", "clock_hz": INF}),
        InputError,
        "clock_hz",
    ),
    case(
        "fpga-emu-link-str",
        lambda: _open_card({"target": "emu", "link": "gen3"}),
        InputError,
        "link: expected a PcieLink",
    ),
    case(
        "fpga-stage-option-in-card",
        lambda: fpga_pipe({"target": "emu", "timeout_s": 1}),
        InputError,
        "options: emu: got an unexpected keyword argument 'timeout_s'",
    ),
    case(
        "fpga-cosim-unknown-option",
        lambda: card_of("cosim", simulator="bogus"),
        InputError,
        "options: cosim",
    ),
    case(
        "fpga-xrt-emu-executor",
        lambda: _open_card({"target": "xrt_emu", "executor": "gpu"}),
        InputError,
        "executor",
    ),
    case(
        "fpga-cards-str",
        lambda: fpga_pipe({"target": "emu", "cards": "2"}),
        InputError,
        "'cards' must be a positive int",
    ),
    case(
        "fpga-cards-empty-list", lambda: fpga_pipe([]), InputError, "fpga: needs at least one card"
    ),
    case("fpga-int", lambda: fpga_pipe(5), InputError, "fpga: expected a target name"),
    case(
        "fpga-list-with-unknown",
        lambda: fpga_pipe(["emu", "bogus"]),
        InputError,
        "unknown FPGA target 'bogus'",
    ),
    case("cards-layer-out-of-range", lambda: _cards_layer(), InputError, "layer"),
    case(
        "placement-auto-system-str",
        lambda: Pipeline(method("quest"), "auto", system="MI210"),
        InputError,
        "system",
    ),
    case(
        "placement-auto-shape-str",
        lambda: Pipeline(method("quest"), "auto", shape="big"),
        InputError,
        "shape",
    ),
    case(
        "placement-auto-unknown-card",
        lambda: Pipeline(method("quest"), "auto", system=("MI210", "NoSuchCard")),
        _profile_error(),
        "NoSuchCard",
    ),
    case(
        "fpga-emu-bank-bytes-zero",
        lambda: _open_card({"target": "emu", "bank_bytes": 0}),
        InputError,
        "bank_bytes",
    ),
    case("card-fault-limit-zero", lambda: card(fault_limit=0), InputError, "fpga fault_limit"),
    case("card-cooldown-zero", lambda: card(cooldown=0), InputError, "fpga cooldown"),
    case("stage-timeout-zero", lambda: stage(timeout_s=0), InputError, "timeout_s"),
    case("stage-timeout-str", lambda: stage(timeout_s="1"), InputError, "timeout_s"),
    case("stage-method-str", lambda: stage(method="quest"), InputError, "method"),
    case("fpga-open-device-with-options", lambda: _device_with_options(), InputError, "fpga"),
    # methods' options
    case("method-unknown", lambda: get("flash"), InputError, "method: unknown method"),
    case("quest-page-size-zero", lambda: get("quest", page_size=0), InputError, "page_size"),
    case("quest-page-size-float", lambda: get("quest", page_size=2.5), InputError, "page_size"),
    case("quest-page-size-str", lambda: get("quest", page_size="16"), InputError, "page_size"),
    case("quest-scale-nan", lambda: get("quest", scale=NAN), InputError, "scale"),
    case("quest-scale-zero", lambda: get("quest", scale=0.0), InputError, "scale"),
    case("quest-scale-str", lambda: get("quest", scale="0.1"), InputError, "scale"),
    case("dsa-scale-negative", lambda: get("dsa", scale=-1.0), InputError, "scale"),
    case("seer-scale-inf", lambda: get("seer", scale=INF), InputError, "scale"),
    case(
        "quest-per-query-head-str",
        lambda: get("quest", per_query_head="yes"),
        InputError,
        "per_query_head",
    ),
    case("seer-block-size-zero", lambda: get("seer", block_size=0), InputError, "block_size"),
    case("seer-mode", lambda: get("seer", mode="sometimes"), InputError, "mode"),
    case(
        "seer-threshold-zero",
        lambda: get("seer", mode="threshold", threshold=0.0),
        InputError,
        "threshold",
    ),
    case(
        "seer-threshold-above-one",
        lambda: get("seer", mode="threshold", threshold=1.5),
        InputError,
        "threshold",
    ),
    case(
        "seer-threshold-str",
        lambda: get("seer", mode="threshold", threshold="0.5"),
        InputError,
        "threshold",
    ),
    case(
        "seer-threshold-nan",
        lambda: get("seer", mode="threshold", threshold=NAN),
        InputError,
        "threshold",
    ),
    case("dsa-kv-layout", lambda: get("dsa", kv_layout="diagonal"), InputError, "kv_layout"),
    case(
        "dsa-weights-tensor", lambda: get("dsa", weights=torch.randn(4, 4)), InputError, "weights"
    ),
    case(
        "seer-weights-tensor", lambda: get("seer", weights=torch.randn(4, 4)), InputError, "weights"
    ),
    case(
        "dsa-indexer-shapes",
        lambda: _indexer(torch.randn(16, 30), torch.randn(16, 8), torch.randn(16, 4)),
        InputError,
        "wq",
    ),
    case(
        "dsa-indexer-nan",
        lambda: _indexer(torch.randn(16, 32), with_(torch.randn(16, 8), (0, 0), NAN)),
        InputError,
        "wk",
    ),
    case(
        "seer-gate-shapes",
        lambda: _gate(torch.randn(2, 16, 8), torch.randn(2, 24, 4)),
        InputError,
        "wk",
    ),
    case(
        "method-unknown-option",
        lambda: get("quest", block_size=4),
        InputError,
        "options: quest: got an unexpected keyword argument 'block_size'",
    ),
    # RAG methods
    case("bm25-k1-negative", lambda: get("bm25_rag", k1=-1), InputError, "k1"),
    case("bm25-k1-inf", lambda: get("bm25_rag", k1=INF), InputError, "k1"),
    case("bm25-b-above-one", lambda: get("bm25_rag", b=2), InputError, "b"),
    case(
        "bm25-fold-accents-str",
        lambda: get("bm25_rag", fold_accents="yes"),
        InputError,
        "fold_accents",
    ),
    case("bm25-device", lambda: get("bm25_rag", device="nodevice"), InputError, "device"),
    case("bm25-max-chars-zero", lambda: get("bm25_rag", max_chars=0), InputError, "max_chars"),
    case("bm25-stopwords-str", lambda: get("bm25_rag", stopwords="the"), InputError, "stopwords"),
    case(
        "bm25-prepare-str",
        lambda: Pipeline(get("bm25_rag")).prepare("one document"),
        InputError,
        "documents",
    ),
    case(
        "bm25-prepare-int-item",
        lambda: Pipeline(get("bm25_rag")).prepare(["a", 3]),
        InputError,
        "documents",
    ),
    case("bm25-append-str", lambda: rag("bm25_rag").append("more"), InputError, "documents"),
    case("bm25-query-empty", lambda: rag("bm25_rag").step([], 2), InputError, "query"),
    case("bm25-query-str", lambda: rag("bm25_rag").step("topic", 2), InputError, "query"),
    case("bm25-query-int-item", lambda: rag("bm25_rag").step(["topic", 7], 2), InputError, "query"),
    case("bm25-budget-zero", lambda: rag("bm25_rag").step(["topic"], 0), InputError, "budget"),
    case("bm25-empty-memory", lambda: _bm25_empty(), InputError, "memory"),
    case(
        "dense-encoder-not-callable",
        lambda: get("dense_rag", encoder="minilm"),
        InputError,
        "encoder",
    ),
    case(
        "dense-max-chars-negative", lambda: get("dense_rag", max_chars=-1), InputError, "max_chars"
    ),
    case(
        "dense-texts-without-encoder",
        lambda: Pipeline(get("dense_rag")).prepare(docs()),
        InputError,
        "documents",
    ),
    case(
        "dense-embeddings-nan",
        lambda: Pipeline(get("dense_rag")).prepare(
            documents(docs(3), with_(torch.randn(3, 16), (1, 1), NAN))
        ),
        InputError,
        "embeddings",
    ),
    case(
        "dense-embeddings-count",
        lambda: Pipeline(get("dense_rag")).prepare(documents(docs(3), torch.randn(4, 16))),
        InputError,
        "embeddings",
    ),
    case(
        "dense-encoder-wrong-count",
        lambda: Pipeline(_dense(lambda t: torch.randn(1, 16))).prepare(docs()),
        InputError,
        "encoder",
    ),
    case(
        "dense-encoder-returns-list",
        lambda: Pipeline(_dense(lambda t: [[0.0] * 16] * len(t))).prepare(docs()),
        InputError,
        "encoder",
    ),
    case(
        "dense-query-dim",
        lambda: rag("dense_rag").step(dense_query(torch.randn(1, 8)), 2),
        InputError,
        "query",
    ),
    case(
        "dense-query-nan",
        lambda: rag("dense_rag").step(dense_query(with_(torch.randn(1, 16), (0, 3), NAN)), 2),
        InputError,
        "query",
    ),
    case(
        "dense-query-3d",
        lambda: rag("dense_rag").step(dense_query(torch.randn(1, 1, 16)), 2),
        InputError,
        "query",
    ),
    case(
        "dense-query-nothing", lambda: rag("dense_rag").step(dense_query(), 2), InputError, "query"
    ),
    case(
        "dense-budget-negative",
        lambda: rag("dense_rag").step(dense_query(torch.randn(1, 16)), -1),
        InputError,
        "budget",
    ),
    # hetmem.wrap / unwrap on a tiny transformers model
    case("wrap-not-a-model", lambda: __import__("hetmem").wrap(object()), InputError, "model"),
    case("wrap-twice", wrap_twice, InputError, "model: is already wrapped"),
    case(
        "unwrap-not-wrapped",
        lambda: __import__("hetmem").unwrap(tiny()),
        InputError,
        "model: is not wrapped",
    ),
    case("wrap-budget-zero", lambda: wrap(method="quest", budget=0), InputError, "budget"),
    case("wrap-budget-str", lambda: wrap(method="quest", budget="64"), InputError, "budget"),
    case(
        "wrap-budget-under-a-page",
        lambda: wrap(method="quest", budget=8, method_options={"page_size": 16}),
        InputError,
        "budget: 8 tokens is less than one 16-token unit",
    ),
    case("wrap-method-unknown", lambda: wrap(method="flash"), InputError, "method"),
    case("wrap-method-rag", lambda: wrap(method="bm25_rag"), InputError, "method"),
    case("wrap-method-int", lambda: wrap(method=42), InputError, "method"),
    case(
        "wrap-method-callable-not-a-method",
        lambda: wrap(method=lambda i: "quest"),
        InputError,
        "method",
    ),
    case(
        "wrap-method-options-unknown",
        lambda: wrap(method="quest", method_options={"page_siz": 8}),
        InputError,
        "method_options: quest: got an unexpected keyword argument 'page_siz'",
    ),
    case(
        "wrap-method-options-with-instance",
        lambda: wrap(method=method("quest"), method_options={"page_size": 8}),
        InputError,
        "method_options",
    ),
    case(
        "wrap-on-fpga-error",
        lambda: wrap(method="quest", budget=64, on_fpga_error="ignore"),
        InputError,
        "on_fpga_error",
    ),
    case(
        "wrap-auto-options-without-auto",
        lambda: wrap(method="quest", budget=64, auto_options={"batch": 2}),
        InputError,
        "auto_options",
    ),
    case(
        "wrap-auto-context-text",
        lambda: wrap(method="quest", budget=64, placement="auto", auto_options={"context": "lots"}),
        InputError,
        "auto_options: context: expected an int",
    ),
    case(
        "wrap-auto-batch-zero",
        lambda: wrap(method="quest", budget=64, placement="auto", auto_options={"batch": 0}),
        InputError,
        "batch",
    ),
    case(
        "wrap-auto-unknown-option",
        lambda: wrap(method="quest", budget=64, placement="auto", auto_options={"bogus": 1}),
        InputError,
        "auto_options: unknown keys ['bogus']",
    ),
    case(
        "wrap-auto-objective",
        lambda: wrap(
            method="quest", budget=64, placement="auto", auto_options={"objective": "speed"}
        ),
        InputError,
        "objective",
    ),
    case(
        "wrap-auto-system-str",
        lambda: wrap(method="quest", budget=64, placement="auto", auto_options={"system": "MI210"}),
        InputError,
        "system",
    ),
    case(
        "seer-threshold-bool",
        lambda: get("seer", mode="threshold", threshold=True),
        InputError,
        "threshold",
    ),
    case(
        "wrap-overlap-str",
        lambda: wrap(method="quest", budget=64, overlap="yes"),
        InputError,
        "overlap",
    ),
    case(
        "wrap-placement-unknown-device",
        lambda: wrap(method="quest", budget=64, placement="tpu/tpu/tpu/tpu"),
        PlacementError,
        "placement",
    ),
    case("wrap-fpga-unknown", lambda: _wrapped_fpga("bogus"), InputError, "fpga"),
    case(
        "wrap-fpga-fault-limit",
        lambda: _wrapped_fpga({"target": "emu", "fault_limit": -2}),
        InputError,
        "fpga fault_limit",
    ),
    case(
        "wrapped-cache-batch-change",
        lambda: _wrapped_forward("batch"),
        InputError,
        "keys: expected shape (2, 2, 1, 8), got (3, 2, 1, 8)",
    ),
    case(
        "wrapped-decode-nan",
        lambda: _wrapped_forward("nan"),
        InputError,
        "keys: contains NaN or Inf",
    ),
    case(
        "wrap-mla-refused",
        lambda: unsupported(
            "DeepseekV3",
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            n_routed_experts=2,
            num_experts_per_tok=1,
            moe_intermediate_size=16,
            first_k_dense_replace=2,
        ),
        _unsupported_model(),
        "MLA",
    ),
    # selection and budgets
    case("budget-units-zero", lambda: _budget_units(0), InputError, "budget"),
    case(
        "budget-units-under-unit",
        lambda: _budget_units(3, 4),
        InputError,
        "budget: 3 tokens is less than one unit (4 tokens)",
    ),
    case("budget-units-bool", lambda: _budget_units(True), InputError, "budget"),
    case("budget-units-float", lambda: _budget_units(2.0), InputError, "budget"),
    case("topk-k-too-large", lambda: _topk(torch.randn(1, 5), 6), InputError, "k"),
    case("topk-k-zero", lambda: _topk(torch.randn(1, 5), 0), InputError, "k"),
    case(
        "topk-nan-scores",
        lambda: _topk(with_(torch.randn(1, 5), (0, 2), NAN), 2),
        InputError,
        "scores",
    ),
    case(
        "dense-attention-positions",
        lambda: dense_attention(
            torch.randn(B, HQ, 2, D), kv(), positions=torch.zeros(B, 3, dtype=torch.long)
        ),
        InputError,
        "positions",
    ),
    case(
        "dense-attention-query-dim",
        lambda: dense_attention(torch.randn(B, HQ, 1, D + 1), kv()),
        InputError,
        "query",
    ),
    # synthetic data, tasks and text
    case("synthetic-batch-negative", lambda: _synthetic(batch=-1), InputError, "batch"),
    case("synthetic-dim-zero", lambda: _synthetic(dim=0), InputError, "dim"),
    case("synthetic-length-float", lambda: _synthetic(length=64.0), InputError, "length"),
    case(
        "synthetic-hitters-negative",
        lambda: _synthetic(length=64, hitters=-1),
        InputError,
        "hitters",
    ),
    case("passkey-length-zero", lambda: _tasks().passkey(0), InputError, "length"),
    case("passkey-depth-above-one", lambda: _tasks().passkey(500, depth=2.0), InputError, "depth"),
    case("passkey-depth-nan", lambda: _tasks().passkey(500, depth=NAN), InputError, "depth"),
    case("task-kind-unknown", lambda: _tasks().make_task("bogus", 500), InputError, "kind"),
    case("task-score-int", lambda: _tasks().score(5, "1234"), InputError, "task"),
    case(
        "task-accuracy-count",
        lambda: _tasks().accuracy([_tasks().passkey(500)], ["a", "b"]),
        InputError,
        "completions",
    ),
    case("recall-length-zero", lambda: _tasks().associative_recall(0), InputError, "length"),
    case("tokenize-none", lambda: _text().tokenize(None), InputError, "text: expected a str"),
    case(
        "tokenize-bytes", lambda: _text().tokenize(b"abc def"), InputError, "text: expected a str"
    ),
    case("normalize-int", lambda: _text().normalize(5), InputError, "text: expected a str"),
    case("last-words-negative", lambda: _text().last_words("a b c", -1), InputError, "window"),
    case("max-chars-str", lambda: _text().check_max_chars("10"), InputError, "max_chars"),
    # RAG re-retrieval
    case("reretriever-source-str", lambda: _reretriever("x", 2), InputError, "source"),
    case(
        "reretriever-method-without-memory",
        lambda: _reretriever(get("bm25_rag"), 2),
        InputError,
        "memory",
    ),
    case("reretriever-pipeline-and-memory", lambda: _reretriever_both(), InputError, "memory"),
    case("reretriever-k-zero", lambda: _reretriever(rag("bm25_rag"), 0, every=1), InputError, "k"),
    case("reretriever-never-fires", lambda: _reretriever(rag("bm25_rag"), 2), InputError, "every"),
    case(
        "reretriever-min-prob",
        lambda: _reretriever(rag("bm25_rag"), 2, min_prob=2.0),
        InputError,
        "min_prob",
    ),
    case(
        "reretriever-every-negative",
        lambda: _reretriever(rag("bm25_rag"), 2, every=-1),
        InputError,
        "every",
    ),
    case(
        "reretriever-window-negative",
        lambda: _reretriever(rag("bm25_rag"), 2, every=1, window=-3),
        InputError,
        "window",
    ),
    case(
        "reretriever-question-int",
        lambda: _reretriever(rag("bm25_rag"), 2, every=1, question=5),
        InputError,
        "question",
    ),
    case(
        "reretriever-generated-int",
        lambda: _reretriever(rag("bm25_rag"), 2, every=1)(5),
        InputError,
        "generated",
    ),
    case(
        "new-cache-unwrapped",
        lambda: _models().new_cache(tiny()),
        InputError,
        "model: is not wrapped",
    ),
    # kernel specs' golden inputs
    case("kernel-unknown", lambda: _kernel("nope"), InputError, "kernel"),
    case("kernel-none", lambda: _kernel(None), InputError, "kernel"),
    case("golden-missing-buffer", lambda: golden_with(drop="keys"), InputError, "keys"),
    case(
        "golden-wrong-dtype",
        lambda: golden_with(arrays={"keys": np.zeros((40, 8))}),
        InputError,
        "keys: expected dtype",
    ),
    case("golden-missing-scalar", lambda: golden_with(drop="k"), InputError, "k"),
    case("golden-scalar-negative", lambda: golden_with(scalars={"k": -1}), InputError, "k"),
    case("golden-scalar-too-big", lambda: golden_with(scalars={"n": 2**32}), InputError, "n"),
    case("golden-scalar-float", lambda: golden_with(scalars={"k": 4.0}), InputError, "k"),
    case("golden-scalar-bool", lambda: golden_with(scalars={"k": True}), InputError, "k"),
    case("golden-k-above-n", lambda: golden_with(scalars={"k": 41}), InputError, "k"),
    case("golden-mode-unknown", lambda: golden_with(scalars={"mode": 7}), InputError, "mode"),
    case(
        "golden-n-beyond-rows",
        lambda: golden_with(scalars={"n": 41}, drop="segs"),
        InputError,
        "keys",
    ),
    case(
        "golden-segment-beyond-rows",
        lambda: golden_with(
            arrays={"segs": np.array([[0, 41], [0, 41]], dtype=np.uint32)}, scalars={"n": 41}
        ),
        InputError,
        "keys: holds 40 rows, fewer than n=41",
    ),
    case(
        "kernel-fit-nan", lambda: token_fit(np.array([[NAN, 1.0], [0.0, 1.0]])), InputError, "keys"
    ),
    case("kernel-fit-1d", lambda: token_fit(np.ones(8)), InputError, "keys"),
    case("kernel-query-inf", lambda: token_query(q=np.full((2, 3, 8), INF)), InputError, "q"),
    case("kernel-query-dim", lambda: token_query(q=np.ones((2, 3, 5))), InputError, "q"),
    case("kernel-query-w-shape", lambda: token_query(w=np.ones((2, 4))), InputError, "w"),
    case("kernel-query-k-zero", lambda: token_query(k=0), InputError, "k"),
    case(
        "kernel-buffer-without-capacity",
        lambda: _token_inputs()[0].buffer_nbytes("keys", {"dim": 8}),
        InputError,
        "capacity",
    ),
    case(
        "kernel-buffer-of-a-scalar",
        lambda: _token_inputs()[0].buffer_nbytes("n", {}),
        InputError,
        "arg",
    ),
    *[
        case(
            f"{k}-golden-q-int32",
            lambda k=k: kernel_golden(
                k, arrays={"q": _kernel_inputs(k)[3].arrays["q"].astype(np.int32)}
            ),
            InputError,
            "q: expected dtype int8",
        )
        for k in KERNEL_MEMORY
    ],
    *[
        case(
            f"{k}-golden-q-rows",
            lambda k=k: kernel_golden(k, arrays={"q": _kernel_inputs(k)[3].arrays["q"][:1]}),
            InputError,
            "q: axis 0 has length 1",
        )
        for k in KERNEL_MEMORY
    ],
    *[
        case(
            f"{k}-golden-dim",
            lambda k=k: kernel_golden(k, scalars={"dim": 16}),
            InputError,
            "expected 16 (dim)",
        )
        for k in KERNEL_MEMORY
    ],
    *[
        case(
            f"{k}-golden-segment-rows",
            lambda k=k: kernel_golden(
                k, arrays={"segs": np.array([[5, 1000]] * 2, dtype=np.uint32)}
            ),
            InputError,
            "segs: query 0 scans 1000 rows",
        )
        for k in KERNEL_MEMORY
    ],
    *[
        case(
            f"{k}-golden-segs-shape",
            lambda k=k: kernel_golden(k, arrays={"segs": np.zeros(2, dtype=np.uint32)}),
            InputError,
            "segs: expected shape",
        )
        for k in KERNEL_MEMORY
    ],
    *[
        case(
            f"{k}-golden-queries-zero",
            lambda k=k: kernel_golden(k, scalars={"queries": 0}),
            InputError,
            "segs",
        )
        for k in KERNEL_MEMORY
    ],
    *[
        case(
            f"{k}-fit-inf",
            lambda k=k: _kernel_inputs(k)[0].fit(
                {a: np.full_like(v, INF) for a, v in _kernel_inputs(k)[2].items()}
            ),
            InputError,
            "contains NaN or Inf",
        )
        for k in KERNEL_MEMORY
    ],
    *[
        case(
            f"{k}-memory-channels",
            lambda k=k: kernel_memory(k, {a: v[:, :5] for a, v in _kernel_inputs(k)[2].items()}),
            InputError,
            "channels of the fitted memory",
        )
        for k in KERNEL_MEMORY
    ],
    *[
        case(
            f"{k}-query-nan",
            lambda k=k: kernel_query(k, {"q": np.full(KERNEL_MEMORY[k][1], NAN)}),
            InputError,
            "q: contains NaN or Inf",
        )
        for k in KERNEL_MEMORY
    ],
    *[
        case(
            f"{k}-query-k-str",
            lambda k=k: kernel_query(k, {"q": np.ones(KERNEL_MEMORY[k][1])}, k="3"),
            InputError,
            "k: expected an int",
        )
        for k in KERNEL_MEMORY
    ],
    case(
        "vector_search-golden-shifts",
        lambda: kernel_golden(
            "vector_search",
            arrays={
                "shifts": np.full_like(_kernel_inputs("vector_search")[3].arrays["shifts"], 100)
            },
        ),
        InputError,
        "shifts: expected row shifts",
    ),
    case(
        "kernel-query-without-q",
        lambda: kernel_query("vector_search", {}),
        InputError,
        "q: missing from the query",
    ),
    case(
        "kernel-memory-without-keys",
        lambda: kernel_memory("block_gate", {}),
        InputError,
        "keys: missing from the memory",
    ),
    # the system model
    case("shape-context-zero", lambda: shape(context=0), InputError, "context"),
    case("shape-batch-negative", lambda: shape(batch=-1), InputError, "batch"),
    case("shape-budget-bool", lambda: shape(budget=True), InputError, "budget"),
    case("shape-budget-float", lambda: shape(budget=256.0), InputError, "budget"),
    case("shape-term-df-zero", lambda: shape(term_df=0), InputError, "term_df"),
    case("shape-term-df-above-one", lambda: shape(term_df=2), InputError, "term_df"),
    case("shape-term-df-nan", lambda: shape(term_df=NAN), InputError, "term_df"),
    case(
        "system-model-unknown",
        lambda: _get_model("NoSuchModel-7B"),
        _config_error(),
        "model: unknown model",
    ),
    case("system-gpu-unknown", lambda: system(gpu="NoSuchGPU"), _profile_error(), "NoSuchGPU"),
    case("system-card-unknown", lambda: system(card="NoSuchCard"), _profile_error(), "NoSuchCard"),
    case("system-gpu-as-card", lambda: system(card="MI210"), _profile_error(), "MI210"),
    case(
        "system-link-unknown",
        lambda: _link("pcie9-x64"),
        _profile_error(),
        "link: unknown link 'pcie9-x64'",
    ),
    case("compare-objective", lambda: compare(objective="speed"), InputError, "objective"),
    case("compare-per", lambda: compare(per="second"), InputError, "per"),
    case("compare-method", lambda: compare(methods=["flash"]), InputError, "method"),
    case("compare-contexts-text", lambda: compare(contexts=["lots"]), InputError, "contexts"),
    case("compare-contexts-zero", lambda: compare(contexts="0"), InputError, "contexts"),
    case("compare-contexts-empty", lambda: compare(contexts=""), InputError, "contexts"),
    case("compare-batches-negative", lambda: compare(batches=[-2]), InputError, "batches"),
    case(
        "compare-system-without-card",
        lambda: compare(systems=[system(card=None)]),
        InputError,
        "card",
    ),
    case("compare-budget-zero", lambda: compare(budget=0), InputError, "budget"),
    case(
        "compare-new-tokens-zero",
        lambda: compare(per="request", new_tokens=0),
        InputError,
        "new_tokens",
    ),
    case("compare-pairs", lambda: _systems_of(["MI210", "A100"], ["U55C"] * 3), InputError, "card"),
    case("plan-objective", lambda: plan(objective="speed"), InputError, "objective"),
    case("plan-method", lambda: plan("flash"), InputError, "method"),
    case("plan-overlap-str", lambda: plan(overlap="yes"), InputError, "overlap"),
    case("plan-per", lambda: plan(per="second"), InputError, "per"),
    case(
        "plan-new-tokens-negative",
        lambda: plan(per="request", new_tokens=-1),
        InputError,
        "new_tokens",
    ),
    case(
        "plan-shape-str",
        lambda: _system_mod().plan("quest", "big", system()),
        InputError,
        "shape: expected a hetmem.system.Shape",
    ),
    case(
        "plan-system-str",
        lambda: _system_mod().plan("quest", shape(), "MI210"),
        InputError,
        "system: expected a hetmem.system.System",
    ),
    case(
        "shape-model-str",
        lambda: _system_mod().Shape("Llama-3.1-8B", 4096),
        InputError,
        "model: expected a ModelConfig",
    ),
    case(
        "schedule-kind",
        lambda: _system_mod().schedule("quest", shape(), system(), "bogus"),
        InputError,
        "kind",
    ),
    case(
        "schedule-method",
        lambda: _system_mod().schedule("flash", shape(), system(), "gpu"),
        InputError,
        "method: unknown method 'flash'",
    ),
    case(
        "schedule-offload-without-card",
        lambda: _system_mod().schedule("quest", shape(), system(card=None), "sequential"),
        InputError,
        "need a card",
    ),
    case(
        "schedule-placement",
        lambda: _system_mod().schedule(
            "quest", shape(), system(), "sequential", placement="tpu/x/y/z"
        ),
        PlacementError,
        "unknown device 'tpu'",
    ),
    case(
        "schedule-gpu-with-offload",
        lambda: _system_mod().schedule(
            "quest", shape(), system(), "gpu", placement="gpu/fpga/fpga/gpu"
        ),
        InputError,
        "kind",
    ),
    case(
        "schedule-system-tuple",
        lambda: _system_mod().schedule("quest", shape(), ("MI210", "U55C"), "gpu"),
        InputError,
        "system",
    ),
    case(
        "device-wrong-kind",
        lambda: _system_mod().get_device("MI210", "fpga"),
        _profile_error(),
        "is a gpu",
    ),
    case("device-int", lambda: _system_mod().get_device(5), _profile_error(), "unknown device"),
    case(
        "device-register-str",
        lambda: _system_mod().register("MI210"),
        _profile_error(),
        "expected a DeviceProfile",
    ),
    case(
        "profile-path-int",
        lambda: _system_mod().load_profile(5),
        _profile_error(),
        "expected a file path",
    ),
    case("parse-tokens-suffix", lambda: _parse_tokens("4g"), InputError, "contexts"),
    case("parse-tokens-negative", lambda: _parse_tokens(-4), InputError, "contexts"),
]


@pytest.mark.parametrize(("fn", "error", "fragment"), API)
def test_api(fn, error, fragment):
    expect(fn, error, fragment)


def test_the_catalogue_is_large_enough():
    assert len(API) + len(CLI) + len(FILES) >= 150
    for table in (API, CLI, FILES):
        ids = [p.id for p in table]
        assert len(ids) == len(set(ids))


# -- files --------------------------------------------------------------------------------------


def _selectors_file(tmp: Path, tensors=None, meta=None, raw: bytes | None = None) -> Path:
    path = tmp / "selectors.safetensors"
    if raw is not None:
        path.write_bytes(raw)
        return path
    from safetensors.torch import save_file

    save_file(tensors if tensors is not None else {"x": torch.zeros(1)}, str(path),
              metadata=meta)  # fmt: skip
    return path


def _good_selectors(tmp: Path, **meta) -> Path:
    from hetmem.methods.dsa import IndexerWeights
    from hetmem.methods.seer import GateWeights
    from hetmem.selectors.weights import Selectors, save_selectors

    indexer = IndexerWeights(torch.randn(16, 32), torch.randn(16, 8), torch.randn(16, 4), 4)
    gate = GateWeights(torch.randn(2, 16, 8), torch.randn(2, 16, 8))
    path = save_selectors(Selectors([indexer], [gate], 4), tmp / "good.safetensors")
    if meta:
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            old = dict(f.metadata())
        old.update(meta)
        tensors = {k: v for k, v in tensors.items() if k not in meta.get("_drop", ())}
        old.pop("_drop", None)
        save_file(tensors, str(path), metadata=old)
    return path


def load_selectors(path):
    from hetmem.selectors.weights import load_selectors as load

    return load(path)


def manifest_file(tmp: Path, text: str) -> Path:
    path = tmp / "manifest.json"
    path.write_text(text)
    return path


def load_manifest(path):
    from hetmem.fpga.manifest import Manifest

    return Manifest.load(path)


def _entry_json(**changes):
    from hetmem.fpga.manifest import expected_entry

    entry = expected_entry()
    data = json.loads(json.dumps(entry.__dict__, default=str))
    data.update(changes)
    return data


def _manifest_with(tmp: Path, **changes):
    from hetmem.fpga.manifest import SCHEMA

    return manifest_file(tmp, json.dumps({"schema": SCHEMA, "xclbins": [_entry_json(**changes)]}))


def _check_manifest(path):
    manifest = load_manifest(path)
    for entry in manifest.xclbins.values():
        entry.check_specs()
    return manifest


def _open_xrt_emu(**options):
    from hetmem.fpga.targets import open_device

    return open_device("xrt_emu", **options).close()


def _profile(tmp: Path, text: str):
    from hetmem.system import load_profile

    path = tmp / "profile.json"
    path.write_text(text)
    return load_profile(path)


def _bad_bank_map():
    entry = _entry_json()
    kernels = entry["kernels"]
    first = next(iter(kernels))
    arg = next(iter(kernels[first]))
    kernels[first][arg] = 31 if kernels[first][arg] != 31 else 30
    return kernels


FILES = [
    case(
        "selectors-missing",
        lambda t: load_selectors(t / "none.safetensors"),
        InputError,
        "does not exist",
    ),
    case(
        "selectors-empty-file",
        lambda t: load_selectors(_selectors_file(t, raw=b"")),
        InputError,
        "not a readable safetensors file",
    ),
    case(
        "selectors-garbage",
        lambda t: load_selectors(_selectors_file(t, raw=b"\x00" * 64)),
        InputError,
        "not a readable safetensors file",
    ),
    case(
        "selectors-text",
        lambda t: load_selectors(_selectors_file(t, raw=b"hello, world\n")),
        InputError,
        "not a readable safetensors file",
    ),
    case(
        "selectors-truncated",
        lambda t: load_selectors(_truncated(_good_selectors(t))),
        InputError,
        "not a readable safetensors file",
    ),
    case(
        "selectors-no-format",
        lambda t: load_selectors(_selectors_file(t)),
        InputError,
        "is not a hetmem selectors file",
    ),
    case(
        "selectors-bad-layers",
        lambda t: load_selectors(_good_selectors(t, layers="two")),
        InputError,
        "malformed metadata",
    ),
    case(
        "selectors-missing-heads",
        lambda t: load_selectors(_good_selectors(t, dsa_heads="")),
        InputError,
        "malformed metadata",
    ),
    case(
        "selectors-more-layers",
        lambda t: load_selectors(_good_selectors(t, layers="3")),
        InputError,
        "lacks tensor",
    ),
    case(
        "selectors-missing-tensor",
        lambda t: load_selectors(_good_selectors(t, _drop=("seer.0.wk",))),
        InputError,
        "lacks tensor",
    ),
    case(
        "selectors-bad-info",
        lambda t: load_selectors(_good_selectors(t, info="{not json")),
        InputError,
        "malformed metadata",
    ),
    case(
        "selectors-negative-block",
        lambda t: load_selectors(_good_selectors(t, seer_block_size="-4")).method("seer", 0),
        InputError,
        "block_size",
    ),
    case(
        "manifest-missing",
        lambda t: load_manifest(t / "none.json"),
        XclbinError,
        "no bitstream manifest",
    ),
    case(
        "manifest-empty",
        lambda t: load_manifest(manifest_file(t, "")),
        XclbinError,
        "cannot read the bitstream manifest",
    ),
    case(
        "manifest-garbage",
        lambda t: load_manifest(manifest_file(t, "{not json")),
        XclbinError,
        "cannot read the bitstream manifest",
    ),
    case(
        "manifest-list", lambda t: load_manifest(manifest_file(t, "[1, 2]")), XclbinError, "schema"
    ),
    case(
        "manifest-schema",
        lambda t: load_manifest(manifest_file(t, '{"schema": 7}')),
        XclbinError,
        "schema",
    ),
    case(
        "manifest-entry-malformed",
        lambda t: load_manifest(_manifest_with(t, kernels=7)),
        XclbinError,
        "malformed manifest entry",
    ),
    case(
        "manifest-bank-map",
        lambda t: _check_manifest(_manifest_with(t, kernels=_bad_bank_map())),
        XclbinError,
        "disagrees with its kernel spec",
    ),
    case(
        "manifest-unknown-kernel",
        lambda t: _check_manifest(
            _manifest_with(t, kernels={**_entry_json()["kernels"], "flash": {"q": 0}})
        ),
        XclbinError,
        "flash",
    ),
    case(
        "xclbin-missing",
        lambda t: _open_xrt_emu(xclbin=t / "hetmem_hw.xclbin"),
        XclbinError,
        "not found",
    ),
    case(
        "xclbin-not-in-manifest",
        lambda t: _open_xrt_emu(xclbin=_write(t / "other.xclbin", b"x")),
        XclbinError,
        "not in the manifest",
    ),
    case(
        "xclbin-garbage",
        lambda t: _open_xrt_emu(xclbin=_write(t / "hetmem_hw.xclbin", b"garbage")),
        XclbinError,
        "hetmem_hw.xclbin",
    ),
    case(
        "profile-missing", lambda t: _load_profile(t / "none.json"), _profile_error(), "none.json"
    ),
    case("profile-garbage", lambda t: _profile(t, "{not json"), _profile_error(), "profile"),
    case("profile-empty", lambda t: _profile(t, ""), _profile_error(), "profile"),
    case(
        "profile-wrong-kind",
        lambda t: _profile(t, '{"name": "x", "kind": "tpu"}'),
        _profile_error(),
        "kind",
    ),
    case(
        "model-config-garbage",
        lambda t: _get_model(_write(t / "config.json", b"{oops")),
        _config_error(),
        "config.json",
    ),
    case(
        "model-config-empty-object",
        lambda t: _get_model(_write(t / "config.json", b"{}")),
        _config_error(),
        "config.json",
    ),
]


def _truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _load_profile(path):
    from hetmem.system import load_profile

    return load_profile(path)


@pytest.mark.parametrize(("fn", "error", "fragment"), FILES)
def test_files(fn, error, fragment, tmp_path):
    expect(fn, error, fragment, tmp_path)


# -- the CLI ------------------------------------------------------------------------------------


def argv_case(id, argv, fragment, status=2, marks=()):
    return pytest.param(tuple(argv), fragment, status, id=id, marks=marks)


MANIFEST_CLI = "python -m hetmem.fpga.manifest"

#: {tmp}: the test's tmp_path; {garbage}: a file of garbage text in it; {empty}: an empty file;
#: {dir}: a directory; {tiny}: a tiny transformers model directory with garbage selectors.
CLI = [
    argv_case(
        "demo-method-twice-unknown",
        ["demo", "--method", "quest", "--method", "nope"],
        "--method: unknown method 'nope'",
    ),
    argv_case("demo-budget-zero", ["demo", "--method", "quest", "--budget", "0"], "budget"),
    argv_case("demo-k-negative", ["demo", "--k", "-3"], "--k"),
    argv_case("demo-context-one", ["demo", "--context", "1"], "--context"),
    argv_case("demo-placement-three", ["demo", "--placement", "gpu/gpu/gpu"], "expected 4 devices"),
    argv_case("demo-placement-tpu", ["demo", "--placement", "tpu/tpu/tpu/tpu"], "tpu"),
    argv_case("demo-fpga-empty", ["demo", "--fpga", ""], "--fpga"),
    argv_case("demo-context-text", ["demo", "--context", "lots"], "invalid int value"),
    argv_case("demo-unknown-flag", ["demo", "--frobnicate"], "unrecognized arguments"),
    argv_case("unknown-command", ["frobnicate"], "invalid choice"),
    argv_case("run-method-unknown", ["run", "--method", "flash"], "flash"),
    argv_case(
        "run-method-dense-rag", ["run", "--method", "dense_rag"], "expected one of dsa, seer, quest"
    ),
    argv_case("run-prompts-negative", ["run", "--prompts", "-1"], "prompts"),
    argv_case("run-budget-negative", ["run", "--budget", "-64"], "budget"),
    argv_case("run-placement-apply-fpga", ["run", "--placement", "gpu/gpu/gpu/fpga"], "apply"),
    argv_case("run-fpga-empty", ["run", "--fpga", ""], "unknown FPGA target ''"),
    argv_case(
        "run-model-is-a-file",
        ["run", "--model", "{garbage}"],
        "is not a transformers model directory",
    ),
    argv_case(
        "run-model-empty-dir", ["run", "--model", "{dir}"], "is not a transformers model directory"
    ),
    argv_case("run-model-garbage-config", ["run", "--model", "{badconfig}"], "config.json"),
    argv_case(
        "run-selectors-garbage",
        ["run", "--model", "{tiny}", "--method", "dsa", "--context", "256"],
        "not a readable safetensors file",
    ),
    argv_case(
        "run-context-beyond-tiny-model",
        ["run", "--model", "{tiny}", "--method", "quest", "--context", "4096"],
        "exceed the model's 2048 positions",
    ),
    argv_case(
        "run-seer-selectors-garbage",
        ["run", "--model", "{tiny}", "--method", "seer", "--context", "256"],
        "not a readable safetensors file",
    ),
    argv_case(
        "calibrate-tiny-tokens-beyond",
        ["calibrate", "--model", "{tiny}", "--tokens", "4096"],
        "exceed the model's 2048 positions",
    ),
    argv_case("calibrate-sequences-zero", ["calibrate", "--sequences", "0"], "--sequences"),
    argv_case("calibrate-queries-zero", ["calibrate", "--queries", "0"], "--queries"),
    argv_case("calibrate-tokens-one", ["calibrate", "--tokens", "1"], "1-token sequences"),
    argv_case("calibrate-indexer-dim-zero", ["calibrate", "--indexer-dim", "0"], "--indexer-dim"),
    argv_case(
        "calibrate-out-under-a-file", ["calibrate", "--out", "{garbage}/x.safetensors"], "{garbage}"
    ),
    argv_case(
        "calibrate-model-garbage-config", ["calibrate", "--model", "{badconfig}"], "config.json"
    ),
    argv_case("compare-contexts-text", ["compare", "--contexts", "lots"], "contexts"),
    argv_case("compare-contexts-zero", ["compare", "--contexts", "0"], "contexts"),
    argv_case("compare-batches-zero", ["compare", "--batches", "0,8"], "batches"),
    argv_case("compare-batches-empty", ["compare", "--batches", ","], "batches"),
    argv_case("compare-method-unknown", ["compare", "--method", "flash"], "flash"),
    argv_case("compare-model-unknown", ["compare", "--model", "NoSuchModel-7B"], "unknown model"),
    argv_case("compare-model-garbage-file", ["compare", "--model", "{garbage}"], "{garbage}"),
    argv_case("compare-gpu-unknown", ["compare", "--gpu", "NoSuchGPU"], "NoSuchGPU"),
    argv_case("compare-gpu-garbage-file", ["compare", "--gpu", "{garbage}"], "{garbage}"),
    argv_case("compare-gpu-empty-file", ["compare", "--gpu", "{empty}"], "{empty}"),
    argv_case("compare-card-unknown", ["compare", "--card", "NoSuchCard"], "NoSuchCard"),
    argv_case(
        "compare-card-pairs",
        [
            "compare",
            "--gpu",
            "MI210",
            "--gpu",
            "A100",
            "--card",
            "U55C",
            "--card",
            "U55C",
            "--card",
            "U55C",
        ],
        "card",
    ),
    argv_case("compare-link-unknown", ["compare", "--link", "pcie9-x64"], "pcie9-x64"),
    argv_case("compare-budget-zero", ["compare", "--budget", "0"], "expected a positive"),
    argv_case("compare-objective", ["compare", "--objective", "speed"], "invalid choice"),
    argv_case(
        "compare-json-is-a-dir",
        ["compare", "--contexts", "4k", "--batches", "1", "--method", "quest", "--json", "{dir}"],
        "{dir}",
    ),
    argv_case(
        "compare-png-is-a-file",
        [
            "compare",
            "--contexts",
            "4k",
            "--batches",
            "1",
            "--method",
            "quest",
            "--png",
            "{garbage}",
        ],
        "{garbage}",
    ),
    argv_case("plan-context-text", ["plan", "--context", "lots"], "contexts"),
    argv_case("plan-context-zero", ["plan", "--context", "0"], "contexts"),
    argv_case("plan-method-unknown", ["plan", "--method", "flash"], "flash"),
    argv_case("plan-model-unknown", ["plan", "--model", "NoSuchModel-7B"], "unknown model"),
    argv_case("plan-model-empty-file", ["plan", "--model", "{empty}"], "{empty}"),
    argv_case("plan-gpu-unknown", ["plan", "--gpu", "NoSuchGPU"], "NoSuchGPU"),
    argv_case("plan-card-unknown", ["plan", "--card", "NoSuchCard"], "NoSuchCard"),
    argv_case("plan-batch-zero", ["plan", "--batch", "0"], "expected a positive"),
    argv_case("plan-budget-text", ["plan", "--budget", "many"], "expected a positive"),
    argv_case("plan-link-unknown", ["plan", "--link", "pcie9-x64"], "pcie9-x64"),
    argv_case("profile-device-out-is-a-dir", ["profile-device", "--out", "{dir}"], "{dir}"),
    argv_case(
        "profile-device-out-under-a-file",
        ["profile-device", "--out", "{garbage}/p.json"],
        "{garbage}",
    ),
    argv_case("profile-device-repeat-negative", ["profile-device", "--repeat", "-2"], "--repeat"),
    argv_case(
        "devices-manifest-missing",
        ["devices", "--manifest", "{tmp}/none.json"],
        "no bitstream manifest",
    ),
    argv_case(
        "devices-manifest-garbage",
        ["devices", "--manifest", "{garbage}"],
        "cannot read the bitstream manifest",
    ),
    argv_case(
        "devices-manifest-empty",
        ["devices", "--manifest", "{empty}"],
        "cannot read the bitstream manifest",
    ),
    argv_case("devices-manifest-schema", ["devices", "--manifest", "{schema}"], "schema"),
    argv_case(
        "devices-manifest-bank-map",
        ["devices", "--manifest", "{bankmap}"],
        "disagrees with the kernel specs",
        status=1,
    ),
    # python -m hetmem.fpga.manifest record
    argv_case(
        "manifest-record-not-listed",
        [MANIFEST_CLI, "record", "{tmp}/other.xclbin", "--manifest", "{manifest}"],
        "is not in the manifest",
    ),
    argv_case(
        "manifest-record-missing-xclbin",
        [MANIFEST_CLI, "record", "{tmp}/hetmem_hw.xclbin", "--manifest", "{manifest}"],
        "No such file",
    ),
    argv_case(
        "manifest-record-garbage-manifest",
        [MANIFEST_CLI, "record", "{garbage}", "--manifest", "{garbage}"],
        "cannot read the bitstream manifest",
    ),
    argv_case(
        "manifest-record-no-manifest",
        [MANIFEST_CLI, "record", "{garbage}", "--manifest", "{tmp}/none.json"],
        "no bitstream manifest",
    ),
    argv_case(
        "manifest-record-schema",
        [MANIFEST_CLI, "record", "{garbage}", "--manifest", "{schema}"],
        "schema",
    ),
    argv_case("manifest-no-command", [MANIFEST_CLI], "required"),
]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "garbage.txt").write_text("\x00\x01 this is not json { ]\n")
    (tmp_path / "empty.txt").write_text("")
    bad = tmp_path / "badconfig"
    bad.mkdir()
    (bad / "config.json").write_text("{ not json")
    (tmp_path / "schema.json").write_text('{"schema": 7}')
    from hetmem.fpga.manifest import SCHEMA

    entry = _entry_json(kernels=_bad_bank_map())
    (tmp_path / "bankmap.json").write_text(json.dumps({"schema": SCHEMA, "xclbins": [entry]}))
    from hetmem.fpga.manifest import Manifest, expected_entry

    good = expected_entry()
    Manifest({good.name: good}).save(tmp_path / "manifest.json")
    return {
        "{manifest}": str(tmp_path / "manifest.json"),
        "{tmp}": str(tmp_path),
        "{garbage}": str(tmp_path / "garbage.txt"),
        "{empty}": str(tmp_path / "empty.txt"),
        "{dir}": str(tmp_path / "dir"),
        "{badconfig}": str(bad),
        "{schema}": str(tmp_path / "schema.json"),
        "{bankmap}": str(tmp_path / "bankmap.json"),
    }


@functools.cache
def _tiny_model_dir(root: str) -> str:
    from hetmem.selectors.weights import SELECTORS_FILE
    from tiny_lm import make_tiny_lm

    model = make_tiny_lm(Path(root) / "tiny", layers=1, hidden=32)
    (model / SELECTORS_FILE).write_bytes(b"not a safetensors file at all")
    return str(model)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return _tiny_model_dir(str(tmp_path_factory.mktemp("catalogue")))


@pytest.fixture
def nothing_runs(monkeypatch):
    """A case fails (instead of running for minutes) if a model loads, calibration trains, a
    demo or a microbenchmark runs."""

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    import hetmem.demo
    import hetmem.selectors.calibrate

    monkeypatch.setattr(hetmem.selectors.calibrate, "load_local", refuse)
    monkeypatch.setattr(hetmem.selectors.calibrate, "calibrate_dir", refuse)
    monkeypatch.setattr(hetmem.demo, "run_demo", refuse)
    try:
        import hetmem.system.calibrate_device as calibrate_device

        monkeypatch.setattr(calibrate_device, "measure", refuse, raising=False)
    except ImportError:
        pass


@pytest.mark.parametrize(("argv", "fragment", "status"), CLI)
def test_cli(argv, fragment, status, files, nothing_runs, capsys, monkeypatch, request):
    monkeypatch.setattr(cli.console, "width", 200)
    names = dict(files)
    if "{tiny}" in argv:
        names["{tiny}"] = request.getfixturevalue("tiny_dir")
    argv = [_fill(a, names) for a in argv]
    fragment = _fill(fragment, names)

    main = cli.main
    if argv and argv[0] == MANIFEST_CLI:
        from hetmem.fpga.manifest import main

        argv = argv[1:]

    def run():
        try:
            return main(argv)
        except SystemExit as exc:  # argparse's own errors
            return exc.code

    kind, code = outcome(run)
    out = capsys.readouterr()
    text = " ".join((out.out + out.err).split())
    assert kind == "value", f"raised {code!r}"
    assert "Traceback" not in text
    assert code == status, text[-2000:]
    assert "error:" in text or status == 1
    assert fragment in text, text[-2000:]


def _fill(text: str, names: dict) -> str:
    for key, value in names.items():
        text = text.replace(key, value)
    return text


# -- accepted, but said: a named warning instead of a silent empty answer ---------------------


@pytest.mark.parametrize("text", ["😀😀", "?!", "   "], ids=["emoji", "punctuation", "blank"])
def test_a_query_with_no_indexable_term_warns(text):
    from hetmem.methods.bm25_rag import NoMatchWarning

    p = rag("bm25_rag")
    with pytest.warns(NoMatchWarning, match="no indexable term"):
        (prompt,) = p.step([text], 2)
    assert "[1]" not in prompt and "about topic" not in prompt  # no document retrieved


def test_calibrate_out_directory_writes_the_file_inside_it(tmp_path, monkeypatch, capsys):
    """`--out DIR` is accepted (the selectors file goes inside it): calibration is handed the
    file, not the directory (which it could not write after minutes of training)."""
    import hetmem.selectors.calibrate as calibrate
    from hetmem.run import bundled_dir
    from hetmem.selectors.weights import SELECTORS_FILE

    try:
        bundled_dir()
    except Exception:
        pytest.skip("needs the bundled model's config")
    seen = {}
    monkeypatch.setattr(calibrate, "calibrate_dir", lambda directory, **kw: seen.update(kw))
    assert cli.main(["calibrate", "--out", str(tmp_path)]) == 0
    assert seen["out"] == str(tmp_path / SELECTORS_FILE)


@pytest.mark.parametrize("fpga", ["emu", {"target": "emu"}], ids=["name", "mapping"])
def test_an_fpga_no_step_uses_is_said(fpga):
    """A card given to a placement that puts no step on it is not used: a warning says so
    (instead of running on the GPU silently), once per wrap."""
    with pytest.warns(UserWarning, match=r"fpga=.* is not used: the placement puts no step"):
        Pipeline(method("quest"), "cpu/cpu/cpu/cpu", fpga=fpga)
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        Pipeline(method("quest"), "cpu/cpu/cpu/cpu")  # no card given: nothing to say
        Pipeline(method("quest"), "cpu/cpu/cpu/cpu", fpga="auto")  # whatever card there is
    assert not [w for w in seen if "is not used" in str(w.message)]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = wrap(method="quest", budget=64, method_options={"page_size": 8}, fpga=fpga)
    try:
        said = [w for w in seen if "is not used" in str(w.message)]
        assert len(said) == 1 and said[0].filename == __file__
    finally:
        __import__("hetmem").unwrap(model)
