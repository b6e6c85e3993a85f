"""How a `Comparison` or a `Plan` is shown: rich tables (every figure with its source), a
JSON file, and PNG figures (matplotlib, imported only when asked for)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InputError
from .compare import PAPER, Comparison, tokens_label
from .planner import Plan


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f}"


def _ratio(x: float) -> str:
    color = "green" if x > 1 + 1e-9 else "red" if x < 1 - 1e-9 else "white"
    return f"[{color}]{x:.3f}x[/{color}]"


def comparison_tables(cmp: Comparison) -> list[Any]:
    """The grid, the crossovers, the paper check and the overlap gain, as rich renderables."""
    from rich.table import Table

    out: list[Any] = []
    per = "token" if cmp.per == "token" else "request"
    models = list(dict.fromkeys(r.model for r in cmp.rows))
    for system in cmp.systems:
        for model in models:
            rows = [r for r in cmp.rows if r.system == system.label and r.model == model]
            if not rows:
                continue
            t = Table(title=f"{model} on {system.label}: GPU alone vs GPU+FPGA, per {per} "
                            f"[{rows[0].source}]", caption=rows[0].basis)  # fmt: skip
            for col in ("method", "context", "batch", f"GPU ms/{per}", "speedup seq",
                        "speedup ovl", "energy seq", "energy ovl", "mem share",
                        f"choice ({cmp.objective})", "source"):  # fmt: skip
                t.add_column(col, justify="left" if col == "method" else "right")
            for r in rows:
                t.add_row(r.method, tokens_label(r.context), str(r.batch), _ms(r.gpu_s),
                          _ratio(r.speedup), _ratio(r.speedup_overlapped), _ratio(r.energy_ratio),
                          _ratio(r.energy_ratio_overlapped), f"{r.memory_share:.0%}",
                          "GPU" if r.choice == "gpu alone" else "offload", r.source)  # fmt: skip
            out.append(t)
    t = Table(title="crossover: where offload (overlapped) starts and stops paying, "
                    "and the engine it would need [source: modeled]")  # fmt: skip
    for col in ("model", "method", "system", "where offload pays on the grid"):
        t.add_column(col)
    for c in cmp.crossovers:
        t.add_row(c.model, c.method, c.system, c.summary)
    out.append(t)
    if cmp.paper:
        t = Table(title="check against the paper: MI210 + U55C, sequential offload (the "
                        "paper's schedule) [modeled vs the paper's reported]")  # fmt: skip
        for col in ("method", "modeled speedup", "paper (Fig. 1)", "modeled energy ratio",
                    "paper (Fig. 1)", "modeled memory share", "paper", "speedup", "energy"):  # fmt: skip
            t.add_column(col)

        def yes(ok: bool) -> str:
            return "[green]agrees[/green]" if ok else "[red]differs[/red]"

        fs, fe, sh = PAPER["figure1_speedup"], PAPER["figure1_energy"], PAPER["memory_share"]
        for p in cmp.paper:
            t.add_row(p.method, f"{p.speedup[0]:.2f}-{p.speedup[1]:.2f}x", f"{fs[0]}-{fs[1]}x",
                      f"{p.energy[0]:.2f}-{p.energy[1]:.2f}x", f"{fe[0]}-{fe[1]}x",
                      f"{p.memory_share[0]:.0%}-{p.memory_share[1]:.0%}",
                      f"{sh[0]:.0%}-{sh[1]:.0%}",
                      yes(p.speedup_agrees), yes(p.energy_agrees))  # fmt: skip
        lo = min(p.speedup[0] for p in cmp.paper), max(p.speedup[1] for p in cmp.paper)
        elo = min(p.energy[0] for p in cmp.paper), max(p.energy[1] for p in cmp.paper)
        os_, oe = PAPER["overall_speedup"], PAPER["overall_energy"]
        t.add_row("[bold]overall[/bold]", f"{lo[0]:.2f}-{lo[1]:.2f}x", f"{os_[0]}-{os_[1]}x",
                  f"{elo[0]:.2f}-{elo[1]:.2f}x", f"{oe[0]}-{oe[1]}x", "", "",
                  yes(lo[1] >= os_[0]), yes(elo[1] >= oe[0]))  # fmt: skip
        out.append(t)
        lines = [f"[bold]{p.method}[/bold]: {p.verdict}" for p in cmp.paper]
        out.append("\n".join(lines))
    t = Table(title="beyond the paper: the overlapped schedule's gain over the sequential one "
                    "(sequential time / overlapped time) [source: modeled]")  # fmt: skip
    for col in ("model", "method", "system", "gain range", "largest at"):
        t.add_column(col)
    for g in cmp.overlap_gains():
        t.add_row(g["model"], g["method"], g["system"], f"{g['min']:.2f}-{g['max']:.2f}x",
                  f"{tokens_label(g['at']['context'])}, batch {g['at']['batch']}")  # fmt: skip
    out.append(t)
    return out


def print_comparison(cmp: Comparison, console: Any) -> None:
    for renderable in comparison_tables(cmp):
        console.print(renderable)
    for note in cmp.notes:
        console.print(f"[dim]{note}[/dim]")


def write_json(cmp: Comparison, path: str | Path, **extra: Any) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**extra, **cmp.to_json()}, indent=1) + "\n")
    except OSError as exc:
        raise InputError("json", f"cannot write {path}: {exc}") from None
    return path


def write_pngs(cmp: Comparison, directory: str | Path) -> list[Path]:
    """speedup and energy ratio vs context per method (one panel per device pair; solid:
    the smallest batch, dashed: the largest), and the memory-processing share per method and
    context. Each figure's title says its source."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise InputError("png", "PNG figures need matplotlib (pip install matplotlib)") from exc
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError("png", f"cannot create {directory}: {exc}") from None
    sources = sorted({r.source for r in cmp.rows})
    source = " / ".join(sources)
    models = list(dict.fromkeys(r.model for r in cmp.rows))
    methods = list(dict.fromkeys(r.method for r in cmp.rows))
    batches = sorted({r.batch for r in cmp.rows})
    shown = [batches[0], batches[-1]] if len(batches) > 1 else batches
    paths = []
    for metric, label, fname in (("speedup_overlapped", "speedup vs GPU alone (overlapped)", "speedup"),
                                 ("energy_ratio_overlapped", "energy ratio vs GPU alone (overlapped)", "energy")):  # fmt: skip
        for model in models:
            fig, axes = plt.subplots(1, len(cmp.systems), figsize=(5 * len(cmp.systems), 4),
                                     squeeze=False, sharey=True)  # fmt: skip
            for ax, system in zip(axes[0], cmp.systems, strict=True):
                for i, method in enumerate(methods):
                    for batch, style in zip(shown, ("-", "--"), strict=False):
                        rs = sorted((r for r in cmp.rows if (r.model, r.system, r.method, r.batch)
                                     == (model, system.label, method, batch)), key=lambda r: r.context)  # fmt: skip
                        if rs:
                            ax.plot([r.context for r in rs], [getattr(r, metric) for r in rs],
                                    style, marker="o", color=f"C{i}", label=f"{method} B={batch}")  # fmt: skip
                ax.axhline(1.0, color="gray", lw=0.8)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("context (tokens)")
                ax.set_title(system.label, fontsize=9)
            axes[0][0].set_ylabel(label + " (>1: offload pays)")
            axes[0][-1].legend(fontsize=7)
            fig.suptitle(f"{model}: {label} [{source}]", fontsize=10)
            fig.tight_layout()
            path = directory / f"system_{fname}_{_slug(model)}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    for model in models:
        fig, axes = plt.subplots(1, len(cmp.systems), figsize=(5 * len(cmp.systems), 4),
                                 squeeze=False, sharey=True)  # fmt: skip
        for ax, system in zip(axes[0], cmp.systems, strict=True):
            for i, method in enumerate(methods):
                for batch, style in zip(shown, ("-", "--"), strict=False):
                    rs = sorted((r for r in cmp.rows if (r.model, r.system, r.method, r.batch)
                                 == (model, system.label, method, batch)), key=lambda r: r.context)  # fmt: skip
                    if rs:
                        ax.plot([r.context for r in rs], [100 * r.memory_share for r in rs], style,
                                marker="o", color=f"C{i}", label=f"{method} B={batch}")  # fmt: skip
            ax.axhspan(100 * PAPER["memory_share"][0], 100 * PAPER["memory_share"][1],
                       color="gray", alpha=0.12, label="paper: 22-97%")  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.set_ylim(0, 100)
            ax.set_xlabel("context (tokens)")
            ax.set_title(system.gpu.name + " alone", fontsize=9)
        axes[0][0].set_ylabel("memory processing, % of inference time")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"{model}: memory-processing share of the GPU alone's time [{source}]",
                     fontsize=10)  # fmt: skip
        fig.tight_layout()
        path = directory / f"system_memory_share_{_slug(model)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-").lower()


def plan_table(plan: Plan, title: str) -> Any:
    """Every placement, ranked: its time, its energy, valid or why not."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("rank", "placement", "schedule", "ms", "J", f"x best ({plan.objective})",
                "source / why not"):  # fmt: skip
        t.add_column(col)
    best = plan.choice.cost(plan.objective)
    rank = 0
    for c in plan.candidates:
        if c.valid:
            rank += 1
            assert c.schedule is not None
            t.add_row(str(rank), ("[bold]" + c.placement + "[/bold]") if rank == 1 else c.placement,
                      c.schedule.kind, _ms(c.seconds), f"{c.joules:.4g}",
                      f"{c.cost(plan.objective) / max(best, 1e-30):.3f}", "modeled")  # fmt: skip
        else:
            t.add_row("-", f"[dim]{c.placement}[/dim]", "", "", "", "", f"[dim]{c.reason}[/dim]")
    return t
