"""The Vitis packaging (kernel.xml and top module per RTL kernel, the U55C link config)
follows the kernel specs and the RTL."""

import importlib.util
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from hetmem import kernels

ROOT = Path(__file__).resolve().parents[1]
VITIS = ROOT / "fpga" / "vitis"
RTL_KERNELS = ("token_indexer", "page_indexer", "block_gate", "vector_search")


def load_generator():
    spec = importlib.util.spec_from_file_location("hetmem_fpga_gen", ROOT / "fpga" / "gen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_files_match_the_specs():
    assert load_generator().main(["--check"]) == 0


def test_the_rtl_kernels_are_packaged_and_bm25_is_not():
    assert load_generator().rtl_kernels() == list(RTL_KERNELS)
    assert not (VITIS / "kernels" / "bm25.xml").exists()


@pytest.mark.parametrize("name", RTL_KERNELS)
def test_kernel_xml_offsets_and_ports_follow_the_register_map(name):
    spec = kernels.get(name)
    port_of = load_generator().ports_of(name)
    kernel = ET.parse(VITIS / "kernels" / f"{name}.xml").getroot().find("kernel")
    assert kernel.get("name") == name
    assert kernel.get("hwControlProtocol") == "ap_ctrl_hs"
    args = kernel.find("args").findall("arg")
    assert [a.get("name") for a in args] == [a.name for a in spec.args]
    offsets = spec.registers()
    for xml_arg, arg in zip(args, spec.args, strict=True):
        assert int(xml_arg.get("offset"), 16) == offsets[arg.name]
        assert int(xml_arg.get("size"), 16) == arg.width_bytes
        assert xml_arg.get("port") == (port_of[arg.name] if arg.is_buffer else "s_axi_control")
    ports = {p.get("name"): p for p in kernel.find("ports").findall("port")}
    assert ports["s_axi_control"].get("mode") == "slave"
    masters = {n for n, p in ports.items() if p.get("mode") == "master"}
    assert masters == {port_of[a.name] for a in spec.args if a.is_buffer}
    assert all(ports[m].get("dataWidth") == "512" for m in masters)
    top = (VITIS / "top" / f"{name}.v").read_text()
    assert f"module {name} #(" in top and '`include "hm_top.vh"' in top
    body = (ROOT / "fpga" / "rtl" / "hm_top.vh").read_text()
    assert all(f"{m}_rready" in body or f"{m}_wvalid" in body for m in masters)


def test_link_config_reaches_every_buffer_in_its_spec_bank():
    text = (VITIS / "u55c_hbm.cfg").read_text()
    gen = load_generator()
    lines = re.findall(r"^sp=(\w+)_1\.(m_axi_\w+):HBM\[(\d+)(?::(\d+))?\]$", text, re.M)
    reach = {(k, port): set(range(int(lo), int(hi or lo) + 1)) for k, port, lo, hi in lines}
    banks = []
    for name in RTL_KERNELS:
        port_of = gen.ports_of(name)
        for arg in kernels.get(name).args:
            if arg.is_buffer:
                assert arg.bank in reach[(name, port_of[arg.name])], (name, arg.name)
                if arg.name != "stage":  # the staged beats share the segments' bank
                    banks.append(arg.bank)
    assert len(set(banks)) == len(banks)  # one pseudo-channel per buffer
    assert all(0 <= bank < 32 for bank in banks)


def test_a_spec_change_shows_up_as_drift(monkeypatch):
    gen = load_generator()
    spec = kernels.get("vector_search")
    moved = tuple(replace(a, bank=31) if a.name == "out" else a for a in spec.args)
    monkeypatch.setattr(type(spec), "args", moved)
    assert gen.main(["--check"]) == 1


@pytest.mark.rtl
@pytest.mark.parametrize("name", RTL_KERNELS)
def test_vitis_top_elaborates_over_the_rtl(name, tmp_path):
    """The wrapper's ports match the RTL top's: Icarus elaborates them together."""
    if shutil.which("iverilog") is None:
        pytest.skip("iverilog is not installed")
    rtl = ROOT / "fpga" / "rtl"
    if not (rtl / f"hm_{name}.v").exists():
        pytest.skip(f"the RTL top hm_{name}.v is not in this checkout yet")
    out = tmp_path / "top.vvp"
    cmd = ["iverilog", "-g2012", "-I", str(rtl), "-s", name, "-o", str(out)]
    cmd += [*sorted(str(p) for p in rtl.glob("*.v")), str(VITIS / "top" / f"{name}.v")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
