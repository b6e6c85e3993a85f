"""Step times from step costs: a GPU step by roofline, an FPGA step by its kernel's cycle
model at the card's clock (the very function the emulated card times itself with), a
transfer by the link model. And the model's own work around the memory steps (QKV and O
projections, FFN or MoE experts, dense attention, the LM head, prefill), from its config.

Every time here is `modeled`.
"""

from __future__ import annotations

from typing import Any

from .. import kernels
from ..errors import InputError
from .accounting import dense_attention_cost
from .devices import DeviceProfile, Link
from .shape import ModelConfig, Shape, StepCost

#: The keys a method's `costs(shape)` returns.
METHOD_STEPS = ("prepare", "relevancy", "retrieval", "apply")
TRANSFER_STEPS = ("to_fpga", "fpga", "from_fpga")


def gpu_seconds(cost: StepCost, gpu: DeviceProfile) -> float:
    """Roofline: launches x launch cost + the larger of bytes / (bandwidth x efficiency) and
    FLOPs / (peak of the step's dtype x efficiency)."""
    eff = gpu.efficiency
    memory = cost.nbytes / (gpu.mem_bw * eff.bandwidth)
    compute = cost.flops / (gpu.peak(cost.dtype) * eff.flops) if cost.flops else 0.0
    return cost.launches * eff.launch_s + max(memory, compute)


def fpga_cycles(cost: StepCost) -> int:
    """The kernel's cycles for the step's launch: `kernels.get(kernel).cycles(**call)`."""
    if cost.kernel is None:
        raise InputError("cost", "an FPGA step needs the kernel it launches")
    return int(kernels.get(cost.kernel).cycles(**dict(cost.call)))


def fpga_seconds(cost: StepCost, card: DeviceProfile) -> float:
    """The kernel's cycles at the card's clock (the manifest's unless the profile says)."""
    return kernels.seconds(fpga_cycles(cost), card.clock_hz)


def link_seconds(cost: StepCost, link: Link) -> float:
    """One transfer of the step's bytes over the link."""
    return link.seconds(cost.nbytes)


def method_costs(method: Any, shape: Shape) -> dict[str, StepCost]:
    """The method's own accounting for one layer's decode step (RAG: one retrieval)."""
    costs = getattr(method, "costs", None)
    if costs is None:
        raise InputError("method", f"{getattr(method, 'name', method)!r} has no costs(shape)")
    out = costs(shape)
    missing = [s for s in METHOD_STEPS if s not in out]
    if missing:
        raise InputError("method", f"{method.name}.costs lacks {missing}")
    return out


# -- the model's own work ----------------------------------------------------------------


def method_layers(model: ModelConfig) -> list[bool]:
    """Per layer, whether it has full attention (where a method's memory lives), the
    `full_layers` of the model spread evenly (GPT-OSS alternates sliding and full)."""
    n, full = model.layers, model.full_layers
    return [(i + 1) * full // n > i * full // n for i in range(n)]


def layer_costs(shape: Shape, layer: int) -> dict[str, StepCost]:
    """A decode step's work in layer `layer` besides the memory steps: `qkv` (input
    projections), `o_ffn` (output projection and the FFN, or the router and the experts the
    batch's tokens touch), and `window` (dense attention over a sliding window, for layers
    without full attention)."""
    m, tokens = shape.model, shape.tokens
    p_in, p_out = m.attn_params
    wb = m.weight_bytes
    qkv = StepCost(p_in * wb + tokens * m.kv_token_bytes, 2 * tokens * p_in, launches=3,
                   note="QKV projections, RoPE, KV append")  # fmt: skip
    if m.moe_layer(layer):
        e, active = m.experts, m.experts_active
        touched = e * (1 - (1 - active / e) ** tokens)  # distinct experts the batch routes to
        expert = 3 * m.hidden * m.moe_intermediate
        nbytes = (touched * expert) * m.expert_weight_bytes
        nbytes += (m.shared_experts * expert + m.hidden * e + p_out) * wb
        flops = 2 * tokens * ((active + m.shared_experts) * expert + m.hidden * e + p_out)
        o_ffn = StepCost(nbytes, flops, launches=6,
                         note=f"O projection, router, {touched:.1f} of {e} experts touched")  # fmt: skip
    else:
        ffn = 3 * m.hidden * m.intermediate
        o_ffn = StepCost((ffn + p_out) * wb, 2 * tokens * (ffn + p_out), launches=4,
                         note="O projection and FFN")  # fmt: skip
    out = {"qkv": qkv, "o_ffn": o_ffn}
    if m.sliding_window:
        out["window"] = dense_attention_cost(shape, min(shape.context, m.sliding_window))
    return out


def head_cost(shape: Shape) -> StepCost:
    """The LM head of a decode step (and the final norm)."""
    m = shape.model
    return StepCost(m.hidden * m.vocab * m.weight_bytes, 2 * shape.tokens * m.hidden * m.vocab)


def prefill_layer_cost(shape: Shape, layer: int, tokens: int) -> StepCost:
    """Prefill of `tokens` tokens per row through one layer: every projection and the FFN
    (or the routed experts) on all tokens, causal attention."""
    m, b = shape.model, shape.batch
    p_in, p_out = m.attn_params
    if m.moe_layer(layer):
        ffn = (m.experts_active + m.shared_experts) * 3 * m.hidden * m.moe_intermediate
        weights = (m.experts + m.shared_experts) * 3 * m.hidden * m.moe_intermediate
    else:
        ffn = weights = 3 * m.hidden * m.intermediate
    flops = 2 * b * tokens * (p_in + p_out + ffn)
    span = (
        min(tokens, m.sliding_window)
        if m.sliding_window and not method_layers(m)[layer]
        else tokens
    )
    flops += (
        2
        * b
        * m.q_heads
        * (m.attn_qk_dim + m.attn_v_dim)
        * tokens
        * span
        // (1 if span < tokens else 2)
    )
    nbytes = (p_in + p_out) * m.weight_bytes + weights * m.expert_weight_bytes
    nbytes += b * tokens * m.kv_token_bytes
    return StepCost(nbytes, flops, launches=10, note=f"prefill of {tokens} tokens")
