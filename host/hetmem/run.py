"""`hetmem run`: the main job, a wrapped model answering long-context retrieval prompts.

The bundled model (or `--model DIR`, any local transformers causal LM) reads passkey
prompts at a long context. Prefill runs dense and prepares each layer's memory; every
decode step then runs the method's four steps through a `Pipeline` under the placement
(default gpu/fpga/fpga/gpu: Compute Relevancy + Retrieval on the FPGA, the `emu` target
unless a card is present; Prepare and Apply on the GPU, else the CPU). The same prompts
are decoded dense from the same prefill, so the answers and the accuracy compare with
dense attention on equal terms. The per-step profile sums every layer's pipeline over the
run; each figure carries its source (measured, simulated, modeled) and sources are never
added together.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checks import check_positive_int
from .errors import InputError
from .profile import Profile, format_bytes, format_seconds

#: Contexts `hetmem run` may pick from the model card (longest where the model answers).
CARD_CONTEXTS = (4096, 2048, 1024)
#: A context is "where the model works" when the card's passkey accuracy reaches this.
CARD_ACCURACY = 0.8
#: Quest page and untrained Seer block, in tokens (trained Seer keeps its trained block).
UNIT = 16
#: Tokens decoded per prompt: the answer (space + 5 digits) and a little more.
NEW_TOKENS = 8


@dataclass
class Answer:
    """One prompt: what was asked, what hetmem's sparse decode said, what dense said."""

    expected: str
    depth: float
    sparse: str
    dense: str
    sparse_ok: bool
    dense_ok: bool


@dataclass
class PhaseTimes:
    """Wall clock of the model's forward passes (measured), per phase."""

    prefill_s: float = 0.0
    decode_sparse_s: float = 0.0
    decode_dense_s: float = 0.0


@dataclass
class RunResult:
    model: str
    method: str
    trained: bool
    placement: str
    fpga: str
    context: int
    budget: int
    answers: list[Answer]
    profile: dict[tuple[str, str, str, str], list[float]]
    times: PhaseTimes
    fallbacks: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return sum(a.sparse_ok for a in self.answers) / len(self.answers)

    @property
    def dense_accuracy(self) -> float:
        return sum(a.dense_ok for a in self.answers) / len(self.answers)

    @property
    def agreement(self) -> float:
        """Share of prompts whose sparse answer text equals dense's."""
        return sum(a.sparse == a.dense for a in self.answers) / len(self.answers)


def default_context(model_dir: Path, model: Any) -> int:
    """The longest context of `CARD_CONTEXTS` where the model card's passkey accuracy
    (`eval.json` beside the weights) is at least `CARD_ACCURACY`; without a card, 2048 tokens
    (or the model's positions)."""
    positions = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    card = model_dir / "eval.json"
    figures: dict[str, Any] = {}
    if card.is_file():
        try:
            figures = json.loads(card.read_text())["tasks"]["passkey"]
        except (KeyError, TypeError, ValueError):
            figures = {}
    for context in CARD_CONTEXTS:
        entry = figures.get(str(context))
        if isinstance(entry, dict) and entry.get("accuracy", 0.0) >= CARD_ACCURACY:
            return min(context, positions)
    return min(2048, positions)


def bundled_dir() -> Path:
    """The bundled model's directory, or an error that says how to run without it."""
    try:
        from .bundled import path
    except ImportError as exc:
        raise InputError("model", "this checkout has no bundled model: pass --model DIR") from exc
    directory = path()
    if not (directory / "config.json").is_file():
        raise InputError(
            "model",
            f"the bundled model's weights are not in {directory} "
            "(python -m hetmem.bundled.train makes them): pass --model DIR",
        )
    return directory


def _phase(profile: Profile) -> str:
    """Prefill: the profile that prepared the memory (and loaded it on the card)."""
    return "prefill" if any(r.step == "prepare" for r in profile.records) else "decode"


def collect_profile(
    caches: list[Any],
) -> tuple[dict[tuple[str, str, str, str], list[float]], int]:
    """Sum every layer's pipeline history: (phase, step, device, source) -> [seconds,
    calls, bytes, PCIe transactions]; and the FPGA fallbacks counted."""
    rows: dict[tuple[str, str, str, str], list[float]] = defaultdict(lambda: [0.0, 0, 0, 0])
    fallbacks = 0
    for cache in caches:
        for pipeline in cache.pipelines:
            fallbacks += pipeline.counters.get("fpga_fallbacks", 0)
            for profile in pipeline.history:
                phase = _phase(profile)
                for rec in profile.records:
                    row = rows[(phase, rec.step, rec.device, rec.source)]
                    row[0] += rec.seconds
                    row[1] += 1
                    row[2] += rec.nbytes
                    row[3] += rec.transactions
    return dict(rows), fallbacks


@contextmanager
def _timed(times: PhaseTimes, attr: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    setattr(times, attr, getattr(times, attr) + time.perf_counter() - start)


@torch.no_grad()
def _greedy(model: Any, cache: Any, first: torch.Tensor, steps: int, tick: Any) -> torch.Tensor:
    from .models.wrap import cache_kwarg

    tokens = [first]
    name = cache_kwarg(model)
    for _ in range(steps - 1):
        out = model(input_ids=tokens[-1][:, None], use_cache=True, **{name: cache})
        tokens.append(out.logits[:, -1].argmax(-1))
        tick()
    return torch.cat([t[:, None] for t in tokens], dim=1)


#: The sparse-attention methods `hetmem run` wraps a model with.
RUN_METHODS = ("dsa", "seer", "quest")


def model_config(model_dir: Path) -> dict[str, Any]:
    """The text model's config.json (read, not loaded: no weights), or InputError."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise InputError(
            "model", f"{model_dir} is not a transformers model directory (no config.json)"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError("model", f"{path} is not a readable JSON config: {exc}") from None
    if not isinstance(config, dict):
        raise InputError("model", f"{path} is not a JSON object")
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def max_positions(config: dict[str, Any]) -> int | None:
    """The most positions the model embeds (max_position_embeddings), if its config says."""
    value = config.get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else None


def check_selectors(model_dir: Path, config: dict[str, Any]) -> None:
    """The trained selectors beside the model, if any, fit its shape: layers, KV heads,
    query heads per group, head dim. Says what does not match and how to regenerate."""
    from .selectors.weights import SELECTORS_FILE, load_selectors

    path = model_dir / SELECTORS_FILE
    if not path.is_file():
        return
    selectors = load_selectors(path)
    layers = config.get("num_hidden_layers")
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    dim = config.get("head_dim") or (
        config["hidden_size"] // heads if config.get("hidden_size") and heads else None
    )
    wrong: list[str] = []
    if isinstance(layers, int) and selectors.layers != layers:
        wrong.append(f"{selectors.layers} layers of selectors, the model has {layers}")
    if isinstance(kv_heads, int) and isinstance(dim, int) and isinstance(heads, int):
        key_features = int(selectors.indexers[0].wk.shape[0])
        if key_features != kv_heads * dim:
            wrong.append(
                f"DSA indexer keys read {key_features} features per token, the model's keys "
                f"have {kv_heads} KV heads x {dim} = {kv_heads * dim}"
            )
        gate_q = tuple(int(n) for n in selectors.gates[0].wq.shape[:2])
        if gate_q != (kv_heads, heads // kv_heads * dim):
            wrong.append(
                f"Seer gates take {gate_q[0]} KV groups of {gate_q[1]} query features, the "
                f"model has {kv_heads} groups of {heads // kv_heads} heads x {dim} = "
                f"{heads // kv_heads * dim}"
            )
    if wrong:
        raise InputError(
            "model",
            f"{path} was trained for another model shape: {'; '.join(wrong)}. Regenerate it "
            f"with `hetmem calibrate --model {model_dir}` (or delete it to run the untrained "
            "selectors)",
        )


def check_run_args(
    model_dir: Path,
    method: Any,
    fpga: Any,
    context: Any,
    prompts: Any,
    budget: Any,
    placement: Any,
    new_tokens: Any = NEW_TOKENS,
) -> int | None:
    """Every argument of `run`, checked before the model loads (a bad one costs nothing):
    returns the model's maximum positions (None when its config does not say)."""
    from .fpga.targets import TARGETS
    from .pipeline import normalize_placement

    if method not in RUN_METHODS:
        raise InputError("method", f"expected one of {', '.join(RUN_METHODS)}, got {method!r}")
    if not (isinstance(fpga, str) and (fpga == "auto" or fpga in TARGETS)):
        raise InputError(
            "fpga", f"unknown FPGA target {fpga!r}; targets are auto, {', '.join(TARGETS)}"
        )
    if placement != "auto":
        normalize_placement(placement)
    check_positive_int("prompts", prompts)
    check_positive_int("new_tokens", new_tokens)
    if context is not None:
        check_positive_int("context", context)
    if budget is not None:
        check_positive_int("budget", budget)
    config = model_config(model_dir)
    limit = max_positions(config)
    if limit is not None and context is not None and context + new_tokens > limit:
        raise InputError(
            "context",
            f"{context} tokens + {new_tokens} decoded exceed the model's {limit} positions "
            f"(max_position_embeddings in {model_dir / 'config.json'}): use --context "
            f"{limit - new_tokens} or less",
        )
    if context is not None:  # the prompt must hold the task (its tokenizer only: no weights)
        _check_task_fits(model_dir, context)
    if method in ("dsa", "seer"):
        check_selectors(model_dir, config)
    return limit


def _check_task_fits(model_dir: Path, context: int) -> None:
    from transformers import AutoTokenizer

    from . import tasks

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, TypeError):
        return  # run() says the model has no tokenizer
    tasks.passkey(context, 0, tokenizer)


def run(
    model: str | os.PathLike | None = None,
    method: str = "dsa",
    fpga: str = "auto",
    context: int | None = None,
    prompts: int = 4,
    budget: int | None = None,
    placement: str = "gpu/fpga/fpga/gpu",
    new_tokens: int = NEW_TOKENS,
    seed: int = 0,
    console: Any = None,
) -> RunResult:
    """The main job; prints progress, the answers, accuracy against dense and the profile."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from transformers import DynamicCache

    from . import tasks
    from .device import torch_device
    from .models import new_cache, unwrap, wrap
    from .models.wrap import cache_kwarg
    from .selectors.calibrate import load_local
    from .selectors.weights import selectors_for

    console = console or Console()
    model_dir = bundled_dir() if model is None else Path(model)
    check_run_args(model_dir, method, fpga, context, prompts, budget, placement, new_tokens)
    device = torch_device("gpu")
    with console.status(f"loading {model_dir}"):
        lm, tokenizer = load_local(model_dir, device)
    if tokenizer is None:
        raise InputError("model", f"{model_dir} has no tokenizer")
    context = default_context(model_dir, lm) if context is None else context
    context = check_positive_int("context", context)
    budget = max(context // 8, 1) if budget is None else check_positive_int("budget", budget)
    trained = method in ("dsa", "seer") and selectors_for(lm) is not None
    options: dict[str, Any] = {}
    if method in ("seer", "quest") and not trained:
        # Blocks and pages of 16 tokens, as the accuracy harness measures them.
        options = {"block_size": UNIT} if method == "seer" else {"page_size": UNIT}
    with console.status(f"making {prompts} passkey prompts of {context} tokens"):
        items = tasks.task_set("passkey", context, prompts, seed, tokenizer)
    auto = {"context": context, "batch": 1} if placement == "auto" else None
    wrap(lm, method=method, budget=budget, placement=placement, fpga=fpga, method_options=options,
         auto_options=auto)  # fmt: skip
    if auto is not None:  # say what the planner chose, and why
        from .models.wrap import plan_explanation

        chosen = lm._hetmem_wrap.settings.placement
        placement = "/".join(
            chosen[step] for step in ("prepare", "relevancy", "retrieval", "apply")
        )
        console.print(
            f"placement auto -> [bold]{placement}[/bold]\n[dim]{plan_explanation(lm)}[/dim]"
        )
    caches: list[Any] = []
    answers: list[Answer] = []
    times = PhaseTimes()
    try:
        unit = lm._hetmem_wrap.settings.methods[0].unit
        console.print(
            f"[bold]hetmem run[/bold]: {model_dir.name} | method [bold]{method}[/bold]"
            f"{' (trained selectors)' if trained else ' (untrained default weights)' if method in ('dsa', 'seer') else ''}"
            f" | budget {budget} of {context} tokens (unit {unit}) | placement {placement}"
        )
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console) as progress:
            bar_prefill = progress.add_task("prefill (dense, memory prepared)", total=len(items))
            bar_sparse = progress.add_task(
                f"decode ({method}, sparse)", total=len(items) * (new_tokens - 1)
            )
            bar_dense = progress.add_task(
                "decode (dense reference)", total=len(items) * (new_tokens - 1)
            )
            for task in items:
                ids = tokenizer(task.prompt, return_tensors="pt")["input_ids"].to(device)
                cache = new_cache(lm, ids.shape[1] + new_tokens)
                with _timed(times, "prefill_s"), torch.no_grad():
                    out = lm(input_ids=ids, use_cache=True, **{cache_kwarg(lm): cache})
                first = out.logits[:, -1].argmax(-1)
                progress.advance(bar_prefill)
                # Dense reference from the same prefill: a plain cache runs sdpa unchanged.
                dense_cache = DynamicCache()
                for i, layer in enumerate(cache.layers):
                    dense_cache.update(layer.keys.clone(), layer.values.clone(), i)
                with _timed(times, "decode_sparse_s"):
                    sparse = _greedy(
                        lm, cache, first, new_tokens, lambda: progress.advance(bar_sparse)
                    )
                with _timed(times, "decode_dense_s"):
                    dense = _greedy(
                        lm, dense_cache, first, new_tokens, lambda: progress.advance(bar_dense)
                    )
                caches.append(cache)
                got_sparse = tokenizer.decode(sparse[0], skip_special_tokens=True)
                got_dense = tokenizer.decode(dense[0], skip_special_tokens=True)
                answers.append(
                    Answer(
                        task.answer,
                        task.depth,
                        got_sparse,
                        got_dense,
                        tasks.score(task, got_sparse),
                        tasks.score(task, got_dense),
                    )
                )
        first_pipeline = caches[0].pipelines[0]
        fpga_label = first_pipeline.fpga_stage.label if first_pipeline.fpga_stage else "none"
        profile, fallbacks = collect_profile(caches)
    finally:
        unwrap(lm)
    result = RunResult(
        str(model_dir),
        method,
        trained,
        placement,
        fpga_label,
        context,
        budget,
        answers,
        profile,
        times,
        fallbacks,
    )
    report(result, console)
    return result


def report(result: RunResult, console: Any) -> None:
    """The answers, the accuracy against dense, and the per-step profile with sources."""
    from rich.table import Table

    table = Table(title=f"passkey answers @ {result.context} tokens")
    for col in ("#", "depth", "expected", f"hetmem ({result.method})", "", "dense", ""):
        table.add_column(col)
    for i, a in enumerate(result.answers):
        table.add_row(
            str(i),
            f"{a.depth:.2f}",
            a.expected,
            repr(a.sparse.strip()[:24]),
            "[green]ok[/green]" if a.sparse_ok else "[red]x[/red]",
            repr(a.dense.strip()[:24]),
            "[green]ok[/green]" if a.dense_ok else "[red]x[/red]",
        )
    console.print(table)
    n = len(result.answers)
    console.print(
        f"accuracy: hetmem {result.method} (budget {result.budget}/{result.context}) "
        f"[bold]{result.accuracy:.0%}[/bold] ({round(result.accuracy * n)}/{n}) | dense "
        f"[bold]{result.dense_accuracy:.0%}[/bold] ({round(result.dense_accuracy * n)}/{n}) | "
        f"same answer as dense {result.agreement:.0%}"
    )
    prof = Table(
        title=f"per-step profile: every layer's pipeline summed over the run (fpga: {result.fpga})"
    )
    for col, just in (
        ("phase", "left"),
        ("step", "left"),
        ("device", "left"),
        ("calls", "right"),
        ("total", "right"),
        ("per call", "right"),
        ("source", "left"),
        ("bytes", "right"),
        ("PCIe txns", "right"),
    ):
        prof.add_column(col, justify=just)
    totals: dict[str, float] = defaultdict(float)
    for (phase, step, device, source), (seconds, calls, nbytes, txns) in result.profile.items():
        prof.add_row(
            phase,
            step,
            device,
            str(int(calls)),
            format_seconds(seconds),
            format_seconds(seconds / max(calls, 1)),
            source,
            format_bytes(int(nbytes)),
            str(int(txns)) if txns else "-",
        )
        totals[source] += seconds
    for source, seconds in totals.items():
        prof.add_row("", f"total ({source})", "", "", format_seconds(seconds), "", source, "", "")
    if result.fallbacks:
        prof.add_row("", "counter fpga_fallbacks", "", str(result.fallbacks), "", "", "", "", "")
    console.print(prof)
    t = result.times
    console.print(
        f"wall clock (measured, whole model forward passes, pipeline steps included): "
        f"prefill {t.prefill_s:.2f} s, decode {t.decode_sparse_s:.2f} s sparse / "
        f"{t.decode_dense_s:.2f} s dense"
    )
