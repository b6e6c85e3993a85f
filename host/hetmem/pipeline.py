"""The four steps under a placement, with explicit transfers and a per-step profile.

    pipe = Pipeline(DSA(...), placement={"relevancy": "fpga", "retrieval": "fpga"})
    pipe.prepare(kv)            # Prepare Memory, once
    out = pipe.step(query, budget=2048)   # Relevancy, Retrieval, Apply; per decode step
    pipe.append(new_kv)         # the memory grows; on the card only new entries cross PCIe
    print(pipe.profile.table())

`step` is the public edge: it validates the query and plans the step. A model's decode loop
plans each step once (`StepPlan`: positions, visibility, budget) and calls `decode` on every
layer's pipeline with that plan: no re-validation, no re-planning per layer. `fpga` may be a
`hetmem.fpga.cards.Card` that every layer of a model shares (one open device, one xclbin
load, each layer's memory a slot set on it).

Placement maps each step to `gpu` (CUDA/ROCm, else the CPU, said once), `cpu`, or `fpga`.
On the FPGA, Compute Relevancy and Retrieval are one fused kernel: both go there or
neither does. Each change of device between steps is recorded as a transfer step.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F

from .attention import AttentionQuery, KVChunk
from .device import synchronize, torch_device
from .errors import FpgaError, InputError, PlacementError
from .methods.base import Memory, Method
from .placement import DEFAULT_PLACEMENT as DEFAULT_PLACEMENT  # re-exported
from .placement import normalize_placement
from .plan import StepPlan
from .profile import MeasuredProfile, Profile, StepRecord, Timeline, device_label
from .selection import Bitmap, Selection, TopK
from .warn import warn

Policy = Literal["fallback", "raise"]

#: Profiles kept in `Pipeline.history` (a long generation must not grow it without bound).
HISTORY = 1024


def _serialized(fn: Any) -> Any:
    """A public call that holds the pipeline's lock: calls from several threads run one at a
    time, each as it would alone (the memory, the card's buffers and the last profile are
    the pipeline's state)."""

    @functools.wraps(fn)
    def call(self: Pipeline, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return fn(self, *args, **kwargs)

    return call


class Pipeline:
    """Runs a method's four steps under a placement and profiles every step.

    Thread-safe by serialization: `prepare`, `append`, `select`, `step` and `decode` hold the
    pipeline's lock, so calls from several threads run one after another, each returning what
    it would alone (`profile` and `last_selection` are those of the call that ended last).
    Pipelines that share a card (a wrapped model's layers) also take the card's lock while
    they use it."""

    def __init__(
        self,
        method: Method,
        placement: Mapping[str, str] | str | None = None,
        *,
        fpga: Any = None,
        on_fpga_error: Policy = "fallback",
        overlap: bool = False,
        shape: Any = None,
        system: Any = None,
        objective: str = "latency",
    ):
        """`overlap=True`: a planned decode step with the card splits its batch into two
        micro-batches, so that the card selects for the second while the GPU runs Apply for
        the first (the profile's `timeline` shows the overlapped schedule). The results
        equal the sequential schedule's exactly.

        `placement="auto"`: `hetmem.system.planner` picks the placement by `objective`
        (latency or energy) for the devices of `system` (a `hetmem.system.System`, or a
        (gpu, card) pair of profile names or files; default the local GPU and a U55C). With
        `shape` (a `hetmem.system.Shape`) it is resolved here; without, at `prepare`, from
        the memory's shape (one layer of the KV cache's geometry, or the corpus's tokens).
        `plan_explanation` says why."""
        if not isinstance(method, Method):
            raise PlacementError("method", f"expected a hetmem Method, got {type(method).__name__}")
        if on_fpga_error not in ("fallback", "raise"):
            raise PlacementError("on_fpga_error", "expected 'fallback' or 'raise'")
        self.method = method
        self._lock = threading.RLock()
        self.plan_explanation: str | None = None
        self._auto: dict[str, Any] | None = None
        planned = isinstance(placement, str) and placement == "auto"
        if planned:
            placement = self._auto_placement(shape, system, objective, fpga)
        self.on_fpga_error: Policy = on_fpga_error
        if not isinstance(overlap, bool):
            raise PlacementError("overlap", f"expected True or False, got {overlap!r}")
        self.overlap = overlap
        self._place(placement, fpga)
        if fpga not in (None, "auto") and not self.uses_fpga and not planned:
            warn(f"hetmem: fpga={fpga!r} is not used: the placement puts no step on 'fpga' "
                 "(e.g. placement='gpu/fpga/fpga/gpu')")  # fmt: skip
        self.memory: Memory | None = None
        self.profile = Profile()
        self.history: deque[Profile] = deque(maxlen=HISTORY)
        self.counters: dict[str, int] = {"fpga_fallbacks": 0, "fpga_skipped": 0}
        self.last_selection: Selection | None = None

    def _place(self, placement: Mapping[str, str] | str | None, fpga: Any) -> None:
        self.placement = normalize_placement(placement)
        self.uses_fpga = self.placement["relevancy"] == "fpga"
        place = self.placement
        # Relevancy, Retrieval and Apply on one torch device: (device, its profile label),
        # read by every planned decode step (`_one_device_step`)
        self._one_device: tuple[torch.device, str] | None = None
        if not self.uses_fpga and place["relevancy"] == place["retrieval"] == place["apply"]:
            dev = self.device("apply")
            self._one_device = (dev, device_label(dev))
        dev = self.device("prepare")
        self._prepare_device = (dev, device_label(dev))  # where appends run, its label
        # The method's append of a decode token (`lean_append`), off the card (a card's
        # memory takes its rows through the FPGA stage); `lean_decode`'s device and label:
        # every step on one device, the appends' included
        self._lean_append = None if self.uses_fpga else getattr(self.method, "lean_append", None)
        one = self._one_device
        lean = self._lean_append is not None and one is not None and one[0] == dev
        self._lean_device = one if lean else None
        if self.uses_fpga and self.method.kernel is None:
            raise PlacementError("placement", f"method {self.method.name!r} has no FPGA kernel")
        self.fpga_stage = None
        if self.uses_fpga:
            from .offload import FpgaStage

            self.fpga_stage = FpgaStage(self.method, fpga)

    def _auto_placement(self, shape: Any, system: Any, objective: str, fpga: Any) -> str:
        """The planner's placement now (`shape` given), or the GPU alone until `prepare`
        knows the memory's shape."""
        from .system import auto

        auto.check_objective(objective)
        if system is None or isinstance(system, tuple | list):
            system = auto.auto_system(*(system or ()))
        auto.check_system(system)
        self._auto = {"system": system, "objective": objective, "fpga": fpga}
        if shape is None:
            return "gpu/gpu/gpu/gpu"  # until prepare
        choice = auto.resolve(self.method, shape, system=system, objective=objective)
        self._auto = None
        self.plan_explanation = choice.explanation
        return choice.placement

    def _resolve_auto(self, data: Any) -> None:
        from .system import auto

        assert self._auto is not None
        options, self._auto = self._auto, None
        shape = auto.shape_from_data(self.method, data)
        choice = auto.resolve(self.method, shape, system=options["system"],
                              objective=options["objective"])  # fmt: skip
        self.plan_explanation = choice.explanation
        self._place(choice.placement, options["fpga"])

    # -- devices -------------------------------------------------------------------------
    def device(self, step: str) -> torch.device:
        """The torch device of a torch-placed step (the GPU path for an FPGA step)."""
        name = self.placement[step]
        return torch_device("gpu" if name == "fpga" else name)

    def _label(self, step: str) -> str:
        if self.placement[step] == "fpga":
            return self.fpga_stage.label if self.fpga_stage else "fpga"
        return device_label(self.device(step))

    def _move(self, profile: Profile, what: str, value: Any, src: str, dst: str) -> Any:
        """A transfer between torch devices, as an explicit, measured step."""
        src_dev, dst_dev = self.device(src), self.device(dst)
        if src_dev == dst_dev:
            return value
        nbytes = _nbytes(value)
        with profile.measure(f"transfer {what}", dst_dev, nbytes, f"{src_dev} -> {dst_dev}"):
            value = _to(value, dst_dev)
        return value

    # -- steps ---------------------------------------------------------------------------
    @_serialized
    def prepare(self, data: Any) -> Memory:
        """Prepare Memory once; decode steps reuse it and `append` grows it."""
        if self._auto is not None:  # placement="auto" without a shape: plan for this memory
            self._resolve_auto(data)
        profile = Profile()
        dev = self.device("prepare")
        data = _to(data, dev)
        with profile.measure("prepare", dev, _nbytes(data)) as rec:
            self.memory = self.method.prepare(data)
            rec.note = f"{self.memory.entries} entries"
        if self.fpga_stage is not None:
            try:
                profile.extend(self.fpga_stage.load(self.memory))
            except FpgaError as exc:  # the next select reloads the card from the host copy
                self._fault(profile, exc, "loading the memory")
        self._finish(profile)
        return self.memory

    @_serialized
    def append(self, data: Any) -> None:
        """Grow the memory by new entries; on the card only the new entries are sent."""
        memory = self._require_memory()
        self._append(memory, _to(data, self._prepare_device[0]))

    def _append(self, memory: Memory, data: Any) -> None:
        """Append, timed and profiled: the method's `lean_append` when it takes the entries
        (a decode token to a full cache, off the card), else its `append`."""
        dev, label = self._prepare_device
        sync = dev.type != "cpu"
        if sync:
            synchronize(dev)
        start = time.perf_counter()
        lean = self._lean_append
        if (
            lean is None
            or not isinstance(data, KVChunk)
            or data.features is not None
            or not lean(memory, data.keys, data.values)
        ):
            self.method.append(memory, data)
        if sync:
            synchronize(dev)
        seconds = time.perf_counter() - start
        profile = MeasuredProfile(label, ("append", seconds, _nbytes(data), memory.entries))
        if self.fpga_stage is not None:
            # Quantized into the host mirror now; the card takes them at the next select (the
            # same transfers). An append touches no device, so it cannot fault halfway: it
            # raises before the memory changed, or has appended everything.
            profile.extend(self.fpga_stage.stage_rows(memory))
        self._finish(profile)

    @_serialized
    def select(
        self, query: Any, budget: int | StepPlan, profile: Profile | None = None
    ) -> Selection:
        """Compute Relevancy and Retrieval under the placement; return the selection.

        `budget`: tokens (documents for RAG), or the step's `StepPlan` when the query was
        validated and planned once for every layer (`decode`)."""
        memory = self._require_memory()
        profile = profile if profile is not None else Profile()
        if not isinstance(budget, StepPlan):
            self.method.check_query(memory, query)
        if self.fpga_stage is not None:
            with self.fpga_stage.card.lock:
                return self._select_fpga(memory, query, budget, profile)
        query_r = _to(query, self.device("relevancy"))
        with profile.measure("relevancy", self.device("relevancy"), memory.index_nbytes):
            scores = self.method.relevancy(memory, query_r)
        scores = self._move(profile, "scores", scores, "relevancy", "retrieval")
        with profile.measure("retrieval", self.device("retrieval"), scores.nbytes):
            tokens = budget.budget if isinstance(budget, StepPlan) else budget
            selection = self.method.retrieve(scores, tokens)
        return self._move(profile, "selection", selection, "retrieval", "apply")

    def _select_fpga(
        self, memory: Memory, query: Any, budget: int | StepPlan, profile: Profile
    ) -> Selection:
        """Relevancy + Retrieval with the card: on it, or its exact answer on the host when
        it faults or its circuit breaker is open."""
        stage = self.fpga_stage
        assert stage is not None
        breaker = stage.card.breaker
        query_m = _to(query, memory.device)  # the kernel's query is built beside the memory
        if breaker.allow():
            try:
                selection, fpga_profile = stage.select(memory, query_m, budget)
            except FpgaError as exc:
                breaker.failure()
                self._fault(profile, exc, "relevancy+retrieval; the host runs the kernel")
            else:
                breaker.success()
                profile.extend(fpga_profile)
                return self._move_selection(profile, selection)
        else:
            self.counters["fpga_skipped"] += 1
            profile.counters["fpga_skipped"] += 1
            note = (
                f"circuit open after {breaker.limit} faults in a row: {breaker.left} more "
                "selects on the host"
            )
            profile.add(StepRecord("fpga skipped", stage.label, 0.0, "measured", 0, note))
        # The card's exact answer, computed on the host (its golden model over the host
        # mirror of the card's memory): a fault changes no output.
        selection, host_profile = stage.select_host(memory, query_m, budget)
        profile.extend(host_profile)
        return self._move_selection(profile, selection)

    @_serialized
    def step(self, query: Any, budget: int) -> Any:
        """One decode step: Relevancy, Retrieval, Apply. Returns Apply's output.

        The public edge: the query is validated here; an attention query is then planned
        (`StepPlan`) and run as `decode` runs it."""
        memory = self._require_memory()
        self.method.check_query(memory, query)
        kv = getattr(memory, "kv", None)
        if kv is not None and isinstance(query, AttentionQuery) and query.plan is None:
            positions = self.method.positions(memory, query)  # type: ignore[attr-defined]
            plan = StepPlan(positions.to("cpu"), kv.lengths.to("cpu"), budget)
            return self.decode(AttentionQuery(query.q, positions, query.features, plan), plan)
        return self._step(query, budget)

    def lean_decode(
        self, keys: torch.Tensor, values: torch.Tensor, q: torch.Tensor, scale: float | None,
        plan_for: Any, budget_for: Any,
    ) -> torch.Tensor | None:  # fmt: skip
        """A wrapped model's decode step in one call: its token, keys and values [B, Hkv, 1,
        D], appended by the method's `lean_append` (the operators of `append` without its
        bookkeeping), the step planned (`plan_for(kv)`, shared by the layers), then the
        query q [B, Hq, 1, D] attended by the method's `lean_step`, or as `decode` runs it
        when that declines; at one batch row, both in the method's `lean_one`, which needs
        no plan, only the budget (`budget_for(length)`). The memory, the output and the two
        profiles (the append's, then the step's) are those of `append` then `decode`
        (test); what is left out is the second lock, the moves, the device lookups and the
        checks (measured in bench/decode_e2e.py's B=1 overhead). None, nothing done, when
        the append is not a lean one: the card, a placement over several devices, a method
        without one, or an append it declines (`append` then takes it). The token is in
        once it was appended, even when the step raises (the caller counts it)."""
        one, memory = self._lean_device, self.memory
        if one is None or memory is None or keys.device != one[0]:
            return None
        with self._lock:
            dev, label = one
            method = self.method
            method.scale = scale
            nbytes = keys.numel() * keys.element_size() + values.numel() * values.element_size()
            if keys.shape[0] == 1:
                done = method.lean_one(memory, keys, values, q, budget_for)
                if done is not None:
                    seconds, step = done
                    self._finish(
                        MeasuredProfile(label, ("append", seconds, nbytes, memory.entries))
                    )
                    return self._lean_done(memory, step, label)
            sync = dev.type != "cpu"
            if sync:
                synchronize(dev)
            start = time.perf_counter()
            if not method.lean_append(memory, keys, values):
                return None
            if sync:
                synchronize(dev)
            seconds = time.perf_counter() - start
            self._finish(MeasuredProfile(label, ("append", seconds, nbytes, memory.entries)))
            plan = plan_for(memory.kv)
            step = method.lean_step(memory, AttentionQuery(q, None, None, plan), plan)
            if step is None:
                return self._step(AttentionQuery(q, plan.positions_on(dev), None, plan), plan)
            return self._lean_done(memory, step, label)

    def _lean_done(self, memory: Memory, step: Any, label: str) -> torch.Tensor:
        """A method's `LeanStep`: its selection kept and its three steps profiled as
        `_one_device_step` profiles them; its output."""
        relevancy, retrieval, apply = step.seconds
        self.last_selection = step.selection
        nbytes = self.method.apply_nbytes(memory, step.selection)
        self._finish(
            MeasuredProfile(
                label,
                ("relevancy", relevancy, memory.index_nbytes, None),
                ("retrieval", retrieval, step.scores_nbytes, None),
                ("apply", apply, nbytes, None),
            )
        )
        return step.out

    @_serialized
    def decode(self, query: Any, plan: StepPlan) -> Any:
        """One step of a planned decode: `query` carries the step's plan (`query.plan`),
        shared by every layer, and is trusted (validated at the edge, once per step)."""
        return self._step(query, plan)

    def _step(self, query: Any, budget: int | StepPlan) -> Any:
        memory = self._require_memory()
        if self._one_device is not None and isinstance(budget, StepPlan):
            return self._one_device_step(memory, query, budget)
        profile = Profile()
        if (
            self.overlap
            and self.fpga_stage is not None
            and isinstance(budget, StepPlan)
            and budget.batch >= 2
            and not self.fpga_stage.card.breaker.open
        ):
            try:
                with self.fpga_stage.card.lock:
                    return self._ping_pong(memory, query, budget)
            except FpgaError as exc:  # the card faulted: this step runs sequentially
                self.fpga_stage.card.breaker.failure()
                self._fault(profile, exc, "relevancy+retrieval; rerunning the step")
        selection = self.select(query, budget, profile)
        dev = self.device("apply")
        with profile.measure("apply", dev, self.method.apply_nbytes(memory, selection)):
            out = self.method.apply(memory, selection, _to(query, dev))
        self.last_selection = selection
        self._finish(profile)
        return out

    def _one_device_step(self, memory: Memory, query: Any, plan: StepPlan) -> Any:
        """A planned step whose Relevancy, Retrieval and Apply share one torch device (a
        wrapped model's decode on the GPU or CPU alone): nothing moves between them, so the
        three run back to back, profiled as `select` and `_step` profile them (the same three
        records: a wall clock read between steps, a GPU drained first), without their moves,
        device lookups, checks and context managers (measured in bench/decode_e2e.py's B=1
        overhead)."""
        method = self.method
        dev, label = self._one_device  # type: ignore[misc]
        query = _to(query, dev)
        lean = getattr(method, "lean_step", None)
        step = None if lean is None else lean(memory, query, plan)
        if step is not None:  # nothing masked: the three without their bookkeeping
            return self._lean_done(memory, step, label)
        sync = dev.type != "cpu"  # each step's time is its own: the device drained between
        if sync:
            synchronize(dev)
        start = time.perf_counter()
        scores = method.relevancy(memory, query)
        if sync:
            synchronize(dev)
        scored = time.perf_counter()
        selection = method.retrieve(scores, plan.budget)
        if sync:
            synchronize(dev)
        selected = time.perf_counter()
        out = method.apply(memory, selection, query)
        if sync:
            synchronize(dev)
        end = time.perf_counter()
        nbytes = method.apply_nbytes(memory, selection)
        self.last_selection = selection
        self._finish(
            Profile(
                [
                    StepRecord("relevancy", label, scored - start, "measured", memory.index_nbytes),
                    StepRecord("retrieval", label, selected - scored, "measured", scores.nbytes),
                    StepRecord("apply", label, end - selected, "measured", nbytes),
                ]
            )
        )
        return out

    def _ping_pong(self, memory: Memory, query: Any, plan: StepPlan) -> Any:
        """Two micro-batches: both launches start on the card, then Apply of the first
        runs on the GPU while the card selects for the second. On a card the overlap is
        real; on the emulated targets the card's time is modeled, so the timeline that the
        profile keeps (`profile.timeline`) is the composite of measured host and GPU steps
        and the card's modeled ones."""
        stage = self.fpga_stage
        assert stage is not None
        half = plan.batch // 2
        profile, timeline = Profile(), Timeline()
        dev = self.device("apply")
        begun = []
        for rows in (slice(0, half), slice(half, plan.batch)):  # the card queues both
            start = time.perf_counter()
            sub = AttentionQuery(query.q[rows], None, _rows(query.features, rows), plan.rows(rows))
            pending = stage.begin(memory, _to(sub, memory.device), plan, rows)
            sent = timeline.add(
                "host", "quantize, write, launch", time.perf_counter() - start, "measured"
            )
            begun.append((rows, sub, pending, sent))
        outs, selections = [], []
        for rows, sub, pending, sent in begun:
            name = f"rows {rows.start}-{rows.stop - 1}"
            selection, card = stage.finish(pending)
            profile.extend(card)
            ready = sent
            for source in sorted({r.source for r in card.records if r.device == stage.label}):
                seconds = sum(
                    r.seconds
                    for r in card.records
                    if r.device == stage.label and r.source == source
                )
                ready = timeline.add("fpga", f"select {name}", seconds, source, after=ready)
            selection = self._move_selection(profile, selection)
            view = memory.rows(rows)  # type: ignore[attr-defined]
            with profile.measure("apply", dev, self.method.apply_nbytes(view, selection)) as rec:
                outs.append(self.method.apply(view, selection, _to(sub, dev)))
            timeline.add("gpu", f"apply {name}", rec.seconds, "measured", after=ready)
            selections.append(selection)
        profile.add(
            StepRecord(
                "overlap: time saved",
                "timeline",
                max(timeline.serial - timeline.makespan, 0.0),
                "composite",
                0,
                f"2 micro-batches: {timeline.serial * 1e6:.0f} us one after another -> "
                f"{timeline.makespan * 1e6:.0f} us overlapped ({timeline.sources})",
            )
        )
        profile.timeline = timeline
        self.last_selection = _cat_selections(selections)
        self._finish(profile)
        return torch.cat(outs, dim=0)

    def _move_selection(self, profile: Profile, selection: Selection) -> Selection:
        """The FPGA's selection arrives on the host; Apply may need it on a GPU."""
        dev = self.device("apply")
        if dev.type == "cpu":
            return selection
        with profile.measure("transfer selection -> gpu", dev, _nbytes(selection), "host -> gpu"):
            return _to(selection, dev)

    # -- bookkeeping ---------------------------------------------------------------------
    def _fault(self, profile: Profile, exc: FpgaError, what: str) -> None:
        """An FPGA fault: raise it (on_fpga_error="raise"), or count it, warn, and forget
        the card's state so that the next FPGA step rebuilds it from the host's memory."""
        if self.on_fpga_error == "raise":
            raise exc
        self.counters["fpga_fallbacks"] += 1
        profile.counters["fpga_fallbacks"] += 1
        profile.add(
            StepRecord(
                "fpga fault",
                self._label("relevancy"),
                0.0,
                "measured",
                0,
                f"{type(exc).__name__}: {exc}",
            )
        )
        warn(
            f"hetmem: FPGA fault while {what} ({type(exc).__name__}: {exc}); the card's memory "
            "will be restored from the host copy",
            RuntimeWarning,
        )

    def _finish(self, profile: Profile) -> None:
        self.profile = profile
        self.history.append(profile)

    def _require_memory(self) -> Memory:
        if self.memory is None:
            raise InputError("memory", "is empty: call prepare() before step() or append()")
        return self.memory


def _rows(value: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if value is None else value[rows]


def _cat_selections(parts: list[Selection]) -> Selection:
    """The selections of micro-batches, joined along the batch axis."""
    first = parts[0]
    if isinstance(first, Bitmap):
        return Bitmap(torch.cat([p.mask for p in parts]), first.unit)  # type: ignore[union-attr]
    k = max(p.indices.shape[-1] for p in parts)  # type: ignore[union-attr]
    return TopK(
        torch.cat([F.pad(p.indices, (0, k - p.indices.shape[-1])) for p in parts]),  # type: ignore[union-attr]
        torch.cat([F.pad(p.valid, (0, k - p.valid.shape[-1])) for p in parts]),  # type: ignore[union-attr]
        first.unit,
    )


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if hasattr(value, "__dict__"):
        return sum(_nbytes(v) for v in vars(value).values() if isinstance(v, torch.Tensor))
    return 0


def _to(value: Any, device: torch.device) -> Any:
    """Move tensors (and objects with a `to`) to a device; leave other values alone."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (TopK, Bitmap)):
        return type(value)(*(_to(v, device) for v in vars(value).values()))
    if hasattr(value, "to") and callable(value.to) and not isinstance(value, (str, bytes)):
        try:
            return value.to(device)
        except TypeError:
            return value
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    return value
