"""cocotb bench of hm_histogram: batches of random 64-bit scores (all magnitudes, both signs,
the int64 extremes, repeats) with idle cycles between them; after each batch every fine bin
count, every coarse count, the maximum and `sany` against a model of the 12-bit key; `clear`
forgets a batch in one cycle. The key itself is checked monotone in the score."""

from __future__ import annotations

import os
import random
from collections import Counter

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge
from streams import params

I64_MIN, I64_MAX = -(2**63), 2**63 - 1


def bin_key(s: int) -> int:
    """{s >= 0, bit length e of |s| (|s| as ~s when negative), 5 bits after the leading one},
    complemented for negative scores."""
    x = s if s >= 0 else ~s  # ~s = -s - 1 >= 0
    e = x.bit_length()
    m = (x >> (e - 6)) if e > 5 else (x << (6 - e))
    em = (e << 5) | (m & 31)
    return (1 << 11) | em if s >= 0 else (~em) & 0x7FF


def random_score(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.05:
        return rng.choice([0, -1, 1, I64_MIN, I64_MAX, I64_MIN + 1, I64_MAX - 1])
    bits = rng.randint(0, 63)
    v = rng.getrandbits(bits) if bits else 0
    return -v - 1 if rng.random() < 0.5 else v


@cocotb.test(timeout_time=20, timeout_unit="ms")
async def counts_match_model(dut):
    nmax = params(NMAX=1024)["NMAX"]
    rng = random.Random(int(os.environ.get("HM_SEED", "1")))
    # the key is monotone: a larger score never gets a smaller bin
    sample = sorted(random_score(rng) for _ in range(4000))
    keys = [bin_key(s) for s in sample]
    assert keys == sorted(keys), "bin key not monotone"

    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.we.value = 0
    dut.clear.value = 1
    dut.hbin.value = 0
    dut.cgroup.value = 0
    await ClockCycles(dut.clk, 2)
    await FallingEdge(dut.clk)
    dut.clear.value = 0
    for batch in range(int(os.environ.get("HM_BATCHES", "4"))):
        n = [1, nmax][batch] if batch < 2 else rng.randint(1, nmax)
        pool = [random_score(rng) for _ in range(max(1, n // 8))]
        scores = [rng.choice(pool) if rng.random() < 0.3 else random_score(rng) for _ in range(n)]
        gap = rng.choice([0.0, 0.3])
        for s in scores:
            while rng.random() < gap:
                dut.we.value = 0
                await FallingEdge(dut.clk)
            dut.we.value = 1
            dut.wval.value = s & (2**64 - 1)
            await FallingEdge(dut.clk)
        dut.we.value = 0
        await FallingEdge(dut.clk)
        await FallingEdge(dut.clk)
        assert int(dut.busy.value) == 0
        fine = Counter(bin_key(s) for s in scores)
        label = f"batch {batch} ({n} scores)"
        assert int(dut.sany.value) == 1, label
        assert dut.smax.value.to_signed() == max(scores), label
        for g in range(64):
            dut.cgroup.value = g
            await FallingEdge(dut.clk)
            want = sum(fine[b] for b in range(64 * g, 64 * g + 64))
            assert int(dut.ccount.value) == want, f"{label}: coarse group {g}"
        # every bin: the address one cycle ahead of its count
        dut.hbin.value = 0
        await FallingEdge(dut.clk)
        for b in range(4096):
            assert int(dut.hcount.value) == fine[b], f"{label}: bin {b}"
            dut.hbin.value = (b + 1) % 4096
            await FallingEdge(dut.clk)
        dut.clear.value = 1
        await FallingEdge(dut.clk)
        dut.clear.value = 0
        await FallingEdge(dut.clk)
        assert int(dut.sany.value) == 0, f"{label}: sany after clear"
        dut.cgroup.value = bin_key(scores[0]) >> 6
        await FallingEdge(dut.clk)
        assert int(dut.ccount.value) == 0, f"{label}: coarse count after clear"
