"""The trained selectors and their weights file: `<model_dir>/hetmem_selectors.safetensors`,
one DSA indexer and one Seer AttnGate per layer, which `wrap(model, method="dsa")` (or
"seer") picks up when the model was loaded from that directory (`trained_spec`)."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..methods.base import Method
from ..methods.dsa import DSA, IndexerWeights
from ..methods.seer import GateWeights, SeerAttention

SELECTORS_FILE = "hetmem_selectors.safetensors"
FORMAT = "hetmem-selectors/1"
#: Methods whose weights `calibrate` trains.
TRAINED_METHODS = ("dsa", "seer")


@dataclass
class Selectors:
    """Per-layer trained weights of the DSA indexer and the Seer AttnGate."""

    indexers: list[IndexerWeights]
    gates: list[GateWeights]
    block_size: int = 16
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> int:
        return len(self.indexers)

    def method(self, name: str, layer_idx: int, **options: Any) -> Method:
        """The trained method of one layer (`options` as for `hetmem.methods.get`)."""
        if name == "dsa":
            return DSA(self.indexers[layer_idx], **options)
        if name == "seer":
            options.setdefault("block_size", self.block_size)
            return SeerAttention(self.gates[layer_idx], **options)
        raise InputError("method", f"no trained weights for {name!r}; trained: {TRAINED_METHODS}")

    def spec(self, name: str, options: Mapping[str, Any] | None = None) -> Callable[[int], Method]:
        """A per-layer callable for `wrap(model, method=...)`."""
        opts = dict(options or {})
        try:
            self.method(name, 0, **dict(opts))
        except TypeError as exc:
            raise InputError("method_options", f"{name}: {exc}") from exc

        def build(layer_idx: int) -> Method:
            if not 0 <= layer_idx < self.layers:
                raise InputError(
                    "model",
                    f"layer {layer_idx} has no trained {name} weights ({self.layers} layers)",
                )
            return self.method(name, layer_idx, **dict(opts))

        return build


def save_selectors(selectors: Selectors, path: str | os.PathLike) -> Path:
    """Write the selectors as one safetensors file (metadata: format, block size, losses)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for i, (ix, gate) in enumerate(zip(selectors.indexers, selectors.gates, strict=True)):
        named = {"dsa.{}.wq": ix.wq, "dsa.{}.wk": ix.wk, "dsa.{}.ww": ix.ww}
        named |= {"seer.{}.wq": gate.wq, "seer.{}.wk": gate.wk}
        for key, t in named.items():
            if t is not None:  # copies: safetensors refuses tensors that share memory
                tensors[key.format(i)] = t.detach().to("cpu", torch.float32).clone().contiguous()
    meta = {
        "format": FORMAT,
        "layers": str(selectors.layers),
        "seer_block_size": str(selectors.block_size),
        "dsa_heads": ",".join(str(ix.heads) for ix in selectors.indexers),
        "info": json.dumps(selectors.meta, sort_keys=True),
    }
    path = Path(path)
    save_file(tensors, str(path), metadata=meta)
    return path


def load_selectors(path: str | os.PathLike) -> Selectors:
    """Read a selectors file written by `save_selectors` (a directory: the file inside it)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / SELECTORS_FILE
    if not path.is_file():
        raise InputError("path", f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types
        raise InputError("path", f"{path} is not a readable safetensors file: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise InputError("path", f"{path} is not a hetmem selectors file (format {FORMAT})")
    try:
        layers = int(meta["layers"])
        heads = [int(h) for h in meta["dsa_heads"].split(",")]
        block_size = int(meta["seer_block_size"])
    except (KeyError, ValueError) as exc:
        raise InputError("path", f"{path} has malformed metadata: {exc}") from exc
    try:
        indexers = [
            IndexerWeights(
                tensors[f"dsa.{i}.wq"], tensors[f"dsa.{i}.wk"], tensors.get(f"dsa.{i}.ww"), heads[i]
            )
            for i in range(layers)
        ]
        gates = [
            GateWeights(tensors[f"seer.{i}.wq"], tensors[f"seer.{i}.wk"]) for i in range(layers)
        ]
    except KeyError as exc:
        raise InputError("path", f"{path} lacks tensor {exc}") from exc
    try:
        info = json.loads(meta.get("info", "{}"))
    except ValueError as exc:
        raise InputError("path", f"{path} has malformed metadata: info: {exc}") from exc
    return Selectors(indexers, gates, block_size, info)


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime: float) -> Selectors:
    return load_selectors(path)


def model_dir(model: Any) -> Path | None:
    """The local directory a transformers model was loaded from, if any."""
    name = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", None
    )
    if not name:
        return None
    path = Path(name)
    return path if path.is_dir() else None


def selectors_for(model: Any) -> Selectors | None:
    """The trained selectors shipped beside the model's directory, or None."""
    directory = model_dir(model)
    if directory is None:
        return None
    path = directory / SELECTORS_FILE
    if not path.is_file():
        return None
    selectors = _load_cached(str(path), path.stat().st_mtime)
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    if selectors.layers != layers:
        raise InputError(
            "model",
            f"{path} holds {selectors.layers} layers of selectors, the model has {layers}: "
            "rerun `hetmem calibrate`",
        )
    return selectors


def trained_spec(model: Any, method: Any, options: Mapping[str, Any] | None = None) -> Any:
    """What `wrap` should build for `method`: the trained per-layer callable when `method`
    names a trained selector, the model ships weights and the options give none; else
    `method` unchanged."""
    if not isinstance(method, str) or method not in TRAINED_METHODS:
        return method
    if options and "weights" in options:
        return method
    selectors = selectors_for(model)
    if selectors is None:
        return method
    return selectors.spec(method, options)
