"""placement="auto": evaluate every placement of the four steps on the system's devices
(2^4 assignments of gpu / fpga), reject the invalid ones with the reason
(`hetmem.placement.normalize_placement`), cost the valid ones by their schedule, rank them by
latency or energy, and say why the first won."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError, PlacementError
from ..methods.base import STEPS
from .energy import schedule_energy
from .schedule import GPU_ONLY, Schedule, System, _method, check_shape_system, schedule
from .shape import Shape

OBJECTIVES = ("latency", "energy")
DEVICES = ("gpu", "fpga")


@dataclass
class Candidate:
    """One placement: valid or why not, and (valid) its schedule's seconds and joules."""

    placement: str
    valid: bool
    reason: str = ""
    schedule: Schedule | None = None
    seconds: float = float("inf")
    joules: float = float("inf")

    def cost(self, objective: str) -> float:
        return self.seconds if objective == "latency" else self.joules


@dataclass
class Plan:
    """The ranked candidates (valid first, best first) and the choice."""

    objective: str
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def ranked(self) -> list[Candidate]:
        return [c for c in self.candidates if c.valid]

    @property
    def choice(self) -> Candidate:
        return self.ranked[0]

    def explain(self) -> str:
        best = self.choice
        lines = [f"objective: {self.objective}; chosen {best.placement} "
                 f"({best.seconds * 1e3:.3f} ms, {best.joules:.3f} J, modeled)"]  # fmt: skip
        for other in self.ranked[1:]:
            ratio = other.cost(self.objective) / max(best.cost(self.objective), 1e-30)
            what = "time" if self.objective == "latency" else "energy"
            lines.append(f"  {other.placement}: {ratio:.2f}x the {what} "
                         f"({other.seconds * 1e3:.3f} ms, {other.joules:.3f} J)")  # fmt: skip
        rejected = [c for c in self.candidates if not c.valid]
        if rejected:
            lines.append(f"  {len(rejected)} placements invalid, e.g. {rejected[0].placement}: "
                         f"{rejected[0].reason}")  # fmt: skip
        return "\n".join(lines)

    def table(self) -> list[dict[str, Any]]:
        return [{"placement": c.placement, "valid": c.valid, "reason": c.reason,
                 "seconds": c.seconds if c.valid else None,
                 "joules": c.joules if c.valid else None, "source": "modeled"}
                for c in self.candidates]  # fmt: skip


def placements() -> list[str]:
    """Every assignment of the four steps to gpu or fpga (16)."""
    return ["/".join(p) for p in itertools.product(DEVICES, repeat=len(STEPS))]


def plan(method: Any, shape: Shape, system: System, *, objective: str = "latency",
         overlap: bool = True, per: str = "token", new_tokens: int = 256) -> Plan:  # fmt: skip
    """Rank every valid placement of `method` for `shape` on `system` by `objective`
    (ties: the GPU alone first, then fewer steps moved). `overlap`: offloaded placements run
    the overlapped schedule (else the paper's sequential one)."""
    from ..placement import normalize_placement

    if objective not in OBJECTIVES:
        raise InputError("objective", f"expected one of {OBJECTIVES}, got {objective!r}")
    check_shape_system(shape, system)
    if not isinstance(overlap, bool):
        raise InputError("overlap", f"expected True or False, got {overlap!r}")
    method = _method(method)
    out = Plan(objective)
    for placement in placements():
        try:
            normalize_placement(placement)
        except PlacementError as exc:
            out.candidates.append(
                Candidate(placement, False, exc.args[-1] if exc.args else str(exc))
            )
            continue
        offload = placement != GPU_ONLY
        if offload and system.card is None:
            out.candidates.append(Candidate(placement, False, "no FPGA card in the system"))
            continue
        kind = ("overlapped" if overlap else "sequential") if offload else "gpu"
        sched = schedule(method, shape, system, kind, per=per, new_tokens=new_tokens,
                         placement=placement)  # fmt: skip
        energy = schedule_energy(sched)
        out.candidates.append(Candidate(placement, True, "", sched, sched.seconds, energy.total))
    out.candidates.sort(key=lambda c: (not c.valid, c.cost(objective) if c.valid else 0.0,
                                       c.placement.count("fpga")))  # fmt: skip
    return out


def auto_placement(method: Any, shape: Shape, system: System, **options: Any) -> str:
    """The placement `plan` chooses, as the 'gpu/fpga/fpga/gpu' string Pipeline takes."""
    return plan(method, shape, system, **options).choice.placement
