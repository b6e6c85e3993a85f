"""Golden-model throughput against the float torch reference, per kernel, at 128k candidates.

    python bench/emu_speed.py                       # every kernel, n = 131072, 7 repeats
    python bench/emu_speed.py --kernels bm25 --n 65536 --repeat 3

The emulated card (`emu`) runs each kernel's bit-exact golden model; it should cost no more
than twice the float path it replaces, so that emulation is a cheap default. For each
kernel one slot is timed two ways on the same float data:

- golden: per call, quantize the query and run `spec.golden` over the resident quantized
  memory (quantized once, as the card holds it), top-k or bitmap included;
- float: the kernel's float semantics in torch, as the methods compute them (the float32
  scores of methods/, float64 for bm25), then the project's top-k (`topk_select`, the
  stable sort every method's Retrieval uses) or the threshold rule.

Both are `measured` (wall clock, median of --repeat interleaved runs) on this machine's
CPU. The target is golden/float speed >= 0.5 (golden at most twice the float time).
Writes a table and JSON (bench/results/emu_speed.json) with the command and the machine.

Threads: numpy's BLAS (the golden models' exact float matmuls) and torch each use every
core by default. On a machine shared with other work, multithreaded BLAS calls slow down
far more than single-threaded ones; to compare one core against one core:

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python bench/emu_speed.py --threads 1
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from hetmem import kernels
from hetmem.selection import topk_select

TARGET = 0.5


@dataclass
class Case:
    """One kernel call: float memory and query (numpy), the spec's query params, and the
    float torch reference over torch copies of the same floats."""

    kernel: str
    shape: str
    memory: dict
    query: dict
    params: dict
    reference: Callable[[], object]


def heavy_keys(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Student-t(3) rows with 4 outlier channels (the tests' realistic key distribution)."""
    keys = rng.standard_t(3, (n, d)).astype(np.float32)
    keys[:, rng.choice(d, 4, replace=False)] *= 20
    return keys


def token_indexer(rng: np.random.Generator, n: int, k: int) -> Case:
    heads, dim, queries = 64, 128, 1  # DeepSeek-V3.2's lightning indexer
    keys = heavy_keys(rng, n, dim)
    q = rng.standard_normal((queries, heads, dim)).astype(np.float32)
    w = rng.uniform(-1, 1, (queries, heads)).astype(np.float32)
    tk, tq, tw = (torch.from_numpy(a) for a in (keys, q, w))

    def reference() -> object:
        logits = torch.einsum("qhd,nd->qnh", tq, tk)
        scores = (torch.relu(logits) * tw[:, None, :]).sum(-1)
        return topk_select(scores, k)

    shape = f"n={n} Di={dim} H={heads} Q={queries} k={k}"
    return Case("token_indexer", shape, {"keys": keys}, {"q": q, "w": w}, {"k": k}, reference)


def page_indexer(rng: np.random.Generator, n: int, k: int) -> Case:
    heads, dim, queries, page = 4, 128, 1, 16
    # Page summaries of `page` keys each: mins <= maxs by construction.
    spread = np.abs(rng.standard_t(3, (n, dim))).astype(np.float32) * page**0.5
    centre = heavy_keys(rng, n, dim)
    mins, maxs = centre - spread, centre + spread
    q = rng.standard_normal((queries, heads, dim)).astype(np.float32)
    tmin, tmax, tq = (torch.from_numpy(a) for a in (mins, maxs, q))

    def reference() -> object:
        bound = tq.clamp(min=0) @ tmax.T + tq.clamp(max=0) @ tmin.T  # [Q, R, n]
        return topk_select(bound.amax(dim=1), k)

    shape = f"n={n} pages D={dim} R={heads} Q={queries} k={k}"
    return Case("page_indexer", shape, {"mins": mins, "maxs": maxs}, {"q": q}, {"k": k}, reference)


def block_gate(rng: np.random.Generator, n: int, k: int, tau: float | None = None) -> Case:
    dim, queries = 128, 1
    keys = heavy_keys(rng, n, dim)
    q = rng.standard_normal((queries, dim)).astype(np.float32)
    tk, tq = torch.from_numpy(keys), torch.from_numpy(q)

    def reference() -> object:
        logits = tq @ tk.T / math.sqrt(dim)
        if tau is None:
            return topk_select(logits, k)
        return logits >= logits.amax(-1, keepdim=True) + math.log(tau)

    params = {"k": k} if tau is None else {"tau": tau}
    mode = f"k={k}" if tau is None else f"threshold tau={tau:g}"
    name = "block_gate" if tau is None else "block_gate (threshold)"
    return Case(
        name,
        f"n={n} blocks Dg={dim} Q={queries} {mode}",
        {"keys": keys},
        {"q": q},
        params,
        reference,
    )


def vector_search(rng: np.random.Generator, n: int, k: int) -> Case:
    dim, queries = 768, 1
    keys = heavy_keys(rng, n, dim)
    q = rng.standard_normal((queries, dim)).astype(np.float32)
    tk, tq = torch.from_numpy(keys), torch.from_numpy(q)

    def reference() -> object:
        return topk_select(tq @ tk.T, k)

    shape = f"n={n} docs D={dim} Q={queries} k={k}"
    return Case("vector_search", shape, {"keys": keys}, {"q": q}, {"k": k}, reference)


def bm25(rng: np.random.Generator, n: int, k: int) -> Case:
    """A Zipfian corpus of ~60 tokens per document as a CSR over terms; 6-term queries drawn
    from the frequent half of the vocabulary (so they touch many postings)."""
    vocab, doc_len, terms, queries = 30000, 60, 6, 1
    k1, b = 1.5, 0.75
    lengths = rng.integers(doc_len // 2, 2 * doc_len, n)
    tokens = np.minimum(rng.zipf(1.2, int(lengths.sum())), vocab) - 1
    doc_of = np.repeat(np.arange(n), lengths)
    pairs, tfs = np.unique(tokens.astype(np.int64) * n + doc_of, return_counts=True)
    term, doc = pairs // n, pairs % n  # sorted by term, then doc: the CSR order
    offsets = np.zeros(vocab + 1, dtype=np.int64)
    np.cumsum(np.bincount(term, minlength=vocab), out=offsets[1:])
    memory = {
        "term_offsets": offsets,
        "doc_ids": doc,
        "tfs": tfs,
        "doc_lengths": lengths,
        "k1": k1,
        "b": b,
    }
    df = np.diff(offsets)
    qterms = rng.choice(200, (queries, terms), replace=False)
    idf = np.log1p((n - df[qterms] + 0.5) / (df[qterms] + 0.5))
    query = {"terms": qterms, "idf": idf}
    t_off, t_doc, t_tf = (torch.from_numpy(a) for a in (offsets, doc, tfs))
    t_len = torch.from_numpy(lengths).double()
    avgdl = float(lengths.mean())
    t_terms, t_idf = torch.from_numpy(qterms), torch.from_numpy(idf)

    def reference() -> object:
        flat = t_terms.flatten()
        starts, counts = t_off[flat], t_off[flat + 1] - t_off[flat]
        owner = torch.repeat_interleave(torch.arange(len(counts)), counts)
        first = torch.cumsum(counts, 0) - counts
        pos = starts[owner] + torch.arange(len(owner)) - first[owner]
        docs, tf = t_doc[pos], t_tf[pos].double()
        norm = k1 * ((1 - b) + b * t_len[docs] / avgdl)
        weight = t_idf.flatten()[owner] * tf / (tf + norm)
        row = owner // terms
        scores = torch.zeros(queries, n, dtype=torch.float64)
        scores.view(-1).index_put_((row * n + docs,), weight, accumulate=True)
        return topk_select(scores, k)

    postings = int(counts_of(offsets, qterms))
    shape = f"n={n} docs V={vocab} P={doc.size} T={terms} ({postings} postings read) k={k}"
    return Case("bm25", shape, memory, query, {"k": k}, reference)


def counts_of(offsets: np.ndarray, terms: np.ndarray) -> int:
    return int((offsets[terms + 1] - offsets[terms]).sum())


BUILDERS: dict[str, Callable[[np.random.Generator, int, int], Case]] = {
    "token_indexer": token_indexer,
    "page_indexer": page_indexer,
    "block_gate": block_gate,
    "block_gate_threshold": lambda rng, n, k: block_gate(rng, n, k, tau=1e-3),
    "vector_search": vector_search,
    "bm25": bm25,
}


def timed(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median wall time of each function over interleaved rounds (a noisy neighbour slows
    both alike, so the ratio stays fair)."""
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - start)
    return {name: statistics.median(r) for name, r in runs.items()}


def bench_kernel(name: str, n: int, k: int, repeat: int, seed: int) -> dict:
    case = BUILDERS[name](np.random.default_rng(seed), n, k)
    spec = kernels.get(case.kernel.split(" ")[0])
    state = spec.fit(case.memory)
    resident = spec.quantize_memory(case.memory, state)

    def golden() -> object:
        query = spec.quantize_query(case.query, state, **case.params)
        return spec.golden(spec.bind(resident, query, n=n))

    times = timed({"golden": golden, "float": case.reference}, repeat)
    out = golden()
    return {
        "kernel": case.kernel,
        "shape": case.shape,
        "golden_s": times["golden"],
        "float_s": times["float"],
        "speed": times["float"] / times["golden"],
        "meets_target": times["float"] / times["golden"] >= TARGET,
        "modeled_card_s": kernels.seconds(out.cycles, spec.engine.clock_hz),
        "cycles": out.cycles,
    }


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    load = [round(x, 2) for x in os.getloadavg()]  # other work on the machine, before ours
    rows = []
    console = Console()
    for name in args.kernels:
        with console.status(f"{name} ..."):
            rows.append(bench_kernel(name, args.n, args.k, args.repeat, args.seed))
    return {
        "command": " ".join([*_thread_env(), "python", "bench/emu_speed.py", *sys.argv[1:]]),
        "source": "measured",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "system": f"{platform.system()} {platform.release()}",
            "threads": torch.get_num_threads(),
            "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default (all cores)"),
            "cores": os.cpu_count(),
            "load_average_before": load,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "blas": _blas(),
            "python": platform.python_version(),
        },
        "target": f"golden/float speed >= {TARGET}",
        "candidates": args.n,
        "repeat": args.repeat,
        "rows": rows,
    }


def _thread_env() -> list[str]:
    """The thread settings of the environment, as they prefix the command."""
    names = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    return [f"{name}={os.environ[name]}" for name in names if name in os.environ]


def _blas() -> str:
    try:
        info = np.__config__.CONFIG["Build Dependencies"]["blas"]  # type: ignore[attr-defined]
        return f"{info['name']} {info['version']}"
    except (AttributeError, KeyError, TypeError):
        return "unknown"


def table(result: dict) -> Table:
    t = Table(
        title=f"emu golden model vs float torch reference, {result['candidates']} candidates: "
        f"ms measured on {result['machine']['cpu']} (torch threads "
        f"{result['machine']['threads']}, BLAS threads {result['machine']['blas_threads']}), "
        f"median of {result['repeat']}; speed = float / golden (target >= {TARGET})"
    )
    for col, just in (
        ("kernel", "left"),
        ("shape", "left"),
        ("golden", "right"),
        ("float", "right"),
        ("speed", "right"),
        ("target", "left"),
        ("card (modeled)", "right"),
    ):
        t.add_column(col, justify=just)
    for r in result["rows"]:
        t.add_row(
            r["kernel"],
            r["shape"],
            f"{r['golden_s'] * 1e3:.1f}",
            f"{r['float_s'] * 1e3:.1f}",
            f"{r['speed']:.2f}x",
            "met" if r["meets_target"] else "MISSED",
            f"{r['modeled_card_s'] * 1e3:.3f} ms",
        )
    return t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kernels", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    parser.add_argument("--n", type=int, default=131072, help="candidates per call")
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "emu_speed.json"
    )
    args = parser.parse_args(argv)
    result = run(args)
    Console(width=max(140, Console().width)).print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r["meets_target"] for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
