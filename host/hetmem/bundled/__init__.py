"""The bundled small causal LM: hetmem's main job runs with nothing downloaded.

A 4-layer Llama (GQA: 8 query heads, 2 KV heads, head dim 32, RoPE theta 500k, 8192
positions) trained in this repository by `python -m hetmem.bundled.train` on the
machine's own text and on passkey / associative-recall tasks (`hetmem.tasks`), so that its
attention retrieves across long contexts. Weights, config, tokenizer and model card live in
`path()`; its measured accuracy per context length is in `path() / "eval.json"`.

    model, tok = hetmem.bundled.load()
    acc = hetmem.bundled.evaluate(model, tok, length=2048, n=50)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InputError
from .evaluate import evaluate

__all__ = ["card_accuracy", "evaluate", "load", "path"]

#: Name of the weights directory inside this package.
NAME = "hetmem-lm"


def path() -> Path:
    """The directory of the bundled weights, config, tokenizer and model card."""
    return Path(__file__).resolve().parent / NAME


def load(
    device: Any = "cpu", dtype: Any = None, directory: str | Path | None = None
) -> tuple[Any, Any]:
    """(model, tokenizer) from the bundled directory (or `directory`), never the network.

    The model comes in `dtype` (default float32, whatever the storage dtype), in eval mode
    on `device`; generation is greedy by its generation config. The tokenizer pads on the
    left, so prompts of different lengths batch for generation.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = Path(directory) if directory is not None else path()
    if not (where / "config.json").is_file() or not (where / "model.safetensors").is_file():
        raise InputError(
            "directory", f"{where} holds no trained model (config.json, model.safetensors)"
        )
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError("device", f"not a torch device: {device!r} ({e})") from None
    dtype = torch.float32 if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError("dtype", f"expected a floating torch.dtype, got {dtype!r}")
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True)
    return model.to(device).eval(), tokenizer


def card_accuracy(
    kind: str = "passkey", directory: str | Path | None = None
) -> dict[int, dict[str, Any]]:
    """The model card's accuracy figures: context length -> {accuracy, n, seed, ...}."""
    where = Path(directory) if directory is not None else path()
    data = json.loads((where / "eval.json").read_text())
    if kind not in data["tasks"]:
        raise InputError("kind", f"expected one of {sorted(data['tasks'])}, got {kind!r}")
    return {int(k): v for k, v in data["tasks"][kind].items()}
