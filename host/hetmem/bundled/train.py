"""Train the bundled model from scratch on this machine: `python -m hetmem.models.bundled.train`.

Nothing is downloaded. The tokenizer is a byte-level BPE trained on the machine's text
(`data.py`); the model a small Llama trained on that text and on the retrieval tasks of
`hetmem.tasks`, with the loss on the answers weighted up so that attention learns to find
them. A curriculum keeps it CPU-cheap: short sequences (256-1024 tokens) first, then a short
phase at 2k-4k. Positions skip ahead at a random point in half the sequences (positional
skip-wise training), so relative distances up to 8k are seen without paying for 8k-token
sequences. At the end the model is evaluated at each context length and the model card
(README.md, eval.json) is written beside the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...checks import check_positive_int
from ...errors import InputError
from ...tasks import KINDS, TokenCounter, make_task
from . import NAME, path
from .data import BOS, EOS, PAD, as_transformers, machine_text, train_tokenizer
from .evaluate import evaluate_tasks
from .shape import ModelShape, previous_token_heads, retrieval_heads

#: Training tasks draw their seeds from here up; evaluation sets use small seeds.
TRAIN_SEED_BASE = 2**32
#: What a training token is, for the progress figures: text, a copied span, a task's answer.
LM, COPY, ANSWER = 0, 1, 2


@dataclass
class TrainConfig:
    """Every knob of a run; written to training.json beside the weights."""

    steps: int = 2600
    #: Phases in order: (sequence lengths drawn from, share of the steps).
    curriculum: tuple[tuple[tuple[int, ...], float], ...] = (
        ((128, 256), 0.35),
        ((512, 1024), 0.45),
        ((2048, 4096), 0.2),
    )
    batch_tokens: int = 1024
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    answer_weight: float = 8.0
    lm_fraction: float = 0.15
    lm_keep: float = 0.15
    repeat_prob: float = 0.8
    copy_weight: float = 2.0
    retrieval_weight: float = 1.0
    previous_weight: float = 0.2
    init: str | None = None  # start from these weights (same tokenizer) instead of random
    skip_prob: float = 0.5
    #: Positions skip ahead within this range: 8k contexts plus their answers.
    skip_to: int = 8192 + 256
    #: Training stops early (saving what it has) past this wall time.
    max_minutes: float = 40.0
    threads: int = 2  # the most; fewer when measured faster (see ThreadChooser)
    eval_lengths: tuple[int, ...] = (1024, 2048, 4096, 8192)
    eval_n: int = 50
    eval_n_long: int = 50
    shape: ModelShape = field(default_factory=ModelShape)


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


class Batches:
    """Training batches: LM windows of the machine's text and retrieval tasks, with a
    per-token loss weight (answers up, unpredictable random values out, a sample of the
    LM positions in) and position ids that may skip ahead."""

    def __init__(self, tok: Any, cfg: TrainConfig):
        self.tok, self.cfg = tok, cfg
        self.counter = TokenCounter(tok)
        self.rng = random.Random(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        texts = machine_text()
        held = max(1, len(texts) // 20)
        self.held_out = texts[-held:]
        ids = [
            i
            for e in tok.encode_batch(list(texts[:-held]), add_special_tokens=False)
            for i in e.ids
        ]
        self.lm = torch.tensor(ids, dtype=torch.long)
        self.bos, self.pad = tok.token_to_id(BOS), tok.token_to_id(PAD)

    def _lm(self, length: int) -> Example:
        """A window of text; usually with a few of its spans copied further on.

        A copy is predictable only by looking back at the original (an induction head, the
        mechanism retrieval runs on): its tokens are weighted up and linked to their source,
        which teaches attention to look things up long before the tasks' sparse answers do.
        """
        start = self.rng.randrange(len(self.lm) - length)
        ids = torch.cat([torch.tensor([self.bos]), self.lm[start : start + length - 1]])
        weight = (torch.rand(length, generator=self.gen) < self.cfg.lm_keep).float()
        role = torch.full((length,), LM)
        links = []
        if self.rng.random() < self.cfg.repeat_prob and length >= 64:
            for _ in range(self.rng.randint(1, 3)):
                m = self.rng.randint(8, max(8, min(64, length // 4)))
                src = self.rng.randrange(1, length // 2 - m + 1)
                dst = self.rng.randrange(src + m, length - m + 1)
                ids[dst : dst + m] = ids[src : src + m].clone()
                weight[dst + 1 : dst + m] = self.cfg.copy_weight
                role[dst + 1 : dst + m] = COPY
                k = torch.arange(1, m)
                links.append(torch.stack([dst + k - 1, src + k], 1))
        return Example(ids, weight, role, _cat_links(links))

    def _task(self, length: int) -> Example:
        """A passkey or recall task of about `length` tokens, every answer written out.

        Each answer token is linked to the same token of the value where it was stated."""
        kind = self.rng.choice(KINDS)
        seed = TRAIN_SEED_BASE + self.rng.getrandbits(40)
        if kind == "recall":
            pairs = self.rng.randint(1, max(1, min(16, (length - 48) // 32)))
            options = {"pairs": pairs, "queries": self.rng.randint(1, pairs)}
        else:
            options = {}
        task = make_task(kind, length - 8, seed, self.counter, **options)
        enc = self.tok.encode(task.text)
        ids = torch.tensor(enc.ids[:length], dtype=torch.long)
        starts = np.array([a for a, _ in enc.offsets[:length]])
        weight = (torch.rand(len(ids), generator=self.gen) < self.cfg.lm_keep).numpy()
        weight = weight.astype(np.float32)
        role = np.full(len(ids), LM)
        stated: dict[str, np.ndarray] = {}
        links = []
        for a, b, kind_ in task.spans:
            inside = np.flatnonzero((starts >= a) & (starts < b))
            value = task.text[a:b]
            if kind_ == "answer":
                weight[inside] = self.cfg.answer_weight
                role[inside] = ANSWER
                source = stated.get(value)
                if source is not None and len(source) == len(inside):
                    links.append(torch.from_numpy(np.stack([inside - 1, source], 1)))
            else:
                weight[inside] = 0.0
                stated.setdefault(value, inside)
        weight[0] = 0.0
        return Example(ids, torch.from_numpy(weight), torch.from_numpy(role), _cat_links(links))

    def _positions(self, length: int) -> torch.Tensor:
        pos = torch.arange(length)
        room = self.cfg.skip_to - length
        if room > 0 and self.rng.random() < self.cfg.skip_prob:
            cut = self.rng.randrange(1, length)
            pos[cut:] += self.rng.randrange(room + 1)
        return pos

    def batch(self, length: int) -> dict[str, torch.Tensor]:
        """`batch_tokens // length` sequences of `length` tokens (at least one)."""
        rows = max(1, self.cfg.batch_tokens // length)
        ids = torch.full((rows, length), self.pad, dtype=torch.long)
        weight = torch.zeros(rows, length)
        pos = torch.zeros(rows, length, dtype=torch.long)
        roles = torch.zeros(rows, length, dtype=torch.long)
        links = []
        for r in range(rows):
            lm = self.rng.random() < self.cfg.lm_fraction
            ex = self._lm(length) if lm else self._task(length)
            n = len(ex.ids)
            ids[r, :n], weight[r, :n], roles[r, :n] = ex.ids, ex.weight, ex.role
            pos[r] = self._positions(length)
            if len(ex.links):
                links.append(torch.cat([torch.full((len(ex.links), 1), r), ex.links], 1))
        return {
            "input_ids": ids,
            "weight": weight,
            "position_ids": pos,
            "role": roles,
            "links": torch.cat(links) if links else torch.zeros(0, 3, dtype=torch.long),
            "previous": self._previous(rows, length),
        }

    def _previous(self, rows: int, length: int, per_row: int = 32) -> torch.Tensor:
        """Links (row, p, p - 1) at random positions, for the previous-token heads."""
        p = torch.randint(1, length, (rows, per_row), generator=self.gen)
        r = torch.arange(rows)[:, None].expand(rows, per_row)
        return torch.stack([r, p, p - 1], -1).reshape(-1, 3)


@dataclass
class Example:
    """One training sequence: tokens, loss weight and role per token, and links (query
    position, source position): where a retrieving head should look from that query."""

    ids: torch.Tensor
    weight: torch.Tensor
    role: torch.Tensor
    links: torch.Tensor


def _cat_links(links: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(links).long() if links else torch.zeros(0, 2, dtype=torch.long)


#: The name the training-time attention function registers under (see `AttentionTap`).
TAP = "hetmem_train_tap"


class AttentionTap:
    """Keeps the post-RoPE queries and keys of some layers during a training forward.

    Registered with transformers' `AttentionInterface` as `TAP`; attention itself is sdpa,
    unchanged. The kept tensors feed `retrieval_loss`.
    """

    current: AttentionTap | None = None

    def __init__(self, heads: Sequence[tuple[int, int]], previous: Sequence[tuple[int, int]] = ()):
        self.heads = tuple(heads)
        self.previous = tuple(previous)
        self.layers = {layer for layer, _ in (*heads, *previous)}
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}

    @staticmethod
    def register() -> None:
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask

        AttentionInterface.register(TAP, _tap_forward)
        AttentionMaskInterface.register(TAP, sdpa_mask)


def _tap_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    **kwargs: Any,
) -> Any:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    tap = AttentionTap.current
    if tap is not None and module.layer_idx in tap.layers:
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        tap.kept[module.layer_idx] = (query, key, scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def retrieval_loss(
    tap: AttentionTap, links: torch.Tensor, heads: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """Mean -log(attention weight on the source) over the links, for each of `heads`.

    A link (row, query position p, source position j) says: the token after p is a copy of
    the token at j. Supervising a few heads to attend there (and a first-layer head to the
    previous token) is the shortcut that makes a small model's retrieval form within
    minutes of CPU rather than days.
    """
    losses = []
    for layer, head in heads:
        q, k, scaling = tap.kept[layer]
        group = q.shape[1] // k.shape[1]
        for r in links[:, 0].unique().tolist():
            mine = links[links[:, 0] == r]
            p, j = mine[:, 1], mine[:, 2]
            scores = (q[r, head, p] @ k[r, head // group].T) * scaling  # [n, L]
            causal = torch.arange(k.shape[2])[None, :] <= p[:, None]
            scores = scores.masked_fill(~causal, float("-inf"))
            target = scores.gather(1, j[:, None])[:, 0]
            losses.append(torch.logsumexp(scores, -1) - target)
    return torch.cat(losses).mean()


def loss_fn(
    model: Any,
    batch: dict[str, torch.Tensor],
    tap: AttentionTap | None = None,
    retrieval_weight: float = 1.0,
    previous_weight: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted next-token loss (logits only where the weight is set), plus the retrieval
    loss of the tapped heads when `tap` is given."""
    AttentionTap.current = tap
    try:
        # An explicit all-ones mask, so that no transformers version reads the jump in the
        # position ids as the start of another packed sequence.
        hidden = model.model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=torch.ones_like(batch["input_ids"]),
        ).last_hidden_state
    finally:
        AttentionTap.current = None
    w = batch["weight"][:, 1:]
    where = w > 0
    logits = model.lm_head(hidden[:, :-1][where])
    target = batch["input_ids"][:, 1:][where]
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    ww = w[where]
    loss = (ce * ww).sum() / ww.sum()
    role = batch["role"][:, 1:][where]
    stats = {}
    if tap is not None and len(batch["links"]):
        attn = retrieval_loss(tap, batch["links"], tap.heads)
        loss = loss + retrieval_weight * attn
        stats["attn_loss"] = float(attn.detach())
    if tap is not None and tap.previous and previous_weight > 0:
        prev = retrieval_loss(tap, batch["previous"], tap.previous)
        loss = loss + previous_weight * prev
        stats["prev_loss"] = float(prev.detach())
    if tap is not None:
        tap.kept.clear()
    stats["loss"] = float(loss.detach())
    with torch.no_grad():
        hit = logits.argmax(-1) == target
        for code, name in ((ANSWER, "answer"), (COPY, "copy")):
            mine = role == code
            if bool(mine.any()):
                stats[f"{name}_loss"] = float(ce[mine].mean())
                stats[f"{name}_acc"] = float(hit[mine].float().mean())
        if bool((role == LM).any()):
            stats["lm_loss"] = float(ce[role == LM].mean())
    return loss, stats


def held_out_loss(
    model: Any, tok: Any, texts: Sequence[str], length: int = 512, limit: int = 64
) -> float:
    """Mean next-token loss on held-out docstrings (the LM side of the model)."""
    ids = [i for e in tok.encode_batch(list(texts), add_special_tokens=False) for i in e.ids]
    bos = tok.token_to_id(BOS)
    total, count = 0.0, 0
    with torch.inference_mode():
        for s in range(0, min(len(ids), limit * (length - 1)) - length, length - 1):
            x = torch.tensor([[bos, *ids[s : s + length - 1]]])
            logits = model(input_ids=x).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
            count += length - 1
    return total / max(count, 1)


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


def parse_lengths(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError("lengths", f"expected comma-separated integers, got {text!r}") from None
    for v in values:
        check_positive_int("lengths", v)
    return values


def parse_curriculum(text: str) -> tuple[tuple[tuple[int, ...], float], ...]:
    """'128,256@0.4;512,1024@0.6' -> (((128, 256), 0.4), ((512, 1024), 0.6))."""
    phases = []
    for part in text.split(";"):
        lengths, _, share = part.partition("@")
        try:
            value = float(share) if share else 1.0
        except ValueError:
            raise InputError("contexts", f"bad share {share!r} in {text!r}") from None
        if not value > 0:
            raise InputError("contexts", f"shares must be positive, got {value} in {text!r}")
        values = parse_lengths(lengths)
        if not values:
            raise InputError("contexts", f"a phase without lengths in {text!r}")
        phases.append((values, value))
    return tuple(phases)


def format_curriculum(curriculum: Sequence[tuple[Sequence[int], float]]) -> str:
    return ";".join(f"{','.join(map(str, lengths))}@{share:g}" for lengths, share in curriculum)


def main(argv: Sequence[str] | None = None) -> int:
    from rich.console import Console

    from .card import write_card

    p = argparse.ArgumentParser(
        prog="python -m hetmem.models.bundled.train", description=__doc__.splitlines()[0]
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
