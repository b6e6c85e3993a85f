"""`xrt_emu`: the part of pyxrt's API that the xrt driver (`xrt.py`) uses, executed by the
emu executor (or cosim's RTL: `device(executor=...)`), the way Vitis hardware emulation
runs unchanged host code against a simulated card. `open_device("xrt_emu")` runs the real
driver over this module, so the driver's buffer sizes and banks, argument order, sync
directions, state checks and fault handling are tested without XRT or a card.

The API, as in pyxrt (a module-level `import pyxrt` can be replaced by this one):

    enumerate_devices() -> int
    device(index | bdf)          .load_xclbin(xclbin | path) -> uuid, .get_xclbin_uuid(),
                                 .get_info(xrt_info_device.name | bdf | ...)
    xclbin(path)                 .get_uuid(), .get_xsa_name(), .get_kernels() -> [xclbinkernel:
                                 get_name(), get_num_args()], .get_mems() -> [xclbinmem:
                                 get_tag(), get_index(), get_size_kb(), get_used(), ...]
    uuid(str)                    .to_string()
    kernel(device, uuid, name[, kernel.cu_access_mode.shared])
                                 .group_id(arg_index), kernel(*args) -> run
    bo(device, nbytes, bo.flags.normal, group_id), bo(parent_bo, nbytes, offset) (a sub-buffer)
                                 .write(data, seek), .read(size, skip) -> int8 array,
                                 .sync(xclBOSyncDirection.X[, size, offset]), .size(), .address()
    run                          .wait([timeout_ms]) -> ert_cmd_state, .state()
    xclBOSyncDirection, ert_cmd_state, xrt_info_device

Behaviour the tests rely on:
- A bo holds a host copy and a card copy. write/read touch the host copy; sync moves the
  given range in the given direction; a kernel reads and writes only card copies. A read
  without a prior sync from the device returns stale bytes, a run without a prior sync to
  the device sees stale (zero) inputs.
- kernel(*args) takes one argument per kernel argument, in the order the xclbin declares
  them (the spec's): a bo for a buffer, an int (uint32) for a scalar; anything else is a
  TypeError, as in pybind. A bo in a bank its argument's AXI master does not reach makes
  the run end in ERT_CMD_STATE_ERROR (the port's AXI access decodes to no memory:
  DECERR), as do inputs the kernel cannot process; `run.message` says why. A master that
  carries several arguments (the engine's query side) reaches the range of their banks,
  as fpga/gen.py connects it; every other argument, its own bank.
- A sub-buffer shares its parent's bank and bytes (host and card copies).
- run.wait(timeout_ms) returns ERT_CMD_STATE_TIMEOUT when the modeled kernel time exceeds
  timeout_ms (0: no timeout).
- Each HBM pseudo-channel holds 512 MiB; a bo that does not fit raises RuntimeError.
- device(i) opens a fresh card each time (as after a reset): bos of another handle and a
  lost handle's state do not carry over.

Emulation-only extensions: `EMULATED = True`; `run.modeled_cycles`, `run.modeled_seconds`,
`run.message`; `device.sync_log` (direction, group, size, offset of every sync);
`write_xclbin`; `kernel_args`; the fault injection below; `CARDS`.

An emulated xclbin is a small JSON file (`write_xclbin` writes one):

    {"emulated_xclbin": 1, "platform": "<xsa / shell VBNV>", "uuid": "...", "clock_hz": 3e8,
     "kernels": {"token_indexer": [["keys", 0], ["shifts", 1], ..., ["n", null], ...]}}

(argument name and HBM bank in argument order; null for a scalar).

Fault injection, for the driver's fault tests and the pipeline's fallback tests:

    from hetmem.fpga import xrt_emu
    with xrt_emu.inject("timeout"):              # the next kernel run times out
        ...
    fault = xrt_emu.inject("device_lost", after=2)   # runs 1-2 succeed, run 3 loses the card
    ...
    fault.fired                                  # how many times it fired
    xrt_emu.clear()                              # disarm every fault

`inject(kind, after=0, times=1, on=None)` arms a fault that lets `after` matching
operations pass, then fires on the next `times` ones (times=None: on every one after);
used as a context manager it is disarmed on exit. Kinds, the operation they fire on
(`on`), and what the driver raises:

    "timeout"      run            wait() returns ERT_CMD_STATE_TIMEOUT      -> FpgaTimeout
    "axi_error"    run            wait() returns ERT_CMD_STATE_ERROR        -> AxiError
    "device_lost"  run (default), the run aborts (ERT_CMD_STATE_ABORT) or the sync / bo
                   sync, alloc    fails, and every later call on that device handle
                                  raises RuntimeError                       -> DeviceLost
    "alloc"        alloc          bo() raises RuntimeError (bad_alloc)      -> AllocationError
    "xclbin"       load           load_xclbin() raises RuntimeError         -> XclbinError

A missing or mismatched xclbin file needs no injection: write one with `write_xclbin`
(wrong platform, kernels or banks) or point the driver at a path that does not exist.
"""

from __future__ import annotations

import enum
import json
import os
import uuid as _uuid
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import kernels as _kernels
from ..errors import DeviceLost, FpgaTimeout, HetmemError, InputError
from ..kernels.engine import port_of
from . import emu as _emu

EMULATED = True
#: The shell VBNV an xclbin built for the U55C platform records in its header.
SHELL = "xilinx_u55c_gen3x16_xdma_base_3"
PLATFORM = _emu.PLATFORM
#: Bytes of one HBM pseudo-channel.
BANK_BYTES = _emu.BANK_BYTES
HBM_BANKS = _kernels.spec.HBM_BANKS
XCL_BO_FLAGS_NONE = 0


class xclBOSyncDirection(enum.IntEnum):
    XCL_BO_SYNC_BO_TO_DEVICE = 0
    XCL_BO_SYNC_BO_FROM_DEVICE = 1
    XCL_BO_SYNC_BO_GMIO_TO_AIE = 2
    XCL_BO_SYNC_BO_AIE_TO_GMIO = 3


class ert_cmd_state(enum.IntEnum):  # values of XRT's ert.h
    ERT_CMD_STATE_NEW = 1
    ERT_CMD_STATE_QUEUED = 2
    ERT_CMD_STATE_RUNNING = 3
    ERT_CMD_STATE_COMPLETED = 4
    ERT_CMD_STATE_ERROR = 5
    ERT_CMD_STATE_ABORT = 6
    ERT_CMD_STATE_SUBMITTED = 7
    ERT_CMD_STATE_TIMEOUT = 8
    ERT_CMD_STATE_NORESPONSE = 9
    ERT_CMD_STATE_SKERROR = 10
    ERT_CMD_STATE_SKCRASHED = 11


class xrt_info_device(enum.IntEnum):
    bdf = 0
    interface_uuid = 1
    kdma = 2
    max_clock_frequency_mhz = 3
    m2m = 4
    name = 5
    nodma = 6
    offline = 7
    platform = 8


@dataclass(frozen=True)
class Card:
    """One emulated card: what get_info reports and how much each bank holds."""

    name: str = SHELL
    bdf: str = "xrt_emu:0"
    bank_bytes: int = BANK_BYTES


#: The emulated cards, by index; tests may append or replace (restore afterwards).
CARDS: list[Card] = [Card()]


def enumerate_devices() -> int:
    """Number of (emulated) cards."""
    return len(CARDS)


# -- fault injection ---------------------------------------------------------------------------

FAULTS: dict[str, tuple[str, tuple[str, ...]]] = {
    # kind: (default operation, operations it may fire on)
    "timeout": ("run", ("run",)),
    "axi_error": ("run", ("run",)),
    "device_lost": ("run", ("run", "sync", "alloc")),
    "alloc": ("alloc", ("alloc",)),
    "xclbin": ("load", ("load",)),
}


class Fault:
    """An armed fault (see the module docstring); a context manager that disarms it."""

    def __init__(self, kind: str, after: int, times: int | None, on: str) -> None:
        self.kind, self.after, self.times, self.on = kind, after, times, on
        self.seen = 0  # matching operations so far
        self.fired = 0  # times it fired

    def _due(self) -> bool:
        """Count one matching operation; True when the fault fires on it."""
        self.seen += 1
        return self.seen > self.after and (self.times is None or self.fired < self.times)

    def disarm(self) -> None:
        if self in _ARMED:
            _ARMED.remove(self)

    def __enter__(self) -> Fault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.disarm()

    def __repr__(self) -> str:
        return (
            f"Fault({self.kind!r}, on={self.on!r}, after={self.after}, times={self.times}, "
            f"fired={self.fired})"
        )


_ARMED: list[Fault] = []


def inject(kind: str, *, after: int = 0, times: int | None = 1, on: str | None = None) -> Fault:
    """Arm a fault: let `after` matching operations pass, then fire on `times` of them."""
    if kind not in FAULTS:
        raise InputError("kind", f"unknown fault {kind!r}; faults are {sorted(FAULTS)}")
    default, allowed = FAULTS[kind]
    on = default if on is None else on
    if on not in allowed:
        raise InputError("on", f"fault {kind!r} fires on {allowed}, not {on!r}")
    if isinstance(after, bool) or not isinstance(after, int) or after < 0:
        raise InputError("after", f"expected an int >= 0, got {after!r}")
    if times is not None and (isinstance(times, bool) or not isinstance(times, int) or times < 1):
        raise InputError("times", f"expected an int >= 1 or None, got {times!r}")
    fault = Fault(kind, after, times, on)
    _ARMED.append(fault)
    return fault


def clear() -> None:
    """Disarm every fault."""
    _ARMED.clear()


def armed() -> tuple[Fault, ...]:
    """The faults armed now."""
    return tuple(_ARMED)


def _fire(op: str) -> str | None:
    """Count an operation against every fault armed for it; the kind of the first one that
    fires (at most one fault fires per operation), else None."""
    fired: str | None = None
    for fault in list(_ARMED):
        if fault.on == op and fault._due() and fired is None:
            fault.fired += 1
            fired = fault.kind
    return fired


# -- xclbin ------------------------------------------------------------------------------------


class uuid:
    """An xclbin's UUID."""

    def __init__(self, uuid_str: str) -> None:
        self._value = str(_uuid.UUID(str(uuid_str)))

    def to_string(self) -> str:
        return self._value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, uuid) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return f"uuid({self._value!r})"


def kernel_args(name: str, banks: Mapping[str, int] | None = None) -> list[list[Any]]:
    """A kernel's [argument, bank or None] list in spec order; `banks` overrides banks."""
    spec = _kernels.get(name)
    banks = dict(banks or {})
    return [[a.name, banks.get(a.name, a.bank) if a.is_buffer else None] for a in spec.args]


def write_xclbin(
    path: str | os.PathLike,
    *,
    kernels: Mapping[str, Any] | None = None,
    platform: str = SHELL,
    clock_hz: float = _kernels.DEFAULT_CLOCK_HZ,
    uuid_str: str | None = None,
) -> Path:
    """Write an emulated xclbin. `kernels`: name -> [[arg, bank | None], ...] (argument
    order), or name -> {buffer arg: bank} (the spec's order and scalars); default: every
    kernel as its spec connects it."""
    if kernels is None:
        kernels = {name: kernel_args(name) for name in _kernels.names()}
    table: dict[str, list[list[Any]]] = {}
    for name, args in kernels.items():
        if isinstance(args, Mapping):
            table[name] = kernel_args(name, args)
        else:
            table[name] = [[str(a), None if b is None else int(b)] for a, b in args]
    body = {"emulated_xclbin": 1, "platform": platform, "clock_hz": clock_hz, "kernels": table}
    if uuid_str is None:  # the same content, the same uuid
        uuid_str = str(_uuid.uuid5(_uuid.NAMESPACE_URL, json.dumps(body, sort_keys=True)))
    body["uuid"] = uuid_str
    out = Path(path)
    out.write_text(json.dumps(body, indent=1) + "\n")
    return out


class xclbin:
    """An emulated xclbin read from its JSON file."""

    class xclbinkernel:
        def __init__(self, name: str, args: list[list[Any]]) -> None:
            self._name, self._args = name, args

        def get_name(self) -> str:
            return self._name

        def get_num_args(self) -> int:
            return len(self._args)

    class xclbinmem:
        def __init__(self, index: int, used: bool) -> None:
            self._index, self._used = index, used

        def get_tag(self) -> str:
            return f"HBM[{self._index}]"

        def get_index(self) -> int:
            return self._index

        def get_base_address(self) -> int:
            return self._index * BANK_BYTES

        def get_size_kb(self) -> int:
            return BANK_BYTES // 1024

        def get_used(self) -> bool:
            return self._used

    def __init__(self, filename: str) -> None:
        path = Path(filename)
        try:
            text = path.read_text()
        except OSError as exc:
            raise RuntimeError(f"xclbin: failed to open {filename}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise RuntimeError(f"xclbin: {filename} is not an emulated xclbin") from None
        try:
            body = json.loads(text)
            if body.get("emulated_xclbin") != 1:
                raise ValueError("no emulated_xclbin marker")
            self._platform = str(body["platform"])
            self._uuid = uuid(body["uuid"])
            self._clock_hz = float(body.get("clock_hz", _kernels.DEFAULT_CLOCK_HZ))
            self._kernels = {
                str(k): [[str(a), None if b is None else int(b)] for a, b in v]
                for k, v in body["kernels"].items()
            }
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RuntimeError(f"xclbin: {filename} is not an emulated xclbin ({exc})") from None
        self.path = path

    def get_uuid(self) -> uuid:
        return self._uuid

    def get_xsa_name(self) -> str:
        return self._platform

    def get_kernels(self) -> list[xclbin.xclbinkernel]:
        return [xclbin.xclbinkernel(k, v) for k, v in self._kernels.items()]

    def get_mems(self) -> list[xclbin.xclbinmem]:
        used = {b for args in self._kernels.values() for _, b in args if b is not None}
        return [xclbin.xclbinmem(i, i in used) for i in range(HBM_BANKS)]


# -- device, bo, kernel, run ---------------------------------------------------------------------


class device:
    """A handle on emulated card `index` (or the card with that BDF): a fresh card.

    `executor` runs its kernels: a callable (spec, raw buffer bytes by argument, scalars)
    -> (out, cycles); emu's golden models by default, or a cosim device's `execute` (the
    RTL in Verilator), as `open_device("xrt_emu", executor="cosim")` sets it.
    """

    def __init__(self, index: int | str = 0, *, executor: Any = None) -> None:
        if isinstance(index, str):
            found = [i for i, c in enumerate(CARDS) if c.bdf == index]
            if not found:
                raise RuntimeError(f"No such device '{index}'")
            index = found[0]
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(CARDS):
            raise RuntimeError(f"Could not open device with index '{index}'")
        self.index = index
        self.card = CARDS[index]
        self.used = [0] * HBM_BANKS
        self.lost: str | None = None
        self.xclbin: xclbin | None = None
        self.sync_log: list[tuple[xclBOSyncDirection, int, int, int]] = []
        self.executor = _emu.execute if executor is None else executor

    @property
    def stages_appends(self) -> bool:
        """Whether its kernels copy staged memory beats in before the scan: the golden
        models do (`emu.execute`); another executor (a cosim device's `execute`: the RTL)
        as its device says."""
        if self.executor is _emu.execute:
            return True
        owner = getattr(self.executor, "__self__", None)
        return bool(getattr(owner, "stages_appends", False))

    def _check(self) -> None:
        """Every call that reaches the card fails once the card is lost."""
        if self.lost is not None:
            raise RuntimeError(f"device {self.card.bdf}: {self.lost}")

    def _lose(self, op: str) -> None:
        self.lost = f"the card stopped answering during a {op} (injected device_lost)"
        raise RuntimeError(f"device {self.card.bdf}: {self.lost}")

    def load_xclbin(self, image: xclbin | str) -> uuid:
        self._check()
        if not isinstance(image, xclbin):
            image = xclbin(str(image))
        if _fire("load") == "xclbin":
            raise RuntimeError("load_xclbin: Operation not permitted (injected xclbin fault)")
        if image.get_xsa_name() not in (self.card.name, PLATFORM):
            raise RuntimeError(
                f"load_xclbin: xclbin built for {image.get_xsa_name()!r} does not match the "
                f"shell of device {self.card.bdf} ({self.card.name!r})"
            )
        self.xclbin = image
        return image.get_uuid()

    def get_xclbin_uuid(self) -> uuid:
        self._check()
        if self.xclbin is None:
            return uuid("00000000-0000-0000-0000-000000000000")
        return self.xclbin.get_uuid()

    def get_info(self, key: xrt_info_device) -> str:
        self._check()
        values = {
            xrt_info_device.name: self.card.name,
            xrt_info_device.bdf: self.card.bdf,
            xrt_info_device.offline: "false",
            xrt_info_device.platform: json.dumps({"platform": PLATFORM, "emulated": True}),
            xrt_info_device.max_clock_frequency_mhz: "300",
        }
        if key not in values:
            raise RuntimeError(f"xrt_emu: device info {key!r} is not emulated")
        return values[key]


class bo:
    """A buffer object: a host copy and a card copy in one HBM pseudo-channel."""

    class flags(enum.IntEnum):
        normal = 0
        cacheable = 1
        device_only = 2
        host_only = 3
        p2p = 4
        svm = 5

    normal = flags.normal

    def __init__(self, dev: device | bo, size: int, flags: Any, group: int | None = None) -> None:
        if isinstance(dev, bo):  # bo(parent, size, offset): a sub-buffer, pyxrt's overload
            self._sub(dev, int(size), int(flags))
            return
        if not isinstance(dev, device):
            raise TypeError("bo(): expected a device")
        dev._check()
        fired = _fire("alloc")
        if fired == "device_lost":
            dev._lose("alloc")
        if fired == "alloc":
            raise RuntimeError(
                f"bo: failed to allocate {size} bytes in group {group}: bad_alloc (injected)"
            )
        size, group = int(size), int(group)
        if size <= 0:
            raise RuntimeError(f"bo: invalid size {size}")
        if not 0 <= group < HBM_BANKS:
            raise RuntimeError(f"bo: no memory group {group}")
        free = dev.card.bank_bytes - dev.used[group]
        if size > free:
            raise RuntimeError(
                f"bo: failed to allocate {size} bytes in HBM[{group}] ({free} bytes free): bad_alloc"
            )
        self._device, self._group, self._size = dev, group, size
        self._address = group * dev.card.bank_bytes + dev.used[group]
        dev.used[group] += size
        self._host = np.zeros(size, dtype=np.uint8)
        self._card = np.zeros(size, dtype=np.uint8)
        weakref.finalize(self, _release, dev, group, size)

    def _sub(self, parent: bo, size: int, offset: int) -> None:
        """`size` bytes of `parent` from `offset`: the same bank, the same host and card
        bytes (views), no allocation of its own."""
        parent._device._check()
        if size <= 0 or offset < 0 or offset + size > parent._size:
            raise RuntimeError(
                f"bo: a sub-buffer of {size} bytes at {offset} exceeds the {parent._size}-byte bo"
            )
        self._device, self._group, self._size = parent._device, parent._group, size
        self._address = parent._address + offset
        self._host = parent._host[offset : offset + size]
        self._card = parent._card[offset : offset + size]
        self._parent = parent  # (its bytes stay allocated while a sub-buffer lives)

    def size(self) -> int:
        return self._size

    def address(self) -> int:
        return self._address

    def _range(self, size: int, offset: int, what: str) -> slice:
        size, offset = int(size), int(offset)
        if size < 0 or offset < 0 or offset + size > self._size:
            raise RuntimeError(
                f"bo.{what}: {size} bytes at {offset} exceed the {self._size}-byte bo"
            )
        return slice(offset, offset + size)

    def write(self, data: Any, seek: int) -> None:
        raw = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
        self._host[self._range(raw.nbytes, seek, "write")] = raw

    def read(self, size: int, skip: int) -> np.ndarray:
        return self._host[self._range(size, skip, "read")].view(np.int8).copy()

    def map(self) -> memoryview:
        return memoryview(self._host)

    def sync(self, direction: xclBOSyncDirection, size: int | None = None, offset: int = 0) -> None:
        self._device._check()
        if _fire("sync") == "device_lost":
            self._device._lose("sync")
        size = self._size - int(offset) if size is None else size
        where = self._range(size, offset, "sync")
        direction = xclBOSyncDirection(direction)
        if direction == xclBOSyncDirection.XCL_BO_SYNC_BO_TO_DEVICE:
            self._card[where] = self._host[where]
        elif direction == xclBOSyncDirection.XCL_BO_SYNC_BO_FROM_DEVICE:
            self._host[where] = self._card[where]
        else:
            raise RuntimeError(f"bo.sync: {direction.name} is for AIE, not an Alveo bo")
        self._device.sync_log.append((direction, self._group, int(size), int(offset)))


def _release(dev: device, group: int, size: int) -> None:
    dev.used[group] -= size


class run:
    """One execution of a kernel; the emulator has finished it by the time it exists."""

    def __init__(
        self,
        state: ert_cmd_state,
        cycles: int = 0,
        seconds: float = 0.0,
        message: str = "",
        dev: device | None = None,
    ) -> None:
        self._state = state
        self.modeled_cycles = cycles
        self.modeled_seconds = seconds
        self.message = message
        self._device = dev

    def wait(self, timeout_ms: int = 0) -> ert_cmd_state:
        if self._state == ert_cmd_state.ERT_CMD_STATE_COMPLETED and 0 < int(timeout_ms) < (
            self.modeled_seconds * 1e3
        ):
            return ert_cmd_state.ERT_CMD_STATE_TIMEOUT
        return self._state

    def state(self) -> ert_cmd_state:
        return self._state


class kernel:
    """The compute unit(s) of a kernel in the loaded xclbin."""

    class cu_access_mode(enum.IntEnum):
        exclusive = 0
        shared = 1
        none = 2

    shared = cu_access_mode.shared
    exclusive = cu_access_mode.exclusive

    def __init__(self, dev: device, xclbin_uuid: uuid, name: str, mode: Any = None) -> None:
        dev._check()
        if dev.xclbin is None or dev.xclbin.get_uuid() != xclbin_uuid:
            raise RuntimeError(f"kernel: xclbin {xclbin_uuid!r} is not loaded on {dev.card.bdf}")
        if name not in dev.xclbin._kernels:
            raise RuntimeError(f"kernel: no kernel named '{name}' in the xclbin")
        self._device, self._name = dev, name
        self._args = dev.xclbin._kernels[name]
        self._clock_hz = dev.xclbin._clock_hz
        # Buffer argument -> the HBM banks [lo, hi] its AXI master is connected to: one
        # sharing a master with others (the query side) reaches the range of their banks
        # through the HBM switch, as fpga/gen.py connects it.
        port = {a: port_of(name, a) for a, bank in self._args if bank is not None}
        banks: dict[str, list[int]] = {}
        for a, bank in self._args:
            if bank is not None:
                banks.setdefault(port[a], []).append(int(bank))
        self._reach = {a: (min(banks[p]), max(banks[p])) for a, p in port.items()}

    def group_id(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < len(self._args):
            raise RuntimeError(f"kernel {self._name}: no argument {index}")
        bank = self._args[index][1]
        if bank is None:
            raise RuntimeError(
                f"kernel {self._name}: argument {index} is a scalar, it has no memory group"
            )
        return int(bank)

    def __call__(self, *args: Any) -> run:
        dev = self._device
        if len(args) != len(self._args):
            raise TypeError(
                f"{self._name}(): expected {len(self._args)} arguments, got {len(args)}"
            )
        buffers: dict[str, bo] = {}
        scalars: dict[str, int] = {}
        for value, (name, bank) in zip(args, self._args, strict=True):
            if bank is not None:
                if not isinstance(value, bo):
                    raise TypeError(
                        f"{self._name}(): argument {name} must be a bo, got {type(value).__name__}"
                    )
                buffers[name] = value
            else:
                if isinstance(value, bo | bool) or not isinstance(value, int | np.integer):
                    raise TypeError(
                        f"{self._name}(): argument {name} must be an int, got {type(value).__name__}"
                    )
                if not 0 <= int(value) < 2**32:
                    raise TypeError(f"{self._name}(): argument {name}={value} does not fit 32 bits")
                scalars[name] = int(value)
        dev._check()
        fired = _fire("run")
        if fired == "device_lost":
            dev.lost = (
                f"the card stopped answering during a run of {self._name} (injected device_lost)"
            )
            return run(ert_cmd_state.ERT_CMD_STATE_ABORT, message=dev.lost, dev=dev)
        if fired == "timeout":
            return run(ert_cmd_state.ERT_CMD_STATE_TIMEOUT, message="injected timeout", dev=dev)
        if fired == "axi_error":
            return run(ert_cmd_state.ERT_CMD_STATE_ERROR, message="injected AXI SLVERR", dev=dev)
        error = ert_cmd_state.ERT_CMD_STATE_ERROR
        for name, buf in buffers.items():
            lo, hi = self._reach[name]
            if buf._device is not dev:
                return run(error, message=f"{name}: bo of another device (DECERR)", dev=dev)
            if not lo <= buf._group <= hi:
                where = f"HBM[{lo}]" if lo == hi else f"HBM[{lo}:{hi}]"
                return run(
                    error,
                    message=f"{name}: bo in HBM[{buf._group}], the port is connected to {where} (DECERR)",
                    dev=dev,
                )
        spec = _kernels.get(self._name)
        try:
            out, cycles = dev.executor(spec, {n: b._card for n, b in buffers.items()}, scalars)
        except FpgaTimeout as exc:  # a simulated card that never raised ap_done
            return run(ert_cmd_state.ERT_CMD_STATE_TIMEOUT, message=str(exc), dev=dev)
        except DeviceLost as exc:
            dev.lost = str(exc)
            return run(ert_cmd_state.ERT_CMD_STATE_ABORT, message=dev.lost, dev=dev)
        except (HetmemError, IndexError, ValueError) as exc:
            return run(error, message=f"the kernel faulted on its inputs: {exc}", dev=dev)
        flat = out.reshape(-1).view(np.uint8)
        target = buffers[spec.output_args()[0]]
        if flat.nbytes > target._size:
            return run(error, message="out: write past the end of the bo (DECERR)", dev=dev)
        target._card[: flat.nbytes] = flat
        seconds = cycles / self._clock_hz
        return run(ert_cmd_state.ERT_CMD_STATE_COMPLETED, cycles, seconds, dev=dev)
