"""What a cost is computed for: a model's config (`ModelConfig`), a decode shape (`Shape`:
context, batch, budget), and a step's bytes and FLOPs (`StepCost`). No torch here: the
methods' `costs(shape)` build `StepCost`s from these.

Counting conventions (the README's "Does GPU+FPGA pay off?" lists them): weights and the KV
cache in the model's dtype (2 bytes unless the config says `weight_bytes` /
`expert_weight_bytes` / `kv_bytes`), a multiply-add is 2 FLOPs, weights are read once per
step and micro-batch, activations are not counted (they are small beside weights and KV).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import InputError

CONFIGS = Path(__file__).with_name("configs")
#: Passes of a GPU top-k over its scores (torch.topk's radix select: a histogram pass and a
#: gather pass over the scores); assumed.
TOPK_PASSES = 2


class ConfigError(InputError):
    """A model config without a field a cost needs, or a malformed one."""


@dataclass(frozen=True)
class StepCost:
    """One step's work: bytes it moves through the device's memory (or over a link), the
    FLOPs it computes (`dtype` says which peak applies), the kernels it launches. An FPGA
    step names its `kernel` and the keyword arguments of the spec's `cycles` (`call`)."""

    nbytes: int
    flops: int = 0
    launches: int = 1
    dtype: str = "fp16"
    note: str = ""
    kernel: str | None = None
    call: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("nbytes", "flops", "launches"):
            object.__setattr__(self, name, round(getattr(self, name)))
        if self.nbytes < 0 or self.flops < 0 or self.launches < 0:
            raise InputError("cost", f"negative bytes, FLOPs or launches: {self}")

    def scaled(self, times: int) -> StepCost:
        return replace(self, nbytes=self.nbytes * times, flops=self.flops * times,
                       launches=self.launches * times)  # fmt: skip


def _int(data: Mapping[str, Any], key: str, origin: str, default: Any = None) -> int:
    value = data.get(key, default)
    if value is None:
        raise ConfigError(key, f"{origin} lacks {key!r}, which the cost model needs")
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(key, f"{origin}: expected a non-negative number, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class ModelConfig:
    """The fields of a transformers config.json that a cost needs, and what follows."""

    name: str
    hidden: int
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    experts: int = 0
    experts_active: int = 0
    shared_experts: int = 0
    moe_intermediate: int = 0
    dense_layers: int = 0  # leading layers with a dense FFN in an MoE model
    q_lora_rank: int = 0
    kv_lora_rank: int = 0  # MLA: the latent KV cache
    qk_rope_dim: int = 0
    qk_nope_dim: int = 0
    v_head_dim: int = 0
    sliding_window: int = 0
    full_layers: int = 0  # layers with full attention (the method's memory lives there)
    index_heads: int = 0  # DSA's lightning indexer
    index_dim: int = 0
    index_topk: int = 0
    weight_bytes: float = 2.0
    expert_weight_bytes: float = 2.0
    kv_bytes: int = 2
    source: str = ""

    @classmethod
    def from_dict(cls, data: Any, origin: str = "config") -> ModelConfig:
        if not isinstance(data, Mapping):
            raise ConfigError("config", f"{origin}: expected a JSON object")
        data = {**data.get("text_config", {}), **data}  # multimodal configs nest it
        hidden = _int(data, "hidden_size", origin)
        layers = _int(data, "num_hidden_layers", origin)
        heads = _int(data, "num_attention_heads", origin)
        experts = _int(data, "n_routed_experts", origin,
                       data.get("num_local_experts", data.get("num_experts", 0)))  # fmt: skip
        inter = _int(data, "intermediate_size", origin, 0 if experts else None)
        window = _int(data, "sliding_window", origin, 0) if data.get("sliding_window") else 0
        pattern = data.get("layer_types_pattern") or data.get("layer_types")
        full = layers
        if window and data.get("use_sliding_window") is False:
            window = 0  # (Qwen configs carry a window they do not use)
        elif window and isinstance(pattern, list) and pattern:
            full = layers * sum(p == "full_attention" for p in pattern) // len(pattern)
        elif window:
            full = 0  # every layer slides (Mistral): no long-context memory to process
        wb = float(data.get("weight_bytes", 2))
        return cls(
            name=str(data.get("name") or data.get("_name_or_path") or origin),
            hidden=hidden,
            layers=layers,
            q_heads=heads,
            kv_heads=_int(data, "num_key_value_heads", origin, heads),
            head_dim=_int(data, "head_dim", origin, hidden // max(heads, 1)),
            intermediate=inter,
            vocab=_int(data, "vocab_size", origin),
            experts=experts,
            experts_active=_int(data, "num_experts_per_tok", origin, 0) if experts else 0,
            shared_experts=_int(data, "n_shared_experts", origin, 0),
            moe_intermediate=_int(data, "moe_intermediate_size", origin, inter) if experts else 0,
            dense_layers=_int(data, "first_k_dense_replace", origin, 0) if experts else 0,
            q_lora_rank=_int(data, "q_lora_rank", origin, 0),
            kv_lora_rank=_int(data, "kv_lora_rank", origin, 0),
            qk_rope_dim=_int(data, "qk_rope_head_dim", origin, 0),
            qk_nope_dim=_int(data, "qk_nope_head_dim", origin, 0),
            v_head_dim=_int(data, "v_head_dim", origin, 0),
            sliding_window=window,
            full_layers=full,
            index_heads=_int(data, "index_n_heads", origin, 0),
            index_dim=_int(data, "index_head_dim", origin, 0),
            index_topk=_int(data, "index_topk", origin, 0),
            weight_bytes=wb,
            expert_weight_bytes=float(data.get("expert_weight_bytes", wb)),
            kv_bytes=_int(data, "kv_bytes", origin, 2),
            source=str(data.get("_source", origin)),
        )

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise ConfigError("config", f"cannot read {path}: {exc}") from None
        except ValueError as exc:
            raise ConfigError("config", f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(data, str(path))

    # -- attention geometry (what the methods' memory sees) ------------------------------
    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def attn_kv_heads(self) -> int:
        """KV heads of the cache the methods index (MLA's latent cache: one)."""
        return 1 if self.mla else self.kv_heads

    @property
    def attn_qk_dim(self) -> int:
        """Key width per KV head (MLA absorbed: latent + RoPE part)."""
        return self.kv_lora_rank + self.qk_rope_dim if self.mla else self.head_dim

    @property
    def attn_v_dim(self) -> int:
        return self.kv_lora_rank if self.mla else self.head_dim

    @property
    def kv_token_bytes(self) -> int:
        """KV cache bytes per token and layer (MLA: the latent, shared by keys and values)."""
        if self.mla:
            return self.attn_qk_dim * self.kv_bytes
        return self.kv_heads * 2 * self.head_dim * self.kv_bytes

    @property
    def attn_params(self) -> tuple[int, int]:
        """Parameters of a layer's attention projections: (in: Q, K, V; out: O)."""
        h, hq = self.hidden, self.q_heads
        if self.mla:
            q = (
                h * self.q_lora_rank + self.q_lora_rank * hq * (self.qk_nope_dim + self.qk_rope_dim)
                if self.q_lora_rank
                else h * hq * (self.qk_nope_dim + self.qk_rope_dim)
            )
            kv = h * (self.kv_lora_rank + self.qk_rope_dim)
            kv += self.kv_lora_rank * hq * (self.qk_nope_dim + self.v_head_dim)
            return q + kv, hq * self.v_head_dim * h  # fmt: skip
        d = self.head_dim
        return h * (hq + 2 * self.kv_heads) * d, hq * d * h

    def moe_layer(self, layer: int) -> bool:
        return self.experts > 0 and layer >= self.dense_layers


@dataclass(frozen=True)
class Shape:
    """One decode step of a batch: `batch` rows of `context` tokens each, `queries` new
    tokens per row (1 in decode), a `budget` of tokens per query (attention methods) and the
    method's options. RAG: the corpus is `context` tokens in documents of `doc_tokens`, each
    query retrieves `rag_k` documents (`embed_dim`-wide embeddings; BM25 queries of
    `query_terms` terms, each in `term_df` of the documents)."""

    model: ModelConfig
    context: int
    batch: int = 1
    budget: int = 2048
    queries: int = 1
    doc_tokens: int = 256
    rag_k: int = 8
    embed_dim: int = 1024
    query_terms: int = 8
    term_df: float = 0.02
    question_tokens: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelConfig):
            raise InputError(
                "model",
                f"expected a ModelConfig (get_model(name)), got {type(self.model).__name__}",
            )
        for name in ("context", "batch", "budget", "queries", "doc_tokens", "rag_k",
                     "embed_dim", "query_terms"):  # fmt: skip
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(name, f"expected a positive int, got {v!r}")
        if not 0 < self.term_df <= 1:
            raise InputError("term_df", f"expected a share in (0, 1], got {self.term_df}")

    @property
    def tokens(self) -> int:
        """Query tokens of the step (batch x queries)."""
        return self.batch * self.queries

    @property
    def documents(self) -> int:
        return max(1, self.context // self.doc_tokens)

    def with_(self, **changes: Any) -> Shape:
        return replace(self, **changes)


def shipped_configs() -> dict[str, Path]:
    """The model configs shipped with hetmem, by model name (and file stem)."""
    out: dict[str, Path] = {}
    for path in sorted(CONFIGS.glob("*.json")):
        name = json.loads(path.read_text()).get("name", path.stem)
        out[name] = path
        out[path.stem] = path
    return out


def get_model(name: str | Path | ModelConfig) -> ModelConfig:
    """A shipped model config by name (Llama-3.1-8B, ...), or a local config.json / model
    directory."""
    if isinstance(name, ModelConfig):
        return name
    shipped = shipped_configs()
    if str(name) in shipped:
        return ModelConfig.load(shipped[str(name)])
    path = Path(name)
    if path.exists():
        return ModelConfig.load(path)
    names = sorted({ModelConfig.load(p).name for p in shipped.values()})
    raise ConfigError("model", f"unknown model {name!r}: not a shipped config {names} nor a path")
