"""The fault matrix: every fault the emulated card can inject (kind x the operation it fires
on) x policy (fallback, raise) x the call it hits (prepare, append, step), on the xrt driver
over xrt_emu. Whatever happens, every step's output equals a fault-free card's exactly and
no appended token is lost or doubled: under "fallback" the host runs the card's golden model
over its mirror; under "raise" the call raises the fault's error and a retry of that call
(what a caller does) carries on; an append touches no device, so a fault armed there fires
at the next step instead."""

from __future__ import annotations

import warnings
from functools import cache

import pytest
import torch

from hetmem.attention import AttentionQuery, KVChunk
from hetmem.errors import (
    AllocationError,
    AxiError,
    DeviceLost,
    FpgaError,
    FpgaTimeout,
    XclbinError,
)
from hetmem.fpga import xrt_emu
from hetmem.methods import get
from hetmem.pipeline import Pipeline
from hetmem.synthetic import synthetic_kv

HYBRID = "cpu/fpga/fpga/cpu"
#: (kind, the operation it fires on, the error the driver raises)
FAULTS = [
    ("timeout", "run", FpgaTimeout),
    ("axi_error", "run", AxiError),
    ("device_lost", "run", DeviceLost),
    ("device_lost", "sync", DeviceLost),
    ("device_lost", "alloc", DeviceLost),
    ("alloc", "alloc", AllocationError),
    ("xclbin", "load", XclbinError),
]
PHASES = ["prepare", "append", "step"]
#: The card operations each call makes: prepare opens the card (xclbin load), allocates and
#: writes the memory; a step allocates its query buffers (the first), writes and runs; an
#: append makes none.
OPERATIONS = {
    "prepare": {"load", "alloc", "sync"},
    "append": set(),
    "step": {"alloc", "sync", "run"},
}
METHODS = {"quest": lambda: get("quest", page_size=16), "dsa": lambda: get("dsa")}
BUDGET = 64


pytestmark = pytest.mark.usefixtures("no_xrt_faults")


def data():
    kv, _ = synthetic_kv(length=320, lengths=[320, 250], seed=11)
    gen = torch.Generator().manual_seed(12)
    chunks = [
        KVChunk(torch.randn(2, 2, 3, 64, generator=gen), torch.randn(2, 2, 3, 64, generator=gen))
        for _ in range(2)
    ]
    query = AttentionQuery(torch.randn(2, 8, 1, 64, generator=gen))
    return kv, chunks, query


def scenario(pipe, armed=None, phase=None, policy="fallback"):
    """prepare, append, step, append, step; the fault armed during the first call of
    `phase`. Returns (outputs of the steps, the error raised, if any, and the fault)."""
    kv, chunks, query = data()
    outs, raised, fault = [], None, None
    calls = [
        ("prepare", lambda: pipe.prepare(kv)),
        ("append", lambda: pipe.append(chunks[0])),
        ("step", lambda: outs.append(pipe.step(query, BUDGET))),
        ("append", lambda: pipe.append(chunks[1])),
        ("step", lambda: outs.append(pipe.step(query, BUDGET))),
    ]
    for name, call in calls:
        if armed is not None and name == phase and fault is None:
            kind, on, _ = armed
            with xrt_emu.inject(kind, on=on) as fault:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)
                        call()
                except FpgaError as exc:
                    raised = exc
                    call()  # the caller retries the call that raised
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            call()
    return outs, raised, fault


@cache
def card_answer(method):
    pipe = Pipeline(METHODS[method](), HYBRID, fpga="emu")
    outs, _, _ = scenario(pipe)
    return outs, pipe.memory.kv.lengths.tolist()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("policy", ["fallback", "raise"])
@pytest.mark.parametrize("fault", FAULTS, ids=[f"{k}-{on}" for k, on, _ in FAULTS])
def test_fault_matrix(fault, policy, phase, method):
    expected, lengths = card_answer(method)
    pipe = Pipeline(METHODS[method](), HYBRID, fpga="xrt_emu", on_fpga_error=policy)
    outs, raised, armed = scenario(pipe, fault, phase, policy)
    kind, on, error = fault
    assert armed.fired == (on in OPERATIONS[phase])  # the fault hit the call it was armed for
    if policy == "raise":
        assert (raised is not None) == (armed.fired > 0)
        if raised is not None:
            assert isinstance(raised, error)
        assert pipe.counters["fpga_fallbacks"] == 0
    else:
        assert raised is None
        assert pipe.counters["fpga_fallbacks"] == armed.fired
    assert len(outs) == len(expected)
    for got, want in zip(outs, expected, strict=True):
        assert torch.equal(got, want)  # the card's answer, fault or not
    assert pipe.memory.kv.lengths.tolist() == lengths  # nothing lost, nothing doubled
    stage = pipe.fpga_stage
    assert [s.rows for s in stage.slots] == [
        -(-n // stage.binding.unit) for n in lengths for _ in range(len(stage.slots) // 2)
    ]


def test_every_fault_the_emulator_knows_is_in_the_matrix():
    pairs = {(kind, on) for kind, (_, ons) in xrt_emu.FAULTS.items() for on in ons}
    assert pairs == {(kind, on) for kind, on, _ in FAULTS}
