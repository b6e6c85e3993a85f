"""cocotb bench of hm_index_packer: random masks of selected candidates (kind 0) and ready
bitmap words (kind 1), with idle cycles between inputs, packed into beats of 16 uint32 taken by
a cocotbext-axi stream sink with backpressure; the item stream (and each beat's item count)
must equal the model's, the partial last beat coming out on `flush`. Calls run back to back
without reset."""

from __future__ import annotations

import os
import random

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge, RisingEdge
from cocotbext.axi import AxiStreamSink
from streams import StreamBus, params, pauses, quiet


def make_input(rng: random.Random, w: int, base: int) -> dict:
    if rng.random() < 0.25:
        n = rng.randint(0, 16)
        return {"kind": 1, "words": [rng.getrandbits(32) for _ in range(n)], "mask": 0, "base": 0}
    style = rng.random()
    if style < 0.15:
        mask = 0
    elif style < 0.3:
        mask = (1 << w) - 1  # all selected: four beats' worth from one input at W = 64
    elif style < 0.5:
        mask = 1 << rng.randrange(w)
    else:
        mask = rng.getrandbits(w) & rng.getrandbits(w)
    return {"kind": 0, "mask": mask, "base": base, "words": []}


def items_of(inp: dict, w: int) -> list[int]:
    if inp["kind"]:
        return list(inp["words"])
    return [(inp["base"] + i) & 0xFFFFFFFF for i in range(w) if inp["mask"] >> i & 1]


@cocotb.test(timeout_time=20, timeout_unit="ms")
async def packing_matches_model(dut):
    w = params(W=64)["W"]
    rng = random.Random(int(os.environ.get("HM_SEED", "1")))
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.rst.value = 1
    dut.in_valid.value = 0
    dut.flush.value = 0
    sink = AxiStreamSink(StreamBus(dut, "out", tuser="items"), dut.clk, dut.rst, byte_lanes=1)
    quiet(sink)
    await ClockCycles(dut.clk, 3)
    dut.rst.value = 0

    beats: list[tuple[int, int]] = []

    async def collect():
        while True:
            frame = await sink.recv(compact=False)
            beats.extend(zip(frame.tdata, frame.tuser, strict=True))

    cocotb.start_soon(collect())
    for call in range(int(os.environ.get("HM_CALLS", "30"))):
        p_in, p_out = rng.choice([(0.0, 0.0), (0.4, 0.0), (0.0, 0.5), (0.3, 0.3)])
        sink.set_pause_generator(pauses(rng, p_out))
        beats.clear()
        want: list[int] = []
        base = rng.getrandbits(32) if call % 4 == 3 else rng.randrange(0, 1 << 16, w)
        for _ in range(rng.randint(1, 25)):
            inp = make_input(rng, w, base)
            base = (base + w) & 0xFFFFFFFF
            want += items_of(inp, w)
            while rng.random() < p_in:
                await FallingEdge(dut.clk)
                dut.in_valid.value = 0
            await FallingEdge(dut.clk)
            dut.in_valid.value = 1
            dut.in_kind.value = inp["kind"]
            dut.in_mask.value = inp["mask"]
            dut.in_base.value = inp["base"]
            words = sum(v << (32 * j) for j, v in enumerate(inp["words"]))
            dut.in_words.value = words  # words past in_nwords zero (as the engine gives them)
            dut.in_nwords.value = len(inp["words"])
            while True:
                await RisingEdge(dut.clk)
                if int(dut.in_ready.value):
                    break
        await FallingEdge(dut.clk)
        dut.in_valid.value = 0
        dut.flush.value = 1
        for _ in range(200):
            await FallingEdge(dut.clk)
            if int(dut.idle.value):
                break
        dut.flush.value = 0
        assert int(dut.idle.value), f"call {call}: not idle after flush"
        await ClockCycles(dut.clk, 4)
        got: list[int] = []
        for i, (data, n) in enumerate(beats):
            assert 1 <= n <= 16, f"call {call}: beat {i} has {n} items"
            assert n == 16 or i == len(beats) - 1, f"call {call}: partial beat {i} not last"
            got += [(data >> (32 * j)) & 0xFFFFFFFF for j in range(n)]
        first = next(
            (j for j, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
            min(len(got), len(want)),
        )
        assert got == want, (
            f"call {call}: {len(got)} items for {len(want)}, first differ at {first}"
        )
