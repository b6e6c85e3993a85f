"""What a wrapped model decodes with: one method per layer, the token budget, the placement,
and the cards its layers share.

Kept apart from transformers so that `hetmem.models` imports without it; the cache builds
one `Pipeline` per layer from these settings each time `generate()` makes a new cache. The
cards are opened once per wrapped model (one xclbin load per card), every layer's memory a
slot set on its card; a step's plan is made once and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..fpga.cards import Cards
from ..methods.base import Method
from ..pipeline import Pipeline, Policy
from ..plan import StepPlan
from ..warn import warn


@dataclass
class SparseDecode:
    """Settings shared by every cache of one wrapped model.

    Methods are built once per layer at `wrap` time and reused by every cache: their state
    (untrained indexer or gate weights) depends on the layer shape only, never on the tokens.
    The memories live in the pipelines, one per layer per cache.
    """

    methods: list[Method]
    budget: int
    placement: dict[str, str]
    fpga: Any = None
    on_fpga_error: Policy = "fallback"
    overlap: bool = False
    _cards: Cards | None = field(default=None, repr=False)
    _plan: tuple[tuple[Any, ...], StepPlan] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.uses_fpga:
            self.cards  # noqa: B018 - the fpga argument checked now; devices open on first use
        elif self.fpga not in (None, "auto"):  # said once, at wrap time (not once per layer)
            warn(f"hetmem: fpga={self.fpga!r} is not used: the placement puts no step on "
                 "'fpga' (e.g. placement='gpu/fpga/fpga/gpu')")  # fmt: skip

    @property
    def layers(self) -> int:
        return len(self.methods)

    @property
    def uses_fpga(self) -> bool:
        return self.placement["relevancy"] == "fpga"

    @property
    def cards(self) -> Cards:
        """The model's cards, opened on first use and shared by every layer and cache."""
        if self._cards is None:
            self._cards = Cards.open(self.fpga)
        return self._cards

    def pipeline(self, layer_idx: int) -> Pipeline:
        fpga = None
        if self.uses_fpga:
            fpga = self.cards.for_layer(layer_idx, self.layers)
        pipe = Pipeline(
            self.methods[layer_idx],
            self.placement,
            fpga=fpga,
            on_fpga_error=self.on_fpga_error,
            overlap=self.overlap,
        )
        if pipe.fpga_stage is not None:
            pipe.fpga_stage.fit_check = lambda need: self.check_fit(layer_idx, need)
        return pipe

    def check_fit(self, layer_idx: int, need: dict[int, int]) -> None:
        """Before layer `layer_idx` loads: the layers of its card from it on (layers load in
        order, all of one shape) must fit what the card's banks have free, or the model
        does not fit: an `InputError` naming the bytes per bank, before anything is written."""
        cards = self.cards
        card = cards.for_layer(layer_idx, self.layers)
        later = sum(
            1 for i in range(layer_idx, self.layers) if cards.for_layer(i, self.layers) is card
        )
        Cards([card]).check_fit([{bank: n * later for bank, n in need.items()}])

    def plan(self, lengths: torch.Tensor, budget: int) -> StepPlan:
        """The plan of the decode step over rows of these lengths: made by the first layer
        that asks, reused by every other layer of the step (same lengths, same budget)."""
        return self._memo((tuple(lengths.tolist()), budget), StepPlan.decode, lengths, budget)

    def full_plan(self, batch: int, length: int, budget: int) -> StepPlan:
        """`plan` over `batch` rows of `length` tokens each (a full cache), from the numbers
        (`StepPlan.full`): the same memo, so layers that ask either way share one plan."""
        return self._memo(((length,) * batch, budget), StepPlan.full, batch, length, budget)

    def _memo(self, key: tuple, make: Any, *args: Any) -> StepPlan:
        """The step's plan for `key` (row lengths, budget): the last one made, or `make(*args)`."""
        memo = self._plan  # one read: another thread's cache may replace it meanwhile
        if memo is None or memo[0] != key:
            memo = self._plan = (key, make(*args))
        return memo[1]

    def close(self) -> None:
        """Close the cards this model opened (unwrap)."""
        if self._cards is not None:
            self._cards.close()
            self._cards = None

    def budget_for(self, longest: int, unit: int) -> int:
        """The token budget of one decode step over rows of at most `longest` tokens.

        A context that fits the budget selects every unit, so decode equals dense attention;
        otherwise the budget goes to Retrieval as is (k = budget // unit units per row).
        """
        if longest <= self.budget:
            return max(-(-longest // unit), 1) * unit
        return self.budget
