"""cocotb bench of hm_axil_ctrl: a cocotbext-axi AXI4-Lite master (idle insertion and
backpressure on all five channels) writes every argument register of every kernel's map
(the spec's offsets, hm_regmap.vh) with random values and random byte strobes; each reads
back and lands on its engine field's output, an unmapped address reads 0 and changes nothing;
then ap_ctrl_hs: ap_start waits for engine_idle and starts the engine once, done sets ap_done
and ap_ready (cleared by the read of CTRL), the interrupt status per IER, the interrupt per
GIE, ISR toggles on write."""

from __future__ import annotations

import os
import random

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge, RisingEdge
from cocotbext.axi import AxiLiteBus, AxiLiteMaster
from streams import pauses, quiet

from hetmem import kernels
from hetmem.kernels import spec as kspec
from hetmem.kernels.engine import BUFFER_FIELDS, FIELD_IDS, FORMATS, KERNEL_IDS


@cocotb.test(timeout_time=20, timeout_unit="ms")
async def registers_and_handshake(dut):
    rng = random.Random(int(os.environ.get("HM_SEED", "1")))
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.rst.value = 1
    dut.engine_idle.value = 1
    dut.done.value = 0
    dut.kernel.value = 0
    axil = AxiLiteMaster(AxiLiteBus.from_prefix(dut, "s"), dut.clk, dut.rst)
    quiet(axil.write_if, axil.read_if)
    for ch, p in (
        (axil.write_if.aw_channel, 0.3),
        (axil.write_if.w_channel, 0.3),
        (axil.write_if.b_channel, 0.3),
        (axil.read_if.ar_channel, 0.3),
        (axil.read_if.r_channel, 0.3),
    ):
        ch.set_pause_generator(pauses(rng, p))
    await ClockCycles(dut.clk, 3)
    dut.rst.value = 0

    starts = {"n": 0}

    async def count_starts():
        while True:
            await RisingEdge(dut.clk)
            starts["n"] += int(dut.start.value)

    cocotb.start_soon(count_starts())

    async def rd(addr: int) -> int:
        return await axil.read_dword(addr)

    def outputs() -> tuple[int, int]:
        return int(dut.buffers.value), int(dut.scalars.value)

    for name, kid in KERNEL_IDS.items():
        await FallingEdge(dut.clk)
        dut.kernel.value = kid
        spec = kernels.get(name)
        regs = spec.registers()
        field_of = {arg: FIELD_IDS[f] for arg, f, _ in FORMATS[name]}
        want: dict[int, int] = {}  # field -> value
        for arg in rng.sample(list(spec.args), len(spec.args)):
            f = field_of[arg.name]
            bits = 64 if arg.is_buffer else 32
            value = rng.getrandbits(bits)
            if arg.is_buffer:
                await axil.write_dword(regs[arg.name] + 4, value >> 32)
                await axil.write_dword(regs[arg.name], value & 0xFFFFFFFF)
            else:
                await axil.write_dword(regs[arg.name], value)
            # a partial write: one random byte of the low word
            byte = rng.randrange(4)
            b = rng.getrandbits(8)
            await axil.write(regs[arg.name] + byte, bytes([b]))
            value = (value & ~(0xFF << (8 * byte))) | (b << (8 * byte))
            want[f] = value
        for arg in spec.args:
            f = field_of[arg.name]
            got = await rd(regs[arg.name])
            if arg.is_buffer:
                got |= (await rd(regs[arg.name] + 4)) << 32
            assert got == want[f], f"{name}.{arg.name} reads back {got:#x}, wrote {want[f]:#x}"
        bufs, scal = outputs()
        for f, v in want.items():
            out = (
                (bufs >> (64 * f)) & (2**64 - 1)
                if f < BUFFER_FIELDS
                else (scal >> (32 * (f - BUFFER_FIELDS))) & (2**32 - 1)
            )
            assert out == v, f"{name}: field {f} drives {out:#x}, wrote {v:#x}"
        # an address outside the map: reads 0, a write changes nothing
        used = {o + w for a in spec.args for o in [regs[a.name]] for w in (0, 4)}
        free = next(a for a in range(0xFFC, 0x10, -4) if a not in used)
        await axil.write_dword(free, 0xDEADBEEF)
        assert await rd(free) == 0, f"{name}: unmapped {free:#x}"
        assert outputs() == (bufs, scal), f"{name}: a write to {free:#x} changed an argument"

    # ap_ctrl_hs
    await axil.write_dword(kspec.GIE, 1)
    await axil.write_dword(kspec.IER, 3)
    assert await rd(kspec.IER) == 3 and await rd(kspec.GIE) == 1
    for call in range(4):
        busy = call % 2 == 1
        before = starts["n"]
        dut.engine_idle.value = 0 if busy else 1
        await axil.write_dword(kspec.CTRL, 1)
        ctrl = await rd(kspec.CTRL)
        if busy:
            assert ctrl & 1 and not ctrl & 4, f"call {call}: CTRL {ctrl:#x} while the engine runs"
            await ClockCycles(dut.clk, 5)
            assert starts["n"] == before, f"call {call}: started while the engine was busy"
            await FallingEdge(dut.clk)
            dut.engine_idle.value = 1
        await ClockCycles(dut.clk, 3)
        assert starts["n"] == before + 1, f"call {call}: {starts['n'] - before} starts"
        await FallingEdge(dut.clk)
        dut.engine_idle.value = 0
        assert int(dut.interrupt.value) == 0
        await ClockCycles(dut.clk, rng.randint(1, 20))
        await FallingEdge(dut.clk)
        dut.done.value = 1
        dut.engine_idle.value = 1
        await FallingEdge(dut.clk)
        dut.done.value = 0
        await FallingEdge(dut.clk)
        assert int(dut.interrupt.value) == 1, f"call {call}: no interrupt"
        assert await rd(kspec.ISR) == 3
        ctrl = await rd(kspec.CTRL)
        assert ctrl & 0b1110 == 0b1110, f"call {call}: CTRL {ctrl:#x} after done"
        ctrl = await rd(kspec.CTRL)
        assert ctrl & 0b1010 == 0, f"call {call}: ap_done / ap_ready not cleared on read"
        await axil.write_dword(kspec.ISR, 3)  # toggle on write: clears both
        assert await rd(kspec.ISR) == 0
        await FallingEdge(dut.clk)
        assert int(dut.interrupt.value) == 0, f"call {call}: interrupt after ISR cleared"
    # GIE off: status still set, no interrupt
    await axil.write_dword(kspec.GIE, 0)
    await FallingEdge(dut.clk)
    dut.done.value = 1
    await FallingEdge(dut.clk)
    dut.done.value = 0
    await FallingEdge(dut.clk)
    assert await rd(kspec.ISR) == 3 and int(dut.interrupt.value) == 0
