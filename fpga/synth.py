"""Synthesize the RTL engine with yosys for UltraScale+ and report its resources against the
Alveo U55C (xcu55c): the whole device and one of its three SLRs.

    python fpga/synth.py                       # every top in TOPS, default parameters
    python fpga/synth.py --top hm_engine --param NMAX=2048   # one top, a smaller build
    make -C fpga synth                         # the same, through make

Writes fpga/build/synth/<top>.json (yosys `stat -json`) and fpga/build/synth/report.md (the
table), and prints the table. Yosys maps to LUT, FF, CARRY8, DSP48E2, RAMB36E2/RAMB18E2,
URAM288 and LUTRAM (RAM32M/RAM64M: counted as LUTs); Vivado's numbers after place and route
differ (it packs and optimizes harder), so this is a pre-implementation estimate.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RTL = HERE / "rtl"
BUILD = HERE / "build" / "synth"

#: xcu55c capacity (AMD Alveo U55C data sheet DS978): the device, split over 3 SLRs.
U55C = {"LUT": 1_303_680, "FF": 2_607_360, "DSP": 9_024, "BRAM36": 2_016, "URAM": 960}
SLRS = 3

#: What a cell counts as. LUTRAM cells take LUTs (a RAM64M is 4 LUT6 of a SLICEM).
CELLS = {
    "LUT": {
        r"LUT[1-6]": 1,
        r"RAM32M16|RAM64M8": 8,
        r"RAM32M|RAM64M": 4,
        # single-bit LUTRAMs: LUTs per cell (UG574): 1 per 64 bits and per port
        r"RAM(32|64)X1S": 1,
        r"RAM(32|64)X1D|RAM128X1S": 2,
        r"RAM128X1D|RAM256X1S": 4,
        r"RAM256X1D|RAM512X1S": 8,
        r"SRL(16E|C32E)": 1,
    },
    "FF": {r"FD[RSCP]E(_1)?": 1},
    "DSP": {r"DSP48E2": 1},
    "BRAM36": {r"RAMB36E2": 1, r"RAMB18E2": 0.5},
    "URAM": {r"URAM288(_BASE)?": 1},
}


def count(cells: dict[str, int]) -> dict[str, float]:
    """Resource totals from yosys cell counts."""
    out = dict.fromkeys(CELLS, 0.0)
    for cell, n in cells.items():
        for resource, patterns in CELLS.items():
            for pattern, weight in patterns.items():
                if re.fullmatch(pattern, cell):
                    out[resource] += weight * n
    return out


def tops() -> list[str]:
    """Top modules to synthesize: the engine, from fpga/rtl/TOPS (one name per line)."""
    listed = RTL / "TOPS"
    if listed.exists():
        return [t.strip() for t in listed.read_text().splitlines() if t.strip()]
    return ["hm_engine"]


def synthesize(top: str, params: dict[str, str]) -> dict[str, float]:
    if shutil.which("yosys") is None:
        raise SystemExit("yosys not found: install it (Debian package yosys), or run make setup")
    BUILD.mkdir(parents=True, exist_ok=True)
    sources = sorted(str(p) for p in RTL.glob("*.v"))
    if not sources:
        raise SystemExit(f"no Verilog in {RTL}")
    chparam = "".join(f" -set {k} {v}" for k, v in params.items())
    script = [
        f"read_verilog -defer {' '.join(sources)}",
        f"chparam{chparam} {top}" if params else "",
        f"hierarchy -top {top}",
        # synth_xilinx in its stages, hierarchy kept (each module is mapped once, however
        # many instances it has) and `share` left out of the coarse stage: on the top-k
        # unit's wide compare-and-select muxes its SAT search runs for tens of minutes and
        # gigabytes for no gain (the datapath has no mutually exclusive operators to merge).
        f"synth_xilinx -family xcup -top {top} -noiopad -noclkbuf -run begin:coarse",
        "techmap -map +/cmp2lut.v -map +/cmp2lcu.v -D LUT_WIDTH=6",
        "alumacc",
        "opt",
        "memory -nomap",
        "opt_clean",
        f"synth_xilinx -family xcup -top {top} -noiopad -noclkbuf -run map_memory:check",
        f"tee -q -o {BUILD / (top + '.json')} stat -json -top {top}",
    ]
    log = BUILD / f"{top}.log"
    with log.open("w") as fh:
        proc = subprocess.run(
            ["yosys", "-p", "; ".join(s for s in script if s)], stdout=fh, stderr=subprocess.STDOUT
        )
    if proc.returncode:
        raise SystemExit(f"yosys failed on {top}: see {log}")
    stat = load_stat(BUILD / f"{top}.json")
    return count(stat["design"]["num_cells_by_type"])


def load_stat(path: Path) -> dict:
    """yosys's `stat -json -top` output. Yosys 0.23 writes the design hierarchy as plain
    text lines ("<module>  <instances>") into the JSON; they are dropped."""
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        lines = [ln for ln in text.splitlines() if not re.fullmatch(r"\s*[^\s\"{}]+\s+\d+\s*", ln)]
        return json.loads("\n".join(lines))


def table(results: dict[str, dict[str, float]]) -> str:
    head = "| top | " + " | ".join(f"{r} (of {U55C[r]:,} / SLR {U55C[r] // SLRS:,})" for r in U55C)
    lines = [head + " |", "|---" * (len(U55C) + 1) + "|"]
    for top, res in results.items():
        cells = [
            f"{res[r]:,.0f} ({100 * res[r] / U55C[r]:.2f}% / {100 * res[r] * SLRS / U55C[r]:.2f}%)"
            for r in U55C
        ]
        lines.append(f"| {top} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", action="append", help="top module (default: fpga/rtl/TOPS)")
    parser.add_argument("--param", action="append", default=[], help="NAME=VALUE for chparam")
    args = parser.parse_args(argv)
    params = dict(p.split("=", 1) for p in args.param)
    results = {top: synthesize(top, params) for top in (args.top or tops())}
    text = table(results)
    fits = all(
        res[r] <= U55C[r] / SLRS / 2 for res in results.values() for r in U55C
    )  # two instances in one SLR
    text += (
        "\n\nSource: yosys synth_xilinx -family xcup (pre-implementation estimate). "
        f"Two instances fit in one SLR: {'yes' if fits else 'no'}.\n"
    )
    (BUILD / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
