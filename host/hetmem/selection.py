"""Scores and selections, the values passed between Compute Relevancy, Retrieval and Apply.

A selection picks *units* of a memory: tokens (unit 1), blocks or pages (unit = block size)
or documents. Selections carry a group axis G: 1 (shared by every head), the number of KV
heads, or the number of query heads.

Top-k contract (the same on every device): the k largest scores; ties go to the lower
index; output indices ascending; k larger than the number of candidates is an error.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .checks import check_k, check_positive_int, check_tensor
from .errors import InputError


@dataclass
class Scores:
    """Relevancy scores, [batch, groups, queries, candidates]; -inf marks a masked candidate."""

    values: torch.Tensor
    unit: int = 1
    #: False when Relevancy masked nothing (every query sees every candidate): Retrieval then
    #: knows every pick is valid without looking.
    masked: bool = True

    @property
    def candidates(self) -> int:
        return self.values.shape[-1]

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size()


@dataclass
class TopK:
    """Selected indices [batch, groups, queries, k], ascending, and which of them are valid.

    A selected candidate is invalid when its score was masked (-inf): a row with fewer
    visible candidates than k still has k slots.
    """

    indices: torch.Tensor
    valid: torch.Tensor
    unit: int = 1
    #: Every slot is valid (known without a device sync): the lean Apply needs no mask.
    all_valid: bool = False

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    @property
    def nbytes(self) -> int:
        return self.indices.numel() * self.indices.element_size() + self.valid.numel()


@dataclass
class Bitmap:
    """A threshold selection: mask [batch, groups, queries, candidates] of kept units."""

    mask: torch.Tensor
    unit: int = 1

    @property
    def nbytes(self) -> int:
        return (self.mask.numel() + 7) // 8

    def to_topk(self) -> TopK:
        """Indices of the set bits, ascending, padded to the largest count in any row."""
        count = int(self.mask.sum(-1).max()) if self.mask.numel() else 0
        count = max(count, 1)
        order = torch.sort((~self.mask).to(torch.int8), dim=-1, stable=True).indices
        indices = order[..., :count].sort(dim=-1).values
        valid = torch.gather(self.mask, -1, indices)
        return TopK(indices, valid, self.unit)


Selection = TopK | Bitmap


def budget_units(budget: int, unit: int = 1, candidates: int | None = None) -> int:
    """The one budget -> k rule, for `Pipeline`, a wrapped model and the CLI alike: a budget
    of tokens (documents for RAG) selects k = budget // unit whole units, and a budget that
    covers every candidate selects them all (`candidates`: the units in the memory), which
    equals dense attention. Less than one unit is an error, said in tokens.

    Every path reads it: the float Retrieval, the FPGA stage and a wrapped model's decode.
    """
    if type(budget) is not int or budget < unit:  # (a plain int of a unit or more passes)
        budget = check_positive_int("budget", budget)
        if budget < unit:
            raise InputError(
                "budget", f"{budget} tokens is less than one unit ({unit} tokens) of this method"
            )
    k = budget // unit
    return k if candidates is None else min(k, max(int(candidates), 1))


#: Up to this many half-precision scores in all, one stable sort: half-precision scores tie
#: often, and a tie costs the partial top-k its slower path (B=1, 8 KV heads, 64-128 pages:
#: 18-25 us against 28-30 us without a tie and ~2x that with one, bf16, measured); above it
#: the sort's cost grows faster. Float32 scores take the partial top-k at any size (B=1, 8
#: KV heads, 20 blocks: 17.5 against 22 us; 1224 tokens: 20 against 38 us, measured).
SMALL_SORT = 1024


def _top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest scores' indices, ascending, ties to the lower index; an `InputError`
    for NaN among floating scores. A few from many: a partial top-k (no full sort: 16x
    faster at 32k candidates, B=8, measured), kept when exactly k scores are at least the
    k-th (then the set is the same whatever the tie order) and read off that mask in order. Otherwise every score above
    the k-th and, of those equal to it, the ones of lowest index that fill k: a mask and a
    running count, no sort (half-precision scores tie often: a stable sort of 2k bf16 page
    scores took ~5 ms a layer-step at 32k, B=8). For a large share or few scores in all
    (`SMALL_SORT`), one stable descending sort.

    NaN is checked on the way, not in a pass of its own: top-k and sort take NaN as the
    largest value, so a row with NaN has a NaN k-th score (no score is at least it: the
    slow path, which looks) or a NaN first sorted score."""
    n = scores.shape[-1]
    floating = scores.is_floating_point()
    if partial_fits(scores, k):
        values = torch.topk(scores, k, dim=-1, sorted=False).values
        kth = values.amin(-1, keepdim=True)
        # Every row has at least k scores >= its k-th; exactly k in every row (k per row in
        # all) when no tie straddles the k-th: then those are the picks, and `nonzero` lists
        # them ascending (no sort).
        picked = (scores >= kth).nonzero()
        if picked.shape[0] == values.numel():
            return picked[:, -1].view(values.shape)
        if floating:
            _check_nan(scores)
        need = k - (scores > kth).sum(-1, keepdim=True)
        equal = scores == kth
        chosen = (scores > kth) | (equal & (equal.cumsum(-1) <= need))
        return chosen.nonzero()[:, -1].view(*scores.shape[:-1], k)
    values, order = torch.sort(scores, dim=-1, descending=True, stable=True)
    if floating and n:
        _check_nan(values[..., :1])
    return order[..., :k].sort(dim=-1).values


def partial_fits(scores: torch.Tensor, k: int) -> bool:
    """Whether `_top_indices` takes the partial top-k for k of these scores (else one
    stable sort: the same picks)."""
    return (
        k > 0
        and 4 * k <= scores.shape[-1]
        and (scores.dtype == torch.float32 or scores.numel() > SMALL_SORT)
    )


def _check_nan(scores: torch.Tensor) -> None:
    if bool(torch.isnan(scores).any()):
        raise InputError("scores", "contain NaN (a method's weights or inputs are not finite)")


@functools.lru_cache(maxsize=8)
def _true(device: torch.device) -> torch.Tensor:
    """A bool scalar True (read-only: expanded into an unmasked top-k's `valid`)."""
    return torch.ones((), dtype=torch.bool, device=device)


@functools.lru_cache(maxsize=64)
def all_true(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """`_true` expanded to `shape` (read-only: an unmasked top-k's `valid`), kept per shape:
    a decode step's selections have one shape for many steps."""
    return _true(device).expand(shape)


def topk_select(
    scores: torch.Tensor, k: int, *, name: str = "k", masked: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over the last axis by the contract: returns (indices ascending, valid).

    Ties go to the lower index (a stable descending sort keeps index order among equals).
    `masked=False`: no score is -inf, so every pick is valid (not looked up).
    """
    check_tensor("scores", scores)
    k = check_k(name, k, scores.shape[-1])
    indices = _top_indices(scores, k)  # raises for NaN
    if not masked:
        return indices, all_true(indices.shape, indices.device)
    picked = torch.gather(scores, -1, indices)
    valid = (
        picked > float("-inf")
        if scores.is_floating_point()
        else torch.ones_like(indices, dtype=torch.bool)
    )
    return indices, valid
