"""What a wrapped model decodes with: one method per layer, the token budget, the placement.

Kept apart from transformers so that `hetmem.models` imports without it; the cache builds
one `Pipeline` per layer from these settings each time `generate()` makes a new cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..methods.base import Method
from ..pipeline import Pipeline, Policy


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

    @property
    def layers(self) -> int:
        return len(self.methods)

    def pipeline(self, layer_idx: int) -> Pipeline:
        return Pipeline(
            self.methods[layer_idx],
            self.placement,
            fpga=self.fpga,
            on_fpga_error=self.on_fpga_error,
        )

    def budget_for(self, longest: int, unit: int) -> int:
        """The token budget of one decode step over rows of at most `longest` tokens.

        A context that fits the budget selects every unit, so decode equals dense attention;
        otherwise the budget goes to Retrieval as is (k = budget // unit units per row).
        """
        if longest <= self.budget:
            return max(-(-longest // unit), 1) * unit
        return self.budget
