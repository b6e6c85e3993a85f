"""Dense attention against each sparse method's Apply step, one decode query.

    python bench/decode_attention.py                  # contexts 4k-64k, budget 2048, batch 1 and 8
    python bench/decode_attention.py --contexts 4096 8192 --batches 1 --repeat 3

Layout of a Llama-3-8B layer: 32 query heads, 8 KV heads, head dim 128, float32. All times
are `measured` wall clock on this machine's torch device, in --repeat interleaved rounds:
each round runs dense once and every sparse step once on each of --queries distinct decode
queries (each with its own selection, as successive decode steps have), so a sparse figure
is the median of repeat x queries samples and a dense one of repeat; the JSON keeps the
quartiles too.
Dense is timed two ways, torch's scaled_dot_product_attention (enable_gqa) and a grouped
matmul with the same math; the speedup is against the faster of the two. Writes a table and
JSON (bench/results/decode_attention.json).

DSA runs with kv_layout="token" unless --dsa-layout says otherwise: its memory keeps a
token-major copy of the keys (half the KV cache's bytes; the JSON gives both per row) so
that Apply gathers one contiguous row of keys per selected token. Every method sums the
values straight from the KV cache.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from hetmem.attention import AttentionQuery, KVCache
from hetmem.device import gpu_backend, synchronize, torch_device
from hetmem.methods import get

METHODS = {
    "dsa": lambda args: get("dsa", kv_layout=args.dsa_layout),
    "quest": lambda args: get("quest", page_size=16),
    "seer": lambda args: get("seer", block_size=64),
}


def timed_round_robin(
    fns: dict[str, list[Callable[[], object]]], device: torch.device, repeat: int
) -> dict[str, list[float]]:
    """Wall times of each candidate, measured in interleaved rounds so that a noisy neighbour
    slows every candidate alike and the ratios stay fair. A candidate is a list of calls (one
    per decode query); each round runs every call of every candidate once, so a candidate
    with Q calls gets repeat * Q samples."""
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for calls in fns.values():
        calls[0]()  # warm-up
    for _ in range(repeat):
        for name, calls in fns.items():
            for fn in calls:
                synchronize(device)
                start = time.perf_counter()
                fn()
                synchronize(device)
                runs[name].append(time.perf_counter() - start)
    return runs


def quartiles(samples: list[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile)."""
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q1, q2, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, q2, q3


def dense_grouped(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    b, hq, t, d = q.shape
    hkv = keys.shape[1]
    qg = q.view(b, hkv, hq // hkv * t, d)
    probs = torch.softmax((qg @ keys.transpose(-1, -2)) / math.sqrt(d), dim=-1)
    return (probs @ values).view(b, hq, t, d)


def bench_case(args: argparse.Namespace, device: torch.device, batch: int, context: int) -> dict:
    gen = torch.Generator().manual_seed(context + batch)
    shape = (batch, args.kv_heads, context, args.dim)
    kv = KVCache(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)).to(device)
    # Distinct decode queries, as successive decode steps bring: each selects its own tokens,
    # so the sparse steps read rows the previous call did not leave in cache.
    queries = [
        AttentionQuery(torch.randn(batch, args.q_heads, 1, args.dim, generator=gen).to(device))
        for _ in range(args.queries)
    ]
    q = queries[0].q
    keys, values = kv.keys, kv.values
    fns: dict[str, list[Callable[[], object]]] = {
        "dense_sdpa": [partial(F.scaled_dot_product_attention, q, keys, values, enable_gqa=True)],
        "dense_grouped": [partial(dense_grouped, q, keys, values)],
    }
    selected = {}
    extra_bytes = {}
    for name, make in METHODS.items():
        method = make(args)
        memory = method.prepare(kv)
        extra_bytes[name] = getattr(memory, "token_copy_nbytes", 0)
        selections = [method.retrieve(method.relevancy(memory, qy), args.budget) for qy in queries]
        selected[name] = int(selections[0].valid.sum()) * selections[0].unit
        fns[f"{name}_select"] = [
            partial(_select, method, memory, qy, args.budget) for qy in queries
        ]
        fns[f"{name}_apply"] = [
            partial(method.apply, memory, sel, qy)
            for sel, qy in zip(selections, queries, strict=True)
        ]
    runs = timed_round_robin(fns, device, args.repeat)
    row: dict = {"batch": batch, "context": context, "budget": args.budget}
    row["kv_bytes"] = sum(t.numel() * t.element_size() for t in (keys, values))
    row["dsa_token_copy_bytes"] = extra_bytes["dsa"]
    for name, samples in runs.items():
        q1, med, q3 = quartiles(samples)
        row[f"{name}_s"] = med
        row[f"{name}_iqr_s"] = [q1, q3]
        row[f"{name}_samples"] = len(samples)
    dense = min(row["dense_sdpa_s"], row["dense_grouped_s"])
    for name in METHODS:
        row[f"{name}_selected_tokens"] = selected[name]
        row[f"{name}_speedup"] = dense / row[f"{name}_apply_s"]
    return row


def _select(method, memory, query, budget):
    return method.retrieve(method.relevancy(memory, query), budget)


def run(args: argparse.Namespace) -> dict:
    device = torch_device(args.device)
    console = Console()
    rows = []
    cases = [(b, c) for b in args.batches for c in args.contexts]
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("decode attention", total=len(cases))
        for batch, context in cases:
            progress.update(task, description=f"batch {batch}, context {context}")
            rows.append(bench_case(args, device, batch, context))
            progress.advance(task)
    return {
        "command": " ".join([*_thread_env(), "python", "bench/decode_attention.py", *sys.argv[1:]]),
        "source": "measured",
        "device": f"{device} ({gpu_backend()})",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "repeat": args.repeat,
        "queries": args.queries,
        "dsa_kv_layout": args.dsa_layout,
        "layout": {
            "q_heads": args.q_heads,
            "kv_heads": args.kv_heads,
            "dim": args.dim,
            "dtype": "float32",
        },
        "rows": rows,
    }


def _thread_env() -> list[str]:
    """Thread-count variables the run was started with (they change every timing)."""
    return [
        f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ
    ]


def table(result: dict) -> Table:
    t = Table(
        title=f"decode attention, one query: ms (measured on {result['device']}, median); "
        "x = dense (faster of sdpa and grouped) / sparse Apply"
    )
    for col in ("B", "context", "sdpa", "grouped"):
        t.add_column(col, justify="right", no_wrap=True)
    for name in METHODS:
        t.add_column(name, justify="right", no_wrap=True)
        t.add_column("x", justify="right", no_wrap=True)
    for r in result["rows"]:
        cells = [
            str(r["batch"]),
            str(r["context"]),
            f"{r['dense_sdpa_s'] * 1e3:.1f}",
            f"{r['dense_grouped_s'] * 1e3:.1f}",
        ]
        for name in METHODS:
            cells += [f"{r[f'{name}_apply_s'] * 1e3:.2f}", f"{r[f'{name}_speedup']:.1f}"]
        t.add_row(*cells)
    return t


def memory_note(result: dict) -> str:
    """What DSA's kv_layout costs in memory, at the largest case."""
    if result["dsa_kv_layout"] != "token":
        return "dsa: kv_layout=head (Apply gathers from the shared KV cache; no copy)"
    r = max(result["rows"], key=lambda r: r["kv_bytes"])
    return (
        f"dsa: kv_layout=token keeps a token-major copy of the keys in its memory: "
        f"{r['dsa_token_copy_bytes'] / 2**20:.0f} MiB beside the {r['kv_bytes'] / 2**20:.0f} MiB "
        f"KV cache at B={r['batch']}, context {r['context']} "
        f"(x{r['dsa_token_copy_bytes'] / r['kv_bytes']:.2f})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--contexts", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536]
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5, help="interleaved rounds")
    parser.add_argument(
        "--queries",
        type=int,
        default=8,
        help="distinct decode queries per case; each round times every sparse step on each",
    )
    parser.add_argument("--device", default="gpu")
    parser.add_argument(
        "--dsa-layout",
        choices=["token", "head"],
        default="token",
        help="DSA's kv_layout: token (a token-major KV copy in its memory) or head (none)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "decode_attention.json"
    )
    args = parser.parse_args(argv)
    for flag in ("repeat", "queries", "budget", "q_heads", "kv_heads", "dim"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if any(c < 1 for c in args.contexts) or any(b < 1 for b in args.batches):
        parser.error("--contexts and --batches must be >= 1")
    if args.budget > min(args.contexts):
        parser.error(f"--budget {args.budget} exceeds the shortest context {min(args.contexts)}")
    result = run(args)
    Console(width=max(120, Console().width)).print(table(result))
    print(memory_note(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
