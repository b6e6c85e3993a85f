"""cocotb bench of hm_score_mem: stream rows (one score per slot, a random slot mask) written,
then summed and maxed into (the read-modify-write of split passes, the same row back to back
included), with idle cycles between rows; each stored row's up_* against the model one cycle
later, then every word of every slot read back (W scores in row order) against the model."""

from __future__ import annotations

import os
import random

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge
from streams import params

M64 = 2**64 - 1


def signed(v: int) -> int:
    v &= M64
    return v - 2**64 if v >> 63 else v


@cocotb.test(timeout_time=20, timeout_unit="ms")
async def stores_match_model(dut):
    p = params(SLOTS=1, NMAX=1024, W=64)
    slots, nmax, w = p["SLOTS"], p["NMAX"], p["W"]
    rng = random.Random(int(os.environ.get("HM_SEED", "1")))
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.in_valid.value = 0
    dut.rslot.value = 0
    dut.raddr.value = 0
    await ClockCycles(dut.clk, 2)

    mem: dict[tuple[int, int], int] = {}
    pending: list = []  # (mask, expected values per slot, final) of the row written last cycle
    errors: list[str] = []

    def score() -> int:
        return signed(rng.getrandbits(rng.choice([8, 40, 62, 64])))

    def check_up() -> None:
        if not pending:
            if int(dut.up_valid.value):
                errors.append("up_valid without a row")
            return
        mask, want, final, what = pending.pop()
        vals = int(dut.up_vals.value)
        if not int(dut.up_valid.value) or int(dut.up_mask.value) != mask:
            errors.append(f"{what}: up_valid/up_mask")
        if int(dut.up_final.value) != final:
            errors.append(f"{what}: up_final")
        for s, v in want.items():
            if signed(vals >> (64 * s)) != v:
                errors.append(f"{what}: slot {s} up_val")

    async def row(idx: int, op: int, mask: int, gap: float) -> None:
        while rng.random() < gap:
            dut.in_valid.value = 0
            await FallingEdge(dut.clk)
            check_up()
        new = [score() for _ in range(slots)]
        want = {}
        for s in range(slots):
            if mask >> s & 1:
                old = mem.get((s, idx))
                if op != 0 and old is None:
                    raise AssertionError("bench: add/max into a row never written")
                v = new[s] if op == 0 else signed(old + new[s]) if op == 1 else max(old, new[s])
                mem[(s, idx)] = v
                want[s] = v
        dut.in_valid.value = 1
        dut.in_idx.value = idx
        dut.in_mask.value = mask
        dut.in_scores.value = sum((v & M64) << (64 * s) for s, v in enumerate(new))
        dut.in_op.value = op
        final = int(op != 0 and rng.random() < 0.5)
        dut.in_final.value = final
        pending.append((mask, want, final, f"row {idx} op {op}"))
        await FallingEdge(dut.clk)
        check_up()  # this row, one cycle later

    full = (1 << slots) - 1
    for call in range(int(os.environ.get("HM_CALLS", "3"))):
        n = [nmax, rng.randint(1, nmax)][call % 2] if call < 2 else rng.randint(2 * w, nmax)
        gap = rng.choice([0.0, 0.25])
        await FallingEdge(dut.clk)
        # pass 1: every row written for every slot (a split pass's first head chunk)
        for i in range(n):
            await row(i, 0, full, gap)
        # passes 2-3: sums and maxima into random slot subsets, rows in order (some repeated
        # back to back: the second must see the first's write)
        for op in (1, 2):
            i = 0
            while i < n:
                await row(i, op, rng.getrandbits(slots) or 1, gap)
                i += 0 if rng.random() < 0.1 else 1
        dut.in_valid.value = 0
        await FallingEdge(dut.clk)
        check_up()
        assert not errors, f"call {call}: {len(errors)} errors, first {errors[0]}"
        # read side: word a of slot s holds rows a * W .. a * W + W - 1
        words = (n + w - 1) // w
        order = [(s, a) for s in range(slots) for a in range(words)]
        rng.shuffle(order)
        for s, a in order:
            dut.rslot.value = s
            dut.raddr.value = a
            await FallingEdge(dut.clk)
            word = int(dut.rword.value)
            for j in range(w):
                i = a * w + j
                if i < n and signed(word >> (64 * j)) != mem[(s, i)]:
                    errors.append(f"call {call}: slot {s} row {i} read back")
        assert not errors, f"{len(errors)} errors, first {errors[0]}"
        mem.clear()
