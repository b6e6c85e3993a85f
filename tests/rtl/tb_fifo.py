"""cocotb bench of hm_fifo: random words through a cocotbext-axi stream source and sink with
idle insertion and backpressure; every cycle `count`, `in_ready` (full) and `out_valid`
(empty) against a model of the occupancy; order and data end to end; `clear` empties it."""

from __future__ import annotations

import os
import random

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge, RisingEdge
from cocotbext.axi import AxiStreamFrame, AxiStreamSink, AxiStreamSource
from streams import StreamBus, params, pauses, quiet


@cocotb.test(timeout_time=20, timeout_unit="ms")
async def stream_matches_model(dut):
    seed = int(os.environ.get("HM_SEED", "1"))
    rng = random.Random(seed)
    p = params(WIDTH=512, DEPTH=64)
    width, depth = p["WIDTH"], p["DEPTH"]
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.rst.value = 1
    dut.clear.value = 0
    src = AxiStreamSource(StreamBus(dut, "in"), dut.clk, dut.rst, byte_lanes=1)
    sink = AxiStreamSink(StreamBus(dut, "out"), dut.clk, dut.rst, byte_lanes=1)
    quiet(src, sink)
    await ClockCycles(dut.clk, 3)
    dut.rst.value = 0

    state = {"occ": 0, "bad": []}

    async def checker():
        while True:
            await RisingEdge(dut.clk)
            occ = state["occ"]
            count = int(dut.count.value)
            in_ready, out_valid = int(dut.in_ready.value), int(dut.out_valid.value)
            if (count, in_ready, out_valid) != (occ, int(occ != depth), int(occ != 0)):
                state["bad"].append((occ, count, in_ready, out_valid))
            push = int(dut.in_valid.value) and in_ready
            pop = out_valid and int(dut.out_ready.value)
            state["occ"] = occ + push - pop

    cocotb.start_soon(checker())
    words = [rng.getrandbits(width) for _ in range(int(os.environ.get("HM_WORDS", "600")))]
    # phases: free flow, a slow reader (the FIFO fills), a slow writer (it drains)
    phases = [(0.0, 0.0), (0.1, 0.7), (0.7, 0.1), (0.3, 0.3)]
    got: list[int] = []
    per = len(words) // len(phases)
    for i, (p_in, p_out) in enumerate(phases):
        src.set_pause_generator(pauses(rng, p_in))
        sink.set_pause_generator(pauses(rng, p_out))
        chunk = words[i * per : (i + 1) * per]
        for w in chunk:
            await src.send(AxiStreamFrame([w]))
        while len(got) < (i + 1) * per:
            got.append((await sink.recv()).tdata[0])
    assert got == words[: len(got)], "words out of order or corrupted"
    assert not state["bad"], f"{len(state['bad'])} cycles differ, first {state['bad'][0]}"

    # clear: fill some words, stop reading, clear, nothing is left
    sink.clear_pause_generator()
    sink.pause = True
    src.clear_pause_generator()
    src.pause = False
    for w in words[: depth // 2 + 1]:
        await src.send(AxiStreamFrame([w]))
    await src.wait()
    await ClockCycles(dut.clk, 2)
    assert int(dut.count.value) == depth // 2 + 1
    await FallingEdge(dut.clk)
    dut.clear.value = 1
    await FallingEdge(dut.clk)
    dut.clear.value = 0
    state["occ"] = 0
    await FallingEdge(dut.clk)
    assert int(dut.count.value) == 0 and int(dut.out_valid.value) == 0
    assert not state["bad"], f"after clear: {state['bad'][0]}"
