"""The hardware files generated from the kernel specs and the engine's facts (fpga/gen.py:
the register-map include, the one parametrized kernel top and each kernel's top, the Vitis
kernel descriptions, tops and link configs) are current: a stale one fails here. The
register-map decoder parses back to the specs' offsets, the tops carry the engine's
parameters, and a spec whose formats change is refused."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from hetmem import kernels
from hetmem.kernels import Arg, engine

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("hetmem_fpga_gen", ROOT / "fpga" / "gen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_files_are_current(gen) -> None:
    stale = [str(p.relative_to(ROOT)) for p in gen.stale()]
    assert not stale, f"stale generated files {stale}: run python fpga/gen.py"


def test_a_stale_file_is_caught(gen, tmp_path, monkeypatch) -> None:
    """Point the generator at a copy of the tree with one top edited: --check fails on it."""
    rtl = tmp_path / "rtl"
    rtl.mkdir()
    for path in gen.outputs():
        if path.parent == gen.RTL_DIR:
            (rtl / path.name).write_text(path.read_text())
    top = rtl / "hm_vector_search.v"
    top.write_text(top.read_text().replace("parameter LANES = 8", "parameter LANES = 4"))
    monkeypatch.setattr(gen, "RTL_DIR", rtl)
    assert [p.name for p in gen.stale() if p.parent == rtl] == ["hm_vector_search.v"]
    assert gen.main(["--check"]) == 1


def test_every_top_is_the_parametrized_one(gen) -> None:
    """Every kernel top (simulation and Vitis) is the engine's parameters, its kernel id and
    the one include; the parameters are engine.PARAMS."""
    body = (gen.RTL_DIR / "hm_top.vh").read_text()
    assert "hm_engine #(" in body and ".kernel(`HM_KERNEL_ID)" in body
    for name, kid in engine.KERNEL_IDS.items():
        for path, module in (
            (gen.RTL_DIR / f"hm_{name}.v", f"hm_{name}"),
            (gen.VITIS / "top" / f"{name}.v", name),
        ):
            text = path.read_text()
            assert f"module {module} #(" in text
            assert f"`define HM_KERNEL_ID 2'd{kid}" in text
            assert '`include "hm_top.vh"' in text
            params = dict(re.findall(r"parameter\s+(\w+)\s*=\s*(\d+)", text))
            assert {k: int(v) for k, v in params.items()} == dict(engine.PARAMS), path
            assert len(text.splitlines()) < 20, f"{path} is more than a thin top"
    engine_v = (gen.RTL_DIR / "hm_engine.v").read_text()
    header = engine_v.split("module hm_engine #(")[1].split(") (")[0]
    declared = dict(re.findall(r"parameter\s+(\w+)\s*=\s*(\d+)", header))
    assert {k: int(v) for k, v in declared.items()} == dict(engine.PARAMS)


def test_decoder_offsets_are_the_specs(gen) -> None:
    """Parse hm_reg_decode back out of the include: every argument word at the spec's
    offset, nothing else decoded."""
    text = (gen.RTL_DIR / "hm_regmap.vh").read_text()
    blocks = re.split(r"2'd(\d):  // (\w+)", text)[1:]
    seen = set()
    for kid, name, body in zip(blocks[0::3], blocks[1::3], blocks[2::3], strict=True):
        seen.add(name)
        assert engine.KERNEL_IDS[name] == int(kid)
        decoded = {
            int(off, 16): (int(hi), int(field))
            for off, hi, field in re.findall(
                r"12'h([0-9a-f]+): hm_reg_decode = \{1'b1, 1'b(\d), 4'd(\d+)\}", body
            )
        }
        spec = kernels.get(name)
        want = {}
        for arg in spec.args:
            field = engine.FIELD_IDS[engine.field_of(name)[arg.name]]
            want[spec.registers()[arg.name]] = (0, field)
            if arg.is_buffer:
                want[spec.registers()[arg.name] + 4] = (1, field)
        assert decoded == want, name
    assert seen == set(engine.KERNEL_IDS)


def test_spec_drift_is_refused(gen, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spec whose argument dtype or order changes no longer matches the RTL."""
    spec = kernels.get("vector_search")
    changed = tuple(
        Arg(a.name, "int16", a.layout, a.direction, a.bank) if a.name == "keys" else a
        for a in spec.args
    )
    monkeypatch.setattr(type(spec), "args", changed)
    with pytest.raises(gen.SpecDrift):
        gen.render_regmap()
    monkeypatch.setattr(type(spec), "args", tuple(reversed(spec.args)))
    with pytest.raises(gen.SpecDrift):
        gen.render_wrapper("vector_search")
