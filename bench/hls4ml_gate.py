"""Recall of the hls4ml-generated selector maps' selections against the float selectors.

The bundled model's trained selectors (hetmem-lm, `hetmem_selectors.safetensors`): for every
layer, SeerAttention-R's AttnGate (key and query maps) and DSA's lightning indexer, converted
by hls4ml at the committed per-layer precisions (hls/attngate/precision.json, from hls4ml's
profiling on calibration seed 0) and C-simulated with g++. The evaluation activations are
held out (calibration text and tasks of `--seed`, default 1). For each sampled decode query,
each KV head (Seer) and each budget: the float selector's top-k (blocks of `block_size`
tokens, or tokens) against the top-k of the integer scores from the C-simulated maps (ties to
the lower index, the kernels' contract); rows with no more than k visible candidates are left
out (they select everything). Every C-simulated projection is also checked against the
golden fixed-point model (`rows_equal`). Result width 8 is what the profile chose (the
block_gate kernel's int8); `--result-widths 8 16` adds a 16-bit result for comparison.

    python bench/hls4ml_gate.py
    python bench/hls4ml_gate.py --result-widths 8 16 --budgets 128 256 512
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from hetmem.fpga.hls4ml_gate.build import BACKEND, IO_TYPE, STRATEGY
from hetmem.fpga.hls4ml_gate.bundled import (
    SELECTORS,
    bundled_maps,
    bundled_selectors,
    capture_bundled,
    load_precisions,
)
from hetmem.fpga.hls4ml_gate.selection import dsa_scores, recall, seer_scores

RESULTS = Path(__file__).resolve().parent / "results"


def float_seer(selectors, act, layer: int):
    from hetmem.selectors.objective import block_pools, gate_logits

    block = selectors.block_size
    return gate_logits(selectors.gates[layer], act, block_pools(act, block), block).numpy()


def float_dsa(selectors, act, layer: int):
    from hetmem.selectors.objective import indexer_logits

    return indexer_logits(selectors.indexers[layer], act).numpy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=32, help="sampled decode queries a row")
    parser.add_argument("--seed", type=int, default=1, help="evaluation set (profile: 0)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--result-widths", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--kinds", nargs="+", default=["seer", "dsa"], choices=SELECTORS)
    parser.add_argument("--out", type=Path, default=RESULTS / "hls4ml_gate.json")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    doc = load_precisions()
    selectors = bundled_selectors()
    block = selectors.block_size
    acts = capture_bundled(args.sequences, args.tokens, args.queries, args.seed)
    rows = []
    for kind in args.kinds:
        for width in args.result_widths:
            built = bundled_maps(kind, result_width=width, selectors=selectors, precisions=doc)
            for layer, (act, maps) in enumerate(zip(acts, built, strict=True)):
                if kind == "seer":
                    ref = float_seer(selectors, act, layer)
                    scores, visible = seer_scores(act, maps, block)
                    golden, _ = seer_scores(act, maps, block, golden=True)
                    ks = [b // block for b in args.budgets]
                else:
                    ix = selectors.indexers[layer]
                    ref = float_dsa(selectors, act, layer)
                    scores, visible = dsa_scores(act, maps, ix.heads)
                    golden, _ = dsa_scores(act, maps, ix.heads, golden=True)
                    ks = list(args.budgets)
                for budget, k in zip(args.budgets, ks, strict=True):
                    r, n = recall(ref, scores, visible, k)
                    rows.append(
                        {
                            "selector": kind,
                            "layer": layer,
                            "result_width": width,
                            "budget_tokens": budget,
                            "k": k,
                            "recall": r,
                            "rows": n,
                            "scores_equal_golden": bool((scores == golden).all()),
                            "types": {
                                m: {
                                    t: g.types[t].hls()
                                    for t in ("input", "weight", "accum", "result")
                                }
                                for m, g in maps.items()
                            },
                        }
                    )
                    print(
                        f"{kind} layer {layer} result {width:2d} bits budget {budget:4d} (k={k:3d}): "
                        f"recall {r:.4f} over {n} rows, scores == golden: "
                        f"{rows[-1]['scores_equal_golden']}",
                        flush=True,
                    )
    seconds = time.perf_counter() - started
    out = {
        "command": "python bench/hls4ml_gate.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "about": __doc__.split("\n\n")[0],
        "machine": platform.platform(),
        "model": "hetmem-lm (bundled), trained selectors",
        "evaluation": {
            "sequences": args.sequences,
            "tokens": args.tokens,
            "queries_per_sequence": args.queries,
            "seed": args.seed,
            "block_size": block,
        },
        "profile": doc["calibration"],
        "hls4ml": {"backend": BACKEND, "io_type": IO_TYPE, "strategy": STRATEGY},
        "seconds": seconds,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    md = args.out.with_suffix(".md")
    md.write_text(markdown(out))
    print(f"wrote {args.out} and {md} ({seconds:.0f} s)")
    bad = [r for r in rows if not r["scores_equal_golden"]]
    return 1 if bad else 0


def markdown(out: dict) -> str:
    rows = out["rows"]
    ev = out["evaluation"]
    budgets = sorted({r["budget_tokens"] for r in rows})
    lines = [
        "# hls4ml selector maps: recall against the float selectors",
        "",
        f"`{out['command'].strip()}` ({out['seconds']:.0f} s, {out['machine']}).",
        "",
        f"{out['model']}; evaluation: {ev['sequences']} sequences x {ev['tokens']} tokens of "
        f"calibration text and tasks, seed {ev['seed']} (the precisions were profiled on seed "
        f"{out['profile']['seed']}), {ev['queries_per_sequence']} sampled decode queries each; "
        f"Seer blocks of {ev['block_size']} tokens. Recall: the fraction of the float "
        "selector's top-k that the top-k of the C-simulated fixed-point maps' integer scores "
        "also selects (ties to the lower index), mean over queries (and KV heads for Seer) "
        "with more than k visible candidates. Every C-simulated score equals the golden "
        "fixed-point model's (column `= golden`).",
        "",
        "| selector | layer | result bits | "
        + " | ".join(f"budget {b}" for b in budgets)
        + " | rows | = golden |",
        "|---|---:|---:|" + "---:|" * len(budgets) + "---:|---|",
    ]
    keys = sorted(
        {(r["selector"], r["result_width"], r["layer"]) for r in rows},
        key=lambda t: (t[0] != "seer", t[1], t[2]),
    )
    for sel, width, layer in keys:
        mine = {
            r["budget_tokens"]: r
            for r in rows
            if (r["selector"], r["result_width"], r["layer"]) == (sel, width, layer)
        }
        cells = [
            f"{mine[b]['recall']:.4f} (k={mine[b]['k']})" if b in mine else "-" for b in budgets
        ]
        n = ", ".join(str(mine[b]["rows"]) for b in budgets if b in mine)
        eq = all(r["scores_equal_golden"] for r in mine.values())
        lines.append(f"| {sel} | {layer} | {width} | " + " | ".join(cells) + f" | {n} | {eq} |")
    lines += [
        "",
        "Types per map (input, weight, accum, result), from hls4ml's compiled layers:",
        "",
    ]
    seen = set()
    for r in rows:
        for m, t in r["types"].items():
            key = (r["selector"], r["layer"], r["result_width"], m)
            if key in seen:
                continue
            seen.add(key)
            lines.append(
                f"- {r['selector']} layer {r['layer']} {m} (result {r['result_width']} bits): "
                + ", ".join(f"{k} `{v}`" for k, v in t.items())
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
