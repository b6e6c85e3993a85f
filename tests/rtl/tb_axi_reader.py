"""cocotb bench of hm_axi_reader: streams of random byte ranges (any start, 1 to hundreds of
beats, across 4 KB pages) read from a cocotbext-axi AXI RAM with idle insertion on AR and R,
taken by a stream sink with backpressure; the beats must be the RAM's, in order, every burst
at most MAX_BURST beats and inside one 4 KB page, never more beats in flight than the FIFO
holds, and `busy` low at the end. Streams run back to back without reset."""

from __future__ import annotations

import os
import random

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge, RisingEdge
from cocotbext.axi import AxiRamRead, AxiReadBus, AxiStreamSink
from streams import StreamBus, params, pauses, quiet

MEM = 1 << 20


@cocotb.test(timeout_time=20, timeout_unit="ms")
async def streams_match_ram(dut):
    p = params(DEPTH=128, MAX_BURST=64)
    depth, max_burst = p["DEPTH"], p["MAX_BURST"]
    rng = random.Random(int(os.environ.get("HM_SEED", "1")))
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.rst.value = 1
    dut.start.value = 0
    ram = AxiRamRead(AxiReadBus.from_prefix(dut, "m"), dut.clk, dut.rst, size=MEM)
    sink = AxiStreamSink(StreamBus(dut, "out"), dut.clk, dut.rst, byte_lanes=64)
    quiet(ram, sink)
    ram.write(0, bytes(rng.getrandbits(8) for _ in range(MEM)))
    await ClockCycles(dut.clk, 3)
    dut.rst.value = 0

    bursts: list[tuple[int, int]] = []
    state = {"inflight": 0, "sunk": 0, "max": 0}

    async def watch():
        while True:
            await RisingEdge(dut.clk)
            if int(dut.m_arvalid.value) and int(dut.m_arready.value):
                bursts.append((int(dut.m_araddr.value), int(dut.m_arlen.value) + 1))
                state["inflight"] += int(dut.m_arlen.value) + 1
            if int(dut.m_rvalid.value) and int(dut.m_rready.value):
                state["inflight"] -= 1
            state["max"] = max(state["max"], state["inflight"])

    cocotb.start_soon(watch())
    for s in range(int(os.environ.get("HM_STREAMS", "25"))):
        p_ar, p_r, p_out = rng.choice([(0, 0, 0), (0.3, 0.3, 0), (0, 0, 0.6), (0.3, 0.3, 0.3)])
        ram.ar_channel.set_pause_generator(pauses(rng, p_ar))
        ram.r_channel.set_pause_generator(pauses(rng, p_r))
        sink.set_pause_generator(pauses(rng, p_out))
        beats = rng.choice([1, 2, max_burst, max_burst + 1, rng.randint(1, 300)])
        addr = rng.randrange(0, MEM - 64 * (beats + 1))
        bursts.clear()
        await FallingEdge(dut.clk)
        dut.addr.value = addr
        dut.beats.value = beats
        dut.start.value = 1
        await FallingEdge(dut.clk)
        dut.start.value = 0
        base = addr & ~63
        want = ram.read(base, 64 * beats)
        got = bytearray()
        while len(got) < len(want):
            got += (await sink.recv()).tdata
        label = f"stream {s}: {beats} beats from {addr:#x}"
        assert bytes(got) == want, label
        await ClockCycles(dut.clk, 3)
        assert int(dut.busy.value) == 0 and int(dut.out_valid.value) == 0, label
        assert int(dut.rerr.value) == 0, label
        assert sum(n for _, n in bursts) == beats, label
        nxt = base
        for a, n in bursts:
            assert a == nxt, f"{label}: burst at {a:#x}, expected {nxt:#x}"
            assert 1 <= n <= max_burst, f"{label}: burst of {n}"
            assert a // 4096 == (a + 64 * n - 1) // 4096, f"{label}: burst crosses 4 KB"
            nxt = a + 64 * n
        assert state["max"] <= depth, f"{label}: {state['max']} beats in flight > {depth}"
