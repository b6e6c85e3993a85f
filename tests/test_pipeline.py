"""The Pipeline: placement, per-step profile with sources, memory reuse across decode steps."""

import warnings

import pytest
import torch

from hetmem import device as hdevice
from hetmem.attention import KVChunk
from hetmem.methods import get
from hetmem.pipeline import Pipeline, normalize_placement
from hetmem.profile import Profile, StepRecord
from hetmem.synthetic import synthetic_kv


def test_step_profile_has_every_step_with_device_time_bytes_and_source():
    kv, query = synthetic_kv(length=512, seed=1)
    pipe = Pipeline(get("dsa"))
    pipe.prepare(kv)
    assert [r.step for r in pipe.profile.records] == ["prepare"]
    pipe.step(query, budget=64)
    records = pipe.profile.by_step()
    assert list(records) == ["relevancy", "retrieval", "apply"]
    for rec in records.values():
        assert rec.source == "measured"
        assert rec.seconds > 0
        assert rec.nbytes > 0
        assert rec.device.startswith("gpu")
    # Apply reads only the selected tokens: far fewer bytes than the cache holds.
    assert records["apply"].nbytes < pipe.memory.kv.nbytes / 4


def test_memory_is_built_once_and_grows_by_appends():
    kv, query = synthetic_kv(length=256, seed=2)
    method = get("quest", page_size=16)
    calls = {"prepare": 0}
    original = method.prepare

    def counting_prepare(data):
        calls["prepare"] += 1
        return original(data)

    method.prepare = counting_prepare
    pipe = Pipeline(method)
    memory = pipe.prepare(kv)
    gen = torch.Generator().manual_seed(0)
    for i in range(20):
        pipe.append(
            KVChunk(
                torch.randn(2, 2, 1, 64, generator=gen), torch.randn(2, 2, 1, 64, generator=gen)
            )
        )
        pipe.step(query, budget=64)
        assert pipe.memory is memory
        assert memory.kv.lengths.tolist() == [257 + i, 257 + i]
    assert calls["prepare"] == 1
    assert memory.entries == -(-276 // 16)
    assert len(pipe.history) == 1 + 20 * 2


def test_placement_shorthand_and_defaults():
    assert normalize_placement("gpu/fpga/fpga/gpu") == {
        "prepare": "gpu",
        "relevancy": "fpga",
        "retrieval": "fpga",
        "apply": "gpu",
    }
    assert normalize_placement({"apply": "cpu"})["relevancy"] == "gpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback only happens without a GPU")
def test_gpu_placement_without_a_gpu_runs_on_cpu_and_says_so_once():
    hdevice.gpu_device.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert hdevice.torch_device("gpu") == torch.device("cpu")
        assert hdevice.torch_device("gpu") == torch.device("cpu")
        kv, query = synthetic_kv(length=128, seed=3)
        pipe = Pipeline(get("seer", block_size=16))
        pipe.prepare(kv)
        pipe.step(query, budget=32)
    said = [w for w in caught if "no CUDA or ROCm GPU" in str(w.message)]
    assert len(said) == 1


def test_profile_never_adds_different_sources():
    profile = Profile()
    profile.add(StepRecord("relevancy", "fpga (emu)", 2e-3, "modeled"))
    profile.add(StepRecord("apply", "gpu (cpu)", 1e-3, "measured"))
    profile.add(StepRecord("transfer", "pcie", 5e-4, "modeled"))
    assert profile.totals() == pytest.approx({"modeled": 2.5e-3, "measured": 1e-3})
    with pytest.raises(ValueError):
        StepRecord("x", "cpu", 1.0, "guessed")


def test_profile_table_shows_the_source_beside_each_time():
    from rich.console import Console

    profile = Profile()
    profile.add(StepRecord("relevancy", "fpga (emu)", 2e-3, "modeled", 1024))
    console = Console(record=True, width=120)
    console.print(profile.table())
    text = console.export_text()
    row = next(line for line in text.splitlines() if "relevancy" in line)
    assert "2.000 ms" in row and "modeled" in row
    assert "total (modeled)" in text
