"""The `hetmem` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from .errors import InputError

#: Piped or captured output (logs, CI) gets 120 columns instead of rich's 80, so that the
#: profile tables stay one line per step.
console = Console(width=None if sys.stdout.isatty() else 120)


# -- argument checks: every one runs before a model loads or training starts ---------------------


def fpga_targets() -> list[str]:
    """The names `--fpga` takes: auto and every registered target."""
    from .fpga.targets import TARGETS

    return ["auto", *TARGETS]


def check_target(value: str | None) -> None:
    if value is not None and value not in fpga_targets():
        raise InputError(
            "--fpga", f"unknown FPGA target {value!r}; targets are {', '.join(fpga_targets())}"
        )


def check_positive(args: argparse.Namespace, *names: str, minimum: int = 1) -> None:
    """Each named option is None or an int >= minimum."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise InputError(
                "--" + name.replace("_", "-"),
                f"expected an integer >= {minimum}, got {value}",
            )


def check_placement(value: str | None) -> dict[str, str] | None:
    from .pipeline import normalize_placement

    return None if value in (None, "auto") else normalize_placement(value)


def check_out(option: str, value: str | os.PathLike, default_name: str | None = None) -> Path:
    """The file an option names can be written: its directory exists and is writable (a
    directory given gets `default_name` in it). Returns the file's path."""
    target = Path(value)
    if target.is_dir():
        if default_name is None:
            raise InputError(option, f"{target} is a directory; name a file")
        target = target / default_name
    parent = target.parent
    if not parent.is_dir():
        raise InputError(option, f"cannot write {target}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise InputError(option, f"cannot write {target}: permission denied")
    return target


def check_demo(args: argparse.Namespace) -> None:
    from .methods import ATTENTION_METHODS, RAG_METHODS

    known = (*ATTENTION_METHODS, *RAG_METHODS)
    for name in args.method or []:
        if name not in known:
            raise InputError("--method", f"unknown method {name!r}; methods are {', '.join(known)}")
    check_target(args.fpga)
    check_placement(args.placement)
    check_positive(args, "budget", "k")
    # The demo's second batch row holds 3/4 of the context: it needs at least one token.
    check_positive(args, "context", minimum=2)


def check_calibrate(args: argparse.Namespace) -> Path:
    """The model directory, after every calibrate option is checked against it."""
    from .run import bundled_dir, max_positions, model_config
    from .selectors.weights import SELECTORS_FILE

    check_positive(
        args, "sequences", "tokens", "queries", "steps", "block_size", "indexer_dim",
        "indexer_heads",
    )  # fmt: skip
    directory = bundled_dir() if args.model is None else Path(args.model)
    limit = max_positions(model_config(directory))
    if limit is not None and args.tokens > limit:
        raise InputError(
            "--tokens", f"{args.tokens} tokens per sequence exceed the model's {limit} positions"
        )
    first = max(args.tokens // 8, 1)  # query positions are drawn from [tokens/8, tokens - 1)
    if args.tokens - 1 - first < args.queries - 1:
        raise InputError(
            "--queries",
            f"{args.queries} query positions do not fit {args.tokens}-token sequences "
            f"(at most {max(args.tokens - first, 1)})",
        )
    if args.block_size > args.tokens:
        raise InputError(
            "--block-size", f"{args.block_size} exceeds the {args.tokens} tokens of a sequence"
        )
    target = check_out("--out", directory if args.out is None else args.out, SELECTORS_FILE)
    if args.out is not None:  # a directory given: the file in it (calibration writes a file)
        args.out = str(target)
    return directory


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

    check_demo(args)
    placement = check_placement(args.placement)
    if args.fpga is not None and "fpga" not in (placement or {}).values():
        console.print(
            f"[yellow]note:[/yellow] --fpga {args.fpga} has no effect: the placement puts no "
            "step on the fpga (e.g. --placement gpu/fpga/fpga/gpu)"
        )
        args.fpga = None  # said once here

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


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .selectors.calibrate import calibrate_dir

    directory = check_calibrate(args)
    calibrate_dir(
        directory,
        sequences=args.sequences,
        tokens=args.tokens,
        queries=args.queries,
        steps=args.steps,
        block_size=args.block_size,
        indexer_dim=args.indexer_dim,
        indexer_heads=args.indexer_heads,
        seed=args.seed,
        out=args.out,
        console=console,
    )
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .fpga import list_devices
    from .fpga.manifest import Manifest, search_paths

    table = Table(title="FPGA targets on this machine")
    for column in ("target", "available", "device", "detail"):
        table.add_column(column)
    for info in list_devices():
        mark = "[green]yes[/green]" if info.available else "[dim]no[/dim]"
        table.add_row(info.target, mark, info.name, info.detail)
    console.print(table)
    manifest = Manifest.load(args.manifest)
    where = ", ".join(str(p) for p in search_paths())
    table = Table(title=f"xclbins of {manifest.path} (searched in {where})")
    for column in ("xclbin", "platform", "kernels", "file", "checksum", "bank map"):
        table.add_column(column)
    labels = {"match": "[green]matches[/green]", "mismatch": "[red]MISMATCH[/red]"}
    disagree = []
    for row in manifest.status():
        entry, path, check = row["entry"], row["path"], row["checksum"]
        found = f"[green]present[/green] {path}" if path else "[yellow]missing[/yellow]"
        checksum = labels.get(check, "not recorded" if check else "-")
        # each kernel with its implementation where the manifest says (rtl or hls)
        kernels = ", ".join(
            f"{k} ({entry.sources[k]})" if k in entry.sources else k for k in entry.kernels
        )
        specs = "[green]as the kernel specs[/green]"
        if row["specs"]:
            specs = "[red]DISAGREES with the kernel specs[/red]"
            disagree.append((entry.name, row["specs"]))
        table.add_row(entry.name, entry.platform, kernels, found, checksum, specs)
    console.print(table)
    for name, lines in disagree:
        console.print(
            f"[red]{escape(name)}: the manifest's bank map disagrees with the kernel specs[/red] "
            "(the runtime allocates by the specs: regenerate the link config with "
            "`python fpga/gen.py`, rebuild, and record the entry that "
            "hetmem.fpga.manifest.expected_entry() gives):",
            highlight=False,
        )
        for line in lines:
            console.print(f"  {escape(line)}", highlight=False)
    return 1 if disagree else 0


def cmd_run(args: argparse.Namespace) -> int:
    from .run import run

    with warnings.catch_warnings():
        warnings.simplefilter("once")
        result = run(
            model=args.model,
            method=args.method,
            fpga=args.fpga,
            context=args.context,
            prompts=args.prompts,
            budget=args.budget,
            placement=args.placement,
            seed=args.seed,
            console=console,
        )
    return 0 if result.answers else 1


def cmd_compare(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from .system.compare import DEFAULT_BATCHES, DEFAULT_CONTEXTS, compare, systems_of
    from .system.report import print_comparison, write_json, write_pngs

    if args.json:
        check_out("--json", args.json)
    systems = systems_of(args.gpu or ["MI210"], args.card or ["U55C"], args.link)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("modeling the grid", total=None)
        result = compare(
            args.model or ["Llama-3.1-8B"],
            args.method,
            args.contexts or DEFAULT_CONTEXTS,
            args.batches or DEFAULT_BATCHES,
            systems,
            budget=args.budget,
            per=args.per,
            objective=args.objective,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    print_comparison(result, console)
    if args.json:
        console.print(f"wrote {write_json(result, args.json, command=' '.join(sys.argv))}")
    if args.png:
        for path in write_pngs(result, args.png):
            console.print(f"wrote {path}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .system import Shape, get_model, plan
    from .system.compare import parse_tokens, systems_of
    from .system.report import plan_table

    (system,) = systems_of([args.gpu], [args.card], args.link)
    shape = Shape(get_model(args.model), parse_tokens(args.context), args.batch, budget=args.budget)
    p = plan(args.method, shape, system, objective=args.objective, overlap=not args.sequential,
             per=args.per)  # fmt: skip
    title = (
        f"placements of {args.method} for {shape.model.name}, context {shape.context}, "
        f"batch {shape.batch}, budget {shape.budget} on {system.label} (per {args.per})"
    )
    console.print(plan_table(p, title))
    console.print(p.explain())
    return 0


def cmd_profile_device(args: argparse.Namespace) -> int:
    from rich.progress import Progress
    from rich.table import Table

    from .device import torch_device
    from .system import save_profile
    from .system.calibrate_device import DEFAULT, QUICK, profile_device

    sizes = QUICK if args.quick else DEFAULT
    check_out("--out", args.out)
    torch_device(args.device)  # an unknown device is an error before any microbenchmark
    if args.repeat is not None:
        check_positive(args, "repeat")
        sizes = type(sizes)(**{**sizes.__dict__, "repeat": args.repeat})
    with Progress(console=console) as progress:
        task = progress.add_task(f"microbenchmarks on {args.device}", total=4)
        profile = profile_device(args.device, sizes=sizes,
                                 progress=lambda name: progress.update(task, advance=1, description=name))  # fmt: skip
    try:
        path = save_profile(profile, args.out)
    except OSError as exc:
        raise InputError("out", f"cannot write {args.out}: {exc}") from None
    table = Table(title=f"{profile.name} [profile source: {profile.source}]")
    for col in ("figure", "value", "unit", "source", "how"):
        table.add_column(col)
    for key, fig in profile.figures.items():
        table.add_row(key, f"{fig.value:.4g}", fig.unit, fig.source, fig.note)
    eff = profile.efficiency
    table.add_row(
        "launch_s", f"{eff.launch_s:.3g}", "s", eff.source, "16-element add, synchronized"
    )
    console.print(table)
    console.print(f"wrote {path}: use it as System.of(gpu={str(path)!r}) or "
                  f"`hetmem compare --gpu {path}`")  # fmt: skip
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


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
    p.add_argument("--fpga", default=None, help=f"FPGA target: {', '.join(fpga_targets())}")
    p.add_argument("--context", type=int, default=8192, help="context length in tokens")
    p.add_argument("--budget", type=int, default=1024, help="token budget of sparse attention")
    p.add_argument("--k", type=int, default=5, help="documents retrieved by the RAG methods")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "calibrate", help="train the DSA indexer and Seer AttnGate of a model (model frozen)"
    )
    p.add_argument("--model", default=None, help="local model directory (default: bundled)")
    p.add_argument("--sequences", type=int, default=24, help="calibration sequences")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--queries", type=int, default=64, help="query positions per sequence")
    p.add_argument("--steps", type=int, default=150, help="training steps per selector per layer")
    p.add_argument("--block-size", type=int, default=16, help="Seer block size (tokens)")
    p.add_argument("--indexer-dim", type=int, default=64, help="DSA indexer head dim")
    p.add_argument(
        "--indexer-heads", type=int, default=None, help="DSA indexer heads (default: Hq)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output file (default: beside the model)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser(
        "run", help="the main job: a model answers long-context passkey prompts through hetmem"
    )
    p.add_argument("--model", default=None, help="local model directory (default: bundled)")
    p.add_argument("--method", default="dsa", help="sparse-attention method: dsa, seer, quest")
    p.add_argument("--fpga", default="auto", help=f"FPGA target: {', '.join(fpga_targets())}")
    p.add_argument("--context", type=int, default=None, help="prompt tokens (default: model card)")
    p.add_argument("--prompts", type=int, default=4, help="passkey prompts")
    p.add_argument("--budget", type=int, default=None, help="tokens attended (default: 1/8)")
    p.add_argument(
        "--placement",
        default="gpu/fpga/fpga/gpu",
        help="devices of the four steps, or 'auto' (the system model's planner picks them)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_run)

    objectives = ("latency", "energy")
    p = sub.add_parser(
        "compare",
        help="GPU+FPGA vs the GPU alone over models, methods, contexts, batches (modeled)",
    )
    p.add_argument("--model", action="append", help="shipped config name or config.json path "
                   "(repeatable; default Llama-3.1-8B)")  # fmt: skip
    p.add_argument("--method", action="append", help="method (repeatable; default all five)")
    p.add_argument("--contexts", default=None, help="e.g. 4k,16k,64k,256k,1M (the default)")
    p.add_argument("--batches", default=None, help="e.g. 1,8,64 (the default)")
    p.add_argument("--gpu", action="append", help="GPU profile name or file (repeatable, "
                   "paired with --card; default MI210)")  # fmt: skip
    p.add_argument("--card", action="append", help="FPGA card profile (default U55C)")
    p.add_argument("--link", default=None, help="link override: pcie3-x16, pcie4-x16, "
                   "pcie5-x16, p2p-gen3")  # fmt: skip
    p.add_argument("--objective", choices=objectives, default="latency")
    p.add_argument("--budget", type=_positive, default=2048, help="tokens per query")
    p.add_argument("--per", choices=("token", "request"), default="token")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    p.add_argument("--png", default=None, help="write PNG figures into this directory")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("plan", help="every placement of one shape, ranked, and why (modeled)")
    p.add_argument("--model", default="Llama-3.1-8B", help="shipped config or config.json")
    p.add_argument("--method", default="quest")
    p.add_argument("--context", default="32k", help="tokens, e.g. 32768 or 32k")
    p.add_argument("--batch", type=_positive, default=1)
    p.add_argument("--budget", type=_positive, default=2048)
    p.add_argument("--gpu", default="MI210")
    p.add_argument("--card", default="U55C")
    p.add_argument("--link", default=None)
    p.add_argument("--objective", choices=objectives, default="latency")
    p.add_argument("--per", choices=("token", "request"), default="token")
    p.add_argument("--sequential", action="store_true",
                   help="offload runs the paper's sequential schedule (default: overlapped)")  # fmt: skip
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "profile-device",
        help="microbenchmark the local torch device and write a measured profile JSON",
    )
    p.add_argument("--device", default="gpu", help="gpu (CUDA/ROCm, else the CPU) or cpu")
    p.add_argument("--out", default="device_profile.json", help="profile file to write")
    p.add_argument("--quick", action="store_true", help="small sizes (seconds; less exact)")
    p.add_argument("--repeat", type=int, default=None, help="runs per microbenchmark")
    p.set_defaults(func=cmd_profile_device)

    p = sub.add_parser(
        "devices", help="FPGA targets and cards found, and which xclbins are present"
    )
    p.add_argument("--manifest", default=None, help="bitstream manifest (default: bitstreams/)")
    p.set_defaults(func=cmd_devices)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command. A bad argument, a hetmem error or a file that cannot be read or
    written ends it with "error: ..." and status 2, never a traceback."""
    from .errors import HetmemError

    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        return args.func(args)
    except HetmemError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        return 2
    except (OSError, json.JSONDecodeError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
