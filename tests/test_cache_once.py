"""A wrapped model's KV cache is held once: the method memory's `KVCache` is the only copy
of each layer's keys and values, every `Cache` operation acts on it, and the bytes a
wrapped cache holds stay within 1.1x of a plain `DynamicCache`'s."""

import dataclasses
import threading
import types
from collections import deque

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, DynamicCache

from hetmem.attention import Growth, KVCache
from hetmem.errors import InputError
from hetmem.methods.base import Method
from hetmem.models import HetmemCache, new_cache, unwrap, wrap
from hetmem.models.cache import HetmemLayer
from hetmem.models.settings import SparseDecode
from hetmem.models.wrap import cache_kwarg
from native_ops import native_library
from test_wrap import cache_of, generate, left_pad, prompts, tiny
from tiny_lm import make_tiny_lm

#: Small pages and blocks so that tiny contexts span several of them.
METHODS = {"dsa": {}, "quest": {"page_size": 8}, "seer": {"block_size": 8}}

_LEAVES = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    str,
    bytes,
    int,
    float,
    bool,
    type(None),
    torch.device,
    torch.dtype,
)


def held_storages(root, skip=()):
    """data_ptr -> (nbytes, path) of every tensor storage reachable from `root` through
    attributes, dicts, lists, tuples, sets and dataclass fields, each storage once."""
    seen, storages = set(), {}
    stack = [(root, "cache")]
    while stack:
        obj, path = stack.pop()
        if id(obj) in seen or isinstance(obj, _LEAVES):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages.setdefault(storage.data_ptr(), (storage.nbytes(), path))
            continue
        if skip and isinstance(obj, skip):
            continue
        if isinstance(obj, dict):
            stack.extend((v, f"{path}[{k!r}]") for k, v in obj.items())
            stack.extend((k, f"{path}.key") for k in obj)
        elif isinstance(obj, (list, tuple, set, frozenset, deque)):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(obj))
        else:
            if dataclasses.is_dataclass(obj):
                stack.extend(
                    (getattr(obj, f.name, None), f"{path}.{f.name}")
                    for f in dataclasses.fields(obj)
                )
            if hasattr(obj, "__dict__"):
                stack.extend((v, f"{path}.{k}") for k, v in vars(obj).items())
    return storages


#: What a wrapped cache reaches but does not hold: the methods (their indexer or gate
#: weights) and the settings are the wrapped model's, shared by every cache it makes and
#: independent of batch and context.
NOT_THE_CACHE = (Method, SparseDecode)


def held_bytes(cache):
    return sum(n for n, _ in held_storages(cache, NOT_THE_CACHE).values())


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    directory = make_tiny_lm(tmp_path_factory.mktemp("tiny_lm_cache"))
    return AutoModelForCausalLM.from_pretrained(directory).eval()


def long_prompts(vocab, lengths=(384, 300), seed=3):
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, vocab, (n,), generator=gen) for n in lengths]
    return left_pad(rows, pad=0)


# -- bytes -------------------------------------------------------------------------------


def _wrapped_cache(model, method, ids, mask, **options):
    wrap(model, method, budget=128, method_options=options or None)
    try:
        cache = cache_of(model, generate(model, ids, mask, new=8))
    finally:
        unwrap(model)
    assert isinstance(cache, HetmemCache) and cache.stats()["sparse_steps"] > 0
    for layer in cache.layers:
        assert "keys" not in vars(layer) and "values" not in vars(layer)
    return cache


@pytest.mark.parametrize("method", ["dsa", "quest", "seer"])
def test_a_wrapped_cache_holds_at_most_1_1x_a_dynamic_caches_bytes(tiny_lm, method):
    """Batch 2 (left padded), a few hundred tokens, default pages and blocks, a sparse
    budget: the tensors a wrapped cache holds after generate() (its method index included)
    against a plain DynamicCache's, at the same batch and context. DSA's default indexer
    here is as wide as a token's keys (Di = Hkv*D = 32), so its index is folded into the
    keys and it holds nothing beyond them."""
    model = tiny_lm
    ids, mask = long_prompts(model.config.vocab_size)
    plain = cache_of(model, generate(model, ids, mask, new=8))
    assert type(plain) is DynamicCache
    cache = _wrapped_cache(model, method, ids, mask)
    storages = held_storages(cache, NOT_THE_CACHE)
    held = sum(n for n, _ in storages.values())
    assert held <= 1.1 * held_bytes(plain), sorted(storages.values(), reverse=True)[:8]
    if method == "dsa":
        assert all(layer.memory.folded for layer in cache.layers)


def test_a_narrow_dsa_index_is_held_once_at_its_own_size(tiny_lm):
    """An indexer narrower than a token's keys (Di = 8 < Hkv*D = 32) keeps its index: the
    one KV copy within 1.1x of a DynamicCache, the index within 1.1x of its exact size."""
    from hetmem.methods.dsa import IndexerWeights

    model = tiny_lm
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    weights = IndexerWeights.from_attention(
        config.num_attention_heads, config.num_key_value_heads, head_dim, dim=8
    )
    ids, mask = long_prompts(config.vocab_size)
    plain = cache_of(model, generate(model, ids, mask, new=8))
    cache = _wrapped_cache(model, "dsa", ids, mask, weights=weights)
    storages = held_storages(cache, NOT_THE_CACHE)
    held = sum(n for n, _ in storages.values())
    assert not any(layer.memory.folded for layer in cache.layers)
    index = {
        layer.memory.keys.buffer.untyped_storage().data_ptr(): layer.memory.keys
        for layer in cache.layers
    }
    index_bytes = sum(storages[p][0] for p in index)
    exact = sum(keys.data.numel() * keys.data.element_size() for keys in index.values())
    assert index_bytes > 0
    assert held - index_bytes <= 1.1 * held_bytes(plain)
    assert index_bytes <= 1.1 * exact


def test_a_layer_keeps_no_dense_copy_after_prefill():
    model = wrap(tiny("llama"), "quest", budget=64, method_options=METHODS["quest"])
    ids, mask = left_pad(prompts(21, 13))
    cache = cache_of(model, generate(model, ids, mask))
    layer = cache.layers[0]
    assert isinstance(layer, HetmemLayer) and layer._pending is None
    held = held_storages(layer, NOT_THE_CACHE)
    kv = layer.memory.kv
    ptrs = {
        kv._keys.buffer.untyped_storage().data_ptr(),
        kv._values.buffer.untyped_storage().data_ptr(),
    }
    kv_sized = [p for p, (n, _) in held.items() if n >= kv.keys.numel() * kv.keys.element_size()]
    assert set(kv_sized) == ptrs  # the memory's KV buffers are the only ones of that size
    # The padded layout is rebuilt on demand, equal to what a DynamicCache holds (padding
    # aside, which the mask hides).
    unwrap(model)
    plain = cache_of(model, generate(model, ids, mask))
    real = mask.bool()[:, None, :, None]
    width = ids.shape[1] + 5
    assert "keys" not in vars(layer) and "values" not in vars(layer)
    assert layer.keys is not layer.keys  # rebuilt on each read, never kept
    for got, want in ((layer.keys, plain.layers[0].keys), (layer.values, plain.layers[0].values)):
        assert got.shape == want.shape
        real_all = torch.cat([real, torch.ones(2, 1, width - ids.shape[1], 1, dtype=torch.bool)], 2)
        torch.testing.assert_close(got * real_all, want * real_all)


@pytest.mark.parametrize("align", [1, 16, 64, 256])
def test_growth_keeps_a_few_percent_and_aligns_when_it_is_cheap(align):
    growth = Growth(align=align)
    for length in [1, 7, 63, 64, 300, 1000, 4096, 4111, 32768, 100_003]:
        capacity = growth.capacity(length)
        spare = -(-length // 64)
        assert length < capacity <= length + 2 * spare
        if align <= spare:
            assert capacity % align == 0  # whole blocks for the block gather
    # Appends to a bounded KVCache reallocate about once per length/64 tokens.
    kv = KVCache(torch.zeros(1, 1, 1000, 2), torch.zeros(1, 1, 1000, 2), growth=growth)
    buffers = set()
    for _ in range(200):
        kv.append(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2))
        buffers.add(kv._keys.buffer.data_ptr())
        assert kv._keys.buffer.shape[2] <= growth.capacity(kv.capacity)
    assert 2 <= len(buffers) <= 200 // 15
    assert kv.keys.sum() == 2 * 200


# -- every Cache operation, on the one copy ----------------------------------------------


def continue_generation(model, cache, sequences, mask, new=4):
    """generate() on from a cache holding a prefix of `sequences`."""
    full = torch.cat([mask, torch.ones(mask.shape[0], sequences.shape[1] - mask.shape[1])], 1)
    out = model.generate(
        input_ids=sequences,
        attention_mask=full.long(),
        max_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        return_dict_in_generate=True,
        output_scores=True,
        **{cache_kwarg(model): cache},
    )
    return out


def crop_two(cache, seq, mask):
    cache.crop(-2)
    return cache, seq, mask


def crop_to_a_chunk(cache, seq, mask):
    cache.crop(-3)  # the next forward feeds the 4 tokens no longer cached: a chunk
    return cache, seq, mask


def select_second_row(cache, seq, mask):
    cache.batch_select_indices(torch.tensor([1]))
    return cache, seq[1:], mask[1:]


def repeat_rows(cache, seq, mask):
    cache.batch_repeat_interleave(2)
    return cache, seq.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)


def reorder_rows(cache, seq, mask):
    cache.reorder_cache(torch.tensor([1, 0, 1]))
    return cache, seq[[1, 0, 1]], mask[[1, 0, 1]]


OPERATIONS = [crop_two, crop_to_a_chunk, select_second_row, repeat_rows, reorder_rows]


def generate_around(model, operation, ids, mask):
    out = generate(model, ids, mask, new=5)
    cache = cache_of(model, out)
    cached = cache.get_seq_length()
    assert cached == out.sequences.shape[1] - 1
    cache, seq, row_mask = operation(cache, out.sequences, mask)
    kept = cache.get_seq_length()
    # The tokens the cache no longer holds are fed again, then generation goes on.
    return continue_generation(model, cache, seq[:, : kept + 1 + (cached - kept)], row_mask)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda f: f.__name__)
def test_every_cache_operation_generates_the_dense_tokens(method, operation):
    model = tiny("llama")
    ids, mask = left_pad(prompts(27, 14))
    dense = generate_around(model, operation, ids, mask)
    wrap(model, method, budget=64, method_options=METHODS[method])
    out = generate_around(model, operation, ids, mask)
    cache = cache_of(model, out)
    assert isinstance(cache, HetmemCache) and cache.stats()["sparse_steps"] > 0
    assert torch.equal(out.sequences, dense.sequences)
    for got, want in zip(out.scores, dense.scores, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # The method's index was rebuilt from the one copy: its rows are the cache's rows.
    for layer in cache.layers:
        kv = layer.memory.kv
        assert kv.batch == out.sequences.shape[0]
        assert kv.lengths.tolist() == layer._validity.lengths().tolist()


@pytest.mark.parametrize("method", list(METHODS))
def test_beam_search_reorders_the_one_copy(method):
    model = tiny("llama")
    ids, mask = left_pad(prompts(20, 12))
    dense = generate(model, ids, mask, num_beams=3, num_return_sequences=2)
    wrap(model, method, budget=64, method_options=METHODS[method])
    out = generate(model, ids, mask, num_beams=3, num_return_sequences=2)
    assert torch.equal(out.sequences, dense.sequences)


def test_prompt_lookup_decoding_crops_the_rejected_candidates():
    """A periodic prompt: prompt lookup proposes candidates with it, the model verifies
    them in the same forward and generate() crops the ones it rejects."""
    model = tiny("llama")
    (row,) = prompts(8)
    ids = torch.cat([row] * 5)[None]
    dense = generate(model, ids, new=8, prompt_lookup_num_tokens=3)
    wrap(model, "quest", budget=64, method_options=METHODS["quest"])
    out = generate(model, ids, new=8, prompt_lookup_num_tokens=3)
    assert torch.equal(out.sequences, dense.sequences)
    cache = cache_of(model, out)
    assert cache.get_seq_length() == out.sequences.shape[1] - 1
    assert cache.layers[0].memory.kv.lengths.tolist() == [out.sequences.shape[1] - 1]


def test_right_padding_and_masked_new_tokens_stay_out_of_the_memory():
    """A mask that is not left padding (a row padded on the right, then fed on) is kept
    whole, and the compact copy holds only the real tokens."""
    model = wrap(tiny("llama"), "dsa", budget=64)
    rows = prompts(12, 7)
    ids = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    cache = HetmemCache(model._hetmem_wrap.settings)
    name = cache_kwarg(model)
    with torch.no_grad():
        model(ids, attention_mask=mask, use_cache=True, **{name: cache})
        step = torch.tensor([[5], [6]])
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        model(step, attention_mask=mask, use_cache=True, **{name: cache})
    layer = cache.layers[0]
    assert layer.memory.kv.lengths.tolist() == [13, 8]
    assert layer._validity.mask is not None
    assert torch.equal(layer._validity.full(), mask.bool())
    assert cache.get_seq_length() == 13


def test_a_model_without_hetmem_attention_reads_the_padded_layout():
    """A HetmemCache driven by an unwrapped model (plain sdpa) still gives the model every
    cached token, as a DynamicCache would."""
    model = tiny("llama")
    ids, mask = left_pad(prompts(15, 9))
    wrap(model, "quest", budget=64, method_options=METHODS["quest"])
    cache = HetmemCache(model._hetmem_wrap.settings)
    unwrap(model)
    plain = DynamicCache()
    name = cache_kwarg(model)
    with torch.no_grad():
        for c in (cache, plain):
            model(ids, attention_mask=mask, use_cache=True, **{name: c})
        step = torch.tensor([[5], [6]])
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        got = model(step, attention_mask=mask, use_cache=True, **{name: cache}).logits
        want = model(step, attention_mask=mask, use_cache=True, **{name: plain}).logits
    torch.testing.assert_close(got, want)
    assert cache.get_seq_length() == plain.get_seq_length()


def test_a_cache_filled_by_update_alone_decodes_sparse():
    """States given to `Cache.update` with no attention call (a cache filled directly) are
    taken in at the next step, and decode then runs sparse."""
    model = wrap(tiny("llama"), "quest", budget=8, method_options=METHODS["quest"])
    cache = HetmemCache(model._hetmem_wrap.settings)
    config = model.config
    gen = torch.Generator().manual_seed(4)
    shape = (2, config.num_key_value_heads, 40, config.hidden_size // config.num_attention_heads)
    for i in range(config.num_hidden_layers):
        cache.update(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), i)
    assert cache.get_seq_length() == 40
    name = cache_kwarg(model)
    with torch.no_grad():
        for step in range(3):
            ids = torch.full((2, 1), 5 + step)
            positions = torch.full((2, 1), 40 + step)
            model(ids, position_ids=positions, use_cache=True, **{name: cache})
    assert cache.stats() == {"sparse_steps": 2 * 3, "dense_steps": 0}
    assert cache.layers[0].memory.kv.lengths.tolist() == [43, 43]


# -- a known final length is allocated once ----------------------------------------------


def test_growth_takes_an_expected_length_whole_then_grows_by_its_fraction():
    growth = Growth(align=8, fraction=64, expected=1000)
    assert growth.capacity(10) == growth.capacity(1000) == 1000  # 1000 = 125 blocks of 8
    # whole blocks where that costs at most a fraction more: 1024 is 24 more, 1008 is 8
    assert Growth(align=64, expected=1000).capacity(1) == 1008
    assert growth.capacity(1001) == Growth(align=8).capacity(1001) > 1001
    assert Growth(fraction=64, expected=1000).within(16).expected == 63
    with pytest.raises(InputError):
        Growth(expected=-1)


@pytest.mark.parametrize("method", ["dsa", "quest", "seer"])
def test_generate_allocates_prompt_plus_new_tokens_once(tiny_lm, method):
    """generate() tells the cache its final length (prompt + max_new_tokens): every layer's
    keys and values are allocated for it at prefill and never reallocated while decoding,
    and the output equals the cache grown step by step (no final length)."""
    model = tiny_lm
    ids, mask = long_prompts(model.config.vocab_size, lengths=(200, 150))
    new = 12
    wrap(model, method, budget=64, method_options=METHODS[method])
    try:
        buffers, calls = [], []
        original = KVCache.append

        def watch(kv, keys, values, **kwargs):
            positions = original(kv, keys, values, **kwargs)
            calls.append(1)
            buffers.append((kv._keys.buffer.data_ptr(), kv._values.buffer.data_ptr()))
            return positions

        KVCache.append = watch
        try:
            out = generate(model, ids, mask, new=new)
        finally:
            KVCache.append = original
        cache = cache_of(model, out)
        grown = generate(model, ids, mask, new=new, **{cache_kwarg(model): new_cache(model)})
    finally:
        unwrap(model)
    unit = cache.layers[0].pipeline.method.unit
    final = ids.shape[1] + new
    assert calls and len(set(buffers)) == model.config.num_hidden_layers
    for layer in cache.layers:
        assert layer.memory.kv.capacity <= final
        room = layer.memory.kv._keys.buffer.shape[2] - final
        assert 0 <= room < max(final // 64, 1) + unit
    assert torch.equal(out.sequences, grown.sequences)


def test_a_cache_refuses_a_bad_max_length(tiny_lm):
    wrap(tiny_lm, "quest", budget=64)
    try:
        for bad in (0, -3, 2.5, True):
            with pytest.raises(InputError, match="max_length"):
                new_cache(tiny_lm, bad)
        assert isinstance(new_cache(tiny_lm, 512), HetmemCache)
    finally:
        unwrap(tiny_lm)


class _FailingAfterAppend:
    """hetmem's native ops, the methods' (`*_one_row`: append, then score) raising once
    they have appended."""

    def __init__(self, library):
        self.library = library

    def __getattr__(self, name):
        op = getattr(self.library, name)
        if not name.endswith("_one_row"):
            return op

        def appended_then_failed(*args):
            op(*args)
            raise RuntimeError("scores failed")

        return appended_then_failed


@pytest.mark.parametrize(
    ("method", "path"),
    [("quest", "python"), ("seer", "python"), ("quest", "native"), ("seer", "native")],
)
def test_a_lean_step_that_raises_after_its_append_keeps_the_layer_consistent(
    method, path, monkeypatch
):
    """A one-row lean step (`lean_one`) that raises once its token is appended, on the
    Python path and on the native ops' (the tiny model's DSA index is folded into its keys,
    which takes the planned step): the layer counts the
    token the memory holds and keeps nothing pending, as `take_in` does for a step that
    raises, and the cache's guard stays with this thread (the last layer's call releases
    it)."""
    from hetmem import native

    model = wrap(tiny("llama"), method, budget=8, method_options=METHODS[method])
    cache = new_cache(model)
    name = cache_kwarg(model)
    ids = torch.arange(3, 43)[None]
    with torch.no_grad():
        model(ids, use_cache=True, **{name: cache})
        method_cls = type(model._hetmem_wrap.settings.methods[0])
        if path == "python":

            def fail(self, memory, q):
                raise RuntimeError("scores failed")

            monkeypatch.setattr(native, "library", lambda: None)
            monkeypatch.setattr(method_cls, "_one_row_scores", fail)
        else:
            library = native_library()
            monkeypatch.setattr(native, "library", lambda: _FailingAfterAppend(library))
        with pytest.raises(RuntimeError, match="scores failed"):
            model(torch.tensor([[7]]), position_ids=torch.tensor([[40]]), use_cache=True,
                  **{name: cache})  # fmt: skip
    layer = cache.layers[0]
    assert layer._pending is None and layer._length == 41 == layer.memory.kv.capacity
    assert layer._guard.thread == threading.get_ident()
    assert cache.layers[1]._length == 40  # never reached
