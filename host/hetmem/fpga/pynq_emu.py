"""`pynq_emu`: the part of PYNQ 3.0.1's API that the pynq driver (`pynq.py`) uses, on the
card that `xrt_emu` emulates (the golden models run its kernels), so the driver's banks,
argument order, sync ranges, wait handling and fault mapping are tested without PYNQ, XRT or
a card, as the xrt driver is over `xrt_emu`. On Alveo, PYNQ is itself a layer over XRT, so
one emulated card serves both: `xrt_emu.inject(...)` arms faults for this module too.

The API, as in PYNQ 3.0.1 (`import pynq` can be replaced by this module):

    Device.devices               the cards (one per `xrt_emu.CARDS` entry), each with `.name`
    Overlay(xclbin, device=card) programs the card; `.ip_dict`; `.<kernel>_1` -> an IP;
                                 `.HBM<i>` -> the memory of every bank the xclbin uses;
                                 `.free()`
    allocate(shape, dtype, target=overlay.HBM<i>) -> a buffer: a numpy array over the bo's
                                 host copy with `.device_address`, `.sync_to_device()`,
                                 `.sync_from_device()` (a slice syncs only its bytes),
                                 `.freebuffer()`
    ip.start(*args) -> handle    args in the kernel's order: a buffer (its device address,
                                 so a slice passes base + offset) or an int for a scalar;
                                 `handle.done`, `handle.wait()`; `ip.call(*args)` =
                                 start + wait

Behaviour of PYNQ 3.0.1 on Alveo (the ERT path) that the emulation keeps, because the
driver must cope with it:
- `handle.done` turns True only once the handle's events are handled, which `wait()` does
  (PYNQ polls XRT inside `wait()`; nothing completes a run in the background).
- `wait()` returns whatever the run ended in: a failed run (ERT state ERROR, ABORT, ...)
  is recorded only in the handle's future, as RuntimeError("Execution failed: <state>").
- A run that never completes (an injected "timeout": the compute unit hangs) makes `wait()`
  block until the overlay is freed.
- Failed allocations and syncs raise RuntimeError ("Allocate failed", "Flush Failed",
  "Invalidate Failed"); a card refusing the xclbin, RuntimeError("Programming Device
  failed: ..."); a start on a lost card, RuntimeError("Buffer submit failed: ...").

Emulation-only extensions: `EMULATED = True`; `handle.modeled_cycles`,
`handle.modeled_seconds`, `handle.message`; `Overlay.card` (the `xrt_emu.device`).
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import re
import threading
from typing import Any

import numpy as np

from . import xrt_emu

EMULATED = True

#: ERT command states (XRT's ert.h, as PYNQ's `ert.ert_cmd_state` numbers them).
ERT_CMD_STATE_COMPLETED = int(xrt_emu.ert_cmd_state.ERT_CMD_STATE_COMPLETED)
ERT_CMD_STATE_TIMEOUT = int(xrt_emu.ert_cmd_state.ERT_CMD_STATE_TIMEOUT)


class Card:
    """One card of `Device.devices` (PYNQ's XrtDevice): its shell name and index."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.name = xrt_emu.CARDS[index].name

    def __repr__(self) -> str:
        return f"<pynq_emu card {self.index} {self.name}>"


class _Devices(type):
    @property
    def devices(cls) -> list[Card]:
        return [Card(i) for i in range(len(xrt_emu.CARDS))]


class Device(metaclass=_Devices):
    """`Device.devices`: the emulated cards, read from `xrt_emu.CARDS` on each access."""


class Memory:
    """One HBM pseudo-channel of a loaded overlay (PYNQ's XrtMemory)."""

    def __init__(self, overlay: Overlay, idx: int) -> None:
        self.overlay, self.idx = overlay, idx

    def allocate(self, shape: Any, dtype: Any) -> PynqBuffer:
        dtype = np.dtype(dtype)
        size = math.prod(shape if isinstance(shape, tuple | list) else (shape,)) * dtype.itemsize
        try:
            bo = xrt_emu.bo(self.overlay.card, size, xrt_emu.bo.flags.normal, self.idx)
        except RuntimeError as exc:
            raise RuntimeError(f"Allocate failed: {exc}") from None
        raw = np.frombuffer(bo.map(), dtype=np.uint8)
        buf = raw.view(dtype).reshape(shape).view(PynqBuffer)
        buf.bo, buf.offset, buf.device_address = bo, 0, bo.address()
        buf.coherent = False
        self.overlay._bos[bo.address()] = bo
        return buf


class PynqBuffer(np.ndarray):
    """A buffer of `allocate`: an array over its bo's host copy. A slice keeps the bo and
    its byte offset, so syncing or passing a slice covers only its bytes."""

    bo: Any = None
    offset: int = 0
    device_address: int | None = None
    coherent: bool | None = None

    def __array_finalize__(self, obj: Any) -> None:
        if isinstance(obj, PynqBuffer) and obj.bo is not None:
            moved = self.__array_interface__["data"][0] - obj.__array_interface__["data"][0]
            self.bo, self.coherent = obj.bo, obj.coherent
            self.offset = obj.offset + moved
            self.device_address = obj.device_address + moved

    def sync_to_device(self) -> None:
        try:
            self.bo.sync(
                xrt_emu.xclBOSyncDirection.XCL_BO_SYNC_BO_TO_DEVICE, self.nbytes, self.offset
            )
        except RuntimeError as exc:
            raise RuntimeError(f"Flush Failed: {exc}") from None

    def sync_from_device(self) -> None:
        try:
            self.bo.sync(
                xrt_emu.xclBOSyncDirection.XCL_BO_SYNC_BO_FROM_DEVICE, self.nbytes, self.offset
            )
        except RuntimeError as exc:
            raise RuntimeError(f"Invalidate Failed: {exc}") from None

    def freebuffer(self) -> None:
        self.bo = None


def allocate(shape: Any, dtype: Any = "u4", target: Memory | None = None, **_: Any) -> PynqBuffer:
    """A buffer in `target`'s bank (an overlay's `HBM<i>`)."""
    if not isinstance(target, Memory):
        raise RuntimeError("pynq_emu: allocate needs target=overlay.HBM<i>")
    return target.allocate(shape, dtype)


class WaitHandle:
    """A started run (PYNQ's ErtWaitHandle). The emulated card has finished computing by
    the time it exists; `done` and the outcome follow PYNQ's event handling (see above)."""

    def __init__(self, run: xrt_emu.run, overlay: Overlay) -> None:
        self._run, self._overlay = run, overlay
        self._future: concurrent.futures.Future = concurrent.futures.Future()
        self.modeled_cycles = run.modeled_cycles
        self.modeled_seconds = run.modeled_seconds
        self.message = run.message

    @property
    def done(self) -> bool:
        return self._future.done()

    def wait(self) -> None:
        state = int(self._run.state())
        if state == ERT_CMD_STATE_TIMEOUT:  # a hung compute unit: nothing ever completes
            self._overlay._freed.wait()
            return
        if self._future.done():
            return
        if state == ERT_CMD_STATE_COMPLETED:
            self._future.set_result(None)
        else:
            self._future.set_exception(RuntimeError(f"Execution failed: {state}"))


class DefaultIP:
    """The compute unit `<kernel>_1` of an overlay."""

    def __init__(self, overlay: Overlay, kernel: str) -> None:
        self._overlay, self._kernel = overlay, kernel
        self._cu = xrt_emu.kernel(
            overlay.card, overlay._uuid, kernel, xrt_emu.kernel.cu_access_mode.shared
        )
        self._args = overlay._image._kernels[kernel]

    def start(self, *args: Any) -> WaitHandle:
        overlay = self._overlay
        if len(args) != len(self._args):
            raise TypeError(
                f"{self._kernel}: expected {len(self._args)} arguments, got {len(args)}"
            )
        values = []
        for value, (name, bank) in zip(args, self._args, strict=True):
            if bank is None:
                if isinstance(value, bool) or not isinstance(value, int | np.integer):
                    raise TypeError(f"{self._kernel}: argument {name} must be an int")
                values.append(int(value))
                continue
            address = getattr(value, "device_address", None)
            if address is None:
                raise AttributeError(f"{type(value).__name__!r} object has no 'device_address'")
            values.append(overlay._bo_at(int(address)))
        try:
            run = self._cu(*values)
        except RuntimeError as exc:
            raise RuntimeError(f"Buffer submit failed: {exc}") from None
        return WaitHandle(run, overlay)

    def call(self, *args: Any) -> None:
        self.start(*args).wait()


_MEMORY = re.compile(r"HBM(\d+)")


class Overlay:
    """An xclbin programmed on a card: a fresh `xrt_emu.device` (as after a download)."""

    def __init__(
        self,
        bitfile_name: str | os.PathLike,
        download: bool = True,
        device: Card | None = None,
        **_: Any,
    ) -> None:
        card = Device.devices[0] if device is None else device
        self.device = card
        self._freed = threading.Event()
        self._bos: dict[int, Any] = {}
        try:
            self.card = xrt_emu.device(card.index)
            self._image = xrt_emu.xclbin(str(bitfile_name))
            self._uuid = self.card.load_xclbin(self._image)
        except RuntimeError as exc:
            raise RuntimeError(f"Programming Device failed: {exc}") from None
        self.ip_dict = {
            f"{name}_1": {"type": f"xilinx.com:hls:{name}:1.0", "cu_name": f"{name}:{name}_1"}
            for name in self._image._kernels
        }
        used = {b for args in self._image._kernels.values() for _, b in args if b is not None}
        self.mem_dict = {
            f"HBM[{i}]": {"idx": i, "tag": f"HBM[{i}]", "used": int(i in used)}
            for i in range(xrt_emu.HBM_BANKS)
        }

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        if key in self.ip_dict:
            ip = DefaultIP(self, key.rsplit("_", 1)[0])
            setattr(self, key, ip)
            return ip
        found = _MEMORY.fullmatch(key)
        if found and self.mem_dict.get(f"HBM[{found[1]}]", {}).get("used"):
            return Memory(self, int(found[1]))
        raise AttributeError(f"Could not find IP or hierarchy {key} in overlay")

    def _bo_at(self, address: int) -> Any:
        """The bo holding `address`: the bo itself at its base, else a sub-buffer from the
        address to the bo's end (a kernel port reads from the address it is given)."""
        for base, bo in self._bos.items():
            if base <= address < base + bo.size():
                return bo if address == base else _sub_bo(bo, address - base)
        raise RuntimeError(f"pynq_emu: no buffer at device address {address:#x}")

    def free(self) -> None:
        self._freed.set()
        self._bos.clear()


def _sub_bo(parent: Any, offset: int) -> Any:
    """A bo over `parent`'s bytes from `offset` (XRT's sub-buffer): the same card copy."""
    sub = object.__new__(xrt_emu.bo)
    sub._device, sub._group = parent._device, parent._group
    sub._size = parent._size - offset
    sub._address = parent._address + offset
    sub._host, sub._card = parent._host[offset:], parent._card[offset:]
    return sub
