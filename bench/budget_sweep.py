"""One task prompt's answer by every method as the budget shrinks, the accuracy bench's own
prefill and decode (`bench/accuracy.py`), with its KV-group oracle:

    python bench/budget_sweep.py                          # passkey, 1k, prompt 14
    python bench/budget_sweep.py --kind recall --context 2048 --index 3

It shows whether a prompt a method loses at a budget is lost by the oracle too (then no
selection of that many tokens per KV group keeps the answer: the budget's loss, not the
method's). No figure here is a time.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from rich.console import Console
from rich.table import Table

import accuracy as acc
from hetmem import bundled, tasks
from hetmem.selectors.weights import selectors_for

LABELS = ("seer", "dsa", "quest", "oracle")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=tasks.KINDS, default="passkey")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--index", type=int, default=14, help="the prompt (seed) of the task set")
    parser.add_argument(
        "--fractions", type=float, nargs="+", default=[1, 7 / 8, 3 / 4, 1 / 2, 1 / 4]
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, tokenizer = bundled.load()
    selectors = selectors_for(model)
    task = tasks.task_set(args.kind, args.context, args.index + 1, 0, tokenizer)[args.index]
    ids = tokenizer(task.prompt, return_tensors="pt")["input_ids"]
    cache, first = acc.prefill(model, ids)
    dense = tokenizer.decode(acc.decode(model, cache, first, 8, None, 0)[0])
    table = Table(
        title=f"{args.kind} @ {ids.shape[1]} tokens, prompt {args.index}: answer {task.answer!r}"
    )
    table.add_column("budget")
    for label in LABELS:
        table.add_column(label)
    table.add_row("dense", *[f"{dense!r} {'ok' if tasks.score(task, dense) else 'wrong'}"] * 1)
    for f in args.fractions:
        budget = max(acc.DECODER_UNIT, int(ids.shape[1] * f) // acc.DECODER_UNIT * acc.DECODER_UNIT)
        cells = []
        for label in LABELS:
            got = tokenizer.decode(
                acc.decode(model, cache, first, 8, acc.method_spec(label, selectors), budget)[0]
            )
            cells.append(f"{got!r} {'ok' if tasks.score(task, got) else 'wrong'}")
        table.add_row(f"{budget} ({f:.3g})", *cells)
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
