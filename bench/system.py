"""Does GPU+FPGA pay off? The system model over the issue's grid (all `modeled`).

    python bench/system.py                          # 5 models x 5 methods x 4k-1M x batch 1-64 x 3 pairs
    python bench/system.py --models Llama-3.1-8B --methods quest seer --contexts 4k 64k --batches 1
    python bench/system.py --gpu H100-SXM --card U55C --full

Models: the shipped configs (Llama-3.1-8B, Llama-3.1-70B, Qwen3-32B, GPT-OSS-120B,
DeepSeek-V3.2 with DSA) or a local config.json; methods dsa, seer, quest, dense_rag,
bm25_rag; device pairs MI210 + U55C (the paper's), H100-SXM + U55C, A100-80GB + U280. Each
cell is the GPU alone, the paper's sequential offload and the overlapped offload per
generated token (`--per request`: prefill + 256 tokens), from `hetmem.system`: roofline GPU
steps over data-sheet profiles, the kernels' cycle models at the manifest's clock, the link
model. Nothing here is timed on this machine.

Writes bench/results/system.json (every cell, the crossovers, the paper check, the overlap
gain, the profiles used) and PNG figures (bench/results/system_*.png): speedup and energy
ratio against the GPU alone per method and context (a panel per device pair), and the
memory-processing share of the GPU alone's time. Prints a summary per (model, method, pair),
the crossover, the check against the paper and the overlap gain (`--full`: every cell).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from hetmem.system.compare import (
    DEFAULT_BATCHES,
    DEFAULT_CONTEXTS,
    DEFAULT_METHODS,
    compare,
    parse_tokens,
    systems_of,
    tokens_label,
)
from hetmem.system.report import comparison_tables, write_json, write_pngs
from hetmem.system.shape import shipped_configs

RESULTS = Path(__file__).with_name("results")
MODELS = ("Llama-3.1-8B", "Llama-3.1-70B", "Qwen3-32B", "GPT-OSS-120B", "DeepSeek-V3.2")


def summary_table(cmp) -> Table:
    t = Table(title="per model, method and device pair: the grid's range [source: modeled]")
    for col in ("model", "method", "system", "speedup ovl (best at)", "speedup seq",
                "energy ratio ovl", "memory share", "crossover"):  # fmt: skip
        t.add_column(col)
    cross = {(c.model, c.method, c.system): c for c in cmp.crossovers}
    keys = dict.fromkeys((r.model, r.method, r.system) for r in cmp.rows)
    for key in keys:
        rs = [r for r in cmp.rows if (r.model, r.method, r.system) == key]
        top = max(rs, key=lambda r: r.speedup_overlapped)
        c = cross[key]
        t.add_row(
            *key,
            f"{min(r.speedup_overlapped for r in rs):.3f}-{top.speedup_overlapped:.3f}x "
            f"({tokens_label(top.context)}, B={top.batch})",
            f"{min(r.speedup for r in rs):.3f}-{max(r.speedup for r in rs):.3f}x",
            f"{min(r.energy_ratio_overlapped for r in rs):.3f}-"
            f"{max(r.energy_ratio_overlapped for r in rs):.3f}x",
            f"{min(r.memory_share for r in rs):.0%}-{max(r.memory_share for r in rs):.0%}",
            "never in the grid" if c.never else "pays somewhere (see below)",
        )
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--models", nargs="+", default=list(MODELS), help="shipped names or config.json paths"
    )
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    ap.add_argument("--contexts", nargs="+", default=[str(c) for c in DEFAULT_CONTEXTS])
    ap.add_argument("--batches", nargs="+", type=int, default=list(DEFAULT_BATCHES))
    ap.add_argument("--gpu", action="append", help="GPU profile (repeatable, paired with --card)")
    ap.add_argument("--card", action="append", help="card profile (repeatable)")
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--per", choices=("token", "request"), default="token")
    ap.add_argument("--objective", choices=("latency", "energy"), default="latency")
    ap.add_argument("--out", default=str(RESULTS / "system.json"))
    ap.add_argument("--png", default=str(RESULTS), help="directory of the PNG figures")
    ap.add_argument("--full", action="store_true", help="print every cell of the grid")
    args = ap.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 160)
    contexts = [parse_tokens(c) for c in args.contexts]
    systems = systems_of(args.gpu, args.card)
    start = time.perf_counter()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("modeling the grid", total=None)
        cmp = compare(
            args.models, args.methods, contexts, args.batches, systems, budget=args.budget,
            per=args.per, objective=args.objective,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )  # fmt: skip
    seconds = time.perf_counter() - start
    tables = comparison_tables(cmp)
    n_grid = (
        0
        if args.full
        else sum(1 for t in tables if isinstance(t, Table) and "GPU alone vs" in str(t.title))
    )
    console.print(summary_table(cmp))
    for t in tables[n_grid:]:
        console.print(t)
    for note in cmp.notes:
        console.print(f"[dim]{note}[/dim]")
    extra = {
        "command": "python "
        + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "shipped_configs": sorted({p.name for p in shipped_configs().values()}),
        "model_seconds": seconds,
    }
    console.print(f"wrote {write_json(cmp, args.out, **extra)}")
    for path in write_pngs(cmp, args.png):
        console.print(f"wrote {path}")
    console.print(f"[dim]{len(cmp.rows)} cells modeled in {seconds:.1f} s[/dim]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
