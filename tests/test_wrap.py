"""hetmem.models.wrap on tiny random-weight transformers causal LMs (no download)."""

import copy
import dataclasses
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    StaticCache,
)

from hetmem.attention import Growth  # noqa: E402
from hetmem.errors import InputError  # noqa: E402
from hetmem.models import HetmemCache, is_wrapped, new_cache, unwrap, wrap  # noqa: E402
from hetmem.models.layout import (  # noqa: E402
    Validity,
    compact,
    fresh_validity,
    key_validity,
    padded,
)
from hetmem.models.wrap import cache_kwarg  # noqa: E402
from hetmem.selection import TopK  # noqa: E402

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    "mistral": (MistralConfig, MistralForCausalLM, {}),
}
#: Small pages and blocks so that tiny contexts span several of them.
METHODS = {"dsa": {}, "quest": {"page_size": 8}, "seer": {"block_size": 8}}
PAD = 0
NEW = 6


def tiny(family="llama", heads=4, kv_heads=2, **extra):
    config_cls, model_cls, family_extra = FAMILIES[family]
    config = config_cls(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=128,
        max_position_embeddings=256,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,  # peaked attention and distinct logits: greedy is stable
        **family_extra,
        **extra,
    )
    torch.manual_seed(0)
    return model_cls(config).eval()


def prompts(*lengths, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=gen) for n in lengths]


def left_pad(rows, pad=PAD):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


def generate(model, ids, mask=None, new=NEW, **kwargs):
    mask = torch.ones_like(ids) if mask is None else mask
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        pad_token_id=PAD,
        eos_token_id=None,
        return_dict_in_generate=True,
        output_scores=True,
        **kwargs,
    )


def cache_of(model, out):
    """The cache a generate() output holds, under the name this transformers gives it."""
    return getattr(out, cache_kwarg(model))


# -- (a) a budget covering the context: exactly the dense model --------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", list(METHODS))
def test_full_budget_generates_the_dense_tokens(family, method):
    model = tiny(family)
    ids, mask = left_pad(prompts(21, 13))
    dense = generate(model, ids, mask)
    wrap(model, method, budget=64, method_options=METHODS[method])
    out = generate(model, ids, mask)
    assert isinstance(cache_of(model, out), HetmemCache)
    stats = cache_of(model, out).stats()
    assert stats["sparse_steps"] == 2 * (NEW - 1)  # every decode step, every layer
    assert stats["dense_steps"] == 2  # prefill only
    assert torch.equal(out.sequences, dense.sequences)
    for got, want in zip(out.scores, dense.scores, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# -- (b) grouped-query attention ---------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_gqa_with_four_query_heads_per_kv_head(method):
    model = tiny("qwen3", heads=8, kv_heads=2)
    assert model.model.layers[0].self_attn.num_key_value_groups == 4
    ids, mask = left_pad(prompts(30))
    dense = generate(model, ids, mask)
    wrap(model, method, budget=64, method_options=METHODS[method])
    out = generate(model, ids, mask)
    assert cache_of(model, out).stats()["sparse_steps"] > 0
    assert torch.equal(out.sequences, dense.sequences)


# -- (c) left padding: a batch gives each prompt's own tokens ----------------------------


def alone_and_batched(model, rows):
    ids, mask = left_pad(rows)
    batched = generate(model, ids, mask).sequences[:, ids.shape[1] :]
    alone = [generate(model, row[None]).sequences[0, len(row) :] for row in rows]
    return batched, torch.stack(alone)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("budget", [64, 8])  # covering the context, and sparse
def test_left_padded_batch_equals_each_prompt_alone(method, budget):
    model = tiny("llama")
    rows = prompts(27, 9, 16)
    batched, alone = alone_and_batched(model, rows)
    assert torch.equal(batched, alone)  # the dense model itself
    wrap(model, method, budget=budget, method_options=METHODS[method])
    batched, alone = alone_and_batched(model, rows)
    assert torch.equal(batched, alone)


def test_padding_is_never_attended():
    """Whatever the padding holds, the generated tokens do not change."""
    model = wrap(tiny("mistral"), "dsa", budget=8)
    rows = prompts(25, 7)
    ids, mask = left_pad(rows, pad=PAD)
    garbage = ids.clone()
    garbage[mask == 0] = torch.randint(3, 128, (int((mask == 0).sum()),))
    first = generate(model, ids, mask)
    second = generate(model, garbage, mask)
    assert torch.equal(first.sequences[:, ids.shape[1] :], second.sequences[:, ids.shape[1] :])
    memory = cache_of(model, first).layers[1].memory
    assert memory.kv.lengths.tolist() == [25 + NEW - 1, 7 + NEW - 1]  # no padding inside


def test_compact_moves_each_rows_real_tokens_to_the_front():
    keys = torch.arange(2 * 1 * 5 * 1, dtype=torch.float32).view(2, 1, 5, 1)
    keys[1, 0, 0] = float("nan")  # padding may carry NaN
    valid = torch.tensor([[True] * 5, [False, False, True, True, True]])
    kv = compact(keys, keys.clone(), valid)
    assert kv.lengths.tolist() == [5, 3]
    assert kv.keys[1, 0, :, 0].tolist() == [7.0, 8.0, 9.0, 0.0, 0.0]
    mask4d = valid[:, None, None, :].expand(2, 1, 3, 5)
    assert torch.equal(key_validity(mask4d, 5), valid)
    assert key_validity(None, 5) is None


def test_padded_rebuilds_transformers_layout_from_the_compact_copy():
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 2, 6, 4, generator=gen), torch.randn(2, 2, 6, 4, generator=gen)
    valid = torch.tensor(
        [[False, False, True, True, True, True], [True, True, False, True, False, True]]
    )
    kv = compact(keys, values, valid, Growth(align=4))
    assert kv.lengths.tolist() == [4, 4] and kv._keys.buffer.shape[2] > 4  # spare room
    validity = Validity(valid, 2, 6, keys.device)
    assert validity.mask is not None  # row 1 is not left padding
    assert Validity(valid[:1], 1, 6, keys.device).mask is None  # row 0 is: two offsets
    got_keys, got_values = padded(kv, validity)
    hide = ~valid[:, None, :, None]
    assert torch.equal(got_keys, keys.masked_fill(hide, 0.0))
    assert torch.equal(got_values, values.masked_fill(hide, 0.0))


def test_fresh_validity_reads_the_diagonal_whatever_the_window_hides():
    """Query j's own key is visible unless it is padding, even where a sliding window hides
    the keys before it from the last query."""
    s = 6
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    window = causal & ~torch.ones(s, s, dtype=torch.bool).tril(-2)  # a window of 2
    real = torch.tensor([[False, True, True, True, True, True]])
    mask = (window & real[:, None, :])[:, None]  # [1, 1, 6, 6]
    assert torch.equal(fresh_validity(mask, s, s), real)
    assert key_validity(mask, s).tolist() == [[False, False, False, False, True, True]]
    assert fresh_validity(mask[:, :, -1:], s, 1) is None  # the last token is real
    assert fresh_validity(None, s, 1) is None


# -- (d) a budget smaller than the context: decode runs sparse ---------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_small_budget_decodes_sparse_within_the_budget(method):
    model = tiny("qwen2")
    budget = 16
    ids, mask = left_pad(prompts(40, 33))
    wrap(model, method, budget=budget, method_options=METHODS[method])
    out = generate(model, ids, mask)
    assert out.sequences.shape == (2, ids.shape[1] + NEW)
    assert len(out.scores) == NEW and out.scores[0].shape == (2, 128)
    cache = cache_of(model, out)
    assert cache.stats()["sparse_steps"] == 2 * (NEW - 1)
    for layer in cache.layers:
        assert layer.memory.kv.capacity > budget
        selection = layer.pipeline.last_selection
        assert isinstance(selection, TopK)
        assert selection.k * selection.unit <= budget
        selected_tokens = selection.valid.sum(-1) * selection.unit
        assert (selected_tokens == budget).all()  # every row, every group: a full budget
        assert layer.pipeline.profile.by_step().keys() >= {"relevancy", "retrieval", "apply"}


def test_beam_search_rebuilds_the_memory_after_reordering():
    model = tiny("llama")
    ids, mask = left_pad(prompts(20, 12))
    dense = generate(model, ids, mask, num_beams=2)
    wrap(model, "quest", budget=64, method_options=METHODS["quest"])
    out = generate(model, ids, mask, num_beams=2)
    assert torch.equal(out.sequences, dense.sequences)


def test_new_cache_drives_a_manual_decode_loop():
    model = wrap(tiny("llama"), "dsa", budget=8)
    (ids,) = prompts(20)
    cache = new_cache(model)
    with torch.no_grad():
        name = cache_kwarg(model)
        logits = model(ids[None], use_cache=True, **{name: cache}).logits
        step = logits[:, -1:].argmax(-1)
        model(step, use_cache=True, **{name: cache})
    assert cache.stats() == {"sparse_steps": 2, "dense_steps": 2}


# -- (e) unwrap restores the model -------------------------------------------------------


def test_unwrap_restores_the_model_exactly():
    model = tiny("mistral")
    ids, mask = left_pad(prompts(24, 10))
    before = generate(model, ids, mask)
    attn = model.config._attn_implementation
    assert wrap(model, "seer", budget=8, method_options=METHODS["seer"]) is model
    assert is_wrapped(model) and model.config._attn_implementation == "hetmem"
    assert not torch.equal(generate(model, ids, mask).sequences, before.sequences)
    assert unwrap(model) is model
    assert model.config._attn_implementation == attn
    assert not is_wrapped(model)
    assert "generate" not in model.__dict__
    after = generate(model, ids, mask)
    assert type(cache_of(model, after)) is DynamicCache
    assert torch.equal(after.sequences, before.sequences)


def test_a_deep_copy_is_wrapped_on_its_own():
    model = wrap(tiny("llama"), "dsa", budget=8)
    twin = unwrap(copy.deepcopy(model))
    assert is_wrapped(model) and not is_wrapped(twin)
    ids, mask = left_pad(prompts(20))
    assert isinstance(cache_of(model, generate(model, ids, mask)), HetmemCache)
    assert type(cache_of(twin, generate(twin, ids, mask))) is DynamicCache


def test_a_cache_the_caller_passes_is_left_alone():
    model = wrap(tiny("llama"), "dsa", budget=8)
    ids, mask = left_pad(prompts(20))
    given = DynamicCache()
    out = generate(model, ids, mask, **{cache_kwarg(model): given})
    assert cache_of(model, out) is given
    assert type(given) is DynamicCache and given.get_seq_length() == 20 + NEW - 1


def test_a_static_cache_is_left_alone_and_runs_dense():
    model = tiny("llama")
    ids, mask = left_pad(prompts(20, 12))
    dense = generate(model, ids, mask)
    wrap(model, "dsa", budget=8)
    out = generate(model, ids, mask, cache_implementation="static")
    assert type(cache_of(model, out)) is StaticCache
    assert torch.equal(out.sequences, dense.sequences)


def test_wrap_overrides_no_private_transformers_method():
    """Only public API: the instance gets `generate` (and hetmem's own state), nothing else."""
    model = tiny("llama")
    before = dict(model.__dict__)
    wrap(model, "dsa", budget=8)
    added = set(model.__dict__) - set(before)
    assert added == {"generate", "_hetmem_wrap"}
    changed = {k for k in before if model.__dict__[k] is not before[k]}
    assert changed == set()
    unwrap(model)
    assert set(model.__dict__) == set(before)


def test_new_cache_passed_to_generate_decodes_as_the_default():
    """The public way, `generate(..., **{cache_kwarg(model): new_cache(model)})`: that cache
    is the one used, and it decodes the same tokens as the one `generate` gets by default."""
    import hetmem.models

    model = wrap(tiny("llama"), "quest", budget=16, method_options=METHODS["quest"])
    ids, mask = left_pad(prompts(30, 18))
    default = generate(model, ids, mask)
    given = hetmem.models.new_cache(model)
    out = generate(model, ids, mask, **{hetmem.models.cache_kwarg(model): given})
    assert cache_of(model, out) is given
    assert given.stats() == cache_of(model, default).stats()
    assert given.stats()["sparse_steps"] > 0
    assert torch.equal(out.sequences, default.sequences)


def test_an_explicit_dynamic_cache_implementation_gets_the_hetmem_cache():
    model = tiny("llama")
    ids, mask = left_pad(prompts(20, 12))
    dense = generate(model, ids, mask)
    wrap(model, "dsa", budget=64)
    out = generate(model, ids, mask, cache_implementation="dynamic")
    assert isinstance(cache_of(model, out), HetmemCache)
    assert torch.equal(out.sequences, dense.sequences)  # the budget covers the context


def test_a_generation_config_asking_for_a_dynamic_cache_gets_the_hetmem_cache():
    """Given by position or by name, the caller's config is used (and left unchanged)."""
    model = wrap(tiny("llama"), "dsa", budget=8)
    ids, mask = left_pad(prompts(20))
    config = transformers.GenerationConfig(
        max_new_tokens=NEW,
        do_sample=False,
        pad_token_id=PAD,
        return_dict_in_generate=True,
        cache_implementation="dynamic",
    )
    by_position = model.generate(ids, config, attention_mask=mask)
    by_name = model.generate(ids, generation_config=config, attention_mask=mask)
    for out in (by_position, by_name):
        assert isinstance(cache_of(model, out), HetmemCache)
        assert out.sequences.shape == (1, 20 + NEW)
    assert torch.equal(by_position.sequences, by_name.sequences)
    assert config.cache_implementation == "dynamic"


def test_the_model_s_own_dynamic_cache_default_gets_the_hetmem_cache():
    model = wrap(tiny("llama"), "dsa", budget=8)
    model.generation_config.cache_implementation = "dynamic"
    ids, mask = left_pad(prompts(20))
    assert isinstance(cache_of(model, generate(model, ids, mask)), HetmemCache)
    assert model.generation_config.cache_implementation == "dynamic"


def test_use_cache_false_gets_no_cache_and_runs_dense():
    model = tiny("llama")
    ids, mask = left_pad(prompts(20, 12))
    dense = generate(model, ids, mask, use_cache=False)
    wrap(model, "dsa", budget=8)
    out = generate(model, ids, mask, use_cache=False)
    assert cache_of(model, out) is None
    assert torch.equal(out.sequences, dense.sequences)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_a_cache_passed_by_the_legacy_name_is_left_alone():
    """transformers >= 5.24 still takes `past_key_values` (deprecated): hetmem gives none."""
    model = wrap(tiny("llama"), "dsa", budget=8)
    ids, mask = left_pad(prompts(20))
    given = DynamicCache()
    out = generate(model, ids, mask, past_key_values=given)
    assert cache_of(model, out) is given
    assert given.get_seq_length() == 20 + NEW - 1


def test_cache_kwarg_is_the_name_forward_takes_the_cache_by():
    """transformers 5.24 renamed `past_key_values` to `cache`: the model says which."""
    model = tiny("llama")
    name = cache_kwarg(model)
    assert name in inspect.signature(model.forward).parameters
    assert name in {f.name for f in dataclasses.fields(model(torch.ones(1, 3, dtype=torch.long)))}


# -- (f) bad input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"method": "nope"}, "method"),
        ({"method": "bm25_rag"}, "method"),
        ({"method": 3}, "method"),
        ({"budget": 0}, "budget"),
        ({"budget": -5}, "budget"),
        ({"budget": 8.0}, "budget"),
        ({"method": "seer", "budget": 32}, "budget"),  # less than one 64-token block
        ({"method": "quest", "method_options": {"pages": 4}}, "method_options"),
        ({"placement": {"relevancy": "tpu"}}, "placement"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, argument):
    model = tiny("llama")
    kwargs = {"method": "dsa", "budget": 64, **kwargs}
    with pytest.raises(InputError) as info:
        wrap(model, **kwargs)
    assert info.value.argument == argument
    assert not is_wrapped(model) and model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    "model", [LlamaModel(tiny("llama").config), torch.nn.Linear(2, 2), "llama"]
)
def test_a_model_that_is_not_a_causal_lm_is_refused(model):
    with pytest.raises(InputError) as info:
        wrap(model, "dsa", budget=64)
    assert info.value.argument == "model"


def test_wrapping_twice_or_unwrapping_a_plain_model_is_refused():
    model = tiny("llama")
    with pytest.raises(InputError, match="not wrapped"):
        unwrap(model)
    wrap(model, "dsa", budget=64)
    with pytest.raises(InputError, match="already wrapped") as info:
        wrap(model, "quest", budget=64)
    assert info.value.argument == "model"


def test_top_level_wrap_is_the_models_wrap():
    """`hetmem.wrap(model, ...)` as the docs write it: the same function, and it works."""
    import subprocess
    import sys

    import hetmem

    assert hetmem.wrap is wrap and hetmem.unwrap is unwrap and hetmem.is_wrapped is is_wrapped
    model = tiny("llama")
    assert hetmem.wrap(model, "quest", budget=8, method_options=METHODS["quest"]) is model
    assert hetmem.is_wrapped(model)
    assert hetmem.unwrap(model) is model and not hetmem.is_wrapped(model)
    with pytest.raises(AttributeError, match="no attribute 'wrapp'"):
        hetmem.wrapp  # noqa: B018
    # importing hetmem alone does not import transformers
    code = "import sys, hetmem; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
