"""placement="auto": the planner's choice (`hetmem.system.auto`) in `Pipeline` and `wrap`;
it equals exhaustive evaluation and follows the costs."""

from __future__ import annotations

import warnings

import pytest
import torch

from hetmem.attention import AttentionQuery, KVCache
from hetmem.errors import InputError
from hetmem.methods import get
from hetmem.pipeline import Pipeline
from hetmem.pipeline import normalize_placement as norm
from hetmem.system import (
    BUILTIN,
    Figure,
    ProfileError,
    Shape,
    System,
    auto,
    get_model,
    schedule,
    schedule_energy,
)
from hetmem.system.planner import placements

LLAMA = get_model("Llama-3.1-8B")
GPU_ALONE, OFFLOAD = "gpu/gpu/gpu/gpu", "gpu/fpga/fpga/gpu"


def fast_system() -> System:
    """MI210 and a hypothetical U55C whose engine runs 50x faster (15 GHz)."""
    card = BUILTIN["U55C"].with_figures(clock_hz=Figure(15e9, "Hz", "hypothetical", "assumed"))
    return System.of("MI210", card)


@pytest.mark.parametrize("objective", ["latency", "energy"])
@pytest.mark.parametrize("system", ["paper", "fast"])
def test_auto_equals_exhaustive_evaluation(objective, system):
    system = System.of("MI210", "U55C") if system == "paper" else fast_system()
    shape = Shape(LLAMA, 131072, 16)
    choice = auto.resolve("quest", shape, system=system, objective=objective)
    costs = {}
    for placement in placements():
        try:
            norm(placement)
        except InputError:
            continue
        kind = "gpu" if placement == GPU_ALONE else "overlapped"
        sched = schedule("quest", shape, system, kind, placement=placement)
        costs[placement] = sched.seconds if objective == "latency" else schedule_energy(sched).total
    assert set(costs) == {GPU_ALONE, OFFLOAD}
    assert choice.placement == min(costs, key=costs.get)
    assert choice.placement in choice.explanation and objective in choice.explanation


def test_auto_follows_the_costs():
    short = Shape(LLAMA, 4096, 1)
    assert auto.resolve("quest", short, system=System.of("MI210", "U55C")).placement == GPU_ALONE
    long = Shape(LLAMA, 131072, 16)
    assert auto.resolve("quest", long, system=System.of("MI210", "U55C")).placement == GPU_ALONE
    assert auto.resolve("quest", long, system=fast_system()).placement == OFFLOAD
    # with the fast card, still the GPU alone where the context fits the budget
    assert auto.resolve("quest", Shape(LLAMA, 2048, 1), system=fast_system()).placement == GPU_ALONE


def test_pipeline_auto_in_the_constructor_and_at_prepare():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = Pipeline(get("quest"), placement="auto", shape=Shape(LLAMA, 4096, 1),
                        system=("MI210", "U55C"))  # fmt: skip
        assert (
            pipe.placement == norm(GPU_ALONE) and "chosen gpu/gpu/gpu/gpu" in pipe.plan_explanation
        )
        pipe = Pipeline(get("quest"), placement="auto", shape=Shape(LLAMA, 131072, 16),
                        system=fast_system(), fpga="emu")  # fmt: skip
        assert pipe.placement == norm(OFFLOAD) and pipe.fpga_stage is not None
        # without a shape: the GPU alone until prepare plans for the memory's shape
        pipe = Pipeline(
            get("quest", page_size=16), placement="auto", system=fast_system(), fpga="emu"
        )
        assert pipe.plan_explanation is None and pipe.fpga_stage is None
        b, s = 8, 65536
        pipe.prepare(KVCache(torch.randn(b, 2, s, 32), torch.randn(b, 2, s, 32)))
        assert f"context {s}, batch {b}" in pipe.plan_explanation
        shape = auto.shape_from_data(
            pipe.method, KVCache(torch.zeros(b, 2, s, 32), torch.zeros(b, 2, s, 32))
        )
        want = auto.resolve(pipe.method, shape, system=fast_system()).placement
        assert pipe.placement == norm(want)
        out = pipe.step(AttentionQuery(torch.randn(b, 2, 1, 32)), budget=512)
        assert out.shape == (b, 2, 1, 32)


def test_auto_bad_input_is_named():
    with pytest.raises(InputError, match="objective"):
        Pipeline(get("quest"), placement="auto", objective="cheapest")
    with pytest.raises(ProfileError, match="unknown device"):
        Pipeline(get("quest"), placement="auto", system=("MI999", "U55C"))
    with pytest.raises(ProfileError, match="is a gpu"):
        auto.auto_system("MI210", "H100-SXM")
    with pytest.raises(InputError, match="shape"):
        auto.resolve("quest", "32k")
    pipe = Pipeline(get("quest"), placement="auto", system=("MI210", "U55C"))
    with pytest.raises(InputError, match="placement"):
        auto.shape_from_data(pipe.method, torch.zeros(3))


def test_local_gpu_profile():
    profile = auto.local_gpu()
    assert profile.kind == "gpu"
    if not torch.cuda.is_available():
        assert profile is auto.CPU_ASSUMED and profile.figures["mem_bw"].source == "assumed"


def test_wrap_auto_plans_for_the_models_config():
    transformers = pytest.importorskip("transformers")
    from hetmem.models import unwrap, wrap
    from hetmem.models.wrap import plan_explanation

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    wrap(model, "quest", budget=64, method_options={"page_size": 8}, placement="auto",
         auto_options={"context": 64, "system": System.of("MI210", "U55C")})  # fmt: skip
    try:
        state = model._hetmem_wrap
        assert state.settings.placement == dict.fromkeys(
            ("prepare", "relevancy", "retrieval", "apply"), "cpu"
        )
        assert "context 64, batch 1" in plan_explanation(model)
    finally:
        unwrap(model)
    wrap(model, "quest", budget=64, method_options={"page_size": 8}, placement="auto",
         fpga="emu", auto_options={"context": 1 << 20, "batch": 1, "system": fast_system()})  # fmt: skip
    try:
        place = model._hetmem_wrap.settings.placement
        assert place["relevancy"] == place["retrieval"] == "fpga" and place["apply"] == "cpu"
    finally:
        unwrap(model)
    with pytest.raises(InputError, match="auto_options"):
        wrap(model, "quest", budget=64, placement="auto", auto_options={"contex": 1})
    with pytest.raises(InputError, match="auto_options"):
        wrap(model, "quest", budget=64, auto_options={"context": 1})
    with pytest.raises(InputError, match="objective"):
        wrap(model, "quest", budget=64, placement="auto", auto_options={"objective": "x"})
