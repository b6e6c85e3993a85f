"""The contract every FPGA kernel spec fulfils; emu, cosim, xrt, the RTL tests and the HLS
C-simulation all read it.

A kernel fuses Compute Relevancy and Retrieval: it reads a resident *memory* (integer rows
in HBM) and a per-call *query*, and writes only the selection (top-k indices, ascending,
or a threshold bitmap). Scores never leave the card.

Register map (Vitis `ap_ctrl_hs`): 0x00 control (bit 0 ap_start, bit 1 ap_done, bit 2
ap_idle, bit 3 ap_ready), 0x04 global interrupt enable, 0x08 IP interrupt enable, 0x0C IP
interrupt status, then the arguments from 0x10 in order: a 32-bit scalar takes one 32-bit
register, a 64-bit buffer address two (low word first); each argument starts on the next
free 32-bit word, with the Vitis gap of one word after each argument.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

CTRL = 0x00
GIE = 0x04
IER = 0x08
ISR = 0x0C
ARGS_BASE = 0x10
AP_START, AP_DONE, AP_IDLE, AP_READY = 0x1, 0x2, 0x4, 0x8

#: Bytes per AXI beat of the kernels' HBM ports (512-bit).
BEAT_BYTES = 64
#: The kernel clock the U55C build targets; a card's measured clock overrides it.
DEFAULT_CLOCK_HZ = 300e6

Direction = Literal["in", "out", "scalar"]


@dataclass(frozen=True)
class Arg:
    """One kernel argument: a buffer in an HBM pseudo-channel, or a 32-bit scalar."""

    name: str
    dtype: str  # numpy dtype name: "int8", "uint32", ...
    layout: str  # e.g. "[n, dim] row-major"
    direction: Direction
    bank: int | None = None  # HBM pseudo-channel (0..31) for buffers; None for scalars
    doc: str = ""

    @property
    def is_buffer(self) -> bool:
        return self.direction != "scalar"

    @property
    def width_bytes(self) -> int:
        """Bytes the argument takes in the register map: 8 for an address, 4 for a scalar."""
        return 8 if self.is_buffer else 4


@dataclass
class KernelInputs:
    """Integer inputs of one kernel call, already quantized: memory arrays, query arrays and
    scalars, by argument name."""

    arrays: dict[str, np.ndarray]
    scalars: dict[str, int] = field(default_factory=dict)


@dataclass
class KernelOutputs:
    """What a kernel call returns: `indices` [queries, k] uint32 ascending (top-k mode), or
    `bitmap` [queries, ceil(n/32)] uint32 (threshold mode), and the cycles the call took."""

    indices: np.ndarray | None = None
    bitmap: np.ndarray | None = None
    cycles: int = 0


class KernelSpec(ABC):
    """Base class of a kernel spec. Subclasses fill the class attributes and the methods."""

    name: ClassVar[str]
    args: ClassVar[tuple[Arg, ...]]
    #: Which args are the resident memory (appended; stay on the card across calls).
    memory_args: ClassVar[tuple[str, ...]]

    @classmethod
    def registers(cls) -> dict[str, int]:
        """Argument name -> byte offset in the AXI4-Lite register map."""
        offsets: dict[str, int] = {}
        offset = ARGS_BASE
        for arg in cls.args:
            offsets[arg.name] = offset
            offset += arg.width_bytes + 4
        return offsets

    @classmethod
    def arg(cls, name: str) -> Arg:
        for a in cls.args:
            if a.name == name:
                return a
        raise KeyError(f"{cls.name} has no argument {name!r}")

    @abstractmethod
    def golden(self, inputs: KernelInputs) -> KernelOutputs:
        """The bit-exact model: vectorized numpy, integer arithmetic only."""

    @abstractmethod
    def cycles(self, **shape: Any) -> int:
        """Cycles from ap_start to ap_done for a shape at the default engine parameters."""
