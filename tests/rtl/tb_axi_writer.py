"""cocotb bench of hm_axi_writer: calls of random beat counts (the last beat partial: 1..16
uint32 items) from a stream source with idle insertion, written into a cocotbext-axi AXI RAM
with backpressure on AW, W and B; the RAM must hold exactly the items from `addr` (bytes past
the last item untouched), every burst at most MAX_BURST beats and inside one 4 KB page, and
`idle` only once every write is acknowledged. Calls run back to back without reset."""

from __future__ import annotations

import os
import random

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge, RisingEdge
from cocotbext.axi import AxiRamWrite, AxiStreamFrame, AxiStreamSource, AxiWriteBus
from streams import StreamBus, params, pauses, quiet

MEM = 1 << 18
SENTINEL = 0xA5


@cocotb.test(timeout_time=20, timeout_unit="ms")
async def writes_match_items(dut):
    max_burst = params(DEPTH=32, MAX_BURST=16)["MAX_BURST"]
    rng = random.Random(int(os.environ.get("HM_SEED", "1")))
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.rst.value = 1
    dut.start.value = 0
    dut.last.value = 0
    ram = AxiRamWrite(AxiWriteBus.from_prefix(dut, "m"), dut.clk, dut.rst, size=MEM)
    src = AxiStreamSource(StreamBus(dut, "in", tuser="items"), dut.clk, dut.rst, byte_lanes=1)
    quiet(ram, src)
    await ClockCycles(dut.clk, 3)
    dut.rst.value = 0

    bursts: list[tuple[int, int]] = []

    async def watch():
        while True:
            await RisingEdge(dut.clk)
            if int(dut.m_awvalid.value) and int(dut.m_awready.value):
                bursts.append((int(dut.m_awaddr.value), int(dut.m_awlen.value) + 1))

    cocotb.start_soon(watch())
    for c in range(int(os.environ.get("HM_CALLS", "25"))):
        p_in, p_aw, p_w, p_b = rng.choice(
            [(0, 0, 0, 0), (0.4, 0, 0, 0), (0, 0.3, 0.3, 0.3), (0.3, 0.3, 0.3, 0.3)]
        )
        src.set_pause_generator(pauses(rng, p_in))
        ram.aw_channel.set_pause_generator(pauses(rng, p_aw))
        ram.w_channel.set_pause_generator(pauses(rng, p_w))
        ram.b_channel.set_pause_generator(pauses(rng, p_b))
        nbeats = rng.choice([1, max_burst, max_burst + 1, rng.randint(1, 150)])
        last_items = rng.randint(1, 16)
        addr = rng.randrange(0, MEM - 64 * (nbeats + 2), 64)
        ram.write(0, bytes([SENTINEL]) * MEM)
        items = [rng.getrandbits(32) for _ in range(16 * (nbeats - 1) + last_items)]
        data = [
            sum(v << (32 * j) for j, v in enumerate(items[16 * b : 16 * b + 16]))
            for b in range(nbeats)
        ]
        counts = [16] * (nbeats - 1) + [last_items]
        bursts.clear()
        await FallingEdge(dut.clk)
        dut.addr.value = addr
        dut.start.value = 1
        await FallingEdge(dut.clk)
        dut.start.value = 0
        await src.send(AxiStreamFrame(data, tuser=counts))
        await src.wait()
        await FallingEdge(dut.clk)
        dut.last.value = 1
        label = f"call {c}: {nbeats} beats at {addr:#x}"
        for _ in range(5000):
            await FallingEdge(dut.clk)
            if int(dut.idle.value):
                break
        assert int(dut.idle.value), f"{label}: never idle"
        dut.last.value = 0
        assert int(dut.berr.value) == 0, label
        want = b"".join(v.to_bytes(4, "little") for v in items)
        assert ram.read(addr, len(want)) == want, label
        tail = ram.read(addr + len(want), 128)
        assert tail == bytes([SENTINEL]) * 128, f"{label}: bytes past the last item written"
        assert ram.read(addr - 64, 64) == bytes([SENTINEL]) * 64 if addr else True, label
        assert sum(n for _, n in bursts) == nbeats, label
        nxt = addr
        for a, n in bursts:
            assert a == nxt, f"{label}: burst at {a:#x}, expected {nxt:#x}"
            assert 1 <= n <= max_burst, f"{label}: burst of {n}"
            assert a // 4096 == (a + 64 * n - 1) // 4096, f"{label}: burst crosses 4 KB"
            nxt = a + 64 * n
