"""The cards a model runs on: one open device per card, shared by every layer placed there.

    cards = Cards.open("emu")                         # one card (one xclbin load)
    cards = Cards.open({"target": "emu", "cards": 2}) # layers spread over two cards
    card = cards.for_layer(i, layers)                 # contiguous blocks of layers per card
    cards.check_fit([{bank: bytes, ...} per card])    # before anything is written

A `Card` opens its device on first use, so that a failure to open falls under the caller's
fault policy, and reopens it after a fault (`reset`): a lost card needs a fresh handle. Every
layer's memory is a slot on the card; `generation` tells a layer that its slot is gone and
must be rebuilt from the host's copy. A device passed in is used as it is and never closed
here.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from ..errors import FpgaError, InputError
from ..kernels.spec import HBM_BANKS
from .device import FpgaDevice

#: Consecutive faults that open a card's circuit breaker, and the selects it then skips.
FAULT_LIMIT = 3
COOLDOWN = 64


@dataclass
class CircuitBreaker:
    """Skips a card that keeps faulting. After `limit` consecutive faults the breaker opens:
    the next `cooldown` selects on the card (every layer's) run the kernel's golden model on
    the host instead of trying it (a dead card would cost the device timeout on every layer
    of every token); then one select tries the card again, and a fault there reopens it at
    once. A success closes it. `skipped` and `opened` count for the stats."""

    limit: int = FAULT_LIMIT
    cooldown: int = COOLDOWN
    faults: int = 0  # consecutive
    left: int = 0  # selects still to skip
    skipped: int = 0
    opened: int = 0

    def __post_init__(self) -> None:
        for name in ("limit", "cooldown"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"fpga {'fault_limit' if name == 'limit' else name}",
                                 f"must be a positive int, got {value!r}")  # fmt: skip

    @property
    def open(self) -> bool:
        return self.left > 0

    def allow(self) -> bool:
        """Whether this select may use the card (False: skip it, one cool-down step spent)."""
        if self.left > 0:
            self.left -= 1
            self.skipped += 1
            return False
        return True

    def success(self) -> None:
        self.faults = 0

    def failure(self) -> None:
        self.faults += 1
        if self.faults >= self.limit:
            self.left = self.cooldown
            self.opened += 1


class Card:
    """One card: a target name and options, opened lazily, or an open device.

    `options` are the device's (`open_device`), plus the circuit breaker's `fault_limit`
    and `cooldown` (`CircuitBreaker`)."""

    def __init__(self, target: str | FpgaDevice = "auto", options: Mapping[str, Any] | None = None):
        from .targets import TARGETS

        self.options = dict(options or {})
        #: Held by a pipeline while it uses the card: the layers (and caches) that share it
        #: from several threads take turns.
        self.lock = threading.RLock()
        self.breaker = CircuitBreaker(
            self.options.pop("fault_limit", FAULT_LIMIT), self.options.pop("cooldown", COOLDOWN)
        )
        self.device: FpgaDevice | None = None
        self._owned = True
        if isinstance(target, FpgaDevice):
            if self.options:
                raise InputError("fpga", "options given with an already-open device")
            self.device, self._owned, self.target = target, False, target.target
        elif isinstance(target, str) and (target == "auto" or target in TARGETS):
            from .targets import check_options

            check_options(target, self.options)  # an unknown option now, not at first use
            self.target = target
        else:
            known = ", ".join(["auto", *TARGETS])
            raise InputError("fpga", f"unknown FPGA target {target!r}; targets are {known}")
        #: Bumped when the device is reopened: slots of an older generation are gone.
        self.generation = 0
        #: Times a device was opened (on a card: one xclbin load each).
        self.opens = 0 if self._owned else 1

    @property
    def label(self) -> str:
        """The device column of profile rows: fpga:<target>, e.g. fpga:emu."""
        if self.target == "auto" and self.device is not None:
            return f"fpga:{self.device.target}"
        return f"fpga:{self.target}"

    def open(self) -> FpgaDevice:
        if self.device is None:
            from .targets import open_device

            self.device = open_device(self.target, **self.options)
            self.opens += 1
        return self.device

    def reset(self) -> None:
        """After a fault: forget every slot on the card and, for a device opened here, close
        it so that the next use reopens it (the card's state is unknown)."""
        self.generation += 1
        if self._owned and self.device is not None:
            with suppress(FpgaError, InputError):  # a lost card: nothing left to release
                self.device.close()
            self.device = None

    def close(self) -> None:
        if self._owned and self.device is not None:
            with suppress(FpgaError, InputError):
                self.device.close()
            self.device = None

    def bank_free(self) -> list[int]:
        """Free bytes per HBM bank (a card not opened yet: every bank empty)."""
        if self.device is None:
            from .device import BANK_BYTES

            return [int(self.options.get("bank_bytes", BANK_BYTES))] * HBM_BANKS
        return self.device.bank_free()

    def __repr__(self) -> str:
        return f"<Card {self.label} generation={self.generation}>"


class Cards:
    """The cards of one model; layers are spread over them in contiguous blocks."""

    def __init__(self, cards: Sequence[Card]):
        if not cards:
            raise InputError("fpga", "needs at least one card")
        self.cards = list(cards)

    @classmethod
    def open(cls, fpga: Any = None) -> Cards:
        """`fpga`: None or "auto", a target name, an open `FpgaDevice`, a mapping
        {"target": name, "cards": n, **open_device options}, a `Card`, a `Cards`, or a list
        of any of these (one per card)."""
        if isinstance(fpga, Cards):
            return fpga
        if isinstance(fpga, list | tuple):
            return cls([_card(f) for f in fpga])
        if isinstance(fpga, Mapping) and "cards" in fpga:
            count = fpga["cards"]
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise InputError("fpga", f"'cards' must be a positive int, got {count!r}")
            rest = {k: v for k, v in fpga.items() if k != "cards"}
            return cls([_card(rest) for _ in range(count)])
        return cls([_card(fpga)])

    def __len__(self) -> int:
        return len(self.cards)

    def __getitem__(self, i: int) -> Card:
        return self.cards[i]

    def for_layer(self, layer: int, layers: int) -> Card:
        """Layer `layer` of `layers`: card layer * cards // layers (contiguous blocks)."""
        if not 0 <= layer < max(layers, 1):
            raise InputError("layer", f"expected 0 <= layer < {layers}, got {layer}")
        return self.cards[layer * len(self.cards) // max(layers, 1)]

    def check_fit(self, needs: Sequence[Mapping[int, int]]) -> None:
        """Raise `InputError` before anything is allocated when the bytes each card needs
        per HBM bank exceed what the bank has free; names every bank that overflows."""
        problems = []
        for card, need in zip(self.cards, needs, strict=False):
            free = card.bank_free()
            for bank, nbytes in sorted(need.items()):
                if nbytes > free[bank]:
                    problems.append(
                        f"card {self.cards.index(card)} ({card.label}) bank {bank}: needs "
                        f"{nbytes:,} bytes, {free[bank]:,} free"
                    )
        if problems:
            raise InputError(
                "fpga", "the model's memory does not fit the cards' HBM: " + "; ".join(problems)
            )

    def close(self) -> None:
        for card in self.cards:
            card.close()

    @property
    def opens(self) -> int:
        return sum(card.opens for card in self.cards)


def _card(fpga: Any) -> Card:
    if isinstance(fpga, Card):
        return fpga
    if fpga is None:
        return Card("auto")
    if isinstance(fpga, FpgaDevice):
        return Card(fpga)
    if isinstance(fpga, str):
        return Card(fpga)
    if isinstance(fpga, Mapping):
        options = {k: v for k, v in fpga.items() if k != "target"}
        target = fpga.get("target", "auto")
        if isinstance(target, FpgaDevice) and options:
            raise InputError("fpga", "options given with an already-open device")
        return Card(target, options)
    raise InputError(
        "fpga",
        f"expected a target name, a mapping with 'target', an FpgaDevice, a Card or a list "
        f"of those, got {type(fpga).__name__}",
    )
