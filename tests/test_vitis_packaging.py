"""The Vitis packaging (kernel.xml per kernel, the U55C link config) follows the kernel specs."""

import importlib.util
import re
from dataclasses import replace
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from hetmem import kernels

ROOT = Path(__file__).resolve().parents[1]
VITIS = ROOT / "fpga" / "vitis"


def load_generator():
    spec = importlib.util.spec_from_file_location("vitis_generate", VITIS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_files_match_the_specs():
    assert load_generator().main(["--check"]) == 0


@pytest.mark.parametrize("name", kernels.names())
def test_kernel_xml_offsets_and_ports_follow_the_register_map(name):
    spec = kernels.get(name)
    root = ET.parse(VITIS / "kernels" / f"{name}.xml").getroot()
    kernel = root.find("kernel")
    assert kernel.get("name") == name
    assert kernel.get("hwControlProtocol") == "ap_ctrl_hs"
    args = kernel.find("args").findall("arg")
    assert [a.get("name") for a in args] == [a.name for a in spec.args]
    offsets = spec.registers()
    for xml_arg, arg in zip(args, spec.args, strict=True):
        assert int(xml_arg.get("offset"), 16) == offsets[arg.name]
        assert int(xml_arg.get("size"), 16) == arg.width_bytes
        expected_port = f"m_axi_{arg.name}" if arg.is_buffer else "s_axi_control"
        assert xml_arg.get("port") == expected_port
    ports = {p.get("name"): p for p in kernel.find("ports").findall("port")}
    assert ports["s_axi_control"].get("mode") == "slave"
    for arg in spec.args:
        if arg.is_buffer:
            assert ports[f"m_axi_{arg.name}"].get("dataWidth") == "512"


def test_link_config_puts_every_buffer_in_its_spec_bank():
    text = (VITIS / "u55c_hbm.cfg").read_text()
    lines = re.findall(r"^sp=(\w+)_1\.m_axi_(\w+):HBM\[(\d+)\]$", text, re.M)
    placed = {f"{kernel}.{arg}": int(bank) for kernel, arg, bank in lines}
    expected = {
        f"{name}.{arg.name}": arg.bank
        for name in kernels.names()
        for arg in kernels.get(name).args
        if arg.is_buffer
    }
    assert placed == expected
    assert len(set(expected.values())) == len(expected)  # one pseudo-channel per buffer
    assert all(0 <= bank < 32 for bank in expected.values())


def test_a_spec_change_shows_up_as_drift(monkeypatch):
    gen = load_generator()
    spec = kernels.get("vector_search")
    moved = tuple(replace(a, bank=31) if a.name == "q" else a for a in spec.args)
    monkeypatch.setattr(type(spec), "args", moved)
    assert gen.main(["--check"]) == 1
