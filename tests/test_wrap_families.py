"""hetmem.wrap per architecture family: what it supports decodes exactly like the unwrapped
model at a full budget; what it refuses raises `UnsupportedModel` at wrap time, naming the
architecture and the feature, with the model left untouched.

Tiny random models from transformers' config classes (no download), a few tokens each.
"""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hetmem.attention import KVCache, dense_attention  # noqa: E402
from hetmem.errors import InputError, UnsupportedModel  # noqa: E402
from hetmem.models import is_wrapped, unwrap, wrap  # noqa: E402
from hetmem.models.attention_fn import (  # noqa: E402
    Extras,
    attend,
    attend_selection,
    hetmem_attention_forward,
)
from hetmem.models.features import attention_features  # noqa: E402
from hetmem.models.wrap import cache_kwarg  # noqa: E402
from hetmem.selection import TopK  # noqa: E402

PAD = 0
NEW = 6
BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
    pad_token_id=PAD,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.2,  # peaked attention and distinct logits: greedy is stable
)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)

#: family -> (config class, model class, config overrides)
SUPPORTED = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    # a window shorter than the context: crossed during generation (prompt 21, then 22..26)
    "mistral-window": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 24}),
    # softcap 2: the tanh bends the logits hard; layers alternate sliding (8) / full
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"head_dim": 16, "sliding_window": 8, "attn_logit_softcapping": 2.0},
    ),
    # no softcap; sliding (8) and full layers with rotary bases of their own
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "head_dim": 16,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    # sinks on every head; layers alternate sliding (8) / full
    "gpt-oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        {"head_dim": 16, "sliding_window": 8, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
}

#: family -> (config class, model class, config overrides, the feature named)
REFUSED = {
    "deepseek-v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        {
            **MOE,
            "n_routed_experts": 4,
            "n_group": 1,
            "topk_group": 1,
            "first_k_dense_replace": 1,
            "kv_lora_rank": 16,
            "q_lora_rank": None,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 16,
        },
        "multi-head latent attention (MLA)",
    ),
    "qwen3-next": (
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        {
            **MOE,
            "num_hidden_layers": 4,
            "head_dim": 16,
            "num_experts": 4,
            "linear_num_value_heads": 2,
            "linear_num_key_heads": 2,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
        },
        "hybrid or linear attention layers",
    ),
    "lfm2": (
        "Lfm2Config",
        "Lfm2ForCausalLM",
        {"full_attn_idxs": [1], "block_ff_dim": 128},
        "hybrid or linear attention layers",
    ),
    "jamba": (
        "JambaConfig",
        "JambaForCausalLM",
        {
            "num_experts": 1,
            "num_experts_per_tok": 1,
            "attn_layer_period": 2,
            "attn_layer_offset": 1,
            "mamba_d_state": 4,
            "mamba_expand": 1,
            "mamba_dt_rank": 4,
        },
        "hybrid or linear attention layers",
    ),
    "llama4": (
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        {
            "head_dim": 16,
            "intermediate_size_mlp": 128,
            "num_local_experts": 1,
            "attention_chunk_size": 8,
        },
        "chunked attention",
    ),
    "minimax": (
        "MiniMaxConfig",
        "MiniMaxForCausalLM",
        {"head_dim": 16, "num_local_experts": 2, "num_experts_per_tok": 1},
        "hybrid or linear attention layers",
    ),
    "gemma3-bidirectional": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {"head_dim": 16, "use_bidirectional_attention": True},
        "bidirectional attention",
    ),
    "gemma3n": (
        "Gemma3nTextConfig",
        "Gemma3nForCausalLM",
        {
            "num_hidden_layers": 4,
            "head_dim": 16,
            "intermediate_size": [128] * 4,
            "num_kv_shared_layers": 2,
            "hidden_size_per_layer_input": 8,
            "vocab_size_per_layer_input": 128,
            "laurel_rank": 4,
            "activation_sparsity_pattern": None,
        },
        "layers without their own KV cache",
    ),
    "mpt": (
        "MptConfig",
        "MptForCausalLM",
        {"d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 256},
        "ALiBi position biases",
    ),
}


def build(config_name, model_name, overrides):
    config_cls = getattr(transformers, config_name)
    model_cls = getattr(transformers, model_name)
    fields = dict(BASE)
    if config_name == "MptConfig":  # MPT names its sizes its own way
        fields = {k: v for k, v in BASE.items() if k in ("vocab_size", "pad_token_id")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = config_cls(**{**fields, **overrides})
    torch.manual_seed(0)
    return model_cls(config).eval()


def prompts(*lengths, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=gen) for n in lengths]


def left_pad(rows):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    return ids, mask


def generate(model, ids, mask):
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=NEW,
        do_sample=False,
        pad_token_id=PAD,
        eos_token_id=None,
        return_dict_in_generate=True,
        output_scores=True,
    )


def supported(family):
    model = build(*SUPPORTED[family])
    if family == "gpt-oss":  # sinks large enough to take a real share of the softmax
        gen = torch.Generator().manual_seed(2)
        for layer in model.model.layers:
            layer.self_attn.sinks.data = 2.0 * torch.randn(4, generator=gen)
    return model


def window_steps(family, prompt):
    """Decode calls that attend a window (per layer, summed): a sliding layer once the
    padded context (prompt + tokens so far) is longer than its window."""
    features = attention_features(supported(family))
    return sum(
        sum(1 for step in range(1, NEW) if prompt + step > window)
        for window in features.windows.values()
    )


# -- supported: a full budget decodes exactly the unwrapped model ---------------------------


#: Small pages and blocks so that tiny contexts span several of them.
METHODS = {"dsa": {}, "quest": {"page_size": 8}, "seer": {"block_size": 8}}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", list(SUPPORTED))
def test_full_budget_equals_the_unwrapped_model(family, method):
    model = supported(family)
    ids, mask = left_pad(prompts(21, 13))
    dense = generate(model, ids, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrap(model, method, budget=64, method_options=METHODS[method])
    out = generate(model, ids, mask)
    cache = getattr(out, cache_kwarg(model))
    layers = model.config.num_hidden_layers
    windowed = window_steps(family, ids.shape[1])
    assert cache.stats() == {
        "sparse_steps": layers * (NEW - 1) - windowed,
        "dense_steps": layers + windowed,  # prefill, and the windowed decode calls
    }
    assert torch.equal(out.sequences, dense.sequences)
    for got, want in zip(out.scores, dense.scores, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # and a plain forward (a transformers cache) through hetmem's attention function; the
    # padding positions' own logits are the mask's business (fully masked rows), not compared
    real = mask.bool()
    with torch.no_grad():
        wrapped = model(ids, attention_mask=mask).logits[real]
        unwrap(model)
        unwrapped = model(ids, attention_mask=mask).logits[real]
    torch.testing.assert_close(wrapped, unwrapped, atol=1e-4, rtol=1e-4)


def test_the_features_change_the_result():
    """The sinks and the softcap of the tiny models matter: the full-budget test above would
    fail if hetmem dropped them."""
    ids, mask = left_pad(prompts(21, 13))
    for family, drop in (
        ("gpt-oss", lambda m: [l.self_attn.sinks.data.fill_(-1e4) for l in m.model.layers]),
        (
            "gemma2",
            lambda m: [
                setattr(l.self_attn, "attn_logit_softcapping", None) for l in m.model.layers
            ],
        ),
    ):
        model = supported(family)
        with torch.no_grad():
            want = model(ids, attention_mask=mask).logits
            drop(model)
            got = model(ids, attention_mask=mask).logits
        assert (got - want).abs().max() > 1e-2, family


@pytest.mark.parametrize(("window", "budget"), [(24, 24), (8, 4)])
def test_sliding_layers_attend_their_window_exactly_at_any_budget(window, budget):
    """Every layer sliding: once past its window a layer attends the window exactly,
    whatever the budget (8 tokens, crossed at prefill, under a 4-token budget); a window
    crossed during generation (24) after steps whose budget covers the context."""
    model = build("MistralConfig", "MistralForCausalLM", {"sliding_window": window})
    ids, mask = left_pad(prompts(21, 13))
    dense = generate(model, ids, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrap(model, "dsa", budget=budget)
    out = generate(model, ids, mask)
    stats = getattr(out, cache_kwarg(model)).stats()
    windowed = 2 * sum(1 for step in range(1, NEW) if ids.shape[1] + step > window)
    assert stats == {"sparse_steps": 2 * (NEW - 1) - windowed, "dense_steps": 2 + windowed}
    assert torch.equal(out.sequences, dense.sequences)
    for got, want in zip(out.scores, dense.scores, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", ["gemma2", "gpt-oss"])
def test_sinks_and_softcap_decode_sparse_within_the_budget(family, method):
    """A budget smaller than the context: the full-attention layers of the softcap and sink
    families decode sparse through the pipeline's selection, within the budget."""
    model = supported(family)
    ids, mask = left_pad(prompts(40, 33))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrap(model, method, budget=8, method_options=METHODS[method])
    out = generate(model, ids, mask)
    cache = getattr(out, cache_kwarg(model))
    assert cache.stats() == {"sparse_steps": NEW - 1, "dense_steps": 2 + (NEW - 1)}
    assert all(torch.isfinite(score).all() for score in out.scores)
    full = cache.layers[1]  # layer 0 slides, layer 1 is full attention
    selection = full.pipeline.last_selection
    assert full.memory.kv.capacity > 8
    assert int(selection.valid.sum(-1).max()) * selection.unit <= 8
    assert {"relevancy", "retrieval", "apply"} <= full.pipeline.profile.by_step().keys()


def test_a_short_window_is_said_once_at_wrap():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrap(supported("mistral-window"), "dsa", budget=8)
        wrap(supported("llama"), "dsa", budget=8)
        wrap(
            build("MistralConfig", "MistralForCausalLM", {"sliding_window": 4096}), "dsa", budget=8
        )
    said = [w for w in caught if str(w.message).startswith("hetmem")]
    assert len(said) == 1  # the 4096 window is longer than the 256 positions: nothing to say
    assert "MistralForCausalLM: 2 of 2 layers use a sliding window of 24 tokens" in str(
        said[0].message
    )
    assert said[0].filename == __file__  # points at the caller


def test_features_read_from_the_config():
    gemma = attention_features(supported("gemma2"))
    assert gemma.windows == {0: 8} and gemma.softcap == 2.0 and not gemma.sinks
    oss = attention_features(supported("gpt-oss"))
    assert oss.windows == {0: 8} and oss.sinks and oss.softcap is None
    llama = attention_features(supported("llama"))
    assert llama.windows == {} and not llama.sinks and llama.softcap is None


# -- sparse decode with sinks and softcap: the softmax over the selected tokens -------------


@pytest.mark.parametrize("unit", [1, 4])
@pytest.mark.parametrize("per_head", [False, True])
def test_sparse_softmax_adds_the_sinks_and_the_softcap(unit, per_head):
    gen = torch.Generator().manual_seed(3)
    b, hq, hkv, s, d = 2, 4, 2, 32, 8
    kv = KVCache(
        torch.randn(b, hkv, s, d, generator=gen),
        torch.randn(b, hkv, s, d, generator=gen),
        torch.tensor([32, 21]),
    )
    q = torch.randn(b, hq, 1, d, generator=gen)
    positions = (kv.lengths - 1)[:, None]
    groups = hq if per_head else hkv
    k = 3
    indices = torch.stack(
        [torch.randperm(s // unit, generator=gen)[:k].sort().values for _ in range(b * groups)]
    ).view(b, groups, 1, k)
    valid = torch.ones_like(indices, dtype=torch.bool)
    valid[1, :, :, -1] = False  # a row with one unit fewer
    selection = TopK(indices, valid, unit)
    extras = Extras(sinks=torch.randn(hq, generator=gen), softcap=1.5)
    got = attend_selection(q, kv, selection, positions, 0.5, extras)
    # reference: every token, the unselected (and the invisible) ones masked out
    chosen = torch.zeros(b, groups, s, dtype=torch.bool)
    for bi in range(b):
        for g in range(groups):
            for i, ok in zip(indices[bi, g, 0].tolist(), valid[bi, g, 0].tolist(), strict=True):
                chosen[bi, g, i * unit : (i + 1) * unit] = ok
    chosen = chosen.repeat_interleave(hq // groups, dim=1)
    chosen &= torch.arange(s)[None, None, :] < kv.lengths[:, None, None]
    want = attend(q, kv.keys, kv.values, chosen[:, :, None, :], 0.5, extras)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got.shape == (b, 1, hq, d)
    # without sinks and softcap: hetmem's own sparse softmax over the same selection
    plain = attend(q, kv.keys, kv.values, chosen[:, :, None, :], 0.5, Extras())
    full = attend(
        q, kv.keys, kv.values, (torch.arange(s) < kv.lengths[:, None])[:, None, None], 0.5, Extras()
    )
    torch.testing.assert_close(full, dense_attention(q, kv, positions, 0.5).transpose(1, 2))
    assert not torch.allclose(plain, want, atol=1e-3)


def test_exact_attention_in_chunks_of_queries_equals_one_piece(monkeypatch):
    """A long prefill runs chunk by chunk of queries (bounded logits): same result; a
    missing mask is the causal one, windowed."""
    from hetmem.models import attention_fn

    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, h, 12, 8, generator=gen) for h in (4, 2, 2))
    extras = Extras(window=5, sinks=torch.randn(4, generator=gen), softcap=3.0)
    mask = attention_fn._dense_mask(None, 12, 12, 5, q)
    whole = attend(q, k, v, mask, 0.3, extras)
    monkeypatch.setattr(attention_fn, "LOGITS_BYTES", 2 * 4 * 12 * 4 * 5)  # 5 queries a chunk
    torch.testing.assert_close(attend(q, k, v, mask, 0.3, extras), whole, atol=1e-6, rtol=1e-6)
    causal = torch.ones(12, 12, dtype=torch.bool).tril() & ~torch.ones(
        12, 12, dtype=torch.bool
    ).tril(-5)
    torch.testing.assert_close(whole, attend(q, k, v, causal[None, None], 0.3, extras))


def test_a_sink_passed_by_another_name_is_refused_at_the_call():
    q = torch.randn(1, 2, 1, 8)
    with pytest.raises(UnsupportedModel, match="sinks"):
        hetmem_attention_forward(torch.nn.Module(), q, q, q, None, sinks=torch.zeros(2))


# -- refused: named, at wrap, before anything changes ---------------------------------------


@pytest.mark.parametrize("family", list(REFUSED))
def test_unsupported_attention_is_refused_by_name_before_any_change(family):
    config_name, model_name, overrides, feature = REFUSED[family]
    model = build(config_name, model_name, overrides)
    attn = model.config._attn_implementation
    with pytest.raises(UnsupportedModel) as info:
        wrap(model, "dsa", budget=64)
    error = info.value
    assert isinstance(error, InputError) and error.argument == "model"
    assert error.architecture == model_name and error.feature == feature and error.reason
    assert model_name in str(error) and feature in str(error)
    assert not is_wrapped(model)
    assert model.config._attn_implementation == attn
    assert "generate" not in model.__dict__  # nothing of wrap was left on the model


def test_a_window_over_padding_inside_the_context_counts_only_real_tokens():
    """A right-padded prompt, then decode: the padding sits inside the context, so the
    window's real tokens are not simply a row's last `window` (the memory keeps no padding).
    Step by step, the windowed layers equal the unwrapped model's."""
    from transformers import DynamicCache

    from hetmem.models import new_cache

    model = build("MistralConfig", "MistralForCausalLM", {"sliding_window": 8})
    (a, b) = prompts(12, 9)
    ids = torch.stack([a, torch.cat([b, torch.zeros(3, dtype=torch.long)])])
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    name = cache_kwarg(model)

    def run(cache):
        with torch.no_grad():
            logits = [model(ids, attention_mask=mask, use_cache=True, **{name: cache}).logits]
            step, step_mask = logits[-1][:, -1:].argmax(-1), mask
            for _ in range(5):
                step_mask = torch.cat([step_mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
                out = model(step, attention_mask=step_mask, use_cache=True, **{name: cache})
                logits.append(out.logits)
                step = out.logits[:, -1:].argmax(-1)
        return logits

    want = run(DynamicCache())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrap(model, "dsa", budget=4)
    cache = new_cache(model)
    got = run(cache)
    assert cache.layers[0]._validity.mask is not None  # not left padding
    assert cache.stats() == {"sparse_steps": 0, "dense_steps": 2 * 6}
    torch.testing.assert_close(got[0][mask.bool()], want[0][mask.bool()], atol=1e-4, rtol=1e-4)
    for g, w in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
