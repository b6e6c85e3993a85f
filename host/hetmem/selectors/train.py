"""Training one layer's selectors on its captured activations: Adam on the KL objective
(`objective.py`), the best held-out checkpoint kept. The model stays frozen."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..checks import check_positive_int
from ..errors import InputError
from ..methods.dsa import IndexerWeights
from ..methods.seer import GateWeights
from .activations import LayerActivations
from .objective import (
    block_pools,
    block_target,
    gate_logits,
    indexer_logits,
    kl_divergence,
    token_target,
)


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
        untrained = float(kl_divergence(held_teacher, indexer_logits(base, held)))
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
            scores = indexer_logits(IndexerWeights(wq, wk, ww, heads), train.subset(rows))
            return kl_divergence(teacher[rows], scores)

        def held_loss(wq=wq, wk=wk, ww=ww) -> torch.Tensor:
            return kl_divergence(
                held_teacher, indexer_logits(IndexerWeights(wq, wk, ww, heads), held)
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
                teacher, indexer_logits(IndexerWeights(wq * temperature, wk, None, heads), act)
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
        kl = float(kl_divergence(teacher, indexer_logits(IndexerWeights(wq, wk, ww, heads), act)))
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
