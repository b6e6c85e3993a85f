"""The RTL follows the kernel specs: its register map and wrappers are generated from
hetmem.kernels (and must be current), a spec whose formats change is refused, and every
kernel's top level (the generated wrapper) lints on Verilator and runs on Icarus."""

from __future__ import annotations

import re
import subprocess

import pytest
import regmap
import sim
from regmap import KERNEL_IDS

from hetmem import kernels
from hetmem.kernels import Arg

pytestmark = pytest.mark.rtl


def test_generated_files_are_current() -> None:
    for fname, text in regmap.rendered().items():
        path = regmap.RTL_DIR / fname
        assert path.read_text() == text, f"{path} is stale: run python tests/rtl/regmap.py"


def test_decoder_offsets_are_the_specs() -> None:
    """Parse hm_reg_decode back out of the include: every argument word at the spec's
    offset, nothing else decoded."""
    text = (regmap.RTL_DIR / "hm_regmap.vh").read_text()
    blocks = re.split(r"2'd(\d):  // (\w+)", text)[1:]
    seen = set()
    for kid, name, body in zip(blocks[0::3], blocks[1::3], blocks[2::3], strict=True):
        seen.add(name)
        assert KERNEL_IDS[name] == int(kid)
        decoded = {
            int(off, 16): (int(hi), int(field))
            for off, hi, field in re.findall(
                r"12'h([0-9a-f]+): hm_reg_decode = \{1'b1, 1'b(\d), 4'd(\d+)\}", body
            )
        }
        spec = kernels.get(name)
        want = {}
        for arg in spec.args:
            field = regmap.FIELD_IDS[dict((a, f) for a, f, _ in regmap.FORMATS[name])[arg.name]]
            want[spec.registers()[arg.name]] = (0, field)
            if arg.is_buffer:
                want[spec.registers()[arg.name] + 4] = (1, field)
        assert decoded == want, name
    assert seen == set(KERNEL_IDS)


def test_spec_drift_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A spec whose argument dtype or order changes no longer matches the RTL."""
    spec = kernels.get("vector_search")
    changed = tuple(
        Arg(a.name, "int16", a.layout, a.direction, a.bank) if a.name == "keys" else a
        for a in spec.args
    )
    monkeypatch.setattr(type(spec), "args", changed)
    with pytest.raises(regmap.SpecDrift):
        regmap.render_regmap()
    monkeypatch.setattr(type(spec), "args", tuple(reversed(spec.args)))
    with pytest.raises(regmap.SpecDrift):
        regmap.render_wrapper("vector_search")


@pytest.mark.parametrize("kernel", list(KERNEL_IDS))
def test_wrapper_lints_on_verilator(kernel: str) -> None:
    reason = sim.missing("verilator")
    if reason:
        pytest.skip(f"verilator: {reason}")
    verilator = sim.verilator_bin() / "verilator"
    sources = [str(p) for p in sorted(regmap.RTL_DIR.glob("hm_*.v"))]
    args = [a for a in sim.VERILATOR_ARGS if a.startswith("-Wno")]
    run = subprocess.run(
        [
            str(verilator),
            "--lint-only",
            "-Wall",
            *args,
            f"-I{regmap.RTL_DIR}",
            "--top-module",
            f"hm_{kernel}",
            *sources,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "%Error" not in run.stderr and "%Warning" not in run.stderr, run.stderr[-3000:]


@pytest.mark.parametrize("kernel", list(KERNEL_IDS))
def test_wrapper_runs_on_icarus(kernel: str) -> None:
    """Each kernel's own top level (kernel id tied, its register map) on small calls."""
    reason = sim.missing("icarus")
    if reason:
        pytest.skip(f"icarus: {reason}")
    params = {"NMAX": 1024}
    ran = sim.run(
        "icarus",
        f"hm_{kernel}",
        "tb_engine",
        "engine_matches_golden",
        parameters=params,
        env={
            "HM_SUITE": "smoke",
            "HM_KERNELS": kernel,
            "HM_WRAPPER": "1",
            "HM_PARAMS": '{"LANES": 8, "SLOTS": 8, "NMAX": 1024, "DMAX": 512}',
            "HM_SEED": str(31 + KERNEL_IDS[kernel]),
        },
    )
    assert ran == ["engine_matches_golden"]
