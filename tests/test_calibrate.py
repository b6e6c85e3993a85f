"""hetmem calibrate: the learned selectors train on a frozen model's own attention."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from hetmem.attention import AttentionQuery, KVCache  # noqa: E402
from hetmem.cli import main  # noqa: E402
from hetmem.errors import InputError  # noqa: E402
from hetmem.methods.dsa import (  # noqa: E402
    DSA,
    IndexerWeights,
    indexer_scores,
    query_key_logits,
)
from hetmem.methods.seer import (  # noqa: E402
    GateWeights,
    SeerAttention,
    gate_keys,
    gate_queries,
    gate_scores,
    pool_blocks,
)
from hetmem.models import unwrap, wrap  # noqa: E402
from hetmem.selectors.activations import CAPTURE, LayerActivations, capture  # noqa: E402
from hetmem.selectors.calibrate import load_local  # noqa: E402
from hetmem.selectors.objective import (  # noqa: E402
    block_pools,
    gate_logits,
    indexer_logits,
    kl_divergence,
)
from hetmem.selectors.train import TrainConfig, train_gate, train_indexer  # noqa: E402
from hetmem.selectors.weights import (  # noqa: E402
    SELECTORS_FILE,
    Selectors,
    load_selectors,
    save_selectors,
    selectors_for,
)
from tiny_lm import make_tiny_lm  # noqa: E402

BLOCK = 16


@pytest.fixture(scope="module")
def tiny_model():
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=512,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def acts(tiny_model):
    ids = torch.randint(3, 128, (12, 192), generator=torch.Generator().manual_seed(0))
    return capture(tiny_model, ids, queries=24)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


def test_capture_shapes_and_model_restored(tiny_model, acts):
    assert len(acts) == 2
    a = acts[0]
    assert a.q.shape == (12, 4, 24, 16) and a.k.shape == (12, 2, 192, 16)
    assert a.scale == pytest.approx(16**-0.5)
    assert bool((a.positions[:, -1] == 191).all())
    assert bool((a.positions.diff(dim=1) > 0).all())
    # Attention goes back to what it was, and the captured probabilities are distributions.
    assert tiny_model.config._attn_implementation != CAPTURE
    probs = a.attention()
    assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5)
    assert bool((probs[0, :, 0, 1 + int(a.positions[0, 0]) :] == 0).all())


@pytest.mark.parametrize("dim", [8, 32], ids=["indexer keys", "folded"])
def test_training_objective_scores_what_the_methods_score(acts, dim):
    """The scores the students train are exactly the methods' Relevancy at decode time: the
    indexer with its own keys (Di < Hkv*D) and folded into the cache's keys (Di = Hkv*D),
    the gate with the query's own block pooled up to the query."""
    a = acts[1]
    dsa_w, _ = train_indexer(a, dim=dim, config=TrainConfig(steps=5))
    gate_w, _ = train_gate(a, block_size=BLOCK, config=TrainConfig(steps=5))
    pools = block_pools(a, BLOCK)
    dsa_all = indexer_logits(dsa_w, a)
    gate_all = gate_logits(gate_w, a, pools, BLOCK)
    for n, t in ((0, 0), (3, 7), (5, 23)):
        p = int(a.positions[n, t])
        kv = KVCache(a.k[n : n + 1, :, : p + 1], a.k[n : n + 1, :, : p + 1])
        query = AttentionQuery(a.q[n : n + 1, :, t : t + 1])
        dsa = DSA(dsa_w)
        memory = dsa.prepare(kv)
        assert memory.folded == (dim == 32)
        got = dsa.relevancy(memory, query).values[0, 0, 0]
        torch.testing.assert_close(got, dsa_all[n, t, : p + 1], atol=1e-5, rtol=1e-5)
        seer = SeerAttention(gate_w, block_size=BLOCK)
        got = seer.relevancy(seer.prepare(kv), query).values[0, :, 0]
        torch.testing.assert_close(got, gate_all[n, :, t, : p // BLOCK + 1], atol=1e-5, rtol=1e-5)
        # The comparison can fail: the untrained gate scores these blocks otherwise.
        untrained = SeerAttention(block_size=BLOCK)
        other = untrained.relevancy(untrained.prepare(kv), query).values[0, :, 0]
        assert not torch.allclose(other, gate_all[n, :, t, : p // BLOCK + 1], atol=1e-3)


def test_shared_scores_are_the_formulas_and_train():
    """The methods' scoring functions, which Relevancy and calibration share, compute the
    published formulas over any leading dims, the in-place variant (the decode path's)
    gives the same values, and gradients reach every input (double-precision gradcheck)."""
    g = torch.Generator().manual_seed(5)
    lead, t, h, di, s = (2, 3), 4, 3, 5, 7
    qi = torch.randn(*lead, t, h, di, generator=g, dtype=torch.float64)
    keys = torch.randn(*lead, s, di, generator=g, dtype=torch.float64)
    w = torch.rand(*lead, t, h, generator=g, dtype=torch.float64)
    dots = torch.einsum("abthd,absd->abtsh", qi, keys)  # q_{t,h} . k_s
    want = (w[..., :, None, :] * dots.relu()).sum(-1) / di**0.5  # [.., T, S]
    logits = query_key_logits(qi, keys).unflatten(-1, (t, h))
    assert logits.shape == (*lead, s, t, h)
    flat = query_key_logits(qi[0], keys[0])  # three dims: the decode path's bmm
    torch.testing.assert_close(flat.unflatten(-1, (t, h)), logits[0])
    torch.testing.assert_close(indexer_scores(logits, w, di), want)
    equal = dots.relu().mean(-1) / di**0.5
    torch.testing.assert_close(indexer_scores(logits, None, di), equal)
    torch.testing.assert_close(indexer_scores(logits.clone(), None, di, inplace=True), equal)
    torch.testing.assert_close(indexer_scores(logits.clone(), w, di, inplace=True), want)
    assert torch.autograd.gradcheck(
        lambda q, k, w: indexer_scores(query_key_logits(q, k).unflatten(-1, (t, h)), w, di),
        (qi.requires_grad_(), keys.requires_grad_(), w.requires_grad_()),
    )

    hkv, r, d, dg, block = 2, 3, 4, 5, 4
    q = torch.randn(*lead, hkv * r, t, d, generator=g, dtype=torch.float64)
    wq = torch.randn(hkv, r * d, dg, generator=g, dtype=torch.float64)
    wk = torch.randn(hkv, 3 * d, dg, generator=g, dtype=torch.float64)
    blocks = torch.randn(*lead, hkv, 6, block, d, generator=g, dtype=torch.float64)
    valid = torch.arange(block).view(1, block, 1) < torch.tensor([4, 4, 4, 4, 4, 2]).view(6, 1, 1)
    pooled = pool_blocks(blocks, valid)  # the last block holds 2 tokens
    torch.testing.assert_close(
        pooled[..., 5, :],
        torch.cat([blocks[..., 5, :2, :].amax(-2), blocks[..., 5, :2, :].amin(-2),
                   blocks[..., 5, :2, :].mean(-2)], dim=-1),
    )  # fmt: skip
    torch.testing.assert_close(pooled[..., 0, d : 2 * d], blocks[..., 0, :, :].amin(-2))
    qg = gate_queries(q, wq)  # group j's query heads jR..jR+R-1, side by side
    grouped = torch.cat([q[..., 1 * r + i, :, :] for i in range(r)], dim=-1)
    torch.testing.assert_close(qg[..., 1, :, :], grouped @ wq[1])
    kg = gate_keys(pooled, wk)
    torch.testing.assert_close(
        gate_scores(qg, kg), torch.einsum("abhtd,abhnd->abhtn", qg, kg) / dg**0.5
    )
    assert torch.autograd.gradcheck(
        lambda wq, wk: gate_scores(gate_queries(q, wq), gate_keys(pooled, wk)),
        (wq.requires_grad_(), wk.requires_grad_()),
    )


@pytest.mark.parametrize("selector", ["dsa", "seer"])
def test_loss_falls(acts, selector):
    config = TrainConfig(steps=80, lr=3e-3)
    if selector == "dsa":
        _, log = train_indexer(acts[0], dim=16, config=config)
        assert log.choice in ("learned head weights", "equal head weights")
    else:
        _, log = train_gate(acts[0], block_size=BLOCK, config=config)
    first, last = sum(log.losses[:10]) / 10, sum(log.losses[-10:]) / 10
    assert last < 0.85 * first, (first, last)
    # The weights kept are never worse on held-out queries than the untrained default.
    assert log.held_out <= log.untrained + 1e-6


def test_kl_is_zero_only_at_the_target():
    target = torch.tensor([[0.5, 0.5, 0.0]])
    same = torch.log(torch.tensor([[0.5, 0.5, 1e-12]]))
    assert float(kl_divergence(target, same)) == pytest.approx(0.0, abs=1e-6)
    other = torch.tensor([[0.0, 1.0, float("-inf")]])
    assert float(kl_divergence(target, other)) > 0.1


def test_calibrate_saves_and_wrap_picks_trained_weights(model_dir, capsys):
    rc = main(
        [
            "calibrate",
            "--model",
            str(model_dir),
            "--sequences",
            "6",
            "--tokens",
            "160",
            "--queries",
            "8",
            "--steps",
            "6",
            "--block-size",
            "16",
            "--indexer-dim",
            "8",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "Seer AttnGate" in out and "DSA indexer" in out and "saved" in out
    path = model_dir / SELECTORS_FILE
    assert path.is_file()
    selectors = load_selectors(path)
    assert selectors.layers == 2 and selectors.block_size == 16
    assert selectors.meta["tokens"] == 160

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    wrap(model, method="dsa", budget=32)
    methods = model._hetmem_wrap.settings.methods
    assert torch.equal(methods[1].weights.wq, selectors.indexers[1].wq)
    assert torch.equal(methods[0].weights.wk, selectors.indexers[0].wk)
    ids = torch.randint(3, 300, (1, 80), generator=torch.Generator().manual_seed(1))
    out_ids = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert out_ids.shape == (1, 84)
    unwrap(model)

    wrap(model, method="seer", budget=32)
    methods = model._hetmem_wrap.settings.methods
    assert torch.equal(methods[0].weights.wq, selectors.gates[0].wq)
    assert methods[0].unit == 16  # the block size it was trained with
    unwrap(model)

    # Weights named in the options win; quest has none to train.
    wrap(model, method="dsa", budget=32, method_options={"weights": None})
    assert model._hetmem_wrap.settings.methods[0].weights is None
    unwrap(model)
    wrap(model, method="quest", budget=32, method_options={"page_size": 16})
    unwrap(model)


def test_bad_input(tmp_path, tiny_model, acts):
    with pytest.raises(InputError, match="path"):
        load_selectors(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="path"):
        load_selectors(tmp_path / "junk.safetensors")
    with pytest.raises(InputError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(InputError, match="lr"):
        TrainConfig(lr=-1.0)
    with pytest.raises(InputError, match="input_ids"):
        capture(tiny_model, torch.zeros(2, 8))
    with pytest.raises(InputError, match="block_size"):
        train_gate(acts[0], block_size=0)
    with pytest.raises(InputError, match="model"):
        load_local(tmp_path)
    # Selectors for another number of layers are refused, naming the model.
    selectors = Selectors(
        [IndexerWeights.from_attention(4, 2, 16, 8)] * 3,
        [GateWeights.mean_pool(4, 2, 16)] * 3,
    )
    directory = tmp_path / "m"
    directory.mkdir()
    save_selectors(selectors, directory / SELECTORS_FILE)
    tiny_model.name_or_path = str(directory)
    try:
        with pytest.raises(InputError, match="model"):
            selectors_for(tiny_model)
    finally:
        tiny_model.name_or_path = ""


def test_bidirectional_activations_train():
    """An encoder's queries see every token, later ones included (e.g. MiniLM)."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(6, 4, 8, 16, generator=g) * 2
    k = torch.randn(6, 2, 128, 16, generator=g) * 2
    act = LayerActivations(q, k, torch.full((6, 8), 127), 0.25, causal=False)
    probs = act.attention()
    assert bool((probs > 0).all())  # nothing masked
    _, log = train_gate(act, block_size=BLOCK, config=TrainConfig(steps=30))
    assert all(torch.isfinite(torch.tensor(log.losses)))
    assert log.losses[-1] < log.losses[0]
    _, log = train_indexer(act, dim=8, config=TrainConfig(steps=30))
    assert all(torch.isfinite(torch.tensor(log.losses)))
