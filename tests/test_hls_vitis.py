"""The one xclbin: the HLS kernels' C++ (hls/) declares the interface of its kernel spec
(argument names and order, C types, one m_axi bundle per buffer, s_axilite control), and
the v++ link config of every kernel (fpga/vitis/u55c_hetmem.cfg) puts each buffer in its
spec's HBM bank, as tests/test_vitis_packaging.py checks the RTL packaging. Needs no g++."""

import importlib.util
import re
from pathlib import Path

import pytest

from hetmem import kernels
from hetmem.fpga import hls as hls_mod
from hetmem.fpga.manifest import Manifest, expected_entry

pytestmark = pytest.mark.hls

ROOT = Path(__file__).resolve().parents[1]
VITIS = ROOT / "fpga" / "vitis"
C_TYPES = {
    "int8": "int8_t",
    "uint8": "uint8_t",
    "int16": "int16_t",
    "uint16": "uint16_t",
    "int32": "int32_t",
    "uint32": "uint32_t",
}


def load_generator():
    spec = importlib.util.spec_from_file_location("hetmem_fpga_gen", ROOT / "fpga" / "gen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def top_signature(kernel: str) -> list[tuple[str, str, bool]]:
    """(C type, name, pointer) of each parameter of the kernel's extern "C" top."""
    text = (hls_mod.HLS_DIR / f"{kernel}.cpp").read_text()
    found = re.search(rf'extern "C" void {kernel}\(([^)]*)\)', text)
    assert found, f'no extern "C" top {kernel}() in hls/{kernel}.cpp'
    params = []
    for part in found.group(1).split(","):
        m = re.fullmatch(r"\s*(?:const\s+)?(\w+)\s*(\*?)\s*(\w+)\s*", part)
        assert m, part
        params.append((m.group(1), m.group(3), bool(m.group(2))))
    return params


def pragmas(kernel: str) -> list[dict[str, str]]:
    text = (hls_mod.HLS_DIR / f"{kernel}.cpp").read_text()
    out = []
    for line in re.findall(r"#pragma HLS INTERFACE (.*)", text):
        words = line.split()
        fields = {"kind": words[0]}
        fields.update(re.findall(r"(\w+)\s*=\s*(\w+)", line))
        out.append(fields)
    return out


@pytest.mark.parametrize("kernel", hls_mod.HLS_KERNELS)
def test_hls_top_declares_the_spec_interface(kernel):
    spec = kernels.get(kernel)
    params = top_signature(kernel)
    assert [name for _, name, _ in params] == [a.name for a in spec.args]
    for (ctype, name, pointer), arg in zip(params, spec.args, strict=True):
        assert pointer == arg.is_buffer, name
        assert ctype == C_TYPES[arg.dtype], (name, ctype, arg.dtype)
    prag = pragmas(kernel)
    m_axi = {p["port"]: p for p in prag if p["kind"] == "m_axi"}
    lite = {p["port"]: p for p in prag if p["kind"] == "s_axilite"}
    buffers = [a.name for a in spec.args if a.is_buffer]
    assert sorted(m_axi) == sorted(buffers)
    gen = load_generator()
    for name in buffers:  # one bundle per HBM argument, named after it: port m_axi_<arg>
        assert m_axi[name]["bundle"] == name and m_axi[name]["offset"] == "slave"
        if kernel in gen.hls_kernels():  # the port the link config connects
            assert gen.ports_of(kernel)[name] == f"m_axi_{name}"
    assert sorted(lite) == sorted([a.name for a in spec.args] + ["return"])
    assert {p["bundle"] for p in lite.values()} == {"control"}


def test_one_link_config_reaches_every_kernel_buffer_in_its_spec_bank():
    gen = load_generator()
    assert gen.main(["--check"]) == 0  # u55c_hetmem.cfg is what the specs say
    text = (VITIS / "u55c_hetmem.cfg").read_text()
    assert re.findall(r"^nk=(\w+):1:\1_1$", text, re.M) == list(kernels.names())
    lines = re.findall(r"^sp=(\w+)_1\.(m_axi_\w+):HBM\[(\d+)(?::(\d+))?\]$", text, re.M)
    reach = {(k, port): set(range(int(lo), int(hi or lo) + 1)) for k, port, lo, hi in lines}
    banks = []
    for name in kernels.names():
        port_of = gen.ports_of(name)
        for arg in kernels.get(name).args:
            if arg.is_buffer:
                assert arg.bank in reach[(name, port_of[arg.name])], (name, arg.name)
                if arg.name != "stage":  # the staged beats share the segments' bank
                    banks.append(arg.bank)
    assert len(set(banks)) == len(banks) and all(0 <= b < 32 for b in banks)
    assert gen.hls_kernels() == ["bm25"]
    assert set(re.findall(r"^slr=(\w+)_1:SLR0$", text, re.M)) == set(kernels.names())


def test_the_vitis_makefile_compiles_the_hls_kernels_and_links_the_one_config():
    text = (VITIS / "Makefile").read_text()
    listed = re.search(r"^HLS_KERNELS\s*:=\s*(.*)$", text, re.M).group(1).split()
    assert listed == load_generator().hls_kernels()
    assert "v++ --compile" in text and "--config u55c_hetmem.cfg" in text
    assert re.search(r"^XCLBIN_ALL\s*:=\s*build/hetmem_\$\(TARGET\)\.xclbin$", text, re.M)


def test_the_manifest_describes_the_one_xclbin():
    entry = Manifest.load().entry("hetmem_hw.xclbin")
    assert entry == expected_entry()
    assert set(entry.kernels) == set(kernels.names())
    assert entry.sources == {
        "token_indexer": "rtl",
        "page_indexer": "rtl",
        "block_gate": "rtl",
        "vector_search": "rtl",
        "bm25": "hls",
    }
    assert "make hetmem" in entry.build
    rtl = Manifest.load().entry("hetmem_rtl_hw.xclbin")
    assert set(rtl.sources.values()) == {"rtl"} and "bm25" not in rtl.kernels
