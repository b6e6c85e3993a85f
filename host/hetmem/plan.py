"""One plan per decode step, shared by every layer (plan once, run many).

Every layer of a decoder sees the same rows, lengths and query positions in a step, so what
follows from them (the queries' positions, what prefix of the memory each query may see, the
budget in units) is computed once, validated once at the public edge, and read by every
layer's Relevancy, Retrieval, Apply and FPGA launch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .selection import budget_units


@dataclass
class StepPlan:
    """A decode step's shared facts: query positions [B, T] and row lengths [B] (tokens
    in each row once the step's tokens are appended), and the token budget."""

    positions: torch.Tensor
    lengths: torch.Tensor
    budget: int
    _visible: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict, repr=False)
    #: The rows' one length when the plan was made for rows of equal length, each query at
    #: its row's end (`full`): a cache of that length is wholly visible to every query.
    full_length = None

    @property
    def batch(self) -> int:
        return int(self.positions.shape[0])

    @property
    def queries(self) -> int:
        return int(self.positions.shape[1])

    def k(self, unit: int) -> int:
        """Units to select under the budget (the one rule, `budget_units`)."""
        return budget_units(self.budget, unit)

    def seen(self, unit: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """[B, T] units each query may see: those holding a token at or before its position
        and inside its row (a unit with any visible token counts)."""
        dev = torch.device(device)
        key = (unit, str(dev))
        got = self._visible.get(key)
        if got is None:
            tokens = torch.minimum(self.positions + 1, self.lengths[:, None]).clamp(min=0)
            got = ((tokens + unit - 1) // unit).to(dev)
            self._visible[key] = got
        return got

    def positions_on(self, device: torch.device | str) -> torch.Tensor:
        """The positions on a torch device (moved once per step and device)."""
        key = ("positions", device)
        got = self._visible.get(key)
        if got is None:
            got = self._visible[key] = self.positions.to(torch.device(device))
        return got

    def all_visible(self, unit: int, candidates: int) -> bool:
        """Whether every query sees all `candidates` units (no mask needed); once per step,
        unit and count (a decode plan answers from its row lengths, no tensor work)."""
        key = (unit, "all", candidates)
        got = self._visible.get(key)
        if got is None:
            if self.at_end:  # each query sees its whole row: ceil(length / unit) units
                shortest = min(self.lengths_list, default=0)
                got = -(-shortest // unit) >= candidates
            else:
                got = bool((self.seen(unit) >= candidates).all())
            self._visible[key] = got
        return bool(got)

    @property
    def lengths_list(self) -> list[int]:
        """The row lengths as Python ints (read once per step)."""
        got = self._visible.get((0, "lengths"))
        if got is None:
            got = self._visible[(0, "lengths")] = self.lengths.tolist()
        return got  # type: ignore[return-value]

    @property
    def at_end(self) -> bool:
        """One query per row, at its row's last token (a decode step): it sees its whole
        row."""
        key = (0, "at end")
        got = self._visible.get(key)
        if got is None:
            got = self._visible[key] = self.queries == 1 and bool(
                (self.positions[:, 0] == self.lengths - 1).all()
            )
        return bool(got)

    def rows(self, rows: slice) -> StepPlan:
        """The plan of some batch rows (a micro-batch)."""
        return StepPlan(self.positions[rows], self.lengths[rows], self.budget)

    @classmethod
    def full(cls, batch: int, length: int, budget: int) -> StepPlan:
        """`decode`'s plan over `batch` rows of `length` tokens each (a full cache: no row
        shorter), made from the two numbers: its tensors are built when first read (a lean
        decode step reads none), and it equals `decode`'s (test)."""
        return _FullPlan(batch, length, budget)

    @classmethod
    def decode(cls, lengths: torch.Tensor, budget: int, queries: int = 1) -> StepPlan:
        """The plan of a step whose queries are the last `queries` tokens of each row."""
        lengths = lengths.to("cpu", torch.long)  # (an integer tensor: no gradient to drop)
        if queries > 1:
            positions = lengths[:, None] - queries + torch.arange(queries)[None, :]
            return cls(positions, lengths, budget)
        plan = cls((lengths - 1)[:, None], lengths, budget)  # one operator: made every step
        plan._visible[(0, "at end")] = True  # each query at its row's last token, by design
        return plan


class _FullPlan(StepPlan):
    """`StepPlan.full`: the plan of `batch` rows of `length` tokens, one query each at its
    row's last token; positions and lengths made on first read."""

    def __init__(self, batch: int, length: int, budget: int):
        self._batch, self.budget = batch, budget
        self.full_length = length
        self._positions: torch.Tensor | None = None
        self._lengths: torch.Tensor | None = None
        self._visible = {(0, "at end"): True, (0, "lengths"): [length] * batch}

    @property  # type: ignore[override]
    def lengths(self) -> torch.Tensor:
        if self._lengths is None:
            self._lengths = torch.full((self._batch,), self.full_length, dtype=torch.long)
        return self._lengths

    @property  # type: ignore[override]
    def positions(self) -> torch.Tensor:
        if self._positions is None:
            self._positions = self.lengths.view(self._batch, 1) - 1
        return self._positions

    @property
    def batch(self) -> int:
        return self._batch

    @property
    def queries(self) -> int:
        return 1
