"""cocotbext-axi's stream source and sink on the RTL's valid/ready ports (`<prefix>_data`,
`<prefix>_valid`, `<prefix>_ready`, optionally `_last` and a sideband as tuser), plus the
pause generators the module benches use for idle insertion and backpressure."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

from cocotb_bus.bus import Bus
from cocotbext.axi import AxiStreamBus


class StreamBus(AxiStreamBus):
    """An AXI-Stream view of a plain valid/ready port: data -> tdata, valid -> tvalid,
    ready -> tready, and the named optional signals (e.g. last -> tlast, items -> tuser)."""

    def __init__(self, entity, prefix: str, **optional: str) -> None:
        signals = {"tdata": "data"}
        opt = {"tvalid": "valid", "tready": "ready", **optional}
        Bus.__init__(self, entity, prefix, signals, optional_signals=opt)


def pauses(rng: random.Random, p: float) -> Iterator[bool]:
    """A pause generator: True (stall this cycle) with probability p, in bursts."""
    while True:
        if rng.random() < p:
            for _ in range(rng.randint(1, 4)):
                yield True
        else:
            yield False


def never() -> Iterator[bool]:
    return itertools.repeat(False)


def params(**defaults: int) -> dict[str, int]:
    """The module parameters the bench was built with (HM_PARAMS, JSON), over the defaults."""
    import json
    import os

    return {**defaults, **json.loads(os.environ.get("HM_PARAMS", "{}"))}


def quiet(*models) -> None:
    """No per-frame INFO lines from cocotbext-axi models (they log every beat)."""
    import logging

    for m in models:
        m.log.setLevel(logging.WARNING)
