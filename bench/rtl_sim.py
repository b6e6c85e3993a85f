"""RTL simulation: simulated cycles per kernel call and shape, the time they project to at the
clock the design targets, and how fast the simulators run.

    python bench/rtl_sim.py                          # every RTL kernel, default shapes
    python bench/rtl_sim.py --quick                  # small shapes only (a minute or two)
    python bench/rtl_sim.py --kernels vector_search --icarus-max-n 1024

Per kernel and shape, one call of realistic quantized inputs (Student-t keys with outlier
channels, fitted and quantized as the pipeline does) runs:

- on `cosim` (each kernel's top in Verilator, fpga/cosim/harness.cpp): cycles from ap_start to
  ap_done (`simulated`), the time they take at 300 MHz (`simulated`), the spec's cycle model
  for the same shape (`modeled`) and their ratio; the output is checked against emu's golden
  model. Simulator speed: clock edges per second of wall time (`measured`, median of
  --repeat calls; register writes and the ap_done poll included);
- on Icarus (fpga/cosim/tb_icarus.v, a plain-Verilog bench with the harness's memory model
  and control sequence, compiled once per kernel), for shapes up to --icarus-max-n: its
  cycles (equal to Verilator's when both are right), its output (checked), and its speed
  (`measured`: the whole vvp run, memory-image loading and reset included).

A call the RTL does not finish (a hang: no ap_done within 8x the cycle model) or answers
wrongly is a row with its error, not a crash. Writes a table and JSON
(bench/results/rtl_sim.json) with the command, the machine and the build times.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from hetmem import kernels
from hetmem.errors import FpgaError
from hetmem.fpga import cosim as cosim_mod
from hetmem.fpga import open_device
from hetmem.kernels import KernelInputs, KernelSpec

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "rtl_sim.json"
TB = ROOT / "fpga" / "cosim" / "tb_icarus.v"
#: Beats of the query and out images in the Icarus bench (its memories are sized when it is
#: compiled; the memory ports' images to fit each call, a power of two >= 1024).
IMAGE_BEATS = {"Q_BEATS": 4096, "OUT_BEATS": 4096}


@dataclass(frozen=True)
class Shape:
    kernel: str
    n: int
    dim: int
    queries: int = 1
    heads: int = 1
    k: int | None = None
    tau: float | None = None

    @property
    def label(self) -> str:
        unit = {"page_indexer": " pages", "block_gate": " blocks", "vector_search": " docs"}
        parts = [f"n={self.n}{unit.get(self.kernel, '')}", f"D={self.dim}"]
        if self.kernel in ("token_indexer", "page_indexer"):
            parts.append(f"H={self.heads}")
        parts.append(f"Q={self.queries}")
        parts.append(f"tau={self.tau:g}" if self.tau is not None else f"k={self.k}")
        return " ".join(parts)

    @property
    def name(self) -> str:
        return self.kernel + (" (threshold)" if self.tau is not None else "")


SHAPES = [
    Shape("token_indexer", 2048, 128, heads=4, k=128),
    Shape("token_indexer", 16384, 128, heads=4, k=1024),
    Shape("token_indexer", 4096, 128, heads=64, k=256),
    Shape("page_indexer", 1024, 128, heads=4, k=64),
    Shape("page_indexer", 8192, 128, heads=4, k=512),
    Shape("vector_search", 2048, 384, k=32),
    Shape("vector_search", 16384, 384, k=64),
    Shape("block_gate", 2048, 128, queries=4, k=64),
    Shape("block_gate", 16384, 128, queries=4, k=256),
    Shape("block_gate", 2048, 128, queries=4, tau=1e-3),
]
QUICK = [
    Shape("token_indexer", 1024, 64, heads=2, k=64),
    Shape("page_indexer", 512, 64, heads=4, k=32),
    Shape("vector_search", 1024, 128, queries=2, k=32),
    Shape("block_gate", 1024, 64, queries=2, k=32),
    Shape("block_gate", 1024, 64, queries=2, tau=1e-2),
]


def heavy(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Student-t(3) rows with 4 outlier channels (the tests' realistic key distribution)."""
    x = rng.standard_t(3, shape)
    x[..., rng.choice(shape[-1], 4, replace=False)] *= 20
    return x


def make_inputs(shape: Shape, rng: np.random.Generator) -> KernelInputs:
    """Floats fitted and quantized as the pipeline does, then bound into one call."""
    spec = kernels.get(shape.kernel)
    n, d, q, h = shape.n, shape.dim, shape.queries, shape.heads
    if shape.kernel == "token_indexer":
        memory = {"keys": heavy(rng, n, d)}
        query = {"q": rng.standard_normal((q, h, d)), "w": rng.uniform(-1, 1, (q, h))}
    elif shape.kernel == "page_indexer":
        centre, spread = heavy(rng, n, d), np.abs(rng.standard_normal((n, d)))
        memory = {"mins": centre - spread, "maxs": centre + spread}
        query = {"q": rng.standard_normal((q, h, d))}
    else:
        memory = {"keys": heavy(rng, n, d)}
        query = {"q": rng.standard_normal((q, d))}
    state = spec.fit(memory)
    params = {"tau": shape.tau} if shape.tau is not None else {"k": shape.k}
    return spec.bind(
        spec.quantize_memory(memory, state), spec.quantize_query(query, state, **params)
    )


def golden_out(spec: KernelSpec, inputs: KernelInputs) -> np.ndarray:
    out = spec.golden(inputs)
    return np.asarray(out.indices if out.indices is not None else out.bitmap, dtype=np.uint32)


# -- Icarus: a plain-Verilog bench of the same calls ----------------------------------------------


@dataclass
class IcarusRun:
    out: np.ndarray
    cycles: int
    edges: int
    wall_s: float


@dataclass
class Icarus:
    """Compiles tb_icarus.v with one kernel top per kernel (cached) and runs calls on vvp."""

    latency: int = 32
    compile_s: dict[str, float] = field(default_factory=dict)

    def binary(self, kernel: str, memory_beats: int) -> Path:
        """tb.vvp for `kernel` with memory-port images of `memory_beats` beats (cached)."""
        beats = {"A_BEATS": memory_beats, "B_BEATS": memory_beats, **IMAGE_BEATS}
        sources = [TB, *sorted((cosim_mod.RTL_DIR).glob("hm_*.v"))]
        h = hashlib.sha256()
        for path in [*sources, *sorted(cosim_mod.RTL_DIR.glob("hm_*.vh"))]:
            h.update(path.name.encode() + path.read_bytes())
        h.update(json.dumps([kernel, beats, self.latency]).encode())
        out = cosim_mod.cache_root() / "icarus" / f"{kernel}-{h.hexdigest()[:16]}" / "tb.vvp"
        if not out.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            params = [f"-Phm_cosim_tb.{k}={v}" for k, v in beats.items()]
            params.append(f"-Phm_cosim_tb.LATENCY={self.latency}")
            tmp = out.with_suffix(".tmp")
            start = time.perf_counter()
            subprocess.run(
                [
                    "iverilog", "-g2005", f"-DHM_TOP=hm_{kernel}", f"-I{cosim_mod.RTL_DIR}",
                    "-s", "hm_cosim_tb", *params, "-o", str(tmp), *map(str, sources),
                ],
                check=True,
                capture_output=True,
                text=True,
            )  # fmt: skip
            self.compile_s[f"{kernel} ({memory_beats} beats)"] = time.perf_counter() - start
            tmp.rename(out)
        return out

    def run(
        self, spec: KernelSpec, inputs: KernelInputs, timeout_s: float, max_cycles: int
    ) -> IcarusRun:
        """One call on vvp; raises FpgaError on a hang (no ap_done within `max_cycles`), a
        wall-clock timeout or a failed run."""
        s = inputs.scalars
        images: dict[str, list[bytes]] = {"a": [], "b": [], "q": []}
        addrs: dict[str, int] = {}
        memory = list(spec.memory_args)
        for arg in spec.args:
            if arg.direction != "in":
                continue
            port = "ab"[memory.index(arg.name)] if arg.name in memory else "q"
            start = sum(len(b) for b in images[port])
            start = -(-start // 4096) * 4096
            data = np.ascontiguousarray(inputs.arrays[arg.name]).tobytes()
            images[port].append(b"\0" * (start - sum(len(b) for b in images[port])) + data)
            addrs[arg.name] = start
        addrs["out"] = 0
        regs: list[int] = []
        offsets = spec.registers()
        for arg in spec.args:
            if arg.is_buffer:
                regs += [offsets[arg.name], addrs[arg.name] & 0xFFFFFFFF]
                regs += [offsets[arg.name] + 4, addrs[arg.name] >> 32]
            else:
                regs += [offsets[arg.name], int(s[arg.name])]
        need = spec.buffer_nbytes("out", s)
        largest = max(sum(len(b) for b in images[p]) for p in "ab")
        vvp = self.binary(spec.name, max(1024, 1 << (-(-largest // 64)).bit_length()))
        with tempfile.TemporaryDirectory(prefix="hm-icarus-") as tmp:
            work = Path(tmp)
            for port, parts in images.items():
                (work / f"{port}.hex").write_text(to_hex(b"".join(parts)))
            (work / "regs.hex").write_text("".join(f"{v:08x}\n" for v in regs))
            start = time.perf_counter()
            try:
                proc = subprocess.run(
                    [
                        "vvp",
                        "-n",
                        str(vvp),
                        f"+nregs={len(regs) // 2}",
                        f"+max_cycles={max_cycles}",
                    ],
                    cwd=work,
                    capture_output=True,
                    text=True,
                    timeout=timeout_s,
                )
            except subprocess.TimeoutExpired:
                raise FpgaError(f"icarus: no result within {timeout_s:g} s of wall time") from None
            wall = time.perf_counter() - start
            lines = {
                ln.split()[0]: ln.split()[1:]
                for ln in proc.stdout.splitlines()
                if ln.startswith("HM_")
            }
            if "HM_TIMEOUT" in lines:
                raise FpgaError(f"icarus: no ap_done after {lines['HM_TIMEOUT'][0]} cycles (hang)")
            if "HM_CYCLES" not in lines:
                raise FpgaError(f"icarus: {proc.stdout[-500:]} {proc.stderr[-500:]}".strip())
            out = from_hex((work / "out.hex").read_text(), need)
        return IcarusRun(
            out.view(np.uint32), int(lines["HM_CYCLES"][0]), int(lines["HM_TOTAL"][0]), wall
        )


def to_hex(data: bytes) -> str:
    """Bytes as 512-bit beats, one per line, most significant byte first ($readmemh)."""
    pad = (-len(data)) % 64
    beats = np.frombuffer(data + b"\0" * pad, dtype=np.uint8).reshape(-1, 64)[:, ::-1]
    return "".join(row.tobytes().hex() + "\n" for row in beats) if beats.size else "0\n"


def from_hex(text: str, nbytes: int) -> np.ndarray:
    """The first `nbytes` of a $writememh dump of 512-bit beats."""
    rows = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("//")]
    beats = -(-nbytes // 64)
    raw = b"".join(
        bytes.fromhex(row.replace("x", "0").replace("X", "0").rjust(128, "0"))[::-1]
        for row in rows[:beats]
    )
    return np.frombuffer(raw[:nbytes], dtype=np.uint8).copy()


# -- the benchmark ----------------------------------------------------------------------------------


def bench_shape(shape: Shape, dev, icarus: Icarus | None, args: argparse.Namespace) -> dict:
    spec = kernels.get(shape.kernel)
    inputs = make_inputs(shape, np.random.default_rng(args.seed))
    want = golden_out(spec, inputs)
    modeled = spec.cycles(**spec.shape(inputs))
    row: dict = {
        "kernel": shape.name,
        "shape": shape.label,
        "scalars": {k: int(v) for k, v in inputs.scalars.items()},
        "cycles_modeled": modeled,
        "status": "ok",
    }
    try:
        walls, edges, cycles = [], [], None
        for _ in range(args.repeat):
            before = (dev.stats.edges, dev.stats.wall_s)
            got, timings = dev.call(spec.name, inputs, timeout_s=args.timeout)
            walls.append(dev.stats.wall_s - before[1])
            edges.append(dev.stats.edges - before[0])
            run = timings[-2]
            if cycles is not None and run.cycles != cycles:
                raise FpgaError(f"cycles differ between repeats: {cycles} and {run.cycles}")
            cycles = run.cycles
            if not np.array_equal(got.reshape(want.shape), want):
                raise FpgaError("cosim output differs from the golden model")
        i = walls.index(statistics.median_low(walls))
        row.update(
            cycles_simulated=cycles,
            ratio=cycles / modeled,
            seconds_simulated=cycles / dev.clock_hz,
            verilator_wall_s=walls[i],
            verilator_edges=edges[i],
            verilator_cycles_per_s=edges[i] / walls[i],
            matches_emu=True,
        )
    except FpgaError as exc:
        row["status"] = f"verilator: {exc}"
        return row
    if icarus is not None and shape.n <= args.icarus_max_n:
        try:
            res = icarus.run(spec, inputs, args.icarus_timeout, 8 * modeled + 100_000)
            row.update(
                icarus_cycles=res.cycles,
                icarus_wall_s=res.wall_s,
                icarus_edges=res.edges,
                icarus_cycles_per_s=res.edges / res.wall_s,
                icarus_matches=bool(np.array_equal(res.out.reshape(want.shape), want)),
            )
            if not row["icarus_matches"]:
                row["status"] = "icarus: output differs from the golden model"
        except (FpgaError, subprocess.CalledProcessError) as exc:
            row["status"] = f"icarus: {exc}"
    return row


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "cores": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "verilator": cosim_mod.verilator_version(),
        "icarus": _icarus_version(),
        "cxx_opt": cosim_mod.CXX_OPT,
    }


def rtl_digest() -> str:
    """sha256 of the RTL sources (fpga/rtl/hm_*.v, *.vh), to say which RTL a run measured."""
    h = hashlib.sha256()
    for path in sorted([*cosim_mod.RTL_DIR.glob("hm_*.v"), *cosim_mod.RTL_DIR.glob("hm_*.vh")]):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _icarus_version() -> str:
    if shutil.which("iverilog") is None:
        return ""
    out = subprocess.run(["iverilog", "-V"], capture_output=True, text=True)
    return out.stdout.splitlines()[0] if out.stdout else ""


def run(args: argparse.Namespace) -> dict:
    shapes = QUICK if args.quick else SHAPES
    if args.kernels:
        shapes = [s for s in shapes if s.kernel in args.kernels]
    info = machine()
    use_icarus = not args.no_icarus and shutil.which("iverilog") and shutil.which("vvp")
    icarus = Icarus(latency=args.latency) if use_icarus else None
    rows = []
    with open_device("cosim", read_latency=args.latency, write_latency=args.latency) as dev:
        for shape in shapes:
            dev.model(shape.kernel)
            row = bench_shape(shape, dev, icarus, args)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        builds = {
            k: {"seconds": m.build_seconds, "params": m.params, "key": m.key}
            for k, m in dev.models.items()
        }
        clock = dev.clock_hz
    return {
        "command": "python bench/rtl_sim.py " + " ".join(sys.argv[1:]),
        "sources": {
            "cycles_simulated": "simulated",
            "seconds_simulated": "simulated",
            "cycles_modeled": "modeled",
            "verilator_cycles_per_s": "measured",
            "icarus_cycles_per_s": "measured",
        },
        "machine": info,
        "rtl_sha256": rtl_digest(),
        "clock_hz": clock,
        "memory_model": {
            "read_latency_cycles": args.latency,
            "write_latency_cycles": args.latency,
            "beats_per_cycle_per_port": 1,
        },
        "verilator_builds": builds,
        "icarus_compile_s": icarus.compile_s if icarus else {},
        "repeat": args.repeat,
        "rows": rows,
    }


def _fmt_rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1e3:,.1f}k" if value < 1e6 else f"{value / 1e6:,.2f}M"


def table(result: dict) -> Table:
    clock = result["clock_hz"] / 1e6
    t = Table(
        title=(
            f"RTL simulation: cycles simulated (RTL), model = spec cycle model (modeled), time at "
            f"{clock:g} MHz (simulated), simulator speed in clock edges/s (measured, "
            f"{result['machine']['cpu']}, {result['machine']['cores']} cores)"
        )
    )
    for col in ("kernel", "shape", "cycles", "model", "sim/model", f"time @{clock:g} MHz"):
        t.add_column(col, justify="left" if col in ("kernel", "shape") else "right")
    t.add_column("Verilator", justify="right")
    t.add_column("Icarus", justify="right")
    t.add_column("status")
    for r in result["rows"]:
        if "cycles_simulated" not in r:
            t.add_row(
                r["kernel"],
                r["shape"],
                "-",
                f"{r['cycles_modeled']:,}",
                "-",
                "-",
                "-",
                "-",
                r["status"],
            )
            continue
        t.add_row(
            r["kernel"],
            r["shape"],
            f"{r['cycles_simulated']:,}",
            f"{r['cycles_modeled']:,}",
            f"{r['ratio']:.2f}",
            f"{r['seconds_simulated'] * 1e6:,.1f} us",
            _fmt_rate(r.get("verilator_cycles_per_s")),
            _fmt_rate(r.get("icarus_cycles_per_s")),
            r["status"],
        )
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernels", nargs="*", choices=cosim_mod.RTL_KERNELS)
    p.add_argument("--quick", action="store_true", help="small shapes only")
    p.add_argument("--repeat", type=int, default=3, help="Verilator calls per shape (median)")
    p.add_argument("--icarus-max-n", type=int, default=2048, help="largest n run on Icarus")
    p.add_argument("--icarus-timeout", type=float, default=900.0, help="wall seconds per call")
    p.add_argument("--no-icarus", action="store_true")
    p.add_argument("--latency", type=int, default=32, help="HBM read/write latency, cycles")
    p.add_argument("--timeout", type=float, default=10.0, help="simulated seconds per call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    reason = cosim_mod.missing()
    if reason:
        print(f"cosim is not available here: {reason}", file=sys.stderr)
        return 1
    result = run(args)
    Console(width=200).print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
