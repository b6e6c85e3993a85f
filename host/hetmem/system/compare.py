"""`hetmem compare`: GPU+FPGA against the GPU alone over a grid of models, methods,
contexts, batches and device pairs; where offload starts (and stops) paying; what engine
bandwidth the card would need where it never does; the paper's reported figures beside the
model's.

Every figure here is `modeled` (roofline + the kernels' cycle models + the link model over
data-sheet profiles), or `composite` when a profile in the system was measured (`hetmem
profile-device`): the times are then a formula over measured inputs, and the source says
which.

    from hetmem.system.compare import compare
    result = compare(["Llama-3.1-8B"], ["quest", "seer"], [4096, 131072], [1, 16])
    print(result.rows[0], result.crossovers[0].summary)
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import InputError
from ..methods import RAG_METHODS
from ..methods import names as method_names
from .costs import fpga_seconds, gpu_seconds, link_seconds, method_costs
from .devices import get_link
from .energy import schedule_energy
from .planner import OBJECTIVES
from .schedule import System, _method, memory_share, schedule
from .shape import ModelConfig, Shape, get_model

DEFAULT_METHODS = ("dsa", "seer", "quest", "dense_rag", "bm25_rag")
DEFAULT_CONTEXTS = (4096, 16384, 65536, 262144, 1048576)
DEFAULT_BATCHES = (1, 8, 64)
#: The device pairs of the issue: the paper's MI210 + U55C first.
DEFAULT_SYSTEMS = (("MI210", "U55C"), ("H100-SXM", "U55C"), ("A100-80GB", "U280"))

#: What the paper reports for MI210 + U55C (its abstract and Figure 1).
PAPER = {
    "system": ("MI210", "U55C"),
    "overall_speedup": (1.04, 2.2),
    "overall_energy": (1.11, 4.7),
    "figure1_speedup": (1.2, 1.8),
    "figure1_energy": (1.3, 4.7),
    "memory_share": (0.22, 0.97),
}


# -- parsing ------------------------------------------------------------------------------------


def parse_tokens(text: str | int) -> int:
    """A context like 4096, 4k, 128K, 1M (k = 1024, M = 1024^2)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", str(text))
        if not m:
            raise InputError("contexts", f"expected tokens like 4096, 4k or 1M, got {text!r}")
        value = int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
    if value < 1:
        raise InputError("contexts", f"expected a positive number of tokens, got {text!r}")
    return value


def parse_list(text: str | Sequence[Any], what: str, parse: Any = int) -> list[int]:
    """'4k,32k,1M' or a sequence of items, each through `parse`; not empty."""
    items = [t for t in re.split(r"[,\s]+", text) if t] if isinstance(text, str) else list(text)
    if not items:
        raise InputError(what, "expected at least one value")
    out = []
    for item in items:
        try:
            value = parse(item)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(what, f"expected positive integers, got {item!r}") from None
        if isinstance(value, bool) or value < 1:
            raise InputError(what, f"expected positive integers, got {item!r}")
        out.append(value)
    return sorted(set(out))


def check_methods(methods: Iterable[str] | None) -> list[str]:
    methods = list(methods or DEFAULT_METHODS)
    known = method_names()
    for m in methods:
        if m not in known:
            raise InputError("method", f"unknown method {m!r}; methods are {known}")
    return list(dict.fromkeys(methods))


def systems_of(gpus: Sequence[str] | None, cards: Sequence[str] | None,
               link: str | None = None) -> list[System]:  # fmt: skip
    """Device pairs: the i-th --gpu with the i-th --card (one of them may be given once and
    pairs with every other); none given: the issue's three pairs."""
    gpus, cards = list(gpus or []), list(cards or [])
    if not gpus and not cards:
        pairs = list(DEFAULT_SYSTEMS)
    else:
        gpus = gpus or ["MI210"]
        cards = cards or ["U55C"]
        if len(gpus) != len(cards) and 1 not in (len(gpus), len(cards)):
            raise InputError("card", f"{len(gpus)} GPUs and {len(cards)} cards: give one card "
                             "per GPU, or one of either")  # fmt: skip
        n = max(len(gpus), len(cards))
        pairs = [(gpus[i if len(gpus) > 1 else 0], cards[i if len(cards) > 1 else 0])
                 for i in range(n)]  # fmt: skip
    lk = get_link(link) if link else None
    return [System.of(g, c, lk) for g, c in pairs]


# -- sources --------------------------------------------------------------------------------------


def figure_source(system: System) -> tuple[str, str]:
    """`modeled` over data-sheet profiles; `composite` (and of what) when a profile was
    measured on hardware."""
    devices = [system.gpu] + ([system.card] if system.card is not None else [])
    measured = [d.name for d in devices if d.source == "measured"]
    if not measured:
        basis = ", ".join(f"{d.name} ({d.source})" for d in devices)
        return "modeled", f"roofline + kernel cycle model + link model over {basis} profiles"
    return "composite", (f"modeled schedule over measured profile(s) {', '.join(measured)} "
                         "and data-sheet figures of the rest")  # fmt: skip


# -- the grid -------------------------------------------------------------------------------------


@dataclass
class Row:
    """One cell of the grid: times per generated token (or request), joules, ratios."""

    model: str
    method: str
    system: str
    context: int
    batch: int
    gpu_s: float
    sequential_s: float
    overlapped_s: float
    gpu_j: float
    sequential_j: float
    overlapped_j: float
    memory_share: float
    choice: str
    source: str
    basis: str

    @property
    def speedup(self) -> float:
        """The paper's schedule (sequential) against the GPU alone."""
        return self.gpu_s / self.sequential_s

    @property
    def speedup_overlapped(self) -> float:
        return self.gpu_s / self.overlapped_s

    @property
    def energy_ratio(self) -> float:
        """GPU alone's joules / sequential offload's (> 1: offload saves energy)."""
        return self.gpu_j / self.sequential_j

    @property
    def energy_ratio_overlapped(self) -> float:
        return self.gpu_j / self.overlapped_j

    @property
    def overlap_gain(self) -> float:
        """Sequential time / overlapped time (> 1: the overlap helps)."""
        return self.sequential_s / self.overlapped_s

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "speedup": self.speedup,
                "speedup_overlapped": self.speedup_overlapped,
                "energy_ratio": self.energy_ratio,
                "energy_ratio_overlapped": self.energy_ratio_overlapped,
                "overlap_gain": self.overlap_gain}  # fmt: skip


def evaluate(method: str, shape: Shape, system: System, *, per: str = "token",
             new_tokens: int = 256, objective: str = "latency") -> Row:  # fmt: skip
    """The GPU alone, the sequential and the overlapped offload for one shape."""
    if objective not in OBJECTIVES:
        raise InputError("objective", f"expected one of {OBJECTIVES}, got {objective!r}")
    kw = {"per": per, "new_tokens": new_tokens}
    gpu = schedule(method, shape, system, "gpu", **kw)
    seq = schedule(method, shape, system, "sequential", **kw)
    ovl = schedule(method, shape, system, "overlapped", **kw)
    j = [schedule_energy(s).total for s in (gpu, seq, ovl)]
    cost = {"gpu": (gpu.seconds, j[0]), "overlapped": (ovl.seconds, j[2])}
    pick = 0 if objective == "latency" else 1
    choice = min(cost, key=lambda k: (cost[k][pick], k != "gpu"))
    source, basis = figure_source(system)
    return Row(shape.model.name, method, system.label, shape.context, shape.batch,
               gpu.seconds, seq.seconds, ovl.seconds, j[0], j[1], j[2], memory_share(gpu),
               "gpu alone" if choice == "gpu" else "offload (overlapped)", source, basis)  # fmt: skip


# -- crossover and the engine what-if ----------------------------------------------------------


@dataclass
class BreakEven:
    """Per layer and decode step: what the card's selection must cost for the sequential
    offload to match the GPU alone (the other steps are the same on both)."""

    gpu_select_s: float  # the GPU's Relevancy + Retrieval
    link_s: float  # query to the card, selection back
    card_s: float  # today's kernel
    card_bytes: int  # what the kernel streams
    needed_factor: float | None  # engine speed-up needed (None: the link alone is too slow)
    engine_bw: float  # today's effective streaming rate (bytes / kernel time)
    needed_bw: float | None  # streaming rate needed, if the whole step were streaming
    card_hbm_bw: float

    @property
    def verdict(self) -> str:
        if self.needed_factor is None:
            return "never: the transfers alone take longer than the GPU's selection"
        if self.needed_factor <= 1:
            return "pays today"
        gbs = (self.needed_bw or 0) / 1e9
        beyond = (
            " (beyond the card's HBM: no engine could)"
            if (self.needed_bw or 0) > self.card_hbm_bw
            else ""
        )
        return (f"needs a {self.needed_factor:.1f}x faster engine: >= {gbs:.0f} GB/s streamed "
                f"(today {self.engine_bw / 1e9:.1f} GB/s, HBM {self.card_hbm_bw / 1e9:.0f} GB/s){beyond}")  # fmt: skip


def break_even(method: Any, shape: Shape, system: System) -> BreakEven | None:
    """The bandwidth at which the card's step time equals the GPU's for that step (None:
    nothing to offload at this shape: a RAG method per token, or a budget that covers the
    whole context)."""
    method = _method(method)
    if method.name in RAG_METHODS or system.card is None or system.link is None:
        return None
    costs = method_costs(method, shape)
    if "fpga" not in costs:
        return None
    gpu = gpu_seconds(costs["relevancy"], system.gpu) + gpu_seconds(costs["retrieval"], system.gpu)
    link = link_seconds(costs["to_fpga"], system.link) + link_seconds(
        costs["from_fpga"], system.link
    )
    card = fpga_seconds(costs["fpga"], system.card)
    nbytes = costs["fpga"].nbytes
    room = gpu - link
    factor = None if room <= 0 else card / room
    return BreakEven(gpu, link, card, nbytes, factor, nbytes / card if card else math.inf,
                     None if room <= 0 else nbytes / room, system.card.mem_bw)  # fmt: skip


@dataclass
class Crossover:
    """Where offload's modeled speedup exceeds 1 on the grid, per batch: the first and last
    context it pays at; and where it never pays, the engine what-if at the best cell."""

    model: str
    method: str
    system: str
    schedule: str
    pays: dict[int, list[int]]  # batch -> contexts where speedup > 1
    contexts: list[int]
    batches: list[int]
    what_if: BreakEven | None = None
    what_if_shape: tuple[int, int] = (0, 0)
    best: tuple[float, int, int] = (0.0, 0, 0)  # (speedup, context, batch)

    @property
    def never(self) -> bool:
        return not any(self.pays.values())

    def start_stop(self, batch: int) -> tuple[int | None, int | None]:
        """The smallest context where offload pays at `batch`, and the first larger grid
        context where it no longer does (None: pays to the grid's end, or never)."""
        pays = self.pays.get(batch, [])
        if not pays:
            return None, None
        start = pays[0]
        stop = next((c for c in self.contexts if c > start and c not in pays), None)
        return start, stop

    @property
    def summary(self) -> str:
        if self.never:
            why = (
                ""
                if self.what_if is None
                else f"; at {_tok(self.what_if_shape[0])}, batch "
                f"{self.what_if_shape[1]}: {self.what_if.verdict}"
            )
            if self.method in RAG_METHODS:
                why = "; RAG retrieves once per request (prefill): a decode token has nothing to offload"
            return f"never in the grid (best {self.best[0]:.3f}x at {_tok(self.best[1])}, batch {self.best[2]}){why}"
        parts = []
        for b in self.batches:
            start, stop = self.start_stop(b)
            if start is None:
                continue
            end = f"stops at {_tok(stop)}" if stop else "to the grid's end"
            parts.append(f"batch {b}: from {_tok(start)}, {end}")
        never = [b for b in self.batches if not self.pays.get(b)]
        if never:
            parts.append(f"never at batch {', '.join(map(str, never))}")
        return f"pays ({'; '.join(parts)}); best {self.best[0]:.3f}x at {_tok(self.best[1])}, batch {self.best[2]}"

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "method": self.method, "system": self.system,
            "schedule": self.schedule, "pays": {str(b): c for b, c in self.pays.items()},
            "start_stop": {str(b): self.start_stop(b) for b in self.batches},
            "never_in_grid": self.never, "summary": self.summary,
            "best": {"speedup": self.best[0], "context": self.best[1], "batch": self.best[2]},
            "what_if": None if self.what_if is None else {
                **asdict(self.what_if), "verdict": self.what_if.verdict,
                "context": self.what_if_shape[0], "batch": self.what_if_shape[1]},
            "source": "modeled",
        }  # fmt: skip


def crossover(rows: Sequence[Row], system: System, model: ModelConfig, method: str, *,
              overlapped: bool = True, budget: int = 2048) -> Crossover:  # fmt: skip
    """The crossover of `method` on `system` from the grid's rows (speedup > 1), and, where
    it never pays, the break-even engine at the grid's most favourable cell."""
    mine = [r for r in rows if r.method == method and r.system == system.label
            and r.model == model.name]  # fmt: skip
    if not mine:
        raise InputError("rows", f"no rows of {method} on {system.label} for {model.name}")
    contexts = sorted({r.context for r in mine})
    batches = sorted({r.batch for r in mine})
    speed = (lambda r: r.speedup_overlapped) if overlapped else (lambda r: r.speedup)
    pays = {b: sorted(r.context for r in mine if r.batch == b and speed(r) > 1 + 1e-9)
            for b in batches}  # fmt: skip
    top = max(mine, key=speed)
    out = Crossover(model.name, method, system.label, "overlapped" if overlapped else "sequential",
                    pays, contexts, batches, best=(speed(top), top.context, top.batch))  # fmt: skip
    if out.never and method not in RAG_METHODS:  # at the grid's most favourable cell
        shape = Shape(model, top.context, top.batch, budget=budget)
        out.what_if = break_even(method, shape, system)
        out.what_if_shape = (top.context, top.batch)
    return out


# -- the paper check -------------------------------------------------------------------------


@dataclass
class PaperCheck:
    method: str
    speedup: tuple[float, float]  # modeled range over the grid (sequential: the paper's)
    energy: tuple[float, float]
    memory_share: tuple[float, float]
    verdict: str
    speedup_agrees: bool = False
    energy_agrees: bool = False
    why: str = ""

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "paper_figure1_speedup": PAPER["figure1_speedup"],
                "paper_figure1_energy": PAPER["figure1_energy"],
                "paper_overall_speedup": PAPER["overall_speedup"],
                "paper_overall_energy": PAPER["overall_energy"], "source": "modeled"}  # fmt: skip


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def paper_check(rows: Sequence[Row]) -> list[PaperCheck]:
    """Per method, the modeled ranges on MI210 + U55C (sequential offload, the paper's
    schedule) beside the paper's, with a plain verdict. Empty when the grid lacks the pair."""
    label = " + ".join(PAPER["system"])
    mine = [r for r in rows if r.system == label]
    out = []
    for method in dict.fromkeys(r.method for r in mine):
        rs = [r for r in mine if r.method == method]
        sp = (min(r.speedup for r in rs), max(r.speedup for r in rs))
        en = (min(r.energy_ratio for r in rs), max(r.energy_ratio for r in rs))
        sh = (min(r.memory_share for r in rs), max(r.memory_share for r in rs))
        fs, fe = PAPER["figure1_speedup"], PAPER["figure1_energy"]
        said = []
        said.append(
            "speedup agrees (ranges overlap)"
            if _overlap(sp, fs)
            else f"speedup disagrees: modeled at most {sp[1]:.2f}x, the paper at least {fs[0]}x"
        )
        said.append(
            "energy agrees (ranges overlap)"
            if _overlap(en, fe)
            else f"energy disagrees: modeled GPU-alone/offload joules at most {en[1]:.2f}, "
            f"the paper's at least {fe[0]}"
        )
        if method in RAG_METHODS:
            why = (
                "RAG retrieves once per request, so a decode token's time has no retrieval "
                "in it; the card only adds its idle power"
            )
        elif sp[1] < fs[0]:
            why = (
                "the card's RTL engine streams one 64-byte beat per port per cycle at 300 MHz "
                "(19.2 GB/s a port, far below the U55C's 460 GB/s HBM) into 8 dot-product "
                "lanes, while the MI210 scans at 80% of 1.6 TB/s; the paper's engines use the "
                "HBM's pseudo-channels"
            )
        else:
            why = "the card's selection is cheaper than the GPU's at some shapes of the grid"
        out.append(PaperCheck(method, sp, en, sh, "; ".join(said) + f". Why: {why}.",
                              _overlap(sp, fs), _overlap(en, fe), why))  # fmt: skip
    return out


# -- the whole comparison ------------------------------------------------------------------------


@dataclass
class Comparison:
    rows: list[Row]
    crossovers: list[Crossover]
    paper: list[PaperCheck]
    systems: list[System]
    per: str
    objective: str
    notes: list[str] = field(default_factory=list)

    def overlap_gains(self) -> list[dict[str, Any]]:
        """Per method and system: the overlapped schedule's gain over the sequential one
        (sequential time / overlapped time), its range over the grid and where it peaks."""
        out = []
        keys = dict.fromkeys((r.model, r.method, r.system) for r in self.rows)
        for model, method, system in keys:
            rs = [r for r in self.rows if (r.model, r.method, r.system) == (model, method, system)]
            top = max(rs, key=lambda r: r.overlap_gain)
            out.append({"model": model, "method": method, "system": system,
                        "min": min(r.overlap_gain for r in rs), "max": top.overlap_gain,
                        "at": {"context": top.context, "batch": top.batch},
                        "source": "modeled"})  # fmt: skip
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "per": self.per,
            "objective": self.objective,
            "sources": {s.label: dict(zip(("source", "basis"), figure_source(s), strict=True))
                        for s in self.systems},
            "systems": [{"label": s.label, "gpu": s.gpu.to_json(),
                         "card": None if s.card is None else s.card.to_json(),
                         "link": None if s.link is None else asdict(s.link)} for s in self.systems],
            "rows": [r.to_json() for r in self.rows],
            "crossovers": [c.to_json() for c in self.crossovers],
            "paper": {"reported": PAPER, "check": [p.to_json() for p in self.paper]},
            "overlap_gain": self.overlap_gains(),
            "notes": self.notes,
        }  # fmt: skip


def compare(models: Sequence[str | ModelConfig] = ("Llama-3.1-8B",),
            methods: Sequence[str] | None = None,
            contexts: Sequence[int] = DEFAULT_CONTEXTS,
            batches: Sequence[int] = DEFAULT_BATCHES,
            systems: Sequence[System] | None = None, *,
            budget: int = 2048, per: str = "token", new_tokens: int = 256,
            objective: str = "latency", progress: Any = None) -> Comparison:  # fmt: skip
    """Every (model, method, system, context, batch) of the grid; `progress(n_done, n_all)`
    after each cell."""
    if objective not in OBJECTIVES:
        raise InputError("objective", f"expected one of {OBJECTIVES}, got {objective!r}")
    if per not in ("token", "request"):
        raise InputError("per", f"expected 'token' or 'request', got {per!r}")
    configs = [get_model(m) for m in models] or [get_model("Llama-3.1-8B")]
    methods = check_methods(methods)
    contexts = parse_list(contexts, "contexts", parse_tokens)
    batches = parse_list(batches, "batches")
    systems = list(systems) if systems else systems_of(None, None)
    for s in systems:
        if s.card is None:
            raise InputError("card", f"system {s.label} has no FPGA card to compare with")
    rows: list[Row] = []
    total = len(configs) * len(methods) * len(systems) * len(contexts) * len(batches)
    for model in configs:
        for system in systems:
            for method in methods:
                for context in contexts:
                    for batch in batches:
                        shape = Shape(model, context, batch, budget=budget)
                        rows.append(evaluate(method, shape, system, per=per,
                                             new_tokens=new_tokens, objective=objective))  # fmt: skip
                        if progress is not None:
                            progress(len(rows), total)
    crossovers = [crossover(rows, s, m, meth, budget=budget)
                  for m in configs for s in systems for meth in methods]  # fmt: skip
    notes = [f"times per {'generated token (one decode step of the batch)' if per == 'token' else f'request (prefill + {new_tokens} tokens)'}",
             "speedup, energy ratio: GPU alone / offload (> 1: offload pays)",
             "memory share: the GPU alone's time in Prepare, Relevancy, Retrieval and Apply"]  # fmt: skip
    return Comparison(rows, crossovers, paper_check(rows), systems, per, objective, notes)


def _tok(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n >> 10}k"
    return str(n)


tokens_label = _tok
