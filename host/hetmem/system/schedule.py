"""Schedules: the steps of a decode step (per generated token) or of a whole request
(prefill + N decode tokens) placed on per-device lanes of a `hetmem.timeline.Timeline`:
`gpu`, `link` (GPU<->card transfers) and `fpga` (the card's kernel engine).

Three schedules:
- `gpu`: every step on the GPU (the GPU alone; no card in the system);
- `sequential`: the paper's: per layer, QKV and Prepare on the GPU, the query to the card,
  Relevancy + Retrieval as one kernel, the selection back, Apply and the FFN on the GPU;
- `overlapped`: the batch in two micro-batches (two requests, or two halves of a batch)
  ping-pong: the card selects for one while the GPU runs Apply/FFN of the other and QKV of
  the next layer (`Pipeline(overlap=True)`'s schedule across a model's layers). With one
  row it equals `sequential`.

Every span is `modeled`: GPU steps by roofline, card steps by the kernels' cycle models,
transfers by the link model (`costs.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError
from ..methods import RAG_METHODS, get
from ..timeline import Source, Span, Timeline
from .costs import (
    fpga_seconds,
    gpu_seconds,
    head_cost,
    layer_costs,
    link_seconds,
    method_costs,
    method_layers,
    prefill_layer_cost,
)
from .devices import DeviceProfile, Link, card_link, get_device
from .shape import Shape, StepCost

SCHEDULES = ("gpu", "sequential", "overlapped")
GPU_ONLY = "gpu/gpu/gpu/gpu"
OFFLOAD = "gpu/fpga/fpga/gpu"


class LaneTimeline(Timeline):
    """A `Timeline` that remembers where each lane ends (thousands of spans per model)."""

    def __init__(self) -> None:
        super().__init__()
        self._ends: dict[str, float] = {}

    def add(self, lane: str, step: str, seconds: float, source: Source = "modeled",
            after: float = 0.0) -> float:  # fmt: skip
        span = Span(lane, step, max(self._ends.get(lane, 0.0), after), float(seconds), source)
        self.spans.append(span)
        self._ends[lane] = span.end
        return span.end


@dataclass(frozen=True)
class System:
    """A GPU, optionally a card, and the link between them."""

    gpu: DeviceProfile
    card: DeviceProfile | None = None
    link: Link | None = None

    @classmethod
    def of(cls, gpu: str | DeviceProfile = "MI210", card: str | DeviceProfile | None = "U55C",
           link: Link | None = None) -> System:  # fmt: skip
        g = get_device(gpu, "gpu")
        c = None if card is None else get_device(card, "fpga")
        return cls(g, c, link if link is not None or c is None else card_link(g, c))

    @property
    def label(self) -> str:
        return self.gpu.name if self.card is None else f"{self.gpu.name} + {self.card.name}"


@dataclass
class Part:
    """A timeline that a schedule repeats `times` (a decode step: once per new token)."""

    name: str
    timeline: Timeline
    times: int = 1


@dataclass
class Schedule:
    """A schedule's parts (prefill once, decode steps N times); lanes map to devices."""

    kind: str
    placement: str
    system: System
    parts: list[Part] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(p.timeline.makespan * p.times for p in self.parts)

    def busy(self, lane: str) -> float:
        return sum(p.timeline.busy(lane) * p.times for p in self.parts)

    def busy_steps(self, lane: str, steps: tuple[str, ...]) -> float:
        """Busy time of the spans on `lane` whose step name starts with one of `steps`."""
        return sum(
            sum(s.seconds for s in p.timeline.spans if s.lane == lane and s.step.startswith(steps))
            * p.times
            for p in self.parts
        )

    @property
    def source(self) -> str:
        return "modeled"

    def summary(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "placement": self.placement,
            "system": self.system.label,
            "seconds": self.seconds,
            "busy": {lane: self.busy(lane) for lane in ("gpu", "link", "fpga")},
            "source": self.source,
            "notes": list(self.notes),
        }


def _method(method: Any) -> Any:
    return get(method) if isinstance(method, str) else method


def _placement(placement: str | Mapping[str, str]) -> dict[str, str]:
    from ..placement import normalize_placement

    place = normalize_placement(placement)
    for step, dev in place.items():
        if dev not in ("gpu", "fpga"):
            raise InputError("placement", f"step {step!r} on {dev!r}: the system model has "
                             "profiles of a GPU and an FPGA card only")  # fmt: skip
    return place


def _halves(shape: Shape, overlap: bool) -> list[Shape]:
    if not overlap or shape.batch < 2:
        return [shape]
    first = shape.batch // 2
    return [shape.with_(batch=first), shape.with_(batch=shape.batch - first)]


class _Builder:
    """Places one layer's steps for each micro-batch on the lanes."""

    def __init__(self, method: Any, system: System, place: dict[str, str]):
        self.method, self.system, self.place = method, system, place
        self.offload = place["relevancy"] == "fpga"
        if self.offload and (system.card is None or system.link is None):
            raise InputError("placement", "steps on 'fpga' need a card in the system")
        self.tl = LaneTimeline()

    def gpu(self, step: str, cost: StepCost, after: float) -> float:
        return self.tl.add("gpu", step, gpu_seconds(cost, self.system.gpu), "modeled", after)

    def select(self, costs: dict[str, StepCost], tag: str, after: float) -> float:
        """Prepare, then Relevancy + Retrieval: on the GPU, or the query to the card, the
        kernel and the selection back. Returns when the selection is on the GPU."""
        t = self.gpu(f"prepare {tag}", costs["prepare"], after)
        if self.offload and "fpga" in costs:
            link, card = self.system.link, self.system.card
            assert link is not None and card is not None
            t = self.tl.add("link", f"to fpga {tag}", link_seconds(costs["to_fpga"], link),
                            "modeled", t)  # fmt: skip
            t = self.tl.add("fpga", f"select {tag}", fpga_seconds(costs["fpga"], card),
                            "modeled", t)  # fmt: skip
            return self.tl.add("link", f"from fpga {tag}",
                               link_seconds(costs["from_fpga"], link), "modeled", t)  # fmt: skip
        # On the GPU; and where the card has no launch to make (the budget covers the
        # whole memory) the selection stays on the GPU too, so that an offloaded placement
        # is never credited with skipping work the GPU alone counts.
        t = self.gpu(f"relevancy {tag}", costs["relevancy"], t)
        return self.gpu(f"retrieval {tag}", costs["retrieval"], t)

    def memory_steps(self, costs: dict[str, StepCost], tag: str, after: float) -> float:
        """Prepare, Relevancy, Retrieval (GPU or card, with transfers), Apply."""
        return self.gpu(f"apply {tag}", costs["apply"], self.select(costs, tag, after))


def token_timeline(method: Any, shape: Shape, system: System,
                   placement: str | Mapping[str, str] = OFFLOAD, overlap: bool = False) -> Timeline:  # fmt: skip
    """One decode step (one new token per row) through every layer of the model."""
    method = _method(method)
    place = _placement(placement)
    b = _Builder(method, system, place)
    m = shape.model
    rag = method.name in RAG_METHODS
    # RAG selects once per request (prefill): its decode steps have nothing to overlap
    subs = _halves(shape, overlap and not rag)
    if rag:  # decode attends densely over the prompt the retrieval assembled
        prompt = shape.question_tokens + shape.rag_k * shape.doc_tokens
        subs = [s.with_(context=prompt) for s in subs]
    full = method_layers(m)
    mcosts = [None if rag else method_costs(method, s) for s in subs]
    lcosts = [[layer_costs(s, i) for s in subs] for i in range(m.layers)]
    # The ping-pong: on the GPU, in order, each micro-batch's Apply and FFN, the next
    # layer's QKV and Prepare (which sends its query to the card); the card selects for one
    # micro-batch while the GPU works on the other.
    ready = [0.0] * len(subs)
    selected = [0.0] * len(subs)

    def begin(i: int, j: int, after: float) -> float:
        t = b.gpu(f"qkv L{i} mb{j}", lcosts[i][j]["qkv"], after)
        return b.select(mcosts[j], f"L{i} mb{j}", t) if full[i] and not rag else t

    for j in range(len(subs)):
        selected[j] = begin(0, j, 0.0)
    for i in range(m.layers):
        for j, sub in enumerate(subs):
            tag = f"L{i} mb{j}"
            lc = lcosts[i][j]
            if full[i] and not rag:
                t = b.gpu(f"apply {tag}", mcosts[j]["apply"], selected[j])
            else:
                cost = (lc.get("window") if not full[i] else None) or _dense(sub)
                t = b.gpu(f"attention {tag}", cost, selected[j])
            ready[j] = b.gpu(f"o_ffn {tag}", lc["o_ffn"], t)
            if i + 1 < m.layers:
                selected[j] = begin(i + 1, j, ready[j])
    b.gpu("lm_head", head_cost(shape), max(ready))
    return b.tl


def _dense(shape: Shape) -> StepCost:
    from .accounting import dense_attention_cost

    return dense_attention_cost(shape, shape.context)


def prefill_timeline(method: Any, shape: Shape, system: System,
                     placement: str | Mapping[str, str] = OFFLOAD) -> Timeline:  # fmt: skip
    """Prefill of a request (batch rows of `context` tokens, RAG: the retrieval and the
    assembled prompt): every layer on the GPU, Prepare builds each layer's memory, and
    with the memory steps on the card each layer's memory is written to it (the link
    runs beside the GPU's next layers)."""
    method = _method(method)
    place = _placement(placement)
    b = _Builder(method, system, place)
    m = shape.model
    t = 0.0
    if method.name in RAG_METHODS:
        costs = method_costs(method, shape)
        t = b.memory_steps(costs, "retrieval", 0.0)
        tokens = shape.question_tokens + shape.rag_k * shape.doc_tokens
        for i in range(m.layers):
            t = b.gpu(f"prefill L{i}", prefill_layer_cost(shape, i, tokens), t)
        return b.tl
    full = method_layers(m)
    costs = method_costs(method, shape)
    index = costs.get("fpga")
    for i in range(m.layers):
        t = b.gpu(f"prefill L{i}", prefill_layer_cost(shape, i, shape.context), t)
        if full[i]:
            prep = costs["prepare"]
            build = StepCost(shape.batch * shape.context * m.kv_token_bytes + prep.nbytes,
                             prep.flops * shape.context, launches=prep.launches,
                             note="build the layer's memory")  # fmt: skip
            t = b.gpu(f"prepare L{i}", build, t)
            if b.offload and index is not None:
                assert system.link is not None
                b.tl.add("link", f"load memory L{i}", system.link.seconds(index.nbytes),
                         "modeled", t)  # fmt: skip
    return b.tl


def check_shape_system(shape: Any, system: Any) -> None:
    """`shape` a `Shape`, `system` a `System` (named errors, not an AttributeError later)."""
    if not isinstance(shape, Shape):
        raise InputError("shape", f"expected a hetmem.system.Shape, got {type(shape).__name__}")
    if not isinstance(system, System):
        raise InputError(
            "system", f"expected a hetmem.system.System (System.of(gpu, card)), got "
            f"{type(system).__name__}",
        )  # fmt: skip


def schedule(method: Any, shape: Shape, system: System, kind: str = "sequential", *,
             per: str = "token", new_tokens: int = 256,
             placement: str | Mapping[str, str] | None = None) -> Schedule:  # fmt: skip
    """A schedule of `kind` (gpu, sequential, overlapped) per generated token (`per="token"`)
    or per request (`per="request"`: prefill, then `new_tokens` decode steps at the same
    context)."""
    if kind not in SCHEDULES:
        raise InputError("kind", f"expected one of {SCHEDULES}, got {kind!r}")
    check_shape_system(shape, system)
    if per not in ("token", "request"):
        raise InputError("per", f"expected 'token' or 'request', got {per!r}")
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise InputError("new_tokens", f"expected a positive int, got {new_tokens!r}")
    method = _method(method)
    if placement is None:
        placement = GPU_ONLY if kind == "gpu" else OFFLOAD
    place = _placement(placement)
    label = "/".join(place[s] for s in ("prepare", "relevancy", "retrieval", "apply"))
    if kind == "gpu" and label != GPU_ONLY:
        raise InputError("kind", f"the 'gpu' schedule runs {GPU_ONLY}, not {label}")
    sys_used = System(system.gpu) if label == GPU_ONLY else system
    overlap = kind == "overlapped"
    out = Schedule(kind, label, sys_used)
    if overlap and shape.batch < 2:
        out.notes.append("one row: no second micro-batch to overlap with (= sequential)")
    if per == "request":
        out.parts.append(Part("prefill", prefill_timeline(method, shape, sys_used, place)))
    times = new_tokens if per == "request" else 1
    out.parts.append(Part("decode", token_timeline(method, shape, sys_used, place, overlap), times))
    return out


def memory_share(sched: Schedule) -> float:
    """Share of the schedule's time that the GPU spends on memory processing (Prepare,
    Relevancy, Retrieval, Apply) in the GPU-alone schedule: the paper's 22-97%."""
    steps = ("prepare", "relevancy", "retrieval", "apply")
    total = sched.seconds
    return sched.busy_steps("gpu", steps) / total if total else 0.0
