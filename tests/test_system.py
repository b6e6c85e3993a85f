"""The system model: device profiles, model configs, the methods' step costs, schedules,
energy, and the placement planner. Model figures are checked for their structure and
against the functions they must equal, never against timings of this machine."""

from __future__ import annotations

import json
import sys
import types
import warnings

import pytest
import torch

from hetmem import kernels
from hetmem.fpga import pcie
from hetmem.methods import get, names
from hetmem.system import (
    BUILTIN,
    LINKS,
    ConfigError,
    ModelConfig,
    ProfileError,
    Shape,
    System,
    fpga_seconds,
    get_device,
    get_model,
    load_profile,
    memory_share,
    method_costs,
    plan,
    schedule,
    schedule_energy,
    shipped_configs,
)
from hetmem.system.devices import REQUIRED, profile_from_dict
from hetmem.system.energy import NvmlMeter, RocmSmiMeter, XrtMeter, measure_energy
from hetmem.system.planner import placements

SMALL = {"name": "small", "hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 2, "head_dim": 64, "intermediate_size": 1024, "vocab_size": 1000}  # fmt: skip


@pytest.fixture(scope="module")
def mi210_u55c() -> System:
    return System.of("MI210", "U55C")


# -- profiles --------------------------------------------------------------------------------


def test_builtin_profiles_cite_every_figure():
    for name in ("MI210", "A100-80GB", "H100-SXM", "H200", "U55C", "U280"):
        p = get_device(name)
        for field in REQUIRED[p.kind]:
            fig = p.figures[field]
            assert fig.cite and fig.source in ("datasheet", "assumed", "derived", "reported")
        assert p.figures["idle_w"].source == "assumed"  # no data sheet gives it: said so
    assert get_device("U55C").clock_hz == kernels.DEFAULT_CLOCK_HZ  # the manifest's 300 MHz
    assert LINKS["p2p-gen3"].source == "reported" and 7.0e9 <= LINKS["p2p-gen3"].bandwidth <= 7.6e9


def test_gen3_link_is_the_emulated_cards_link():
    for n in (0, 1, 4096, 1 << 20):
        assert LINKS["pcie3-x16"].seconds(n) == pcie.GEN3_X16.seconds(n)


def test_bad_device_names_and_files(tmp_path):
    with pytest.raises(ProfileError, match="unknown device"):
        get_device("MI999")
    with pytest.raises(ProfileError, match="is a fpga"):
        get_device("U55C", "gpu")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ProfileError, match="not valid json"):
        load_profile(bad)
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"name": "X", "kind": "gpu", "figures": {"mem_bw": 1e12}}))
    with pytest.raises(ProfileError, match="lacks"):
        load_profile(missing)
    with pytest.raises(ProfileError, match="unknown figure"):
        profile_from_dict({"name": "X", "kind": "gpu", "figures": {"speed": 1}})
    with pytest.raises(ProfileError, match="finite number"):
        profile_from_dict({"name": "X", "kind": "gpu", "figures": {"mem_bw": -1}})


def test_user_profile_from_toml_and_json(tmp_path):
    base = get_device("MI210").to_json()
    path = tmp_path / "gpu.json"
    base["name"] = "my-gpu"
    path.write_text(json.dumps(base))
    assert get_device(str(path)).mem_bw == get_device("MI210").mem_bw
    toml = tmp_path / "card.toml"
    toml.write_text(
        'name = "my-card"\nkind = "fpga"\ncite = "my lab, 2025"\nsource = "measured"\n'
        "[figures]\nmem_bw = 4.6e11\ntdp_w = 75\nidle_w = 20\npcie_gen = 3\npcie_lanes = 16\n"
        "hbm_bytes = 1.6e10\nhbm_channels = 32\nclock_hz = 2.5e8\n"
    )
    card = load_profile(toml)
    assert card.figures["tdp_w"].source == "measured" and card.clock_hz == 2.5e8


# -- configs and costs -----------------------------------------------------------------------


def test_shipped_configs_and_bad_config(tmp_path):
    got = {get_model(p).name for p in shipped_configs().values()}
    assert {"Llama-3.1-8B", "Llama-3.1-70B", "Qwen3-32B", "GPT-OSS-120B", "DeepSeek-V3.2"} <= got
    ds = get_model("DeepSeek-V3.2")
    assert ds.mla and ds.attn_kv_heads == 1 and ds.attn_qk_dim == 576 and ds.index_heads == 64
    assert get_model("GPT-OSS-120B").full_layers == 18
    with pytest.raises(ConfigError, match="num_attention_heads"):
        ModelConfig.from_dict({k: v for k, v in SMALL.items() if k != "num_attention_heads"})
    with pytest.raises(ConfigError, match="unknown model"):
        get_model("no-such-model")
    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    assert get_model(tmp_path).q_heads == 8


@pytest.mark.parametrize("name", names())
def test_method_costs_follow_the_shape(name):
    model = get_model("Llama-3.1-8B")
    small = method_costs(get(name), Shape(model, 32768, 2))
    large = method_costs(get(name), Shape(model, 65536, 2))
    assert {"prepare", "relevancy", "retrieval", "apply", "fpga"} <= set(small)
    assert large["relevancy"].nbytes > small["relevancy"].nbytes  # scans the whole memory
    assert large["fpga"].kernel == get(name).kernel
    assert fpga_seconds(large["fpga"], get_device("U55C")) > fpga_seconds(
        small["fpga"], get_device("U55C")
    )


@pytest.mark.parametrize(
    ("name", "options"), [("quest", {"page_size": 16}), ("dsa", {}), ("seer", {"block_size": 32})]
)
def test_emulated_card_times_are_the_schedules(name, options):
    """The FPGA step of a schedule is the time an `emu` run of that kernel reports for the
    same shape: one function (the spec's cycle model at the manifest's clock)."""
    from hetmem.attention import AttentionQuery, KVCache
    from hetmem.pipeline import Pipeline

    torch.manual_seed(0)
    b, s, budget = 2, 1024, 256
    model = ModelConfig.from_dict(SMALL)
    kv = KVCache(torch.randn(b, 2, s, 64), torch.randn(b, 2, s, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = Pipeline(get(name, **options), placement="gpu/fpga/fpga/gpu", fpga="emu")
        pipe.prepare(kv)
        pipe.step(AttentionQuery(torch.randn(b, 8, 1, 64)), budget=budget)
    (run,) = [r for r in pipe.profile.records if r.step == "relevancy+retrieval"]
    costs = method_costs(pipe.method, Shape(model, s, b, budget=budget))
    assert run.source == "modeled"
    assert fpga_seconds(costs["fpga"], get_device("U55C")) == pytest.approx(run.seconds, rel=1e-12)
    sched = schedule(pipe.method, Shape(model, s, b, budget=budget), System.of("MI210", "U55C"))
    card = [sp for sp in sched.parts[0].timeline.spans if sp.lane == "fpga"]
    assert len(card) == model.layers and card[0].seconds == pytest.approx(run.seconds, rel=1e-12)


# -- schedules and energy --------------------------------------------------------------------


def test_schedules(mi210_u55c):
    shape = Shape(get_model("Llama-3.1-8B"), 131072, 8)
    gpu = schedule("quest", shape, mi210_u55c, "gpu")
    seq = schedule("quest", shape, mi210_u55c, "sequential")
    ovl = schedule("quest", shape, mi210_u55c, "overlapped")
    assert gpu.system.card is None and gpu.busy("fpga") == gpu.busy("link") == 0
    assert seq.busy("fpga") > 0 and seq.busy("link") > 0
    tl = ovl.parts[0].timeline
    assert tl.makespan < tl.serial  # the card and the GPU overlap
    assert 0 < memory_share(gpu) < 1
    one = shape.with_(batch=1)
    assert schedule("quest", one, mi210_u55c, "overlapped").seconds == pytest.approx(
        schedule("quest", one, mi210_u55c, "sequential").seconds
    )
    req = schedule("quest", shape, mi210_u55c, "sequential", per="request", new_tokens=10)
    assert req.seconds == pytest.approx(req.parts[0].timeline.makespan + 10 * seq.seconds)
    for rag in ("dense_rag", "bm25_rag"):
        r = schedule(rag, shape, mi210_u55c, "sequential", per="request", new_tokens=4)
        assert r.parts[0].timeline.busy("fpga") > 0
    with pytest.raises(Exception, match="kind"):
        schedule("quest", shape, mi210_u55c, "fastest")


def test_modeled_energy_is_power_times_time(mi210_u55c):
    shape = Shape(get_model("Llama-3.1-8B"), 65536, 4)
    seq = schedule("seer", shape, mi210_u55c, "sequential")
    e = schedule_energy(seq)
    gpu, card = get_device("MI210"), get_device("U55C")
    t = seq.seconds
    expect = gpu.busy_w * seq.busy("gpu") + gpu.idle_w * (t - seq.busy("gpu"))
    expect_card = card.busy_w * seq.busy("fpga") + card.idle_w * (t - seq.busy("fpga"))
    assert e.joules == pytest.approx({"MI210": expect, "U55C": expect_card})
    assert e.source == "modeled"
    assert set(schedule_energy(schedule("seer", shape, mi210_u55c, "gpu")).joules) == {"MI210"}


def test_measured_power_readers_with_stand_ins(monkeypatch):
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetPowerUsage=lambda h: 250_000,  # mW
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert NvmlMeter(0).watts() == 250.0
    rocm = RocmSmiMeter(
        runner=lambda cmd: json.dumps({"card0": {"Average Graphics Package Power (W)": "123.0"}})
    )
    assert rocm.watts() == 123.0
    xrt = XrtMeter(
        runner=lambda cmd: json.dumps(
            {"devices": [{"electrical": {"power_consumption_watts": "31.5"}}]}
        )
    )
    assert xrt.watts() == 31.5
    result, energy = measure_energy(lambda: 7, {"gpu": NvmlMeter(0)}, interval_s=0.01)
    assert result == 7 and energy.source == "measured"
    assert energy.joules["gpu"] == pytest.approx(250.0 * energy.seconds, rel=0.5, abs=0.5)
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(Exception, match="pynvml"):
        NvmlMeter(0)


# -- the planner -----------------------------------------------------------------------------


def test_planner_matches_exhaustive_evaluation(mi210_u55c):
    shape = Shape(get_model("DeepSeek-V3.2"), 32768, 1)
    for objective in ("latency", "energy"):
        p = plan("seer", shape, mi210_u55c, objective=objective)
        assert len(p.candidates) == len(placements()) == 16
        valid = [c for c in p.candidates if c.valid]
        assert {c.placement for c in valid} == {"gpu/gpu/gpu/gpu", "gpu/fpga/fpga/gpu"}
        assert all(c.reason for c in p.candidates if not c.valid)
        best = min(valid, key=lambda c: c.cost(objective))
        assert p.choice.placement == best.placement
        for c in valid:  # each candidate's cost is its schedule's
            kind = "gpu" if c.placement == "gpu/gpu/gpu/gpu" else "overlapped"
            sched = schedule("seer", shape, mi210_u55c, kind, placement=c.placement)
            assert c.seconds == pytest.approx(sched.seconds)
            assert c.joules == pytest.approx(schedule_energy(sched).total)
        assert p.choice.placement in p.explain()


def test_planner_choice_follows_the_costs(mi210_u55c):
    """GPU alone where the card's engine is the bottleneck; the card once its engine is
    fast enough (a hypothetical card profile with a 50x clock), and never without a card."""
    shape = Shape(get_model("Llama-3.1-8B"), 131072, 16)
    assert plan("quest", shape, mi210_u55c).choice.placement == "gpu/gpu/gpu/gpu"
    fast = BUILTIN["U55C"].with_figures(clock_hz=BUILTIN["U55C"].figures["tdp_w"].__class__(
        15e9, "Hz", "hypothetical", "assumed"))  # fmt: skip
    faster = System.of("MI210", fast)
    assert plan("quest", shape, faster).choice.placement == "gpu/fpga/fpga/gpu"
    short = shape.with_(context=4096, batch=1)
    alone = System.of("MI210", None)
    assert plan("quest", short, alone).choice.placement == "gpu/gpu/gpu/gpu"
    assert plan("quest", short, faster).choice.placement in ("gpu/gpu/gpu/gpu", "gpu/fpga/fpga/gpu")
    with pytest.raises(Exception, match="objective"):
        plan("quest", short, faster, objective="cheapest")
