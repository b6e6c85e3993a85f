"""Timelines: steps placed on per-device lanes (the host, the GPU, the card's PCIe link and
engine), so that steps of different lanes overlap and a schedule's makespan can be read off.

No torch here: the emulated card keeps one too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

Source = Literal["measured", "simulated", "modeled", "composite"]
#: `composite`: a figure built from parts of different sources (its note says of what).
SOURCES: tuple[Source, ...] = ("measured", "simulated", "modeled", "composite")


@dataclass
class Span:
    """One step on one device's lane of a timeline: [start, start + seconds)."""

    lane: str
    step: str
    start: float
    seconds: float
    source: Source

    @property
    def end(self) -> float:
        return self.start + self.seconds


@dataclass
class Timeline:
    """Steps placed on per-device lanes (the card, the GPU): a step starts when its lane is
    free and what it waits for has ended, so steps of different lanes overlap. Each span
    keeps its own source; the makespan of lanes of different sources is `composite`."""

    spans: list[Span] = field(default_factory=list)

    def add(
        self, lane: str, step: str, seconds: float, source: Source, after: float = 0.0
    ) -> float:
        """Place a step on `lane` no earlier than `after`; return its end."""
        free = max((s.end for s in self.spans if s.lane == lane), default=0.0)
        span = Span(lane, step, max(free, after), float(seconds), source)
        self.spans.append(span)
        return span.end

    @property
    def makespan(self) -> float:
        return max((s.end for s in self.spans), default=0.0)

    @property
    def serial(self) -> float:
        """The same steps one after another (nothing overlapped)."""
        return sum(s.seconds for s in self.spans)

    def busy(self, lane: str) -> float:
        return sum(s.seconds for s in self.spans if s.lane == lane)

    @property
    def sources(self) -> str:
        """What the timeline's figures are built from, e.g. "measured gpu + modeled fpga"."""
        seen: dict[str, set[str]] = {}
        for s in self.spans:
            seen.setdefault(s.lane, set()).add(s.source)
        return " + ".join(f"{'/'.join(sorted(src))} {lane}" for lane, src in seen.items())

    def to_dict(self) -> dict:
        return {
            "spans": [asdict(s) for s in self.spans],
            "makespan": self.makespan,
            "serial": self.serial,
            "source": "composite",
            "of": self.sources,
        }
