"""The bundled model: it loads offline, decodes greedily, and reaches its model card's 2k
passkey accuracy (same task set, same code) within 2 points."""

from __future__ import annotations

import json
import os
import socket

import pytest

from hetmem import bundled
from hetmem.errors import InputError

pytest.importorskip("transformers", reason="the models extra (transformers) is not installed")

WEIGHTS = bundled.path()
#: The model card's 2k figure is measured on exactly this set.
CARD_LENGTH, CARD_N, CARD_SEED = 2048, 50, 0


@pytest.fixture(scope="module")
def offline():
    """No network: HF offline flags set and sockets refused while the model loads."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    real = socket.socket.connect

    def refuse(self, *args, **kwargs):
        raise OSError("network access during an offline load")

    socket.socket.connect = refuse
    try:
        yield
    finally:
        socket.socket.connect = real
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def loaded(offline):
    import torch

    torch.set_num_threads(2)
    return bundled.load()


def test_weights_directory_is_complete():
    names = {p.name for p in WEIGHTS.iterdir()}
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "eval.json",
        "training.json",
    ):
        assert name in names
    assert (WEIGHTS / "model.safetensors").stat().st_size <= 30 * 2**20


def test_architecture(loaded):
    model, tok = loaded
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert 32 <= cfg.head_dim <= 64
    assert cfg.max_position_embeddings >= 8192
    assert next(model.parameters()).dtype.is_floating_point
    assert not model.training
    assert model.generation_config.do_sample is False


def test_tokenizer(loaded):
    model, tok = loaded
    ids = tok("The pass key is 68120")["input_ids"]
    assert ids[0] == tok.bos_token_id == model.config.bos_token_id
    digits = tok.convert_ids_to_tokens(ids[-5:])
    assert digits == list("68120")  # one token per digit
    assert tok.pad_token_id is not None and tok.pad_token_id == model.config.pad_token_id
    assert tok.padding_side == "left"


def test_batched_generation_matches_one_by_one(loaded):
    """Left padding: a short prompt decodes the same alone and beside a longer one."""
    from hetmem import tasks
    from hetmem.bundled.evaluate import complete

    model, tok = loaded
    short, long = tasks.passkey(300, 1, tok), tasks.passkey(420, 2, tok)
    together = complete(model, tok, [short.prompt, long.prompt])
    alone = [complete(model, tok, [t.prompt])[0] for t in (short, long)]
    assert together == alone


def test_card_passkey_accuracy_at_2k(loaded):
    model, tok = loaded
    card = bundled.card_accuracy("passkey")[CARD_LENGTH]
    assert (card["n"], card["seed"]) == (CARD_N, CARD_SEED)
    acc = bundled.evaluate(model, tok, length=CARD_LENGTH, n=CARD_N, seed=CARD_SEED)
    assert abs(acc - card["accuracy"]) <= 0.02, (acc, card)
    # The card's figure is a real retrieval rate: far above guessing 5 digits.
    assert card["accuracy"] >= 0.5


def test_card_lists_every_eval_length():
    data = json.loads((WEIGHTS / "eval.json").read_text())
    card = (WEIGHTS / "README.md").read_text()
    for kind, per in data["tasks"].items():
        for length, r in per.items():
            assert f"{int(length):,} tokens" in card
            assert f"{100 * r['accuracy']:.0f}% (n={r['n']})" in card
        assert kind in card


def test_bad_input(tmp_path):
    with pytest.raises(InputError) as e:
        bundled.load(directory=tmp_path)
    assert e.value.argument == "directory"
    with pytest.raises(InputError) as e:
        bundled.load(device="nowhere")
    assert e.value.argument == "device"
    with pytest.raises(InputError) as e:
        bundled.card_accuracy("sudoku")
    assert e.value.argument == "kind"


def test_evaluate_bad_input(loaded):
    model, tok = loaded
    with pytest.raises(InputError) as e:
        bundled.evaluate(model, tok, length=512, n=2, kind="sudoku")
    assert e.value.argument == "kind"
    with pytest.raises(InputError) as e:
        bundled.evaluate(object(), tok, length=512, n=2)
    assert e.value.argument == "model"
    with pytest.raises(InputError) as e:
        bundled.evaluate(model, tok, length=512, n=2, batch_size=0)
    assert e.value.argument == "batch_size"
