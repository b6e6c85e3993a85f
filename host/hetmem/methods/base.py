"""The interface every method implements: its four steps, in float torch (the reference).

A method never imports an FPGA target. It names the kernel (in `hetmem.kernels`) that can
run its Compute Relevancy + Retrieval, and `pipeline.py` does the placement.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from ..selection import Scores, Selection

STEPS = ("prepare", "relevancy", "retrieval", "apply")

#: How a kernel's memory is laid out and grown (see `KernelBinding`).
Layout = Literal["slots", "rows", "index"]


class Memory(ABC):
    """What Prepare Memory builds: the method's index, plus the raw data it was built from.

    It grows by `Method.append`, never rebuilt per decode step.
    """

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @property
    @abstractmethod
    def entries(self) -> int:
        """Number of candidates Relevancy scores (tokens, blocks, pages, documents)."""

    @property
    @abstractmethod
    def index_nbytes(self) -> int:
        """Bytes of the index Relevancy reads (what would live on the FPGA)."""


@dataclass(frozen=True)
class KernelBinding:
    """What a method hands its FPGA kernel: the FPGA stage reads nothing else of the method.

    kernel: the spec's name in `hetmem.kernels` (fused Relevancy + Retrieval).
    layout: "slots": attention. `memory` gives float arrays [B, G, units, ...], one slot per
        (batch row, KV group), each grown at its end by appends; a unit's trailing dims,
        flattened, are its row (so a memory may be a view: a folded DSA index gives the
        cache's keys as [B, 1, S, Hkv, D]); `query` gives [B, Gq, T, ...]
        where query group gq reads slot group gq // (Gq // G); a query sees the prefix of its
        slot that the step's plan says (causal visibility, the row's length).
        "rows": one memory of rows [N, ...] grown at its end (documents); queries [Q, ...].
        "index": one memory rewritten whole on every append (an inverted index); queries
        [Q, ...].
    unit: tokens per candidate (1; a page or block size).
    tau: the threshold of threshold mode (a bitmap, no budget); None for top-k.
    """

    kernel: str
    layout: Layout
    memory: Callable[[Memory], Mapping[str, Any]]
    query: Callable[[Memory, Any], Mapping[str, Any]]
    unit: int = 1
    tau: float | None = None

    @property
    def threshold(self) -> bool:
        return self.tau is not None


class Method(ABC):
    """One memory-processing method: Prepare, Relevancy, Retrieval, Apply."""

    name: ClassVar[str]
    family: ClassVar[str]
    #: Name of the kernel spec in `hetmem.kernels` that runs Relevancy + Retrieval fused.
    kernel: ClassVar[str | None] = None
    #: One line per step, for `hetmem methods`.
    describe: ClassVar[dict[str, str]]
    #: The unit of a selection in tokens (1 for token-level methods and documents).
    unit: int = 1

    @abstractmethod
    def prepare(self, data: Any) -> Memory:
        """Build the memory from raw data (a KV cache, documents)."""

    @abstractmethod
    def append(self, memory: Memory, data: Any) -> None:
        """Grow the memory by new entries in place (new tokens, new documents)."""

    @abstractmethod
    def relevancy(self, memory: Memory, query: Any) -> Scores:
        """Score every candidate of the memory for the query."""

    @abstractmethod
    def retrieve(self, scores: Scores, budget: int) -> Selection:
        """Select from the scores under a budget (tokens for attention, documents for RAG)."""

    @abstractmethod
    def apply(self, memory: Memory, selection: Selection, query: Any) -> Any:
        """Apply the selection to inference: sparse attention output, or an augmented prompt."""

    def apply_nbytes(self, memory: Memory, selection: Selection) -> int:
        """Bytes Apply reads from the data (for the profile)."""
        return 0

    def check_query(self, memory: Memory, query: Any) -> None:  # noqa: B027 - optional hook
        """Validate a query against a memory before any device work."""

    def binding(self) -> KernelBinding | None:
        """How this method's Relevancy + Retrieval runs on its FPGA kernel (None: no kernel)."""
        return None
