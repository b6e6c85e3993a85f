"""Every public entry point rejects bad input with a hetmem error naming the argument,
before any device work."""

import pytest
import torch

from hetmem.attention import AttentionQuery, KVCache, KVChunk, dense_attention
from hetmem.errors import HetmemError, InputError, PlacementError
from hetmem.methods import get
from hetmem.methods.dsa import IndexerWeights
from hetmem.methods.seer import GateWeights
from hetmem.pipeline import Pipeline
from hetmem.selection import topk_select

ATTENTION = ["dsa", "quest", "seer"]


def cache(batch=2, kv_heads=2, tokens=32, dim=8):
    return KVCache(
        torch.randn(batch, kv_heads, tokens, dim), torch.randn(batch, kv_heads, tokens, dim)
    )


def query(batch=2, q_heads=4, t=1, dim=8):
    return AttentionQuery(torch.randn(batch, q_heads, t, dim))


def prepared(name):
    method = get(
        name, **({} if name == "dsa" else {"page_size" if name == "quest" else "block_size": 4})
    )
    return method, method.prepare(cache())


def step(name, q, budget=8):
    method, memory = prepared(name)
    pipe = Pipeline(method, "cpu/cpu/cpu/cpu")
    pipe.memory = memory
    return pipe.step(q, budget)


def raises_naming(argument):
    return pytest.raises(InputError, match=rf"^{argument}")


@pytest.mark.parametrize("name", ATTENTION)
def test_query_of_wrong_rank(name):
    with raises_naming("query"):
        step(name, AttentionQuery(torch.randn(2, 4, 8)))


@pytest.mark.parametrize("name", ATTENTION)
def test_query_dim_mismatch(name):
    with raises_naming("query"):
        step(name, query(dim=6))


@pytest.mark.parametrize("name", ATTENTION)
def test_query_batch_mismatch(name):
    with raises_naming("query"):
        step(name, query(batch=3))


@pytest.mark.parametrize("name", ATTENTION)
def test_integer_query_dtype(name):
    with raises_naming("query"):
        step(name, AttentionQuery(torch.ones(2, 4, 1, 8, dtype=torch.int32)))


@pytest.mark.parametrize("name", ATTENTION)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_query(name, bad):
    q = query()
    q.q[1, 2, 0, 3] = bad
    with raises_naming("query"):
        step(name, q)


@pytest.mark.parametrize("name", ATTENTION)
def test_heads_that_do_not_divide(name):
    with raises_naming("query"):
        step(name, query(q_heads=3))


@pytest.mark.parametrize("name", ATTENTION)
@pytest.mark.parametrize("budget", [0, -4])
def test_budget_not_positive(name, budget):
    with raises_naming("budget"):
        step(name, query(), budget=budget)


@pytest.mark.parametrize("name", ATTENTION)
def test_budget_larger_than_the_candidates_selects_everything(name):
    """The one budget rule (Pipeline, wrap and the CLI alike): a budget that covers the
    memory selects all of it, which is dense attention."""
    from hetmem.attention import dense_attention

    method, memory = prepared(name)
    pipe = Pipeline(method, "cpu/cpu/cpu/cpu")
    pipe.prepare(memory.kv)
    q = query()
    out = pipe.step(q, 10_000)
    torch.testing.assert_close(out, dense_attention(q.q, pipe.memory.kv), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["quest", "seer"])
def test_budget_smaller_than_one_block(name):
    with raises_naming("budget"):
        step(name, query(), budget=3)


@pytest.mark.parametrize("name", ATTENTION)
def test_empty_memory(name):
    method = get(name)
    empty = KVCache(torch.randn(2, 2, 0, 8), torch.randn(2, 2, 0, 8))
    pipe = Pipeline(method, "cpu/cpu/cpu/cpu")
    pipe.prepare(empty)
    with raises_naming("memory"):
        pipe.step(query(), 8)


def test_step_before_prepare():
    with raises_naming("memory"):
        Pipeline(get("quest"), "cpu/cpu/cpu/cpu").step(query(), 8)


def test_keys_and_values_disagree():
    with raises_naming("values"):
        KVCache(torch.randn(2, 2, 8, 4), torch.randn(2, 2, 9, 4))


def test_keys_wrong_rank():
    with raises_naming("keys"):
        KVCache(torch.randn(2, 8, 4), torch.randn(2, 8, 4))


def test_lengths_out_of_range():
    with raises_naming("lengths"):
        KVCache(torch.randn(2, 2, 8, 4), torch.randn(2, 2, 8, 4), torch.tensor([9, 3]))


@pytest.mark.parametrize("name", ATTENTION)
def test_append_of_wrong_shape(name):
    method, memory = prepared(name)
    with raises_naming("keys"):
        method.append(memory, KVChunk(torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8)))


def test_prepare_of_wrong_type():
    with raises_naming("data"):
        get("dsa").prepare(torch.randn(2, 2, 8, 4))


def test_query_of_wrong_type():
    method, memory = prepared("quest")
    pipe = Pipeline(method, "cpu/cpu/cpu/cpu")
    pipe.memory = memory
    with raises_naming("query"):
        pipe.step(torch.randn(2, 4, 1, 8), 8)


def test_positions_wrong_shape():
    with raises_naming("positions"):
        dense_attention(
            torch.randn(2, 4, 2, 8), cache(), positions=torch.zeros(2, 3, dtype=torch.long)
        )


def test_topk_k_larger_than_candidates():
    with raises_naming("k"):
        topk_select(torch.randn(1, 5), 6)


@pytest.mark.parametrize("k", [0, -1])
def test_topk_k_not_positive(k):
    with raises_naming("k"):
        topk_select(torch.randn(1, 5), k)


def test_indexer_weights_shapes():
    with raises_naming("wq"):
        IndexerWeights(torch.randn(16, 30), torch.randn(16, 8), torch.randn(16, 4))


def test_indexer_weights_nan():
    wk = torch.randn(16, 8)
    wk[0, 0] = float("nan")
    with raises_naming("wk"):
        IndexerWeights(torch.randn(16, 32), wk)


def test_gate_weights_shapes():
    with raises_naming("wk"):
        GateWeights(torch.randn(2, 16, 8), torch.randn(2, 24, 4))


def test_seer_options():
    with raises_naming("mode"):
        get("seer", mode="sometimes")
    with raises_naming("threshold"):
        get("seer", mode="threshold", threshold=1.5)


@pytest.mark.parametrize("size", [0, -16])
def test_page_size_not_positive(size):
    with raises_naming("page_size"):
        get("quest", page_size=size)


def test_unknown_method():
    with raises_naming("method"):
        get("flash")


@pytest.mark.parametrize(
    "placement",
    [
        "gpu/gpu/gpu",  # three steps
        {"relevancy": "tpu"},  # unknown device
        {"rerank": "gpu"},  # unknown step
        {"apply": "fpga"},  # apply is a torch step
        {"relevancy": "fpga", "retrieval": "gpu"},  # the fused kernel split in two
    ],
)
def test_bad_placement(placement):
    with pytest.raises(PlacementError, match=r"^placement"):
        Pipeline(get("dsa"), placement)


def test_errors_are_hetmem_errors_and_value_errors():
    with pytest.raises(HetmemError):
        topk_select(torch.randn(3), 4)
    with pytest.raises(ValueError):
        topk_select(torch.randn(3), 4)
