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
directory (`trained_spec`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checks import check_positive_int, check_tensor
from ..errors import InputError
from ..methods.base import Method
from ..methods.dsa import DSA, IndexerWeights
from ..methods.seer import GateWeights, SeerAttention
from .attn_impl import restore_attn, saved_attn

SELECTORS_FILE = "hetmem_selectors.safetensors"
FORMAT = "hetmem-selectors/1"
CAPTURE = "hetmem_capture"
#: Methods whose weights `calibrate` trains.
TRAINED_METHODS = ("dsa", "seer")


# -- capture -----------------------------------------------------------------------------


@dataclass
class LayerActivations:
    """One attention layer's activations over N sequences of S tokens.

    q [N, Hq, T, D]: the queries at the T sampled `positions` [N, T]; k [N, Hkv, S, D]: every
    key. Both after the rotary embedding, as the attention function receives them.
    `scale` is the layer's softmax scale; `causal` says whether a query sees later tokens.
    """

    q: torch.Tensor
    k: torch.Tensor
    positions: torch.Tensor
    scale: float
    causal: bool = True

    @property
    def q_heads(self) -> int:
        return self.q.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    def subset(self, rows: torch.Tensor | slice) -> LayerActivations:
        return LayerActivations(
            self.q[rows], self.k[rows], self.positions[rows], self.scale, self.causal
        )

    def attention(self) -> torch.Tensor:
        """Dense softmax attention of the sampled queries, [N, Hq, T, S]."""
        return dense_probs(self.q, self.k, self.positions, self.scale, self.causal)


def dense_probs(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, scale: float, causal: bool = True
) -> torch.Tensor:
    """Softmax attention [N, Hq, T, S] of queries q [N, Hq, T, D] over keys k [N, Hkv, S, D]."""
    groups = q.shape[1] // k.shape[1]
    keys = k.repeat_interleave(groups, dim=1)
    logits = (q @ keys.transpose(-1, -2)) * scale
    if causal:
        logits = logits.masked_fill(~visible(positions, k.shape[2])[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1)


def visible(positions: torch.Tensor, tokens: int) -> torch.Tensor:
    """[N, T, S]: key s is visible to the query at position p when s <= p."""
    return torch.arange(tokens, device=positions.device)[None, None, :] <= positions[..., None]


_RECORDER: ContextVar[_Recorder | None] = ContextVar("hetmem_capture", default=None)


class _Recorder:
    """Collects (q at sampled positions, k, scale) per layer during one forward pass."""

    def __init__(self, positions: torch.Tensor):
        self.positions = positions  # [B, T]
        self.layers: list[tuple[torch.Tensor, torch.Tensor, float, bool]] = []

    def add(
        self, module: Any, query: torch.Tensor, key: torch.Tensor, scaling: float | None
    ) -> None:
        b, hq, _, d = query.shape
        index = self.positions.to(query.device)[:, None, :, None].expand(b, hq, -1, d)
        q = query.detach().gather(2, index).float().cpu()
        scale = 1.0 / math.sqrt(d) if scaling is None else float(scaling)
        causal = bool(getattr(module, "is_causal", True))
        self.layers.append((q, key.detach().float().cpu(), scale, causal))


def _capture_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """sdpa, after recording the layer's queries and keys (same contract as sdpa)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    recorder = _RECORDER.get()
    if recorder is not None:
        recorder.add(module, query, key, scaling)
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


@contextmanager
def _capturing(model: Any) -> Iterator[None]:
    """Route the model's attention through `_capture_forward`; restore it afterwards."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(CAPTURE, _capture_forward)
    AttentionMaskInterface.register(CAPTURE, sdpa_mask)
    saved = saved_attn(model)
    try:
        model.set_attn_implementation(CAPTURE)
        if model.config._attn_implementation != CAPTURE:
            raise InputError(
                "model",
                f"{type(model).__name__} does not dispatch attention through transformers' "
                "AttentionInterface, so its activations cannot be captured",
            )
        yield
    finally:
        restore_attn(saved)


def sample_positions(
    sequences: int, tokens: int, queries: int, seed: int = 0, first: int | None = None
) -> torch.Tensor:
    """[N, T] ascending query positions per sequence: the last token and T-1 drawn from
    [first, S-1) (default first = S/8: decode queries see long contexts)."""
    check_positive_int("queries", queries)
    first = max(tokens // 8, 1) if first is None else first
    span = tokens - 1 - first
    if span < queries - 1:
        raise InputError(
            "queries", f"{queries} query positions do not fit {tokens}-token sequences"
        )
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(sequences):
        drawn = torch.randperm(span, generator=gen)[: queries - 1] + first
        rows.append(torch.sort(torch.cat([drawn, torch.tensor([tokens - 1])])).values)
    return torch.stack(rows)


@torch.no_grad()
def capture(
    model: Any,
    input_ids: torch.Tensor,
    *,
    queries: int = 64,
    seed: int = 0,
    batch_size: int = 1,
    progress: Callable[[int], None] | None = None,
    positions: torch.Tensor | None = None,
) -> list[LayerActivations]:
    """Run the frozen model over `input_ids` [N, S] and return each attention layer's
    activations, with `queries` sampled query positions per sequence, or at `positions`
    [N, T] (ascending, each in [0, S)) when given."""
    check_tensor("input_ids", input_ids, dims=("sequences", "tokens"), floating=False)
    n, s = input_ids.shape
    if n == 0 or s < 2:
        raise InputError("input_ids", f"expected at least one sequence of 2+ tokens, got {n}x{s}")
    if positions is None:
        positions = sample_positions(n, s, min(queries, s - 1 - max(s // 8, 1) + 1), seed)
    else:
        check_tensor("positions", positions, dims=("sequences", "queries"), floating=False)
        if positions.shape[0] != n or positions.shape[1] == 0:
            raise InputError(
                "positions", f"expected [{n}, T>0] query positions, got {tuple(positions.shape)}"
            )
        if bool((positions < 0).any() | (positions >= s).any()):
            raise InputError("positions", f"expected positions in [0, {s}), got out of range")
        positions = positions.long().cpu()
    device = next(model.parameters()).device
    per_batch: list[list[tuple[torch.Tensor, torch.Tensor, float, bool]]] = []
    model_was_training = model.training
    model.eval()
    try:
        with _capturing(model):
            for start in range(0, n, batch_size):
                recorder = _Recorder(positions[start : start + batch_size])
                token = _RECORDER.set(recorder)
                try:
                    model(
                        input_ids=input_ids[start : start + batch_size].to(device), use_cache=False
                    )
                finally:
                    _RECORDER.reset(token)
                if not recorder.layers:
                    raise InputError("model", "ran no attention layer through the interface")
                per_batch.append(recorder.layers)
                if progress is not None:
                    progress(min(batch_size, n - start))
    finally:
        model.train(model_was_training)
    layers = []
    for i in range(len(per_batch[0])):
        q = torch.cat([b[i][0] for b in per_batch])
        k = torch.cat([b[i][1] for b in per_batch])
        _, _, scale, causal = per_batch[0][i]
        layers.append(LayerActivations(q, k, positions.clone(), scale, causal))
    return layers


# -- the two students --------------------------------------------------------------------


def indexer_scores(weights: IndexerWeights, act: LayerActivations) -> torch.Tensor:
    """DSA's relevancy, [N, T, S] (invisible keys at -inf), exactly as `DSA.relevancy`
    scores with the default features: sum_h w_h ReLU(q_h . k_s / sqrt(Di))."""
    qf = act.q.permute(0, 2, 1, 3).flatten(2)  # [N, T, Hq*D]
    kf = act.k.permute(0, 2, 1, 3).flatten(2)  # [N, S, Hkv*D]
    qi = (qf @ weights.wq).unflatten(-1, (weights.heads, weights.dim))  # [N, T, H, Di]
    ki = kf @ weights.wk  # [N, S, Di]
    w = (
        torch.full(qi.shape[:-1], 1.0 / weights.heads, dtype=qi.dtype)
        if weights.ww is None
        else qf @ weights.ww
    )
    logits = torch.einsum("nthd,nsd->ntsh", qi, ki) / math.sqrt(weights.dim)
    scores = (torch.relu(logits) * w[:, :, None, :]).sum(-1)
    if act.causal:
        scores = scores.masked_fill(~visible(act.positions, act.k.shape[2]), float("-inf"))
    return scores


def token_target(act: LayerActivations) -> torch.Tensor:
    """The indexer's teacher: dense attention summed over query heads, normalized, [N, T, S]."""
    return act.attention().mean(dim=1)


def block_pools(act: LayerActivations, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SeerAttention-R's pooled block keys (max, min, mean; [3D]) as a decode step sees them.

    Returns the complete blocks [N, Hkv, Nb, 3D] and, per sampled query, the block holding
    it pooled over its tokens up to the query only [N, Hkv, T, 3D].
    """
    n, h, s, d = act.k.shape
    nb = -(-s // block)
    keys = torch.nn.functional.pad(act.k, (0, 0, 0, nb * block - s)).view(n, h, nb, block, d)
    valid = (torch.arange(nb * block) < s).view(1, 1, nb, block, 1)
    big = torch.finfo(keys.dtype).max
    run_max = torch.cummax(keys.masked_fill(~valid, -big), dim=3).values
    run_min = torch.cummin(keys.masked_fill(~valid, big), dim=3).values
    run_mean = keys.cumsum(dim=3) / torch.arange(1, block + 1, dtype=keys.dtype)[:, None]
    last = ((s - 1) % block) if s % block else block - 1
    full_index = torch.full((nb,), block - 1)
    full_index[-1] = last
    full = torch.cat(
        [r[:, :, torch.arange(nb), full_index] for r in (run_max, run_min, run_mean)], dim=-1
    )
    blk, off = act.positions // block, act.positions % block  # [N, T]
    rows = torch.arange(n)[:, None, None]
    heads = torch.arange(h)[None, :, None]
    partial = torch.cat(
        [r[rows, heads, blk[:, None, :], off[:, None, :]] for r in (run_max, run_min, run_mean)],
        dim=-1,
    )
    return full, partial


def gate_logits(
    weights: GateWeights,
    act: LayerActivations,
    pools: tuple[torch.Tensor, torch.Tensor],
    block: int,
) -> torch.Tensor:
    """The AttnGate's block logits [N, Hkv, T, Nb] (invisible blocks at -inf), as
    `SeerAttention.relevancy` computes them at each sampled decode position (causal), or
    with the whole sequence in memory (an encoder's bidirectional attention)."""
    full, partial = pools
    n, hkv = act.k.shape[:2]
    grouped = act.q.unflatten(1, (hkv, -1)).permute(0, 1, 3, 2, 4).flatten(3)  # [N,Hkv,T,R*D]
    qg = grouped @ weights.wq[None]  # [N, Hkv, T, Dg]
    kg_full = full @ weights.wk[None]  # [N, Hkv, Nb, Dg]
    kg_part = partial @ weights.wk[None]  # [N, Hkv, T, Dg]
    root = math.sqrt(qg.shape[-1])
    logits = qg @ kg_full.transpose(-1, -2) / root
    if not act.causal:  # every query sees every (complete) block
        return logits
    own = (qg * kg_part).sum(-1) / root  # [N, Hkv, T]
    blk = (act.positions // block)[:, None, :, None].expand(n, hkv, -1, 1)
    logits = logits.scatter(-1, blk, own[..., None])
    nb = full.shape[2]
    later = torch.arange(nb)[None, None, None, :] > blk
    return logits.masked_fill(later, float("-inf"))


#: How the gate's teacher combines the query heads of a KV group (`block_target`).
GROUP_TEACHERS = ("max", "mean")


def block_target(act: LayerActivations, block: int, group: str = "max") -> torch.Tensor:
    """The gate's teacher, [N, Hkv, T, Nb]: each query head's attention mass per block,
    combined over each KV group's query heads and normalized.

    group="max" (the default): the largest mass any head of the group puts on the block.
    One selection serves the whole group, so a block that one head needs (a retrieval head
    on the needle, while its neighbours read the local text) must rank high for the group;
    the group's mean would divide that head's need by the group size. group="mean": the
    group's mean mass (the earlier teacher).
    """
    if group not in GROUP_TEACHERS:
        raise InputError("group", f"expected one of {GROUP_TEACHERS}, got {group!r}")
    probs = act.attention()  # [N, Hq, T, S]
    n, hq, t, s = probs.shape
    nb = -(-s // block)
    padded = torch.nn.functional.pad(probs, (0, nb * block - s))
    per_head = padded.view(n, act.kv_heads, hq // act.kv_heads, t, nb, block).sum(-1)
    if group == "mean":
        return per_head.mean(dim=2)
    most = per_head.amax(dim=2)  # [N, Hkv, T, Nb]
    return most / most.sum(-1, keepdim=True).clamp_min(1e-30)


def kl_divergence(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over queries of KL(target || softmax(logits)) along the last axis; entries at
    -inf carry no target mass (they are invisible to the query)."""
    log_q = torch.log_softmax(logits, dim=-1)
    keep = target > 0
    terms = torch.where(keep, target * (torch.log(target.clamp_min(1e-30)) - log_q), 0.0)
    return terms.sum(-1).mean()


# -- training ----------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Optimizer settings of one selector; the defaults train a layer in seconds on a CPU."""

    steps: int = 150
    lr: float = 3e-3
    batch_sequences: int = 4
    check_every: int = 25
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_int("steps", self.steps)
        check_positive_int("batch_sequences", self.batch_sequences)
        check_positive_int("check_every", self.check_every)
        if not (isinstance(self.lr, float | int) and self.lr > 0):
            raise InputError("lr", f"expected a positive learning rate, got {self.lr!r}")


@dataclass
class TrainLog:
    """Loss (KL, nats) of one selector of one layer: `untrained` and `held_out` on the
    held-out queries, for the untrained default weights and the weights kept; `losses` on
    the training minibatch at every step."""

    untrained: float
    losses: list[float] = field(default_factory=list)
    held_out: float = float("nan")
    choice: str = ""


def _split(act: LayerActivations) -> tuple[LayerActivations, LayerActivations]:
    """Hold out the last sixth of the sequences (at least one) when there are two or more."""
    n = act.q.shape[0]
    if n < 2:
        return act, act
    held = max(n // 6, 1)
    return act.subset(slice(0, n - held)), act.subset(slice(n - held, n))


def _minibatches(n: int, size: int, seed: int) -> Iterator[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield from torch.randperm(n, generator=gen).split(size)


def _fit(
    params: list[torch.nn.Parameter],
    train_loss: Callable[[torch.Tensor], torch.Tensor],
    held_loss: Callable[[], torch.Tensor],
    sequences: int,
    config: TrainConfig,
    log: TrainLog,
    on_step: Callable[[int, float], None] | None,
) -> list[torch.Tensor]:
    """Adam over minibatches of sequences; returns the parameters at the checkpoint (every
    `config.check_every` steps and the last) with the lowest held-out loss."""
    optimizer = torch.optim.Adam(params, lr=config.lr)
    batches = _minibatches(sequences, config.batch_sequences, config.seed)
    with torch.no_grad():
        best_loss, best = float(held_loss()), [p.detach().clone() for p in params]
    for step in range(config.steps):
        loss = train_loss(next(batches))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        log.losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, log.losses[-1])
        if (step + 1) % config.check_every == 0 or step + 1 == config.steps:
            with torch.no_grad():
                held = float(held_loss())
            if held < best_loss:
                best_loss, best = held, [p.detach().clone() for p in params]
    log.held_out = best_loss
    return best


def train_indexer(
    act: LayerActivations,
    *,
    heads: int | None = None,
    dim: int = 64,
    config: TrainConfig | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[IndexerWeights, TrainLog]:
    """Train a DSA lightning indexer on one layer's activations (the layer is frozen).

    Minimizes KL(dense attention summed over heads || softmax(indexer scores)), starting from
    the untrained default's projections (`IndexerWeights.from_attention`). Two students
    train: one with learned head weights ww, one with equal head weights (ww = None, the
    temperature folded into wq, which ReLU's positive homogeneity allows). ww is linear in
    the query features, which after the rotary embedding cannot express a constant, so the
    learned weights do not always generalize; the student with the lower held-out KL wins
    (`TrainLog.choice`). `on_step` sees both students' steps in turn.
    """
    config = config or TrainConfig()
    heads = act.q_heads if heads is None else check_positive_int("heads", heads)
    check_positive_int("dim", dim)
    train, held = _split(act)
    base = IndexerWeights.from_attention(act.q_heads, act.kv_heads, act.head_dim, dim, config.seed)
    if heads != act.q_heads:  # another number of indexer heads than attention heads
        gen = torch.Generator().manual_seed(config.seed)
        fq = base.wq.shape[0]
        wq0 = torch.randn(fq, heads * base.dim, generator=gen) / math.sqrt(fq)
    else:
        wq0 = base.wq
    teacher = token_target(train)
    held_teacher = token_target(held)
    with torch.no_grad():
        untrained = float(kl_divergence(held_teacher, indexer_scores(base, held)))
        temperature = _best_temperature(train, wq0, base.wk, heads, teacher)
        ww0 = _uniform_head_weights(train, wq0, base.wk, heads, teacher)
    candidates = []
    for learned in (True, False):
        wq = torch.nn.Parameter(wq0 * (1.0 if learned else temperature))
        wk = torch.nn.Parameter(base.wk.clone())
        params = [wq, wk]
        ww = None
        if learned:
            ww = torch.nn.Parameter(ww0.clone())
            params.append(ww)
        log = TrainLog(untrained=untrained)

        def train_loss(rows: torch.Tensor, wq=wq, wk=wk, ww=ww) -> torch.Tensor:
            scores = indexer_scores(IndexerWeights(wq, wk, ww, heads), train.subset(rows))
            return kl_divergence(teacher[rows], scores)

        def held_loss(wq=wq, wk=wk, ww=ww) -> torch.Tensor:
            return kl_divergence(
                held_teacher, indexer_scores(IndexerWeights(wq, wk, ww, heads), held)
            )

        best = _fit(params, train_loss, held_loss, train.q.shape[0], config, log, on_step)
        trained = IndexerWeights(best[0], best[1], best[2] if learned else None, heads)
        log.choice = "learned head weights" if learned else "equal head weights"
        candidates.append((log.held_out, trained, log))
    _, trained, log = min(candidates, key=lambda c: c[0])
    return trained, log


def _best_temperature(
    act: LayerActivations, wq: torch.Tensor, wk: torch.Tensor, heads: int, teacher: torch.Tensor
) -> float:
    """The scale of wq (equal head weights) whose indexer softmax fits the teacher best."""
    best, best_kl = 1.0, float("inf")
    for temperature in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0):
        kl = float(
            kl_divergence(
                teacher, indexer_scores(IndexerWeights(wq * temperature, wk, None, heads), act)
            )
        )
        if kl < best_kl:
            best, best_kl = temperature, kl
    return best


def _uniform_head_weights(
    act: LayerActivations, wq: torch.Tensor, wk: torch.Tensor, heads: int, teacher: torch.Tensor
) -> torch.Tensor:
    """A starting ww: the ridge fit of equal head weights from the query features (ww maps
    features to weights, with no bias), scaled to the temperature that fits the teacher best."""
    qf = act.q.permute(0, 2, 1, 3).flatten(0, 1).flatten(1)  # [N*T, Hq*D]
    gram = qf.T @ qf
    ridge = 1e-3 * gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(gram.shape[0])
    unit = torch.linalg.solve(gram + ridge * eye, qf.T @ torch.ones(qf.shape[0], heads))
    best, best_kl = unit, float("inf")
    for temperature in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0):
        ww = unit * temperature
        kl = float(kl_divergence(teacher, indexer_scores(IndexerWeights(wq, wk, ww, heads), act)))
        if kl < best_kl:
            best, best_kl = ww, kl
    return best.clone()


def train_gate(
    act: LayerActivations,
    *,
    block_size: int = 64,
    config: TrainConfig | None = None,
    on_step: Callable[[int, float], None] | None = None,
    group: str = "max",
) -> tuple[GateWeights, TrainLog]:
    """Train a SeerAttention-R AttnGate on one layer's activations by self-distillation.

    Starts from the untrained mean-pool gate and minimizes KL(block attention mass ||
    softmax(gate logits)), the query at each sampled decode position; `group` says how
    the teacher combines a KV group's query heads (`block_target`).
    """
    config = config or TrainConfig()
    block = check_positive_int("block_size", block_size)
    train, held = _split(act)
    base = GateWeights.mean_pool(act.q_heads, act.kv_heads, act.head_dim)
    wq = torch.nn.Parameter(base.wq.clone())
    wk = torch.nn.Parameter(base.wk.clone())
    pools = block_pools(train, block)
    teacher = block_target(train, block, group)
    held_pools, held_teacher = block_pools(held, block), block_target(held, block, group)
    with torch.no_grad():
        log = TrainLog(
            untrained=float(kl_divergence(held_teacher, gate_logits(base, held, held_pools, block)))
        )

    def train_loss(rows: torch.Tensor) -> torch.Tensor:
        sub_pools = (pools[0][rows], pools[1][rows])
        logits = gate_logits(GateWeights(wq, wk), train.subset(rows), sub_pools, block)
        return kl_divergence(teacher[rows], logits)

    def held_loss() -> torch.Tensor:
        return kl_divergence(
            held_teacher, gate_logits(GateWeights(wq, wk), held, held_pools, block)
        )

    best = _fit([wq, wk], train_loss, held_loss, train.q.shape[0], config, log, on_step)
    return GateWeights(best[0], best[1]), log


# -- the trained selectors on disk -------------------------------------------------------


@dataclass
class Selectors:
    """Per-layer trained weights of the DSA indexer and the Seer AttnGate."""

    indexers: list[IndexerWeights]
    gates: list[GateWeights]
    block_size: int = 16
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> int:
        return len(self.indexers)

    def method(self, name: str, layer_idx: int, **options: Any) -> Method:
        """The trained method of one layer (`options` as for `hetmem.methods.get`)."""
        if name == "dsa":
            return DSA(self.indexers[layer_idx], **options)
        if name == "seer":
            options.setdefault("block_size", self.block_size)
            return SeerAttention(self.gates[layer_idx], **options)
        raise InputError("method", f"no trained weights for {name!r}; trained: {TRAINED_METHODS}")

    def spec(self, name: str, options: Mapping[str, Any] | None = None) -> Callable[[int], Method]:
        """A per-layer callable for `wrap(model, method=...)`."""
        opts = dict(options or {})
        try:
            self.method(name, 0, **dict(opts))
        except TypeError as exc:
            raise InputError("method_options", f"{name}: {exc}") from exc

        def build(layer_idx: int) -> Method:
            if not 0 <= layer_idx < self.layers:
                raise InputError(
                    "model",
                    f"layer {layer_idx} has no trained {name} weights ({self.layers} layers)",
                )
            return self.method(name, layer_idx, **dict(opts))

        return build


def save_selectors(selectors: Selectors, path: str | os.PathLike) -> Path:
    """Write the selectors as one safetensors file (metadata: format, block size, losses)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for i, (ix, gate) in enumerate(zip(selectors.indexers, selectors.gates, strict=True)):
        named = {"dsa.{}.wq": ix.wq, "dsa.{}.wk": ix.wk, "dsa.{}.ww": ix.ww}
        named |= {"seer.{}.wq": gate.wq, "seer.{}.wk": gate.wk}
        for key, t in named.items():
            if t is not None:  # copies: safetensors refuses tensors that share memory
                tensors[key.format(i)] = t.detach().to("cpu", torch.float32).clone().contiguous()
    meta = {
        "format": FORMAT,
        "layers": str(selectors.layers),
        "seer_block_size": str(selectors.block_size),
        "dsa_heads": ",".join(str(ix.heads) for ix in selectors.indexers),
        "info": json.dumps(selectors.meta, sort_keys=True),
    }
    path = Path(path)
    save_file(tensors, str(path), metadata=meta)
    return path


def load_selectors(path: str | os.PathLike) -> Selectors:
    """Read a selectors file written by `save_selectors` (a directory: the file inside it)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / SELECTORS_FILE
    if not path.is_file():
        raise InputError("path", f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types
        raise InputError("path", f"{path} is not a readable safetensors file: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise InputError("path", f"{path} is not a hetmem selectors file (format {FORMAT})")
    try:
        layers = int(meta["layers"])
        heads = [int(h) for h in meta["dsa_heads"].split(",")]
        block_size = int(meta["seer_block_size"])
    except (KeyError, ValueError) as exc:
        raise InputError("path", f"{path} has malformed metadata: {exc}") from exc
    try:
        indexers = [
            IndexerWeights(
                tensors[f"dsa.{i}.wq"], tensors[f"dsa.{i}.wk"], tensors.get(f"dsa.{i}.ww"), heads[i]
            )
            for i in range(layers)
        ]
        gates = [
            GateWeights(tensors[f"seer.{i}.wq"], tensors[f"seer.{i}.wk"]) for i in range(layers)
        ]
    except KeyError as exc:
        raise InputError("path", f"{path} lacks tensor {exc}") from exc
    try:
        info = json.loads(meta.get("info", "{}"))
    except ValueError as exc:
        raise InputError("path", f"{path} has malformed metadata: info: {exc}") from exc
    return Selectors(indexers, gates, block_size, info)


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime: float) -> Selectors:
    return load_selectors(path)


def model_dir(model: Any) -> Path | None:
    """The local directory a transformers model was loaded from, if any."""
    name = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", None
    )
    if not name:
        return None
    path = Path(name)
    return path if path.is_dir() else None


def selectors_for(model: Any) -> Selectors | None:
    """The trained selectors shipped beside the model's directory, or None."""
    directory = model_dir(model)
    if directory is None:
        return None
    path = directory / SELECTORS_FILE
    if not path.is_file():
        return None
    selectors = _load_cached(str(path), path.stat().st_mtime)
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    if selectors.layers != layers:
        raise InputError(
            "model",
            f"{path} holds {selectors.layers} layers of selectors, the model has {layers}: "
            "rerun `hetmem calibrate`",
        )
    return selectors


def trained_spec(model: Any, method: Any, options: Mapping[str, Any] | None = None) -> Any:
    """What `wrap` should build for `method`: the trained per-layer callable when `method`
    names a trained selector, the model ships weights and the options give none; else
    `method` unchanged."""
    if not isinstance(method, str) or method not in TRAINED_METHODS:
        return method
    if options and "weights" in options:
        return method
    selectors = selectors_for(model)
    if selectors is None:
        return method
    return selectors.spec(method, options)


# -- the whole job ----------------------------------------------------------------------


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


def text_sequences(tokenizer: Any, sequences: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """[N, S] token ids of real text: the pydoc help topics, shuffled, cut into sequences."""
    from ..corpus import pydoc_paragraphs

    paragraphs = list(pydoc_paragraphs())
    order = torch.randperm(len(paragraphs), generator=torch.Generator().manual_seed(seed))
    ids: list[int] = []
    need = sequences * tokens
    for i in order.tolist():
        ids.extend(tokenizer(paragraphs[i] + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise InputError("tokens", f"the corpus holds {len(ids)} tokens, {need} were asked for")
    return torch.tensor(ids[:need]).view(sequences, tokens)


#: Seeds of calibration prompts start here, away from the evaluation sets (seeds 0, 1, ...).
CALIBRATION_SEED = 2**31


def task_sequences(
    tokenizer: Any, sequences: int, tokens: int, seed: int = 0
) -> torch.Tensor | None:
    """[N, S] token ids of passkey and associative-recall prompts (`hetmem.tasks`, half
    each), seeded away from the evaluation sets; each prompt has S tokens as the model
    sees it, `<s>` included (a prompt the tokenizer makes shorter is left out). None when
    no task fits S tokens."""
    from .. import tasks

    rows: list[list[int]] = []
    for i in range(2 * sequences):
        if len(rows) == sequences:
            break
        kind = tasks.KINDS[i % 2]
        try:
            task = tasks.make_task(kind, tokens, CALIBRATION_SEED + seed + i, tokenizer)
        except InputError:  # too short a context for this task under this tokenizer
            continue
        ids = tokenizer(task.prompt)["input_ids"]
        if len(ids) == tokens:
            rows.append(ids)
    return torch.tensor(rows) if rows else None


def answer_queries(task: Any, tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """Positions of the queries that write the task's final answer when decoding: the
    token before each of the answer's tokens, in `ids` (the tokens of `task.text`)."""
    start, end = next((a, b) for a, b, role in reversed(task.spans) if role == "answer")
    try:
        enc = tokenizer(task.text, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, TypeError, KeyError, ValueError):
        offsets = None
    if offsets is not None and len(offsets) == len(ids):
        inside = [i for i, (a, b) in enumerate(offsets) if b > a and a >= start and b <= end]
    else:  # a tokenizer without offsets: count the tokens before and through the answer
        first = len(tokenizer(task.text[:start])["input_ids"])
        last = len(tokenizer(task.text[:end])["input_ids"])
        inside = list(range(first, last))
    return [i - 1 for i in inside if 0 < i < len(ids)]


def gate_sequences(
    tokenizer: Any, sequences: int, tokens: int, queries: int = 64, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the Seer gate trains on at one context length: (input_ids [N, S], query
    positions [N, T]), S a few tokens over `tokens`.

    Half the sequences are passkey / associative-recall examples with their answers
    written out (`Task.text`), and their query positions hold the decode queries that
    write the final answer (the queries a sparse decode step asks: the prompt's last
    token is prefill's), the rest sampled over the sequence as `sample_positions` does;
    the other half is real text with sampled positions. A task prompt stops before the
    answer, so without these rows no query the gate trains on reads the needle back.
    """
    from .. import tasks

    check_positive_int("sequences", sequences)
    check_positive_int("tokens", tokens)
    rows: list[list[int]] = []
    wanted: list[list[int]] = []
    for i in range(2 * (sequences // 2)):
        if len(rows) == sequences // 2:
            break
        kind = tasks.KINDS[i % 2]
        try:
            task = tasks.make_task(kind, tokens, CALIBRATION_SEED + seed + i, tokenizer)
        except InputError:  # too short a context for this task under this tokenizer
            continue
        ids = tokenizer(task.text)["input_ids"]
        asked = answer_queries(task, tokenizer, ids)
        if asked:
            rows.append(ids)
            wanted.append(asked[: max(queries // 4, 1)])
    # Right-padded to the longest: a causal query never sees the tokens after it.
    length = max([len(r) for r in rows], default=tokens)
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    rows = [r + [pad] * (length - len(r)) for r in rows]
    text = text_sequences(tokenizer, sequences - len(rows), length, seed + tokens)
    drawn = sample_positions(sequences, length, queries, seed + tokens)
    positions = []
    for j in range(sequences):
        if j < len(rows):
            fill = sample_positions(1, length, queries - len(wanted[j]), seed + tokens + j)[0]
            positions.append(torch.sort(torch.cat([torch.tensor(wanted[j]), fill])).values)
        else:
            positions.append(drawn[j])
    ids = torch.cat([torch.tensor(rows, dtype=torch.long).view(-1, length), text])
    # Interleaved, so the held-out sixth of the sequences mixes both kinds.
    order = torch.randperm(sequences, generator=torch.Generator().manual_seed(seed + tokens))
    return ids[order], torch.stack(positions)[order]


def merge_activations(parts: Sequence[list[LayerActivations]]) -> list[LayerActivations]:
    """One list of layer activations from captures at several context lengths: keys
    zero-padded to the longest (no query sees past its own position, so never padding)."""
    if not parts:
        raise InputError("parts", "expected at least one capture")
    longest = max(p[0].k.shape[2] for p in parts)
    width = {p[0].q.shape[2] for p in parts}
    if len(width) != 1:
        raise InputError("parts", f"captures have different query counts {sorted(width)}")
    out = []
    for layer in range(len(parts[0])):
        acts = [p[layer] for p in parts]
        k = torch.cat(
            [torch.nn.functional.pad(a.k, (0, 0, 0, longest - a.k.shape[2])) for a in acts]
        )
        out.append(
            LayerActivations(
                torch.cat([a.q for a in acts]),
                k,
                torch.cat([a.positions for a in acts]),
                acts[0].scale,
                acts[0].causal,
            )
        )
    return out


def gate_calibration_data(
    tokenizer: Any,
    sequences: int,
    lengths: Sequence[int],
    queries: int = 64,
    seed: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`gate_sequences` at each context length (the gate learns at every length it will
    rank blocks at: trained at one, it ranks a needle far worse at four times it)."""
    if tokenizer is None:
        raise InputError("model", "has no tokenizer in its directory: calibration needs one")
    return [gate_sequences(tokenizer, sequences, n, queries, seed) for n in lengths]


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


def calibration_ids(tokenizer: Any, sequences: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """What `hetmem calibrate` trains on: real text (the pydoc help topics) and, for half
    the sequences, passkey / associative-recall prompts."""
    if tokenizer is None:
        raise InputError("model", "has no tokenizer in its directory: calibration needs one")
    check_positive_int("sequences", sequences)
    check_positive_int("tokens", tokens)
    n_tasks = sequences // 2
    tasks = task_sequences(tokenizer, n_tasks, tokens, seed) if n_tasks else None
    n_tasks = 0 if tasks is None else tasks.shape[0]
    text = text_sequences(tokenizer, sequences - n_tasks, tokens, seed)
    if tasks is None:
        return text
    # Interleaved, so the last sequences (held out in training) mix both kinds.
    rows = [r for pair in zip(text, tasks, strict=False) for r in pair]
    return torch.stack(rows + list(text[n_tasks:]))


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
