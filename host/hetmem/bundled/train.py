"""Train the bundled model from scratch on this machine: `python -m hetmem.bundled.train`.

Nothing is downloaded. The tokenizer is a byte-level BPE trained on the machine's text
(`data.py`); the model a small Llama trained on that text and on the retrieval tasks of
`hetmem.tasks`, with the loss on the answers weighted up so that attention learns to find
them. A curriculum keeps it CPU-cheap: short sequences (256-1024 tokens) first, then a short
phase at 2k-4k. Positions skip ahead at a random point in half the sequences (positional
skip-wise training), so relative distances up to 8k are seen without paying for 8k-token
sequences. At the end the model is evaluated at each context length and the model card
(README.md, eval.json) is written beside the weights.

This module runs the job (the model, the optimizer loop, saving, the evaluation and the
command line); the knobs are `config.py`'s, the batches `batches.py`'s and the losses
`losses.py`'s.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checks import check_positive_int
from ..tasks import KINDS
from . import NAME, path
from .batches import Batches
from .config import TrainConfig, format_curriculum, parse_curriculum, parse_lengths
from .data import BOS, EOS, PAD, as_transformers, train_tokenizer
from .evaluate import evaluate_tasks
from .losses import TAP, AttentionTap, held_out_loss, loss_fn
from .shape import ModelShape, previous_token_heads, retrieval_heads


def build_model(shape: ModelShape, tok: Any, seed: int) -> Any:
    """A freshly initialized LlamaForCausalLM (tied embeddings, sdpa attention)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
        tie_word_embeddings=shape.tie_embeddings,
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(PAD),
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if not shape.tie_embeddings:
        with torch.no_grad():
            model.model.embed_tokens.weight.normal_(0.0, shape.embed_std)
    model.generation_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=16,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    return model


class ThreadChooser:
    """Picks 1..`most` torch threads by measured speed, re-checked every `every` steps.

    The machine's cores are shared: when another process holds one, two threads that wait
    on each other run several times slower than one, so the faster count is measured, not
    assumed.
    """

    def __init__(self, most: int, every: int = 20):
        self.options = sorted({1, most})
        self.every = every
        self.rate: dict[int, float] = {}
        self.best = most
        self.current = most
        self.t0 = 0.0

    def begin(self, step: int) -> None:
        untried = [n for n in self.options if n not in self.rate]
        if untried:
            self.current = untried[0]
        elif step % self.every == 0 and len(self.options) > 1:
            self.current = next(n for n in self.options if n != self.best)
        else:
            self.current = self.best
        torch.set_num_threads(self.current)
        self.t0 = time.perf_counter()

    def end(self, tokens: int) -> None:
        rate = tokens / max(time.perf_counter() - self.t0, 1e-9)
        old = self.rate.get(self.current)
        self.rate[self.current] = rate if old is None else 0.5 * old + 0.5 * rate
        self.best = max(self.rate, key=self.rate.__getitem__)


def log_line(log: Any, text: str) -> None:
    if log is not None:
        log.print(text, highlight=False)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio` of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def train(cfg: TrainConfig, out: Path, log: Any = None) -> dict[str, Any]:
    """Train tokenizer and model, save them to `out`, and return the run's record."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    torch.set_num_threads(cfg.threads)
    started = time.time()
    tok = train_tokenizer(cfg.shape.vocab_size)
    batches = Batches(tok, cfg)
    model = build_model(cfg.shape, tok, cfg.seed)
    if cfg.init is not None:
        from safetensors.torch import load_file

        state = load_file(str(Path(cfg.init) / "model.safetensors"))
        model.load_state_dict(state, strict=False)
    # The input embeddings keep their large scale (see ModelShape.embed_std): no decay.
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed_tokens" not in n]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed_tokens" in n]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    threads = ThreadChooser(cfg.threads)
    AttentionTap.register()
    tap = None
    if cfg.retrieval_weight > 0:
        tap = AttentionTap(retrieval_heads(cfg.shape), previous_token_heads(cfg.shape))
    model.set_attn_implementation(TAP)
    bounds = np.cumsum([share for _, share in cfg.curriculum])
    bounds = np.round(bounds / bounds[-1] * cfg.steps).astype(int)
    history: list[dict[str, float]] = []
    tokens = 0
    smooth: dict[str, float] = {}
    columns = (
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=log, refresh_per_second=1) as progress:
        bar = progress.add_task("train", total=cfg.steps, stats="")
        model.train()
        done = 0
        for step in range(cfg.steps):
            if time.time() - started > 60 * cfg.max_minutes:
                log_line(log, f"stopping at step {step}: past {cfg.max_minutes:g} minutes")
                break
            done = step + 1
            lengths = cfg.curriculum[int(np.searchsorted(bounds, step, side="right"))][0]
            length = batches.rng.choice(lengths)
            batch = batches.batch(length)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            threads.begin(step)
            loss, stats = loss_fn(model, batch, tap, cfg.retrieval_weight, cfg.previous_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            threads.end(batch["input_ids"].numel())
            tokens += batch["input_ids"].numel()
            for k, v in stats.items():
                smooth[k] = v if k not in smooth else 0.95 * smooth[k] + 0.05 * v
            history.append(
                {"step": step, "length": length, "time_s": time.time() - started, **stats}
            )
            text = " ".join(f"{k} {v:.3f}" for k, v in smooth.items())
            progress.update(bar, advance=1, stats=f"L={length} {text}")
            if log is not None and (step % 50 == 0 or step == cfg.steps - 1):
                log.print(
                    f"step {step} L={length} lr {lr_at(step, cfg):.2e} {text} tokens {tokens} "
                    f"threads {threads.best} ({threads.rate.get(threads.best, 0):.0f} tok/s) "
                    f"{time.time() - started:.0f} s",
                    highlight=False,
                )
    train_s = time.time() - started
    model.set_attn_implementation("sdpa")
    model.eval()
    save(model, tok, out)
    return {
        "config": asdict(cfg),
        "steps": done,
        "planned_steps": cfg.steps,
        "tokens": tokens,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_wall_s": round(train_s, 1),
        "held_out_lm_loss": round(held_out_loss(model, tok, batches.held_out), 4),
        "final": {k: round(v, 4) for k, v in smooth.items()},
        "history": history[:: max(1, len(history) // 200)],
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": cfg.threads,
            "cpu": platform.processor() or platform.machine(),
        },
    }


def save(model: Any, tok: Any, out: Path) -> None:
    """Weights (float32 safetensors), config, generation config and tokenizer files."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    as_transformers(tok).save_pretrained(out)
    # transformers 5 writes its own class name; the generic one loads in 4.x as well.
    config_file = out / "tokenizer_config.json"
    tok_config = json.loads(config_file.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(tok_config, indent=2) + "\n")


def run_eval(out: Path, cfg: TrainConfig, log: Any = None) -> dict[str, Any]:
    """Accuracy of the saved model at every eval length, both tasks; also timed."""
    from . import load

    torch.set_num_threads(cfg.threads)
    model, tok = load(directory=out)
    results: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
    for kind in KINDS:
        for length in cfg.eval_lengths:
            n = cfg.eval_n if length <= 4096 else cfg.eval_n_long
            t0 = time.time()
            rows = evaluate_tasks(model, tok, length, n, 0, kind)
            acc = sum(ok for _, _, ok in rows) / len(rows)
            results[kind][str(length)] = {
                "accuracy": acc,
                "n": n,
                "seed": 0,
                "wall_s": round(time.time() - t0, 1),
                "wrong": [(t.answer, c) for t, c, ok in rows if not ok][:5],
            }
            if log is not None:
                log.print(
                    f"eval {kind} {length}: {acc:.3f} ({n} prompts, {time.time() - t0:.0f} s)"
                )
    return {"tasks": results, "decoding": "greedy", "threads": cfg.threads}


def main(argv: Sequence[str] | None = None) -> int:
    from rich.console import Console

    from .card import write_card

    p = argparse.ArgumentParser(
        prog="python -m hetmem.bundled.train", description=__doc__.splitlines()[0]
    )
    p.add_argument("--steps", type=int, default=TrainConfig.steps, help="optimizer steps")
    p.add_argument(
        "--contexts",
        default=format_curriculum(TrainConfig.curriculum),
        help="curriculum: phases 'lengths@share' separated by ';', e.g. '256,512@0.8;2048@0.2'",
    )
    p.add_argument("--batch-tokens", type=int, default=TrainConfig.batch_tokens)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument(
        "--lm-fraction",
        type=float,
        default=TrainConfig.lm_fraction,
        help="share of plain-text sequences",
    )
    p.add_argument("--answer-weight", type=float, default=TrainConfig.answer_weight)
    p.add_argument(
        "--lm-keep",
        type=float,
        default=TrainConfig.lm_keep,
        help="share of plain-text positions that carry the LM loss",
    )
    p.add_argument(
        "--retrieval-weight",
        type=float,
        default=TrainConfig.retrieval_weight,
        help="weight of the attention supervision onto copied sources (0: off)",
    )
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument(
        "--previous-weight",
        type=float,
        default=TrainConfig.previous_weight,
        help="weight of the previous-token supervision of the first layer's head",
    )
    p.add_argument("--init", default=None, help="start from the weights in this directory")
    p.add_argument("--warmup", type=int, default=TrainConfig.warmup)
    p.add_argument("--threads", type=int, default=TrainConfig.threads)
    p.add_argument(
        "--max-minutes",
        type=float,
        default=TrainConfig.max_minutes,
        help="stop training (and save) past this wall time",
    )
    p.add_argument("--eval-lengths", default=",".join(map(str, TrainConfig.eval_lengths)))
    p.add_argument(
        "--eval-n", type=int, default=TrainConfig.eval_n, help="prompts per length up to 4k"
    )
    p.add_argument(
        "--eval-n-long",
        type=int,
        default=TrainConfig.eval_n_long,
        help="prompts per length above 4k",
    )
    p.add_argument(
        "--out", type=Path, default=path(), help=f"weights directory (default: the bundled {NAME})"
    )
    p.add_argument(
        "--eval-only", action="store_true", help="evaluate the model in --out and rewrite its card"
    )
    p.add_argument(
        "--card-only",
        action="store_true",
        help="rewrite the card of --out from its training.json and eval.json",
    )
    args = p.parse_args(argv)
    cfg = TrainConfig(
        steps=check_positive_int("steps", args.steps),
        curriculum=parse_curriculum(args.contexts),
        batch_tokens=check_positive_int("batch_tokens", args.batch_tokens),
        lr=args.lr,
        lm_fraction=args.lm_fraction,
        answer_weight=args.answer_weight,
        lm_keep=args.lm_keep,
        retrieval_weight=args.retrieval_weight,
        init=args.init,
        previous_weight=args.previous_weight,
        warmup=args.warmup,
        seed=args.seed,
        threads=check_positive_int("threads", args.threads),
        max_minutes=args.max_minutes,
        eval_lengths=parse_lengths(args.eval_lengths),
        eval_n=check_positive_int("eval_n", args.eval_n),
        eval_n_long=check_positive_int("eval_n_long", args.eval_n_long),
    )
    console = Console(stderr=True, width=200)
    out: Path = args.out
    record_file = out / "training.json"
    if args.card_only:
        ev = json.loads((out / "eval.json").read_text())
        write_card(out, json.loads(record_file.read_text()), ev)
        return 0
    if args.eval_only:
        record = json.loads(record_file.read_text())
    else:
        if out.exists() and out != path():
            shutil.rmtree(out)
        record = train(cfg, out, console)
        record_file.write_text(json.dumps(record, indent=1) + "\n")
        console.print(
            f"trained {cfg.steps} steps in {record['train_wall_s']:.0f} s; saved to {out}"
        )
    t0 = time.time()
    ev = run_eval(out, cfg, console)
    ev["eval_wall_s"] = round(time.time() - t0, 1)
    (out / "eval.json").write_text(json.dumps(ev, indent=1) + "\n")
    write_card(out, record, ev)
    return 0


if __name__ == "__main__":
    sys.exit(main())
