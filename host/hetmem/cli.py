"""The `hetmem` command."""

from __future__ import annotations

import argparse
import sys
import warnings

from rich.console import Console

console = Console()


def cmd_methods(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .methods import REGISTRY, method_class
    from .methods.base import STEPS
    from .pipeline import DEFAULT_PLACEMENT

    table = Table(title="hetmem methods: four steps each, with the default device")
    table.add_column("method")
    table.add_column("step")
    table.add_column("what it does")
    table.add_column("device")
    for name in REGISTRY:
        cls = method_class(name)
        for i, step in enumerate(STEPS):
            device = DEFAULT_PLACEMENT[step]
            if cls.kernel and step in ("relevancy", "retrieval"):
                device += f" or fpga (kernel {cls.kernel})"
            head = f"[bold]{name}[/bold]\n[dim]{cls.family}[/dim]" if i == 0 else ""
            table.add_row(head, step, cls.describe[step], device)
    console.print(table)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    def show(result) -> None:
        console.rule(f"[bold]{result.method}[/bold]")
        console.print(result.summary)
        console.print(result.profile.table(title=f"{result.method}: per-step profile"))

    with warnings.catch_warnings():
        warnings.simplefilter("once")
        run_demo(
            methods=args.method or None,
            placement=args.placement,
            fpga=args.fpga,
            context=args.context,
            budget=args.budget,
            k=args.k,
            seed=args.seed,
            on_result=show,
        )
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hetmem", description="GPU + FPGA runtime for LLM memory processing"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list the methods, their steps and devices")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("demo", help="one decode step of each method on synthetic data")
    p.add_argument("--method", action="append", help="run only this method (repeatable)")
    p.add_argument(
        "--placement", default=None, help="devices of the four steps, e.g. gpu/fpga/fpga/gpu"
    )
    p.add_argument("--fpga", default=None, help="FPGA target: emu, cosim, xrt, pynq")
    p.add_argument("--context", type=int, default=8192, help="context length in tokens")
    p.add_argument("--budget", type=int, default=1024, help="token budget of sparse attention")
    p.add_argument("--k", type=int, default=5, help="documents retrieved by the RAG methods")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import HetmemError

    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        return args.func(args)
    except HetmemError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
