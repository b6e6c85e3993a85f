"""FPGA faults on the device side: each one, injected through xrt_emu (or produced by a bad
xclbin), raises its own FpgaError subclass with a clear message; the injection API."""

from __future__ import annotations

import numpy as np
import pytest

from hetmem import kernels
from hetmem.errors import (
    AllocationError,
    AxiError,
    DeviceLost,
    FpgaError,
    FpgaTimeout,
    InputError,
    XclbinError,
)
from hetmem.fpga import open_device, xrt_emu
from hetmem.fpga.manifest import Manifest, expected_entry, sha256_file

pytestmark = pytest.mark.usefixtures("no_xrt_faults")


@pytest.fixture
def dev():
    with open_device("xrt_emu") as device:
        yield device


def prepared(dev):
    """Buffers written and scalars of one small vector_search call, and its golden output."""
    spec = kernels.get("vector_search")
    rng = np.random.default_rng(0)
    memory = {"keys": rng.standard_normal((64, 16))}
    state = spec.fit(memory)
    inputs = spec.bind(
        spec.quantize_memory(memory, state),
        spec.quantize_query({"q": rng.standard_normal((2, 16))}, state, k=3),
    )
    bufs = {
        n: dev.alloc("vector_search", n, inputs.arrays[n].nbytes)
        for n in ("keys", "shifts", "q", "segs")  # segs: bind's (0, n) for both queries
    }
    for name, buf in bufs.items():
        dev.write(buf, inputs.arrays[name])
    bufs["stage"] = dev.alloc("vector_search", "stage", 64)  # staged = 0: never read
    bufs["out"] = dev.alloc("vector_search", "out", 24)
    return bufs, inputs.scalars, spec.golden(inputs).indices


def result(dev, bufs):
    out, _ = dev.read(bufs["out"], np.uint32, 6)
    return out.reshape(2, 3)


def test_every_fault_is_an_fpga_error():
    for cls in (FpgaTimeout, AxiError, DeviceLost, AllocationError, XclbinError):
        assert issubclass(cls, FpgaError)


def test_kernel_timeout(dev):
    bufs, scalars, golden = prepared(dev)
    with xrt_emu.inject("timeout") as fault:
        with pytest.raises(
            FpgaTimeout, match=r"vector_search: no ap_done within 2\.0 s \(ERT_CMD_STATE_TIMEOUT\)"
        ):
            dev.run("vector_search", bufs, scalars, timeout_s=2.0)
        assert fault.fired == 1
        assert not result(dev, bufs).any()  # the hung run wrote nothing
        dev.run("vector_search", bufs, scalars)  # one-shot: the next run completes
    np.testing.assert_array_equal(result(dev, bufs), golden)


def test_axi_error_response(dev):
    bufs, scalars, golden = prepared(dev)
    with xrt_emu.inject("axi_error"), pytest.raises(AxiError, match=r"ERT_CMD_STATE_ERROR.*SLVERR"):
        dev.run("vector_search", bufs, scalars)
    dev.run("vector_search", bufs, scalars)
    np.testing.assert_array_equal(result(dev, bufs), golden)


def test_device_lost_mid_run_stays_lost_until_reopened(dev):
    bufs, scalars, golden = prepared(dev)
    xrt_emu.inject("device_lost", after=1)
    dev.run("vector_search", bufs, scalars)  # the first run passes
    with pytest.raises(DeviceLost, match="stopped answering during a run of vector_search"):
        dev.run("vector_search", bufs, scalars)
    for call in (
        lambda: dev.run("vector_search", bufs, scalars),
        lambda: dev.write(bufs["q"], np.zeros(4, np.int8)),
        lambda: dev.read(bufs["out"], np.uint32, 1),
        lambda: dev.alloc("vector_search", "q", 8),
    ):
        with pytest.raises(DeviceLost, match="open it again"):
            call()
    with open_device("xrt_emu") as fresh:  # a reset card: memory rebuilt from the host
        bufs, scalars, golden = prepared(fresh)
        fresh.run("vector_search", bufs, scalars)
        np.testing.assert_array_equal(result(fresh, bufs), golden)


def test_device_lost_during_a_transfer(dev):
    bufs, _, _ = prepared(dev)
    with (
        xrt_emu.inject("device_lost", on="sync"),
        pytest.raises(DeviceLost, match=r"during a sync of vector_search\.q"),
    ):
        dev.write(bufs["q"], np.ones(4, np.int8))
    with pytest.raises(DeviceLost):
        dev.read(bufs["q"], np.int8, 4)


def test_device_lost_during_an_allocation_is_not_an_allocation_error(dev):
    with xrt_emu.inject("device_lost", on="alloc"), pytest.raises(DeviceLost, match="allocating"):
        dev.alloc("vector_search", "keys", 64)


def test_bank_allocation_failure(dev):
    with xrt_emu.inject("alloc", after=1):
        dev.alloc("vector_search", "keys", 64)
        with pytest.raises(
            AllocationError, match=r"vector_search.keys: cannot allocate 64 bytes in HBM bank 14"
        ):
            dev.alloc("vector_search", "keys", 64)
    dev.alloc("vector_search", "keys", 64)  # the card is fine


def test_bank_full(monkeypatch):
    monkeypatch.setattr(xrt_emu, "CARDS", [xrt_emu.Card(bank_bytes=4096)])
    with open_device("xrt_emu") as dev:
        dev.alloc("vector_search", "keys", 4000)
        with pytest.raises(AllocationError, match=r"HBM\[14\] \(96 bytes free\)"):
            dev.alloc("vector_search", "keys", 100)
        dev.alloc("vector_search", "shifts", 4096)  # its own pseudo-channel


def test_xclbin_load_refused():
    with xrt_emu.inject("xclbin"), pytest.raises(XclbinError, match="the card refused to load it"):
        open_device("xrt_emu")


def test_xclbin_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HETMEM_XCLBIN_PATH", str(tmp_path))
    with pytest.raises(
        XclbinError, match=r"xclbin hetmem_hw.xclbin not found in .*set \$HETMEM_XCLBIN_PATH"
    ):
        open_device("xrt_emu", xclbin="hetmem_hw.xclbin")


def test_xclbin_mismatched(tmp_path):
    entry = expected_entry()
    banks = {n: xrt_emu.kernel_args(n) for n in kernels.names()}
    banks["bm25"] = xrt_emu.kernel_args("bm25", {"impacts": 31})
    path = xrt_emu.write_xclbin(tmp_path / entry.name, kernels=banks)
    manifest = Manifest({entry.name: entry}).with_checksum(entry.name, sha256_file(path))
    with pytest.raises(
        XclbinError, match=r"bm25.impacts is connected to HBM\[31\], the manifest expects HBM\[20\]"
    ):
        open_device("xrt_emu", xclbin=path, manifest=manifest)


def test_the_emu_target_times_out_by_its_cycle_model():
    with open_device("emu") as dev:
        bufs, scalars, _ = prepared(dev)
        with pytest.raises(FpgaTimeout, match="cycles"):
            dev.run("vector_search", bufs, scalars, timeout_s=1e-9)


# -- the injection API ---------------------------------------------------------------------------


def test_inject_after_and_times(dev):
    bufs, scalars, _ = prepared(dev)
    fault = xrt_emu.inject("axi_error", after=2, times=2)
    outcomes = []
    for _ in range(5):
        try:
            dev.run("vector_search", bufs, scalars)
            outcomes.append("ok")
        except AxiError:
            outcomes.append("axi")
    assert outcomes == ["ok", "ok", "axi", "axi", "ok"]
    assert (fault.seen, fault.fired) == (5, 2)
    assert xrt_emu.armed() == (fault,)
    fault.disarm()
    assert xrt_emu.armed() == ()


def test_inject_forever_and_clear(dev):
    bufs, scalars, _ = prepared(dev)
    xrt_emu.inject("timeout", times=None)
    for _ in range(3):
        with pytest.raises(FpgaTimeout):
            dev.run("vector_search", bufs, scalars)
    xrt_emu.clear()
    dev.run("vector_search", bufs, scalars)


def test_one_fault_fires_per_operation(dev):
    bufs, scalars, _ = prepared(dev)
    first = xrt_emu.inject("timeout")
    second = xrt_emu.inject("axi_error")
    with pytest.raises(FpgaTimeout):
        dev.run("vector_search", bufs, scalars)
    with pytest.raises(AxiError):
        dev.run("vector_search", bufs, scalars)
    assert (first.fired, second.fired) == (1, 1)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"kind": "meteor"}, "kind"),
        ({"kind": "timeout", "on": "sync"}, "on"),
        ({"kind": "timeout", "after": -1}, "after"),
        ({"kind": "timeout", "times": 0}, "times"),
    ],
)
def test_inject_checks_its_arguments(kwargs, argument):
    kind = kwargs.pop("kind")
    with pytest.raises(InputError) as err:
        xrt_emu.inject(kind, **kwargs)
    assert err.value.argument == argument
    assert xrt_emu.armed() == ()
