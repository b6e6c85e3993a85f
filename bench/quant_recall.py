"""Recall of each dot-product kernel's integer top-k against the float top-k, over random
cases of three input distributions, at k = 64 and 256; vector_search also against faiss's
8-bit scalar quantizer on the same data.

    python bench/quant_recall.py                       # 200 cases per kernel and distribution
    python bench/quant_recall.py --cases 50 --kernels vector_search

Distributions (one memory and one query per case, a fresh seed per case):
- `gauss`: keys and queries N(0, 1).
- `t_keys`: keys Student-t (df uniform in [2.5, 5]) with 1-8 outlier channels scaled by
  10-30x (an order of magnitude larger, as real K caches have); queries N(0, 1).
- `t_both`: the keys of `t_keys`; queries Student-t too, with their own 10-30x scale on the
  keys' outlier channels.

Shapes per case: candidates 2048-8192 (log-uniform), head dim 64 or 128; token_indexer
4-16 heads with weights in +-[0.2, 1] (a quarter negative); page_indexer pages of 8-32 keys
and 1-8 query heads. Half the cases fit the scales on a prefix (50-90%) of the memory and
append the rest; each appended row is scaled by a factor drawn in [1, 4] and capped so the
row stays within the documented headroom (`HEADROOM` times the fitted per-channel range).

Recall of a query: |integer top-k & float64 top-k| / k (ties in the float scores to the
lower index). The float references follow the kernels' float semantics (see each spec).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from hetmem import kernels
from hetmem.kernels import spec as kspec

KERNELS = ("token_indexer", "page_indexer", "block_gate", "vector_search")
DISTRIBUTIONS = ("gauss", "t_keys", "t_both")
KS = (64, 256)
#: Range beyond the fitted per-channel range an appended row may reach (the kernels' doc).
HEADROOM = 4.0
RESULTS = Path(__file__).resolve().parent / "results" / "quant_recall.json"


def float_topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest float scores per row (ties to the lower index)."""
    index = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    return np.lexsort((index, -scores), axis=1)[:, :k]


def recall(reference: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Per query: the fraction of the reference top-k that `got` holds."""
    return np.array(
        [np.intersect1d(r, g).size / r.size for r, g in zip(reference, got, strict=True)]
    )


def heavy(rng: np.random.Generator, shape: tuple[int, ...], df: float) -> np.ndarray:
    return rng.standard_t(df, shape)


def draw_keys(rng, dist: str, rows: int, d: int) -> tuple[np.ndarray, dict]:
    """Float keys [rows, d] of a distribution, and what the query side needs of it."""
    if dist == "gauss":
        return rng.standard_normal((rows, d)), {}
    df = rng.uniform(2.5, 5.0)
    keys = heavy(rng, (rows, d), df)
    channels = rng.choice(d, int(rng.integers(1, 9)), replace=False)
    keys[:, channels] *= rng.uniform(10, 30, channels.size)
    return keys, {"df": df, "channels": channels}


def draw_query(rng, dist: str, shape: tuple[int, ...], info: dict) -> np.ndarray:
    if dist != "t_both":
        return rng.standard_normal(shape)
    q = heavy(rng, shape, info["df"])
    channels = info["channels"]
    q[..., channels] *= rng.uniform(10, 30, channels.size)
    return q


def append_split(rng, rows: int) -> int:
    """Rows the scales are fitted on: all of them, or (half the cases) a 50-90% prefix."""
    if rng.random() < 0.5:
        return rows
    return max(1, int(rows * rng.uniform(0.5, 0.9)))


def scale_appended(rng, arrays: list[np.ndarray], fitted: int) -> None:
    """Scale each appended row (index >= fitted, in place, the same factor across `arrays`)
    by a factor in [1, HEADROOM], capped so that the row stays within HEADROOM times the
    per-channel max |.| of the fitted rows."""
    if fitted >= arrays[0].shape[0]:
        return
    d = arrays[0].shape[-1]
    absmax = np.max([np.abs(a[:fitted]).reshape(-1, d).max(axis=0) for a in arrays], axis=0)
    absmax = np.where(absmax > 0, absmax, absmax.max() or 1.0)
    ratio = np.max(
        [
            (np.abs(a[fitted:]) / absmax).reshape(a.shape[0] - fitted, -1).max(axis=1)
            for a in arrays
        ],
        axis=0,
    )
    factor = rng.uniform(1.0, HEADROOM, ratio.size)
    # 0.999: a value at exactly the headroom is one float rounding away from saturating
    factor = np.minimum(factor, 0.999 * HEADROOM / np.maximum(ratio, 1e-12))
    for a in arrays:
        a[fitted:] *= factor.reshape(-1, *([1] * (a.ndim - 1)))


#: Candidates per case (log-uniform: rows, or pages of page_indexer) and keys per page of
#: the bench; tests/test_quant_recall.py draws smaller cases.
SIZES = {
    "candidates": (2048, 8192),
    "pages": (2048, 8192),
    "page_sizes": (8, 16, 32),
    "indexer_heads": (4, 8, 16),
}


def make_case(
    kernel: str, dist: str, seed: int, sizes: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One random case: float memory, float query, the float scores, rows fitted on."""
    sizes = sizes or SIZES
    rng = np.random.default_rng(seed)
    low, high = sizes["pages" if kernel == "page_indexer" else "candidates"]
    n = int(np.exp(rng.uniform(math.log(low), math.log(high))))
    d = int(rng.choice([64, 128]))
    if kernel == "page_indexer":
        size = int(rng.choice(sizes["page_sizes"]))
        keys, info = draw_keys(rng, dist, n * size, d)
        keys = keys.reshape(n, size, d)
        fitted = append_split(rng, n)
        scale_appended(rng, [keys], fitted)
        mins, maxs = keys.min(axis=1), keys.max(axis=1)
        heads = int(rng.choice([1, 2, 4, 8]))
        q = draw_query(rng, dist, (1, heads, d), info)
        bound = np.maximum(q[:, :, None, :] * mins, q[:, :, None, :] * maxs).sum(-1).max(1)
        return {
            "memory": {"mins": mins, "maxs": maxs},
            "query": {"q": q},
            "reference": bound,
            "fitted": fitted,
        }
    keys, info = draw_keys(rng, dist, n, d)
    fitted = append_split(rng, n)
    scale_appended(rng, [keys], fitted)
    if kernel == "token_indexer":
        heads = int(rng.choice(sizes.get("indexer_heads", SIZES["indexer_heads"])))
        q = draw_query(rng, dist, (1, heads, d), info)
        w = rng.uniform(0.2, 1.0, (1, heads)) * rng.choice([1.0, 1.0, 1.0, -1.0], (1, heads))
        reference = np.einsum("qh,qhn->qn", w, np.maximum(np.einsum("qhd,nd->qhn", q, keys), 0))
        query = {"q": q, "w": w}
    else:
        q = draw_query(rng, dist, (1, d), info)
        reference = q @ keys.T
        if kernel == "block_gate":
            reference = reference / math.sqrt(d)
        query = {"q": q}
    return {"memory": {"keys": keys}, "query": query, "reference": reference, "fitted": fitted}


def kernel_recall(kernel: str, case: dict[str, Any], ks=KS) -> list[float]:
    """Recall of the kernel's integer top-k (scales fitted on the case's prefix) per k."""
    spec = kernels.get(kernel)
    memory, fitted = case["memory"], case["fitted"]
    state = spec.fit({a: v[:fitted] for a, v in memory.items()})
    resident = spec.quantize_memory(memory, state)
    n = spec.candidates(memory)
    out = []
    for k in ks:
        query = spec.quantize_query(case["query"], state, k=k)
        got = spec.golden(spec.bind(resident, query, n=n)).indices
        out.append(float(recall(float_topk(case["reference"], k), got).mean()))
    return out


def saturated_rows(kernel: str, case: dict[str, Any]) -> int:
    """Appended rows (or pages) that quantize beyond the format's range (saturate): for the
    int8 kernels a row whose stored-basis peak exceeds 2**-ROW_EXP_MIN * 127, for
    page_indexer a page summary beyond +-32767 steps."""
    spec = kernels.get(kernel)
    memory, fitted = case["memory"], case["fitted"]
    state = spec.fit({a: v[:fitted] for a, v in memory.items()})
    tail = [np.asarray(v[fitted:], dtype=np.float64) for v in memory.values()]
    if not tail[0].shape[0]:
        return 0
    if kernel == "page_indexer":
        over = [np.abs(t / state.scale).max(axis=1) > kspec.INT16_MAX for t in tail]
    else:
        limit = (kspec.INT8_MAX + 0.5) * 2.0**-kspec.ROW_EXP_MIN
        if hasattr(kspec, "to_stored"):
            stored = [kspec.to_stored(state, t) for t in tail]
        else:  # the per-channel format before the stored basis (the "before" run)
            stored = [t / state.scale for t in tail]
        over = [np.abs(t).max(axis=1) >= limit for t in stored]
    return int(np.logical_or.reduce(over).sum())


def faiss_recall(case: dict[str, Any], ks=KS) -> list[float]:
    """faiss IndexScalarQuantizer QT_8bit (inner product), trained on the fitted rows."""
    import faiss

    keys = np.ascontiguousarray(case["memory"]["keys"], dtype=np.float32)
    q = np.ascontiguousarray(case["query"]["q"], dtype=np.float32)
    index = faiss.IndexScalarQuantizer(
        keys.shape[1], faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
    )
    index.train(keys[: case["fitted"]])
    index.add(keys)
    out = []
    for k in ks:
        _, got = index.search(q, k)
        out.append(float(recall(float_topk(case["reference"], k), got).mean()))
    return out


def stats(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values)
    return {
        "mean": float(arr.mean()),
        "p5": float(np.percentile(arr, 5)),
        "worst": float(arr.min()),
    }


def seed_of(kernel: str, dist: str, i: int, base: int = 0) -> int:
    return (
        base * 1_000_003 + KERNELS.index(kernel) * 100_000 + DISTRIBUTIONS.index(dist) * 10_000 + i
    )


def run(
    kernels_: list[str],
    dists: list[str],
    cases: int,
    base: int = 0,
    with_faiss: bool = True,
    sizes: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One row per kernel, distribution and k: recall statistics over `cases` cases, the
    appended rows and how many saturated; vector_search's rows also hold faiss SQ8's
    statistics on the same cases, over all of them and over those without appends."""
    rows = []
    for kernel in kernels_:
        for dist in dists:
            ours: dict[int, list[float]] = {k: [] for k in KS}
            ref: dict[int, list[float]] = {k: [] for k in KS}
            whole: list[bool] = []  # the case fits on every row (no appends)
            appended = saturated = 0
            for i in range(cases):
                case = make_case(kernel, dist, seed_of(kernel, dist, i, base), sizes)
                for k, r in zip(KS, kernel_recall(kernel, case), strict=True):
                    ours[k].append(r)
                appended += spec_rows(kernel, case) - case["fitted"]
                saturated += saturated_rows(kernel, case)
                whole.append(case["fitted"] == spec_rows(kernel, case))
                if with_faiss and kernel == "vector_search":
                    for k, r in zip(KS, faiss_recall(case), strict=True):
                        ref[k].append(r)
            mask = np.array(whole)
            for k in KS:
                row = {
                    "kernel": kernel,
                    "dist": dist,
                    "k": k,
                    "cases": cases,
                    **stats(ours[k]),
                    "appended_rows": int(appended),
                    "saturated_rows": int(saturated),
                    "recalls": [round(r, 6) for r in ours[k]],
                }
                if ref[k]:
                    row["faiss_sq8"] = stats(ref[k])
                    row["faiss_sq8_recalls"] = [round(r, 6) for r in ref[k]]
                    if mask.any():
                        row["no_appends"] = {
                            "cases": int(mask.sum()),
                            "mean": float(np.mean(np.array(ours[k])[mask])),
                            "faiss_sq8_mean": float(np.mean(np.array(ref[k])[mask])),
                        }
                rows.append(row)
    return rows


def spec_rows(kernel: str, case: dict[str, Any]) -> int:
    return kernels.get(kernel).candidates(case["memory"])


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| kernel | dist | k | mean | p5 | worst | saturated / appended rows "
        "| faiss SQ8 mean / p5 / worst | no appends: ours / faiss mean |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = no_app = ""
        if "faiss_sq8" in r:
            f = r["faiss_sq8"]
            ref = f"{f['mean']:.4f} / {f['p5']:.3f} / {f['worst']:.3f}"
        if "no_appends" in r:
            a = r["no_appends"]
            no_app = f"{a['mean']:.4f} / {a['faiss_sq8_mean']:.4f} ({a['cases']} cases)"
        lines.append(
            f"| {r['kernel']} | {r['dist']} | {r['k']} | {r['mean']:.4f} | {r['p5']:.3f} "
            f"| {r['worst']:.3f} | {r['saturated_rows']} / {r['appended_rows']} | {ref} "
            f"| {no_app} |"
        )
    return "\n".join(lines)


def compare(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Per kernel, distribution and k: two runs' statistics on the same cases, and the mean
    of the per-case differences (after - before) with its standard error."""
    lines = [
        "| kernel | dist | k | before mean / p5 / worst | after mean / p5 / worst "
        "| paired diff +- s.e. |",
        "|---|---|---|---|---|---|",
    ]
    old = {(r["kernel"], r["dist"], r["k"]): r for r in before["rows"]}
    for r in after["rows"]:
        b = old.get((r["kernel"], r["dist"], r["k"]))
        if b is None or len(b["recalls"]) != len(r["recalls"]):
            continue
        diff = np.asarray(r["recalls"]) - np.asarray(b["recalls"])
        se = diff.std(ddof=1) / math.sqrt(diff.size) if diff.size > 1 else 0.0
        lines.append(
            f"| {r['kernel']} | {r['dist']} | {r['k']} "
            f"| {b['mean']:.4f} / {b['p5']:.3f} / {b['worst']:.3f} "
            f"| {r['mean']:.4f} / {r['p5']:.3f} / {r['worst']:.3f} "
            f"| {diff.mean():+.4f} +- {se:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    parser.add_argument("--dists", nargs="+", default=list(DISTRIBUTIONS), choices=DISTRIBUTIONS)
    parser.add_argument("--seed", type=int, default=0, help="base seed of the cases")
    parser.add_argument("--no-faiss", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("BEFORE", "AFTER"),
        help="print the paired comparison of two result files (same cases) and exit",
    )
    args = parser.parse_args(argv)
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        print(compare(before, after))
        return 0
    start = time.perf_counter()
    rows = run(args.kernels, args.dists, args.cases, args.seed, not args.no_faiss)
    text = table(rows)
    print(text)
    result = {
        "command": "python bench/quant_recall.py " + " ".join(argv or sys.argv[1:]),
        "source": "measured",
        "headroom": HEADROOM,
        "ks": list(KS),
        "seconds": round(time.perf_counter() - start, 1),
        "rows": rows,
        "table": text,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
