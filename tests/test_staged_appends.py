"""Staged appends: the rows a decode step appends ride on the launch's query write as whole
64-byte memory beats (`stage`, `staged`), and the kernel copies them into its memory before
the scan. The golden pre-phase (`spec.apply_stage`), its checks, its cycles, the targets
that run it, and a decode whose every layer and step after the first makes at most three
PCIe transactions whatever the batch, with the same answers as writing the rows range by
range, faults included."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from hetmem import kernels
from hetmem.attention import AttentionQuery, KVChunk
from hetmem.errors import AxiError, DeviceLost, FpgaTimeout, InputError
from hetmem.fpga import open_device, xrt_emu
from hetmem.fpga.emu import EmuDevice
from hetmem.fpga.pynq import open_pynq_emu
from hetmem.kernels import spec as kspec
from hetmem.methods import get
from hetmem.pipeline import Pipeline
from hetmem.synthetic import synthetic_kv

STAGING = [n for n in kernels.names() if kernels.get(n).staging]
HYBRID = "cpu/fpga/fpga/cpu"
METHODS = {
    "quest": lambda: get("quest", page_size=16),
    "seer": lambda: get("seer", block_size=16),
    "dsa": lambda: get("dsa"),
}
#: The card records of a select (a step that appends nothing new writes no memory rows).
CARD_STEPS = (
    "transfer memory -> fpga",
    "transfer query -> fpga",
    "relevancy+retrieval",
    "transfer selection -> gpu",
)


pytestmark = pytest.mark.usefixtures("no_xrt_faults")


def test_every_kernel_with_segments_takes_staged_beats_last():
    assert set(STAGING) == {n for n in kernels.names() if kernels.get(n).segmented}
    for name in STAGING:
        spec = kernels.get(name)
        assert [a.name for a in spec.args][-3:] == ["segs", "stage", "staged"]
        assert spec.scalar_defaults == {"staged": 0}
    assert not kernels.get("bm25").staging and kernels.get("bm25").scalar_defaults == {}


# -- the golden pre-phase -----------------------------------------------------------------------


def test_beats_of_covers_every_touched_beat_once():
    beats = kspec.beats_of([0, 10, 63, 200, 500], [1, 60, 2, 0, 300])
    want = sorted(
        {
            b
            for o, n in [(0, 1), (10, 60), (63, 2), (500, 300)]
            for b in range(o // 64, (o + n - 1) // 64 + 1)
        }
    )
    assert beats.tolist() == want
    assert kspec.beats_of([], []).size == 0


@pytest.mark.parametrize("nbytes", [64 * 40, 64 * 40 + 17])
def test_a_composed_stage_brings_the_card_up_to_the_mirror(nbytes):
    """Rows of any width changed anywhere in a mirror: the whole beats they touch, copied
    from the mirror, make the card's bytes equal the mirror's (also where a beat holds rows
    that did not change, and on a partial last beat)."""
    rng = np.random.default_rng(nbytes)
    for row in (1, 3, 16, 48, 64, 100):
        mirror = [rng.integers(0, 256, nbytes, dtype=np.uint8) for _ in range(2)]
        card = [m.copy() for m in mirror]
        offsets, sizes = [], []
        for p in range(2):
            rows = nbytes // row
            changed = rng.choice(rows, size=min(rows, 5), replace=False)
            mirror[p].reshape(-1)[: rows * row].reshape(rows, row)[changed] = rng.integers(
                0, 256, (changed.size, row), dtype=np.uint8
            )
            offsets.append(changed * row)
            sizes.append(np.full(changed.size, row))
        if nbytes % 64:  # the partial last beat changes too
            mirror[1][-1] ^= 0xFF
            offsets[1] = np.append(offsets[1], nbytes - 1)
            sizes[1] = np.append(sizes[1], 1)
        beats = [kspec.beats_of(o, s) for o, s in zip(offsets, sizes, strict=True)]
        stage = kspec.compose_stage(mirror, beats)
        assert stage.dtype == np.uint32 and stage.shape == (sum(b.size for b in beats), 17)
        assert not (card[0] == mirror[0]).all()
        kspec.apply_stage(card, stage, stage.shape[0])
        for got, want in zip(card, mirror, strict=True):
            np.testing.assert_array_equal(got, want)


def test_a_repeated_beat_takes_the_last_and_staged_counts_the_beats_used():
    memory = [np.zeros(256, np.uint8), np.zeros(256, np.uint8)]
    stage = np.zeros((4, 17), np.uint32)
    stage[:, 0] = [2, 2 | kspec.STAGE_PORT_B, 2, 3]
    stage[:, 1:] = np.arange(4)[:, None] + 1
    kspec.apply_stage(memory, stage, 3)  # the fourth beat is not staged
    assert (memory[0][128:192].view(np.uint32) == 3).all()  # the later beat of index 2
    assert (memory[1][128:192].view(np.uint32) == 2).all()
    assert not memory[0][192:].any() and not memory[0][:128].any()


@pytest.mark.parametrize(
    ("word0", "match"),
    [
        (4, "holds 4 beats"),
        (kspec.STAGE_PORT_B | 4, "holds 4 beats"),
        (kspec.STAGE_PORT_B | 9, "port b"),
    ],
)
def test_a_beat_outside_its_buffer_is_refused_and_changes_nothing(word0, match):
    memory = [np.zeros(256, np.uint8), np.zeros(250, np.uint8)]
    stage = np.ones((2, 17), np.uint32)
    stage[0, 0], stage[1, 0] = 0, word0  # the first beat is fine, the second is not
    with pytest.raises(InputError, match=match) as err:
        kspec.apply_stage(memory, stage, 2)
    assert err.value.argument == "stage"
    assert not memory[0].any() and not memory[1].any()
    with pytest.raises(InputError) as err:
        kspec.apply_stage(memory, stage, 3)  # more beats than the stage holds
    assert err.value.argument == "staged"
    with pytest.raises(InputError):
        kspec.apply_stage(memory, stage.astype(np.int64), 1)


def _inputs(name, rng, rows=200, queries=3):
    spec = kernels.get(name)
    dim = 32
    if name == "page_indexer":
        lo = rng.standard_normal((rows, dim))
        memory = {"mins": lo, "maxs": lo + rng.random((rows, dim))}
        query = {"q": rng.standard_normal((queries, 2, dim))}
    elif name == "token_indexer":
        memory = {"keys": rng.standard_normal((rows, dim))}
        query = {"q": rng.standard_normal((queries, 2, dim)), "w": rng.random((queries, 2))}
    else:
        memory = {"keys": rng.standard_normal((rows, dim))}
        query = {"q": rng.standard_normal((queries, dim))}
    state = spec.fit(memory)
    ints = spec.quantize_memory(memory, state)
    return spec, ints, spec.quantize_query(query, state, k=7)


@pytest.mark.parametrize("name", STAGING)
def test_golden_with_a_stage_equals_golden_on_the_staged_memory(name):
    rng = np.random.default_rng(len(name))
    spec, old, query = _inputs(name, rng)
    _, new, _ = _inputs(name, np.random.default_rng(99))  # other rows in the same formats
    changed = np.sort(rng.choice(200, 9, replace=False))
    staged_memory = {a: old[a].copy() for a in spec.memory_args}
    offsets, sizes = [], []
    for a in spec.memory_args:
        staged_memory[a][changed] = new[a][changed]
        row = staged_memory[a][0].nbytes
        offsets.append(changed * row)
        sizes.append(np.full(changed.size, row))
    beats = [kspec.beats_of(o, s) for o, s in zip(offsets, sizes, strict=True)]
    stage = kspec.compose_stage([staged_memory[a] for a in spec.memory_args], beats)
    plain = spec.golden(spec.bind(staged_memory, query))
    call = spec.bind(old, query)
    call.arrays["stage"], call.scalars["staged"] = stage, int(stage.shape[0])
    kept = {a: old[a].copy() for a in spec.memory_args}
    staged = spec.golden(call)
    np.testing.assert_array_equal(staged.indices, plain.indices)
    assert staged.cycles == plain.cycles + kspec.stage_cycles(spec.engine, stage.shape[0])
    assert staged.cycles > plain.cycles
    for a in spec.memory_args:  # the pure model leaves the caller's arrays alone
        np.testing.assert_array_equal(call.arrays[a], kept[a])
    assert any(not np.array_equal(old[a], staged_memory[a]) for a in spec.memory_args)
    # staged = 0 is the call without a stage, bit for bit
    call.scalars["staged"] = 0
    assert spec.golden(call).cycles == spec.golden(spec.bind(old, query)).cycles


# -- the targets --------------------------------------------------------------------------------


def test_which_targets_copy_staged_beats():
    with open_device("emu") as emu, open_device("xrt_emu") as xrt, open_pynq_emu() as pynq:
        assert emu.stages_appends and xrt.stages_appends and pynq.stages_appends
    assert EmuDevice.stages_appends
    from hetmem.fpga.cosim import CosimDevice
    from hetmem.fpga.hls import HlsDevice

    assert CosimDevice.stages_appends  # the RTL's pre-phase
    assert not HlsDevice.stages_appends  # the HLS kernels refuse staged > 0


def _staged_run(dev, name, rng):
    """A run on `dev` whose stage rewrites some memory rows; returns (bufs, out, want, new
    memory arrays, stage)."""
    spec, old, query = _inputs(name, rng)
    _, new, _ = _inputs(name, np.random.default_rng(7))
    changed = np.array([0, 5, 6, 100, 199])
    want_memory = {a: old[a].copy() for a in spec.memory_args}
    for a in spec.memory_args:
        want_memory[a][changed] = new[a][changed]
    row = {a: want_memory[a][0].nbytes for a in spec.memory_args}
    beats = [kspec.beats_of(changed * row[a], np.full(5, row[a])) for a in spec.memory_args]
    stage = kspec.compose_stage([want_memory[a] for a in spec.memory_args], beats)
    call = spec.bind(old, query)
    call.arrays["stage"] = stage
    bufs = {}
    for arg in spec.args:
        if arg.direction == "in":
            bufs[arg.name] = dev.alloc(name, arg.name, max(64, call.arrays[arg.name].nbytes))
            dev.write(bufs[arg.name], call.arrays[arg.name])
    bufs["out"] = dev.alloc(name, "out", spec.buffer_nbytes("out", call.scalars))
    want = spec.golden(spec.bind(want_memory, query)).indices
    return spec, bufs, {**call.scalars, "staged": int(stage.shape[0])}, want, want_memory


def _open(target):
    if target == "pynq_emu":
        return open_pynq_emu()
    if target in ("cosim", "xrt_cosim"):
        from hetmem.fpga import cosim

        reason = cosim.missing()
        if reason is not None:
            pytest.skip(f"cosim: {reason}")
        if target == "cosim":
            return open_device("cosim")
        return open_device("xrt_emu", executor="cosim")
    return open_device(target)


TARGETS = [
    "emu",
    "xrt_emu",
    "pynq_emu",
    pytest.param("cosim", marks=pytest.mark.rtl),
    pytest.param("xrt_cosim", marks=pytest.mark.rtl),
]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", STAGING)
def test_a_staged_run_updates_the_card_memory_then_scans_it(target, name):
    """On every target that stages (the golden models, the RTL in cosim and under the xrt
    driver), the output is the golden model's over the staged memory, the card's memory keeps
    the staged rows, and the cycles count the copy (modeled: the cycle model's; simulated:
    more than the same call without a stage)."""
    with _open(target) as dev:
        spec, bufs, scalars, want, memory = _staged_run(dev, name, np.random.default_rng(3))
        timing = dev.run(name, bufs, scalars)
        out, _ = dev.read(bufs["out"], np.uint32, want.size)
        np.testing.assert_array_equal(out.reshape(want.shape), want)
        for a in spec.memory_args:  # the card keeps the staged rows
            got, _ = dev.read(bufs[a], memory[a].dtype, memory[a].size)
            np.testing.assert_array_equal(got.reshape(memory[a].shape), memory[a])
        query = _inputs(name, np.random.default_rng(3))[2]
        plain = spec.golden(spec.bind(memory, query))
        if timing.source == "modeled":
            extra = kspec.stage_cycles(spec.engine, scalars["staged"])
            assert timing.cycles == plain.cycles + extra
        else:  # the RTL: the same call without a stage, on the staged memory, is shorter
            assert timing.source == "simulated"
            again = dev.run(name, bufs, {**scalars, "staged": 0})
            assert again.cycles < timing.cycles
            out, _ = dev.read(bufs["out"], np.uint32, want.size)
            np.testing.assert_array_equal(out.reshape(want.shape), want)


def test_a_refused_stage_writes_nothing(monkeypatch):
    with open_device("emu") as dev:
        spec, bufs, scalars, _, _ = _staged_run(dev, "page_indexer", np.random.default_rng(4))
        before = {a: dev.read(bufs[a], np.uint8, bufs[a].nbytes)[0] for a in spec.memory_args}
        bad = np.zeros((1, 17), np.uint32)
        bad[0, 0] = kspec.STAGE_PORT_B | (bufs["maxs"].nbytes // 64 + 1)
        dev.write(bufs["stage"], bad)
        with pytest.raises(InputError) as err:
            dev.run("page_indexer", bufs, {**scalars, "staged": 1})
        assert err.value.argument == "stage"
        for a in spec.memory_args:
            np.testing.assert_array_equal(dev.read(bufs[a], np.uint8, bufs[a].nbytes)[0], before[a])
        monkeypatch.setattr(dev, "stages_appends", False)  # a card without the pre-phase
        with pytest.raises(InputError) as err:
            dev.run("page_indexer", bufs, {**scalars, "staged": 1})
        assert err.value.argument == "staged"


# -- a decode -----------------------------------------------------------------------------------


def _decode(method, fpga="emu", batch=4, steps=4, fault=None):
    """Prepare a batch of unequal rows, then `steps` x (append one token, step). Returns
    (outputs, the card records of each step, the pipeline)."""
    lengths = [300 - 23 * i for i in range(batch)]
    kv, _ = synthetic_kv(batch, length=300, lengths=lengths, seed=5)
    gen = torch.Generator().manual_seed(6)
    pipe = Pipeline(METHODS[method](), HYBRID, fpga=fpga)
    pipe.prepare(kv)
    outs, records = [], []
    for i in range(steps):
        pipe.append(
            KVChunk(
                torch.randn(batch, 2, 1, 64, generator=gen),
                torch.randn(batch, 2, 1, 64, generator=gen),
            )
        )
        query = AttentionQuery(torch.randn(batch, 8, 1, 64, generator=gen))
        if fault is not None and i == 2:
            with xrt_emu.inject(fault, on="run") as armed, warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                outs.append(pipe.step(query, 48))
            assert armed.fired == 1
        else:
            outs.append(pipe.step(query, 48))
        records.append([r for r in pipe.profile.records if r.step in CARD_STEPS])
    return outs, records, pipe


def _card_equals_mirror(stage):
    for s, slot in enumerate(stage.slots):
        held = stage.resident(s)
        for arg, data in held.items():
            first = s * stage.capacity
            np.testing.assert_array_equal(data, stage.host[arg][first : first + slot.rows])


@pytest.mark.rtl
@pytest.mark.parametrize("method", list(METHODS))
def test_a_decode_on_the_rtl_stages_its_appends_and_answers_as_emu(method):
    """The RTL's pre-phase in a decode (cosim): three transactions per step after the first,
    every output equal to emu's, the card's memory equal to the mirror."""
    from hetmem.fpga import cosim

    reason = cosim.missing()
    if reason is not None:
        pytest.skip(f"cosim: {reason}")
    want, _, _ = _decode(method, batch=2, steps=3)
    outs, records, pipe = _decode(method, fpga="cosim", batch=2, steps=3)
    for got, expected in zip(outs, want, strict=True):
        assert torch.equal(got, expected)
    for step in records[1:]:
        assert sum(r.transactions for r in step) == 3
    _card_equals_mirror(pipe.fpga_stage)


@pytest.mark.parametrize("method", list(METHODS))
def test_a_decode_makes_three_transactions_per_step_and_the_same_answers(method, monkeypatch):
    outs, records, pipe = _decode(method)
    for step in records[1:]:  # the first step may load the memory
        assert sum(r.transactions for r in step) == 3
        assert not [r for r in step if r.step == "transfer memory -> fpga"]
        query = next(r for r in step if r.step == "transfer query -> fpga")
        assert query.transactions == 1
    notes = [r.note for r in pipe.profile.records if r.step == "compose staged beats"]
    assert notes and all("memory beats" in n for n in notes)
    _card_equals_mirror(pipe.fpga_stage)
    # the same decode with the rows written range by range: the same answers, more writes
    monkeypatch.setattr(EmuDevice, "stages_appends", False)
    plain, plain_records, plain_pipe = _decode(method)
    for got, want in zip(outs, plain, strict=True):
        assert torch.equal(got, want)
    assert sum(r.transactions for r in plain_records[-1]) > 3
    _card_equals_mirror(plain_pipe.fpga_stage)


@pytest.mark.parametrize(
    ("fault", "error"),
    [("timeout", FpgaTimeout), ("axi_error", AxiError), ("device_lost", DeviceLost)],
)
def test_a_fault_during_a_staged_launch_changes_no_answer(fault, error):
    """The fault hits the launch that carries the step's staged beats (xrt over xrt_emu):
    the step falls back to the golden model over the mirror, the card is rebuilt from it,
    and every answer equals a fault-free card's."""
    want, _, _ = _decode("quest", steps=4)
    outs, _, pipe = _decode("quest", fpga="xrt_emu", steps=4, fault=fault)
    assert pipe.counters["fpga_fallbacks"] == 1
    for got, expected in zip(outs, want, strict=True):
        assert torch.equal(got, expected)
    assert pipe.fpga_stage.loaded and pipe.fpga_stage.device.stages_appends
    _card_equals_mirror(pipe.fpga_stage)


@pytest.mark.hls
def test_the_hls_block_gate_takes_the_stage_and_refuses_staged_beats():
    """The HLS C++ has the stage arguments (its signature is the spec's) but no pre-phase:
    staged = 0 runs as before; the device refuses staged > 0, and so does the C kernel."""
    from hetmem.fpga import hls

    if not hls.available():
        pytest.skip(f"hls: {hls.missing()}")
    with open_device("hls") as dev:
        assert not dev.stages_appends
        spec, bufs, scalars, want, memory = _staged_run(dev, "block_gate", np.random.default_rng(8))
        with pytest.raises(InputError) as err:
            dev.run("block_gate", bufs, scalars)
        assert err.value.argument == "staged"
        lib = hls.load(dev.library.path)
        query = _inputs("block_gate", np.random.default_rng(8))[2]
        call = spec.bind(memory, query)
        out, _ = hls.simulate(lib, spec, call)  # staged = 0: the golden model's answer
        np.testing.assert_array_equal(out, want)
        call.arrays["stage"] = kspec.compose_stage([memory["keys"], memory["shifts"]], [[0], []])
        call.scalars["staged"] = 1
        with pytest.raises(InputError) as err:
            hls.simulate(lib, spec, call)
        assert err.value.argument == "staged"
