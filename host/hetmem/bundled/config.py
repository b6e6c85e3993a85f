"""The bundled model's training run: every knob (`TrainConfig`, written to training.json beside
the weights), and the command line's text forms of its lengths and curriculum."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..checks import check_positive_int
from ..errors import InputError
from .shape import ModelShape


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
