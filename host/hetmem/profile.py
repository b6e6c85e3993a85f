"""The per-step profile: device, time, bytes moved and the source of every time.

Times from different sources (measured, simulated, modeled) are never added together
without saying so: `Profile.totals()` sums per source.
"""

from __future__ import annotations

import io
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from rich.table import Table

from .device import synchronize
from .timeline import SOURCES, Source, Timeline


@dataclass
class StepRecord:
    step: str
    device: str
    seconds: float
    source: Source
    nbytes: int = 0
    note: str = ""
    #: PCIe transactions the step made (writes, launches, reads); 0 for host work.
    transactions: int = 0

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")


@dataclass
class Profile:
    records: list[StepRecord] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    #: The overlapped schedule of the step, when it ran one (micro-batch ping-pong).
    timeline: Timeline | None = None

    def add(self, record: StepRecord) -> StepRecord:
        self.records.append(record)
        return record

    def extend(self, other: Profile) -> None:
        self.records.extend(other.records)
        for key, value in other.counters.items():
            self.counters[key] += value

    def measure(
        self, step: str, device: torch.device | str, nbytes: int = 0, note: str = ""
    ) -> _Measured:
        """Time a torch step with a wall clock (source `measured`): a context manager that
        gives the step's record and adds it once the step ran (not when it raised)."""
        dev = torch.device(device) if isinstance(device, str) else device
        return _Measured(self, StepRecord(step, _label(dev), 0.0, "measured", nbytes, note), dev)

    def totals(self) -> dict[str, float]:
        """Seconds per source; sources are never mixed."""
        out: dict[str, float] = {}
        for rec in self.records:
            out[rec.source] = out.get(rec.source, 0.0) + rec.seconds
        return out

    def transactions(self) -> int:
        """PCIe transactions of every step of this profile."""
        return sum(rec.transactions for rec in self.records)

    def by_step(self) -> dict[str, StepRecord]:
        return {rec.step: rec for rec in self.records}

    def to_dict(self) -> dict:
        return {
            "records": [asdict(r) for r in self.records],
            "totals": self.totals(),
            "counters": dict(self.counters),
            "timeline": None if self.timeline is None else self.timeline.to_dict(),
        }

    def table(self, title: str = "profile") -> ProfileTable:
        """A rich Table: one row per step, the source beside each time. `print()` and
        `str()` give it as plain text; a rich Console renders it with its styles."""
        table = ProfileTable(title=title)
        for col, just in (
            ("step", "left"),
            ("device", "left"),
            ("time", "right"),
            ("source", "left"),
            ("bytes", "right"),
            ("note", "left"),
        ):
            table.add_column(col, justify=just)
        for rec in self.records:
            table.add_row(
                rec.step,
                rec.device,
                format_seconds(rec.seconds),
                rec.source,
                format_bytes(rec.nbytes),
                rec.note,
            )
        for source, secs in self.totals().items():
            table.add_row(f"total ({source})", "", format_seconds(secs), source, "", "")
        for key, value in sorted(self.counters.items()):
            table.add_row(f"counter {key}", "", str(value), "", "", "")
        return table

    def __str__(self) -> str:
        return str(self.table())


class MeasuredProfile(Profile):
    """A profile of host steps timed by a wall clock (source `measured`) on one device, each
    given as (step, seconds, bytes, entries or None: the note "N entries"), its records made
    when first read: a wrapped model's decode keeps two profiles per layer and step, and
    most are never read (equal to the `Profile` of the same records, test)."""

    def __init__(self, device: str, *steps: tuple[str, float, int, int | None]):
        self._device, self._steps = device, steps
        self._records: list[StepRecord] | None = None
        self._counters: dict[str, int] | None = None
        self.timeline = None

    @property  # type: ignore[override]
    def records(self) -> list[StepRecord]:
        if self._records is None:
            device = self._device
            self._records = [
                StepRecord(step, device, seconds, "measured", nbytes, _entries(entries))
                for step, seconds, nbytes, entries in self._steps
            ]
        return self._records

    @property  # type: ignore[override]
    def counters(self) -> dict[str, int]:
        if self._counters is None:
            self._counters = defaultdict(int)
        return self._counters

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Profile):
            return NotImplemented
        return (self.records, self.counters, self.timeline) == (
            other.records, other.counters, other.timeline
        )  # fmt: skip


def _entries(entries: int | None) -> str:
    return "" if entries is None else f"{entries} entries"


class ProfileTable(Table):
    """A rich Table whose `str()` is its text, so that `print(profile.table())` shows the
    table rather than `<rich.table.Table object ...>`."""

    #: Columns of the text rendering (wide enough for one line per step).
    width_chars = 120

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(
            file=io.StringIO(), width=self.width_chars, color_system=None, record=True
        )
        console.print(self)
        return console.export_text().rstrip("\n")


class _Measured:
    """`Profile.measure`'s context (a plain class: a decode step opens four of them per
    layer, and a generator-based context manager costs twice as much)."""

    __slots__ = ("device", "profile", "record", "start")

    def __init__(self, profile: Profile, record: StepRecord, device: torch.device):
        self.profile, self.record, self.device = profile, record, device

    def __enter__(self) -> StepRecord:
        synchronize(self.device)
        self.start = time.perf_counter()
        return self.record

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is None:
            synchronize(self.device)
            self.record.seconds = time.perf_counter() - self.start
            self.profile.add(self.record)
        return False


def _label(device: torch.device) -> str:
    if device.type == "cuda":
        return "gpu (rocm)" if getattr(torch.version, "hip", None) else "gpu (cuda)"
    return "gpu (cpu)" if device.type == "cpu" else str(device)


def device_label(device: torch.device) -> str:
    return _label(device)


def format_seconds(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us"


def format_bytes(n: int) -> str:
    if n <= 0:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
