"""cocotb bench of hm_lane: random rows of 1-4 chunks, int8 dot and Quest bound chunks, with
random idle cycles between chunks; each row's result against numpy."""

from __future__ import annotations

import os
import random

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import FallingEdge, RisingEdge


def pack(values: np.ndarray) -> int:
    """A little-endian byte array as the integer a 512-bit port carries."""
    return int.from_bytes(np.ascontiguousarray(values).tobytes(), "little")


def expected_row(quest: bool, chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> int:
    total = 0
    for a, b, q in chunks:
        if quest:
            qq = q[:32].astype(np.int64)
            total += int(np.where(qq < 0, qq * a.astype(np.int64), qq * b.astype(np.int64)).sum())
        else:
            total += int((q.astype(np.int64) * a.astype(np.int64)).sum())
    return total


@cocotb.test()
async def random_rows(dut):
    rng = np.random.default_rng(int(os.environ.get("HM_SEED", "1")))
    pyrng = random.Random(int(os.environ.get("HM_SEED", "1")))
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.rst.value = 1
    dut.in_valid.value = 0
    dut.quest.value = 0
    for _ in range(3):
        await RisingEdge(dut.clk)
    dut.rst.value = 0

    results: list[int] = []

    async def monitor():
        while True:
            await RisingEdge(dut.clk)
            if int(dut.out_valid.value):
                results.append(dut.out_dot.value.to_signed())

    cocotb.start_soon(monitor())

    want: list[int] = []
    for row in range(int(os.environ.get("HM_ROWS", "200"))):
        quest = row % 3 == 2
        nchunks = pyrng.randint(1, 4)
        chunks = []
        for _ in range(nchunks):
            if quest:
                a = rng.integers(-32767, 32768, 32, dtype=np.int16)
                b = rng.integers(-32767, 32768, 32, dtype=np.int16)
                # a zero, and the extremes, show up often
                q = rng.choice(np.array([-128, -127, -1, 0, 1, 127], dtype=np.int8), 64)
                if pyrng.random() < 0.5:
                    q = rng.integers(-128, 128, 64, dtype=np.int8)
            else:
                a = rng.integers(-128, 128, 64, dtype=np.int8)
                b = np.zeros(32, dtype=np.int16)
                q = rng.integers(-128, 128, 64, dtype=np.int8)
            chunks.append((a, b, q))
        want.append(expected_row(quest, chunks))
        if quest:
            await FallingEdge(dut.clk)
            dut.quest.value = 1
        else:
            await FallingEdge(dut.clk)
            dut.quest.value = 0
        for i, (a, b, q) in enumerate(chunks):
            while pyrng.random() < 0.3:  # idle cycles
                dut.in_valid.value = 0
                await FallingEdge(dut.clk)
            dut.in_valid.value = 1
            dut.in_first.value = int(i == 0)
            dut.in_last.value = int(i == nchunks - 1)
            dut.in_a.value = pack(a)
            dut.in_b.value = pack(b)
            dut.in_q.value = pack(q)
            await FallingEdge(dut.clk)
        dut.in_valid.value = 0
        # the lane's mode is a per-call setting: let the row finish before it changes
        for _ in range(3):
            await FallingEdge(dut.clk)
    for _ in range(4):
        await RisingEdge(dut.clk)
    assert len(results) == len(want), f"{len(results)} results for {len(want)} rows"
    assert results == want, f"{sum(r != w for r, w in zip(results, want, strict=True))} rows differ"
