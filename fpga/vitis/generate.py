"""Generate the Vitis RTL-kernel descriptions and the U55C link config from the kernel specs.

    python fpga/vitis/generate.py            # rewrite kernels/*.xml, u55c_hbm.cfg, u55c_hetmem.cfg
    python fpga/vitis/generate.py --check    # exit 1 if the committed files drifted from the specs

The kernel specs in `hetmem.kernels` are the single source of truth: argument order, register
offsets (Vitis `ap_ctrl_hs` at 0x00, arguments from 0x10), widths and HBM pseudo-channels.
Each buffer argument gets its own 512-bit AXI4 master `m_axi_<arg>` in its own HBM
pseudo-channel; scalars live in the AXI4-Lite slave `s_axi_control`. The HLS kernels
(hls/<kernel>.cpp, compiled by `v++ -c`) have one m_axi bundle per buffer argument, named
after it (port `m_axi_<arg>`). u55c_hbm.cfg links the RTL kernels (hetmem_rtl_hw.xclbin);
u55c_hetmem.cfg links every kernel into the one xclbin (hetmem_hw.xclbin): the RTL ones as
packaged here, the kernels without RTL (bm25) from their HLS C++. A test
(tests/test_vitis_packaging.py) runs `--check`, so a change to a spec that is not carried into
the packaging fails CI instead of producing an xclbin the driver would refuse.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from xml.etree import ElementTree as ET

from hetmem import kernels
from hetmem.kernels.spec import BEAT_BYTES, KernelSpec

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
#: The HLS C++ kernels.
HLS_DIR = ROOT / "hls"
#: The shell every build in this folder targets (the manifest in bitstreams/ names it too).
PLATFORM = "xilinx_u55c_gen3x16_xdma_3_202210_1"
#: Bytes of the AXI4-Lite register window of each kernel.
CONTROL_RANGE = 0x1000
#: C types of the arguments, as Vitis shows them in the kernel's signature.
C_TYPES = {
    "int8": "char",
    "uint8": "unsigned char",
    "int16": "short",
    "uint16": "unsigned short",
    "int32": "int",
    "uint32": "unsigned int",
}


#: The engine's AXI4 masters, by the engine field an argument is bound to (tests/rtl/regmap.py
#: FORMATS binds each spec argument to a field): memory rows stream on two ports, the query
#: side (query vectors, head weights, threshold deltas, the per-query segments) shares one,
#: results go out on one.
PORT_OF_FIELD = {
    "A": "m_axi_mem_a",
    "B": "m_axi_mem_b",
    "Q": "m_axi_query",
    "W": "m_axi_query",
    "D": "m_axi_query",
    "S": "m_axi_query",
    "OUT": "m_axi_out",
}


def regmap() -> ModuleType:
    """tests/rtl/regmap.py: what the RTL implements per kernel (argument -> engine field),
    the engine's ports and the wrapper parameters; the RTL tops are generated from it too."""
    path = ROOT / "tests" / "rtl" / "regmap.py"
    spec = importlib.util.spec_from_file_location("hetmem_rtl_regmap", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rtl_kernels() -> list[str]:
    """Kernels with an RTL top (bm25 has none yet: it is not in the RTL xclbin)."""
    return [name for name in kernels.names() if name in regmap().KERNEL_IDS]


def hls_kernels() -> list[str]:
    """Kernels the one xclbin takes from their HLS C++ (hls/<kernel>.cpp): those without
    RTL."""
    rtl = set(rtl_kernels())
    return [n for n in kernels.names() if n not in rtl and (HLS_DIR / f"{n}.cpp").is_file()]


def ports_of(name: str) -> dict[str, str]:
    """Spec argument -> the AXI4 master that carries it: the RTL top's port, or for an HLS
    kernel `m_axi_<arg>` (its bundle is named after the argument)."""
    if name in hls_kernels():
        spec = kernels.get(name)
        return {a.name: f"m_axi_{a.name}" for a in spec.args if a.is_buffer}
    return {
        arg: PORT_OF_FIELD[field]
        for arg, field, _ in regmap().FORMATS[name]
        if field in PORT_OF_FIELD
    }


def kernel_xml(spec: KernelSpec) -> str:
    """The kernel.xml of one RTL kernel: ports (control slave, one master per buffer) and the
    arguments at the offsets of the spec's register map."""
    root = ET.Element("root", versionMajor="1", versionMinor="6")
    kernel = ET.SubElement(
        root,
        "kernel",
        name=spec.name,
        language="ip_c",
        vlnv=f"hetmem.org:kernel:{spec.name}:1.0",
        attributes="",
        preferredWorkGroupSizeMultiple="0",
        workGroupSize="1",
        interrupt="true",
        hwControlProtocol="ap_ctrl_hs",
    )
    ports = ET.SubElement(kernel, "ports")
    ET.SubElement(
        ports,
        "port",
        name="s_axi_control",
        mode="slave",
        range=hex(CONTROL_RANGE),
        dataWidth="32",
        portType="addressable",
        base="0x0",
    )
    port_of = ports_of(spec.name)
    for port in dict.fromkeys(port_of[a.name] for a in spec.args if a.is_buffer):
        ET.SubElement(
            ports,
            "port",
            name=port,
            mode="master",
            range="0xFFFFFFFFFFFFFFFF",
            dataWidth=str(BEAT_BYTES * 8),
            portType="addressable",
            base="0x0",
        )
    args = ET.SubElement(kernel, "args")
    offsets = spec.registers()
    for index, arg in enumerate(spec.args):
        ctype = C_TYPES[arg.dtype] + ("*" if arg.is_buffer else "")
        ET.SubElement(
            args,
            "arg",
            name=arg.name,
            addressQualifier="1" if arg.is_buffer else "0",
            id=str(index),
            port=port_of[arg.name] if arg.is_buffer else "s_axi_control",
            size=hex(arg.width_bytes),
            offset=hex(offsets[arg.name]),
            type=ctype,
            hostOffset="0x0",
            hostSize=hex(arg.width_bytes),
        )
    ET.indent(root, space="  ")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def link_config(specs: list[KernelSpec], which: str = "the RTL kernels only") -> str:
    """The v++ --link config: one compute unit per kernel, every buffer argument in the HBM
    pseudo-channel its spec names, and every kernel in SLR0 (the HBM die of the U55C)."""
    lines = [
        "# Generated by fpga/vitis/generate.py from hetmem.kernels: do not edit by hand.",
        f"# Platform: {PLATFORM}. Each buffer argument owns one HBM pseudo-channel",
        f"# (the bank its kernel spec names); {which}.",
        "[connectivity]",
    ]
    for spec in specs:
        lines.append(f"nk={spec.name}:1:{spec.name}_1")
    for spec in specs:
        banks: dict[str, list[int]] = {}
        for arg in spec.args:
            if arg.is_buffer:
                banks.setdefault(ports_of(spec.name)[arg.name], []).append(arg.bank)
        for port, used in banks.items():
            # A port that carries several arguments reaches their pseudo-channels through the
            # HBM switch: a contiguous range [first:last].
            lo, hi = min(used), max(used)
            if sorted(used) != list(range(lo, hi + 1)):
                raise SystemExit(f"{spec.name}.{port}: banks {used} are not contiguous")
            where = f"HBM[{lo}]" if lo == hi else f"HBM[{lo}:{hi}]"
            lines.append(f"sp={spec.name}_1.{port}:{where}")
    for spec in specs:
        lines.append(f"slr={spec.name}_1:SLR0")
    return "\n".join(lines) + "\n"


def wrapper(name: str) -> str:
    """top/<kernel>.v: a module named after the kernel (Vitis takes the kernel name from the
    top module) that passes every port through to the RTL top hm_<kernel>."""
    rm = regmap()
    params = ",\n".join(f"    parameter {p} = {v}" for p, v in rm.WRAPPER_PARAMS)
    ports = ",\n".join(f"    {d:<6} wire {w + ' ' if w else ''}{n}" for d, w, n in rm.ENGINE_PORTS)
    pparams = ",\n".join(f"        .{p}({p})" for p, _ in rm.WRAPPER_PARAMS)
    conns = ",\n".join(f"        .{n}({n})" for _, _, n in rm.ENGINE_PORTS)
    return (
        "// Generated by fpga/vitis/generate.py: do not edit.\n"
        f"// The Vitis kernel {name}: the RTL top hm_{name} under the kernel's name.\n"
        "`default_nettype none\n\n"
        f"module {name} #(\n{params}\n) (\n{ports}\n);\n"
        f"    hm_{name} #(\n{pparams}\n    ) core (\n{conns}\n    );\n"
        "endmodule\n\n`default_nettype wire\n"
    )


def outputs() -> dict[Path, str]:
    specs = [kernels.get(name) for name in rtl_kernels()]
    files = {HERE / "kernels" / f"{spec.name}.xml": kernel_xml(spec) for spec in specs}
    files.update({HERE / "top" / f"{spec.name}.v": wrapper(spec.name) for spec in specs})
    files[HERE / "u55c_hbm.cfg"] = link_config(specs, "the RTL kernels only (bm25 has no RTL)")
    every = [kernels.get(name) for name in kernels.names()]
    hls = ", ".join(hls_kernels())
    files[HERE / "u55c_hetmem.cfg"] = link_config(
        every, f"every kernel: RTL ones packaged here, {hls} from hls/ (v++ -c)"
    )
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a file drifted")
    args = parser.parse_args(argv)
    drifted = []
    for path, text in outputs().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                drifted.append(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    for path in drifted:
        print(f"drifted from the kernel specs: {path} (run python fpga/vitis/generate.py)")
    return 1 if drifted else 0


if __name__ == "__main__":
    sys.exit(main())
