"""cocotb bench of hm_row_aligner: streams of packed rows (any width 1..300 bytes, any start
byte) in 512-bit beats from a cocotbext-axi stream source with idle insertion, chunks out to a
sink with backpressure; every row must come out as ceil(bytes / 64) row-aligned chunks (byte 0
at bit 0, the tail zero) with first/last marks, and `done` after the last row. Streams run
back to back without reset."""

from __future__ import annotations

import os
import random

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge, RisingEdge
from cocotbext.axi import AxiStreamFrame, AxiStreamSink, AxiStreamSource
from streams import StreamBus, pauses, quiet


def expected_chunks(data: bytes, row_bytes: int, rows: int) -> list[tuple[int, int, int]]:
    """(chunk, first, last) of every row of `data` (which starts at the first row)."""
    out = []
    for r in range(rows):
        row = data[r * row_bytes : (r + 1) * row_bytes]
        parts = [row[i : i + 64] for i in range(0, row_bytes, 64)]
        for j, part in enumerate(parts):
            out.append((int.from_bytes(part, "little"), int(j == 0), int(j == len(parts) - 1)))
    return out


@cocotb.test(timeout_time=20, timeout_unit="ms")
async def rows_match_model(dut):
    rng = random.Random(int(os.environ.get("HM_SEED", "1")))
    cocotb.start_soon(Clock(dut.clk, 10, unit="ns").start())
    dut.rst.value = 1
    dut.start.value = 0
    src = AxiStreamSource(StreamBus(dut, "in"), dut.clk, dut.rst, byte_lanes=64)
    sink = AxiStreamSink(
        StreamBus(dut, "out", tlast="last", tuser="first"), dut.clk, dut.rst, byte_lanes=1
    )
    quiet(src, sink)
    await ClockCycles(dut.clk, 3)
    dut.rst.value = 0

    widths = [1, 3, 63, 64, 65, 127, 128, 129, 192, 300]
    streams = int(os.environ.get("HM_STREAMS", "40"))
    for s in range(streams):
        row_bytes = widths[s] if s < len(widths) else rng.randint(1, 300)
        skip = rng.randint(0, 63) if s % 3 else 0
        rows = rng.randint(1, 40)
        p_in, p_out = rng.choice([(0.0, 0.0), (0.3, 0.0), (0.0, 0.4), (0.3, 0.3)])
        src.set_pause_generator(pauses(rng, p_in))
        sink.set_pause_generator(pauses(rng, p_out))
        payload = bytes(rng.getrandbits(8) for _ in range(row_bytes * rows))
        # the beats: `skip` bytes of junk, the rows, junk to the end of the last beat (and one
        # more beat of junk, which the aligner must not need)
        raw = bytes(rng.getrandbits(8) for _ in range(skip)) + payload
        raw += bytes(rng.getrandbits(8) for _ in range((-len(raw)) % 64))
        await FallingEdge(dut.clk)
        dut.skip.value = skip
        dut.row_bytes.value = row_bytes
        dut.rows.value = rows
        dut.start.value = 1
        await FallingEdge(dut.clk)
        dut.start.value = 0
        await src.send(AxiStreamFrame(raw))
        want = expected_chunks(payload, row_bytes, rows)
        got = []
        while len(got) < len(want):
            frame = await sink.recv(
                compact=False
            )  # one frame per row (tlast = the row's last chunk)
            for i, chunk in enumerate(frame.tdata):
                got.append((chunk, frame.tuser[i], int(i == len(frame.tdata) - 1)))
        label = f"stream {s}: {rows} rows of {row_bytes} B from byte {skip}"
        assert len(got) == len(want), label
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert g == w, f"{label}: chunk {i} differs"
        await src.wait()
        for _ in range(2):
            await RisingEdge(dut.clk)
        assert int(dut.done.value) == 1, label
        assert int(dut.out_valid.value) == 0, label
        # a reset between streams is not needed: the next start drops any held beats
