"""cocotb bench of hm_topk (the Retrieval unit) on its own: score streams with random gaps,
top-k and threshold-bitmap selections with random output backpressure, against
hetmem.kernels.topk. Calls run back to back without reset."""

from __future__ import annotations

import os
import random

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, RisingEdge

from hetmem.kernels import threshold_bitmap, topk

I64 = np.iinfo(np.int64)


def score_cases(rng: np.random.Generator, nmax: int, slots: int) -> list[dict]:
    """(name, scores [slots, n], k, bitmap, delta, passes) for the edges and random shapes."""
    cases: list[dict] = []

    def add(name, scores, k=None, bitmap=False, delta=None, split=False):
        scores = np.asarray(scores, dtype=np.int64)
        cases.append(
            {
                "name": name,
                "scores": scores,
                "k": k,
                "bitmap": bitmap,
                "delta": delta,
                "split": split,
            }
        )

    n = min(nmax, 1000)
    add("wide random", rng.integers(I64.min // 4, I64.max // 4, (slots, n)), k=37)
    add("k = 1", rng.integers(-(2**40), 2**40, (slots, n)), k=1)
    add("k = n", rng.integers(-(2**40), 2**40, (slots, n)), k=n)
    add("ties", rng.integers(-3, 4, (slots, n)), k=n // 3)
    add("all equal", np.full((slots, n), 12345678901, dtype=np.int64), k=n // 2)
    add("all equal small", np.zeros((slots, n), dtype=np.int64), k=5)
    add("negative", -rng.integers(1, 2**50, (slots, n)), k=100)
    add("one wide bin", 2**40 + rng.integers(0, 1000, (slots, n)), k=77)
    add("ties in a wide bin", 2**40 + rng.integers(0, 6, (slots, n)), k=min(300, n))
    add("int64 extremes", rng.choice(np.array([I64.min, I64.max, -1, 0, 1]), (slots, n)), k=9)
    relu = np.maximum(rng.integers(-(2**30), 2**30, (slots, n)), 0) << rng.integers(
        0, 8, (slots, n)
    )
    add("relu scores", relu, k=min(600, n))
    add("largest n", rng.integers(-(2**45), 2**45, (slots, nmax)), k=nmax // 4)
    odd = int(rng.integers(1, 200))
    add(
        "n not a multiple of W",
        rng.integers(-1000, 1000, (slots, odd)),
        k=int(rng.integers(1, odd + 1)),
    )
    add("split passes (add)", rng.integers(-(2**40), 2**40, (slots, n)), k=50, split=True)
    for _ in range(6):
        m = int(rng.integers(1, nmax + 1))
        spread = int(rng.choice([4, 2**10, 2**30, 2**55]))
        add(
            "random shape", rng.integers(-spread, spread, (slots, m)), k=int(rng.integers(1, m + 1))
        )
    add(
        "bitmap",
        rng.integers(-(2**40), 2**40, (slots, n)),
        bitmap=True,
        delta=rng.integers(0, 2**32, slots),
    )
    add(
        "bitmap ties",
        rng.integers(-5, 5, (slots, 77)),
        bitmap=True,
        delta=np.array([0, 3] * slots)[:slots],
    )
    add(
        "bitmap keep all",
        rng.integers(-100, 100, (slots, 65)),
        bitmap=True,
        delta=np.full(slots, 2**32 - 1),
    )
    return cases


class Bench:
    def __init__(self, dut, seed: int) -> None:
        self.dut = dut
        self.rng = random.Random(seed)
        self.items: list[int] = []
        self.slots = len(dut.in_mask)
        self.idle_p = float(os.environ.get("HM_IDLE", "0.2"))
        self.stall_p = float(os.environ.get("HM_STALL", "0.3"))

    async def start(self) -> None:
        dut = self.dut
        cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
        for sig in ("rst", "clear", "in_valid", "cmd_valid", "flush", "out_ready"):
            getattr(dut, sig).value = 0
        dut.rst.value = 1
        for _ in range(3):
            await RisingEdge(dut.clk)
        dut.rst.value = 0
        cocotb.start_soon(self._collect())

    async def _collect(self) -> None:
        dut = self.dut
        while True:
            await FallingEdge(dut.clk)
            ready = self.rng.random() >= self.stall_p
            dut.out_ready.value = int(ready)
            await RisingEdge(dut.clk)
            if ready and int(dut.out_valid.value):
                data = int(dut.out_data.value)
                for i in range(int(dut.out_items.value)):
                    self.items.append((data >> (32 * i)) & 0xFFFFFFFF)

    async def stream(self, scores: np.ndarray, op: int, final: int) -> None:
        """One pass: score rows into every slot (scores [slots, n])."""
        dut = self.dut
        await FallingEdge(dut.clk)
        dut.clear.value = 1
        await FallingEdge(dut.clk)
        dut.clear.value = 0
        slots, n = scores.shape
        dut.in_op.value = op
        dut.in_final.value = final
        dut.in_mask.value = (1 << slots) - 1
        u = scores.astype(np.uint64)
        for i in range(n):
            while self.rng.random() < self.idle_p:
                dut.in_valid.value = 0
                await FallingEdge(dut.clk)
            dut.in_valid.value = 1
            dut.in_idx.value = i
            dut.in_scores.value = sum(int(u[s, i]) << (64 * s) for s in range(slots))
            await FallingEdge(dut.clk)
        dut.in_valid.value = 0

    async def select(self, slot: int, n: int, k: int, bitmap: bool, delta: int) -> None:
        dut = self.dut
        await FallingEdge(dut.clk)
        while not int(dut.cmd_ready.value):
            await FallingEdge(dut.clk)
        dut.cmd_valid.value = 1
        dut.cmd_slot.value = slot
        dut.cmd_n.value = n
        dut.cmd_nout.value = n
        dut.cmd_k.value = k
        dut.cmd_bitmap.value = int(bitmap)
        dut.cmd_delta.value = delta
        await FallingEdge(dut.clk)
        dut.cmd_valid.value = 0
        while True:
            await RisingEdge(dut.clk)
            if int(dut.cmd_done.value):
                return

    async def flush(self) -> list[int]:
        dut = self.dut
        await FallingEdge(dut.clk)
        dut.flush.value = 1
        while True:
            await RisingEdge(dut.clk)
            if int(dut.idle.value):
                break
        await FallingEdge(dut.clk)
        dut.flush.value = 0
        items, self.items = self.items, []
        return items


@cocotb.test()
async def selections_match_golden(dut):
    seed = int(os.environ.get("HM_SEED", "1"))
    rng = np.random.default_rng(seed)
    tb = Bench(dut, seed)
    await tb.start()
    nmax = 2 ** len(dut.in_idx)
    failures = []
    for case in score_cases(rng, nmax, tb.slots):
        scores = case["scores"]
        n = scores.shape[1]
        if case["split"]:  # two partial passes added: the stored scores are their sum
            first = rng.integers(-(2**40), 2**40, scores.shape)
            await tb.stream(first, op=0, final=0)
            await tb.stream(scores - first, op=1, final=1)
        else:
            await tb.stream(scores, op=0, final=1)
        for s in range(tb.slots):
            if case["bitmap"]:
                await tb.select(s, n, 0, True, int(case["delta"][s]))
            else:
                await tb.select(s, n, case["k"], False, 0)
        got = np.array(await tb.flush(), dtype=np.uint32)
        if case["bitmap"]:
            thr = scores.max(axis=1) - case["delta"].astype(np.int64)
            want = threshold_bitmap(scores, thr).reshape(-1)
        else:
            want = topk(scores, case["k"]).reshape(-1)
        if got.shape != want.shape or not np.array_equal(got, want):
            failures.append(
                f"{case['name']} (n={n}, k={case['k']}): got {got[:12]}..., want {want[:12]}..."
            )
            dut._log.error(failures[-1])
        else:
            dut._log.info("ok: %s (n=%d)", case["name"], n)
    assert not failures, failures
