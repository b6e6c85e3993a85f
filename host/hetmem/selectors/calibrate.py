"""`hetmem calibrate`: train the learned selectors of a frozen model.

Two selectors learn from the model's own dense attention, the model itself never changes:
- DSA's lightning indexer (`IndexerWeights`: wq, wk, ww), trained as DSA's dense warm-up
  trains it: the softmax of its scores over the visible tokens is pulled by KL divergence
  towards the dense attention distribution summed over the query heads;
- SeerAttention-R's AttnGate (`GateWeights`: wq, wk), trained by self-distillation: the
  softmax of its block logits is pulled by KL towards the attention mass of each block,
  summed over the query heads of each KV group.

The features are those the wrapped model hands the methods at decode time: the attention
layer's queries and keys after the rotary embedding, flattened over heads, captured through
an attention function registered with transformers (model code is never edited).

The weights go beside the model, `<model_dir>/hetmem_selectors.safetensors`, and
`wrap(model, method="dsa")` (or "seer") picks them up when the model was loaded from that
directory (`weights.trained_spec`).

This module is the job: `calibrate` (capture, train every layer, save) and `calibrate_dir`
(`hetmem calibrate`: a local model, its data, progress and the report). The capture is
`activations.py`'s, the scores and teachers `objective.py`'s (the students score with the
methods' own Relevancy functions), the loops `train.py`'s, the data `data.py`'s and the file
`weights.py`'s.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from .activations import capture, merge_activations
from .data import calibration_ids, gate_calibration_data
from .train import TrainConfig, TrainLog, train_gate, train_indexer
from .weights import (
    SELECTORS_FILE,
    TRAINED_METHODS,
    Selectors,
    load_selectors,
    model_dir,
    save_selectors,
)


def load_local(path: str | os.PathLike, device: torch.device | None = None) -> tuple[Any, Any]:
    """(model, tokenizer or None) from a local transformers directory, frozen, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise InputError(
            "model", f"{directory} is not a transformers model directory (no config.json)"
        )
    model = AutoModelForCausalLM.from_pretrained(
        str(directory), local_files_only=True, dtype=torch.float32
    )
    model.requires_grad_(False).eval()
    if device is not None:
        model.to(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model, tokenizer


@dataclass
class CalibrationReport:
    path: Path
    dsa: list[TrainLog]
    seer: list[TrainLog]
    seconds: float


def calibrate(
    model: Any,
    input_ids: torch.Tensor,
    *,
    out: str | os.PathLike | None = None,
    queries: int = 64,
    steps: int = 150,
    lr: float = 3e-3,
    indexer_heads: int | None = None,
    indexer_dim: int = 64,
    block_size: int = 16,
    seed: int = 0,
    progress: Any = None,
    gate_data: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    gate_group: str = "max",
    train: Sequence[str] = TRAINED_METHODS,
    base: Selectors | None = None,
) -> tuple[Selectors, CalibrationReport]:
    """Capture the frozen model's activations on `input_ids` [N, S], train one indexer and
    one gate per layer, and save them to `out` (default: beside the model).

    `progress`: a rich `Progress` to show capture and per-layer training with the loss.
    `gate_data`: (input_ids, query positions) pairs, one per context length
    (`gate_calibration_data`), that the gate trains on instead of `input_ids`;
    `gate_group`: how its teacher combines a KV group's heads (`block_target`).
    `train`: the selectors to train; the others are kept from `base` (e.g. the file
    already beside the model).
    """
    train = tuple(train)
    if not train or set(train) - set(TRAINED_METHODS):
        raise InputError("train", f"expected some of {TRAINED_METHODS}, got {train!r}")
    if set(TRAINED_METHODS) - set(train) and base is None:
        raise InputError("base", f"keeping {set(TRAINED_METHODS) - set(train)} needs a base")
    target = Path(out) if out is not None else None
    if target is None:
        directory = model_dir(model)
        if directory is None:
            raise InputError("out", "the model was not loaded from a local directory: name a file")
        target = directory / SELECTORS_FILE
    elif target.is_dir():
        target = target / SELECTORS_FILE
    config = TrainConfig(steps=steps, lr=lr, seed=seed)
    started = time.perf_counter()
    n = input_ids.shape[0] if isinstance(input_ids, torch.Tensor) else 0
    task = progress.add_task("capture q/k activations", total=n) if progress else None
    acts = capture(
        model,
        input_ids,
        queries=queries,
        seed=seed,
        progress=(lambda done: progress.advance(task, done)) if progress else None,
    )
    gate_acts = acts
    if gate_data is not None and "seer" in train:
        parts = []
        for ids, positions in gate_data:
            bar = progress.add_task(f"capture gate data ({ids.shape[1]} tokens)",
                                    total=ids.shape[0]) if progress else None  # fmt: skip
            parts.append(
                capture(
                    model,
                    ids,
                    positions=positions,
                    progress=(lambda done, bar=bar: progress.advance(bar, done))
                    if progress
                    else None,
                )
            )
        gate_acts = merge_activations(parts)
    indexers, gates, dsa_logs, seer_logs = [], [], [], []
    for i, act in enumerate(acts):
        for kind in ("dsa", "seer"):
            if kind not in train:
                assert base is not None
                (indexers if kind == "dsa" else gates).append(
                    base.indexers[i] if kind == "dsa" else base.gates[i]
                )
                continue
            if kind == "seer":
                act = gate_acts[i]
            label = f"layer {i}: {'DSA indexer' if kind == 'dsa' else 'Seer AttnGate'}"
            # The indexer trains two students (learned and equal head weights) in turn.
            total = 2 * steps if kind == "dsa" else steps
            bar = progress.add_task(label, total=total) if progress else None

            def tick(step: int, loss: float, bar: Any = bar, label: str = label) -> None:
                if progress:
                    progress.update(bar, advance=1, description=f"{label}  KL {loss:.4f}")

            if kind == "dsa":
                w, log = train_indexer(
                    act, heads=indexer_heads, dim=indexer_dim, config=config, on_step=tick
                )
                indexers.append(w)
                dsa_logs.append(log)
            else:
                g, log = train_gate(
                    act, block_size=block_size, config=config, on_step=tick, group=gate_group
                )
                gates.append(g)
                seer_logs.append(log)
    old = base.meta if base is not None else {}
    info = {
        "sequences": int(input_ids.shape[0]),
        "tokens": int(input_ids.shape[1]),
        "queries_per_sequence": int(acts[0].q.shape[2]),
        "steps": steps,
        "dsa_kl": [[log.untrained, log.losses[-1], log.held_out] for log in dsa_logs]
        if "dsa" in train
        else old.get("dsa_kl"),
        "seer_kl": [[log.untrained, log.losses[-1], log.held_out] for log in seer_logs]
        if "seer" in train
        else old.get("seer_kl"),
    }
    if "seer" in train:
        info["seer_data"] = {
            "teacher": f"group {gate_group}",
            "lengths": [int(ids.shape[1]) for ids, _ in gate_data]
            if gate_data is not None
            else [int(input_ids.shape[1])],
            "sequences": [int(ids.shape[0]) for ids, _ in gate_data]
            if gate_data is not None
            else [int(input_ids.shape[0])],
            "answer_queries": gate_data is not None,
            "steps": steps,
        }
    else:
        info["seer_data"] = old.get("seer_data")
    if "dsa" not in train:  # the kept indexer's own training set
        info |= {k: old[k] for k in ("sequences", "tokens", "queries_per_sequence") if k in old}
        info["steps"] = old.get("steps", steps)
    selectors = Selectors(indexers, gates, block_size, info)
    path = save_selectors(selectors, target)
    report = CalibrationReport(path, dsa_logs, seer_logs, time.perf_counter() - started)
    return selectors, report


def summary_rows(report: CalibrationReport) -> Sequence[tuple[str, ...]]:
    """(layer, selector, untrained held-out KL, last training step KL, trained held-out KL)
    for a table."""
    rows = []
    for kind, logs in (("DSA indexer", report.dsa), ("Seer AttnGate", report.seer)):
        for i, log in enumerate(logs):
            name = f"{kind} ({log.choice})" if log.choice else kind
            last = f"{log.losses[-1]:.4f}"
            rows.append((str(i), name, f"{log.untrained:.4f}", last, f"{log.held_out:.4f}"))
    return rows


def calibrate_dir(
    directory: str | os.PathLike,
    *,
    sequences: int = 24,
    tokens: int = 1024,
    queries: int = 64,
    steps: int = 150,
    lr: float = 3e-3,
    indexer_heads: int | None = None,
    indexer_dim: int = 64,
    block_size: int = 16,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    console: Any = None,
    gate_lengths: Sequence[int] | None = None,
    train: Sequence[str] = TRAINED_METHODS,
) -> CalibrationReport:
    """`hetmem calibrate`: load a local model, train its selectors with a progress display,
    save them beside it (or to `out`) and print the losses.

    The gate trains on `gate_calibration_data` at `gate_lengths` (default: `tokens`, twice
    and four times that, those the model's positions hold), `sequences` at each. `train`:
    the selectors to train; the others are kept from the file already at the target."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from ..device import torch_device

    console = console or Console()
    model, tokenizer = load_local(directory, torch_device("gpu"))
    input_ids = calibration_ids(tokenizer, sequences, tokens, seed)
    target = Path(out) if out is not None else Path(directory) / SELECTORS_FILE
    base = None
    if set(TRAINED_METHODS) - set(train):
        base = load_selectors(target)
    gate_data = None
    if "seer" in train:
        if gate_lengths is None:
            text = model.config.get_text_config(decoder=True)
            most = getattr(text, "max_position_embeddings", None) or tokens
            # a few tokens of room: a task's answer follows its prompt
            gate_lengths = [n for n in (tokens, 2 * tokens, 4 * tokens) if n + 16 <= most]
            gate_lengths = gate_lengths or [tokens]
        gate_data = gate_calibration_data(tokenizer, sequences, gate_lengths, queries, seed)
    if "dsa" in train:
        console.print(
            f"calibrating [bold]{directory}[/bold]: DSA indexer on {input_ids.shape[0]} "
            f"sequences x {input_ids.shape[1]} tokens (pydoc text and task prompts), {queries} "
            f"query positions each, {steps} steps per layer; the model stays frozen"
        )
    if gate_data is not None:
        console.print(
            f"calibrating [bold]{directory}[/bold]: Seer AttnGate on {sequences} sequences at "
            f"each of {[int(ids.shape[1]) for ids, _ in gate_data]} tokens (pydoc text; task "
            f"examples with their answers, the queries that write them among the {queries}), "
            f"{steps} steps per layer; the model stays frozen"
        )
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        _, report = calibrate(
            model,
            input_ids,
            out=target,
            queries=queries,
            steps=steps,
            lr=lr,
            indexer_heads=indexer_heads,
            indexer_dim=indexer_dim,
            block_size=block_size,
            seed=seed,
            progress=progress,
            gate_data=gate_data,
            train=train,
            base=base,
        )
    table = Table(title="selector loss: KL(dense attention || selector), nats")
    for col in (
        "layer",
        "selector",
        "untrained (held out)",
        "last step (train)",
        "trained (held out)",
    ):
        table.add_column(col, justify="left" if col in ("layer", "selector") else "right")
    for row in summary_rows(report):
        table.add_row(*row)
    console.print(table)
    console.print(f"saved {report.path} ({report.seconds:.1f} s, measured)")
    return report
