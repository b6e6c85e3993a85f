"""`placement="auto"` for `Pipeline`, `wrap` and `hetmem run`: the planner's choice for a
shape on a system, as the placement string those take, with the explanation.

The devices default to the local GPU's built-in profile (by its name: an H100 is
`H100-SXM`, ...), or, on a machine without a known GPU, a CPU profile with assumed figures
(run `hetmem profile-device` and pass its file as `gpu=` for measured ones), and a U55C.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from ..methods import RAG_METHODS
from .devices import BUILTIN, DeviceProfile, Efficiency, Figure, get_device
from .planner import OBJECTIVES, plan
from .schedule import System, _method
from .shape import ModelConfig, Shape

AUTO = "auto"
DEFAULT_CARD = "U55C"

_CPU_CITE = "assumed figures of a server CPU socket (no microbenchmark run)"
_CPU_NOTE = "assumed; `hetmem profile-device` measures this machine"
#: A CPU as the system model's compute device when no GPU is present: assumed figures.
CPU_ASSUMED = DeviceProfile(
    "CPU (assumed)", "gpu",
    {k: Figure(v, u, _CPU_CITE, "assumed", _CPU_NOTE) for k, v, u in (
        ("mem_bw", 100e9, "B/s"), ("fp16", 2e12, "FLOP/s"), ("bf16", 2e12, "FLOP/s"),
        ("fp32", 2e12, "FLOP/s"), ("int8", 4e12, "OP/s"), ("tdp_w", 200.0, "W"),
        ("idle_w", 30.0, "W"), ("pcie_gen", 4.0, ""), ("pcie_lanes", 16.0, ""),
        ("hbm_bytes", 256e9, "B"))},
    Efficiency(0.8, 0.5, 10e-6), "assumed", "a CPU socket, assumed figures",
)  # fmt: skip

#: Substrings of torch's device names and the built-in profile each maps to.
_GPU_NAMES = (("H200", "H200"), ("H100", "H100-SXM"), ("A100", "A100-80GB"), ("MI210", "MI210"))


def local_gpu() -> DeviceProfile:
    """The built-in profile of this machine's GPU, or `CPU_ASSUMED` without a known one."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        for part, profile in _GPU_NAMES:
            if part.lower() in name.lower():
                return BUILTIN[profile]
    return CPU_ASSUMED


def auto_system(gpu: str | DeviceProfile | None = None,
                card: str | DeviceProfile | None = DEFAULT_CARD) -> System:  # fmt: skip
    """The system `auto` plans for: `gpu` (default the local one) and `card`."""
    g = local_gpu() if gpu is None else get_device(gpu, "gpu")
    return System.of(g, card)


@dataclass
class AutoChoice:
    placement: str
    explanation: str
    shape: Shape
    system: System


def check_system(system: Any) -> System:
    if not isinstance(system, System):
        raise InputError(
            "system", "expected a hetmem.system.System or a (gpu, card) pair of profile names, "
            f"got {system!r}",
        )  # fmt: skip
    return system


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise InputError("objective", f"expected one of {OBJECTIVES}, got {objective!r}")
    return objective


def resolve(method: Any, shape: Shape, *, system: System | None = None,
            gpu: str | DeviceProfile | None = None, card: str | DeviceProfile | None = DEFAULT_CARD,
            objective: str = "latency") -> AutoChoice:  # fmt: skip
    """The planner's placement for `method` at `shape` (a method without an FPGA kernel:
    the GPU alone, said in the explanation)."""
    check_objective(objective)
    if not isinstance(shape, Shape):
        raise InputError("shape", f"expected a hetmem.system.Shape, got {type(shape).__name__}")
    system = system if system is not None else auto_system(gpu, card)
    method = _method(method)
    if method.kernel is None:
        return AutoChoice("gpu/gpu/gpu/gpu", f"method {method.name!r} has no FPGA kernel: "
                          "every step on the GPU", shape, system)  # fmt: skip
    p = plan(method, shape, system, objective=objective)
    head = (f"{method.name} on {shape.model.name}, context {shape.context}, batch {shape.batch}, "
            f"budget {shape.budget}, {system.label}:\n")  # fmt: skip
    return AutoChoice(p.choice.placement, head + p.explain(), shape, system)


def layer_model(data: Any, q_heads: int | None = None, name: str = "pipeline layer") -> ModelConfig:
    """A one-layer model config of a KV cache's geometry (what a lone `Pipeline` holds):
    keys [batch, kv_heads, tokens, dim]; `q_heads` defaults to the KV heads."""
    keys = getattr(data, "keys", None)
    shape = getattr(keys, "shape", None)
    if shape is None or len(shape) != 4:
        raise InputError("placement", "'auto' without a shape needs a KVCache (keys [B, H, S, D]) "
                         "to plan from; pass shape=hetmem.system.Shape(...)")  # fmt: skip
    _, hkv, _, d = (int(x) for x in shape)
    hq = q_heads or hkv
    return ModelConfig.from_dict({"name": name, "hidden_size": hq * d, "num_hidden_layers": 1,
                                  "num_attention_heads": hq, "num_key_value_heads": hkv,
                                  "head_dim": d, "intermediate_size": 4 * hq * d,
                                  "vocab_size": 1})  # fmt: skip


def shape_from_data(method: Any, data: Any, budget: int = 2048) -> Shape:
    """The decode shape of a memory about to be prepared: a KV cache's batch and tokens
    (one layer of its geometry), or a RAG corpus's tokens."""
    method = _method(method)
    if method.name in RAG_METHODS:
        tokens = _corpus_tokens(data)
        model = ModelConfig.from_dict({"name": "rag", "hidden_size": 4096, "num_hidden_layers": 1,
                                       "num_attention_heads": 32, "intermediate_size": 14336,
                                       "vocab_size": 1})  # fmt: skip
        return Shape(model, max(tokens, 1), 1, budget=budget)
    model = layer_model(data)
    b, _, s, _ = (int(x) for x in data.keys.shape)
    return Shape(model, max(s, 1), max(b, 1), budget=budget)


def _corpus_tokens(data: Any) -> int:
    docs = getattr(data, "texts", None)  # hetmem.text.Documents
    if docs is None and isinstance(data, list | tuple):
        docs = data
    if docs is not None:
        return sum(len(str(d).split()) for d in docs)  # words as tokens
    raise InputError("placement", "'auto' cannot tell the corpus's size; pass shape=Shape(...)")


def model_from_hf_config(config: Any) -> ModelConfig:
    """The cost model's config of a transformers model's config."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    if isinstance(data.get("text_config"), Mapping):
        data = {**data["text_config"], **{k: v for k, v in data.items() if k != "text_config"}}
    data.setdefault("name", data.get("_name_or_path") or data.get("model_type") or "model")
    return ModelConfig.from_dict(data, "the model's config")
