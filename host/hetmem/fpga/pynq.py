"""`pynq`: a real Alveo card through PYNQ, the alternative to pyxrt; or the same driver
over `pynq_emu` (`open_pynq_emu()`), the way the xrt driver runs over `xrt_emu`.

PYNQ drives Alveo cards up to v3.0.1 (its Alveo guide: "Starting from PYNQ v3.1, the Alveo
platform is no longer supported"), so the `hw` extra pins pynq==3.0.1 and this driver
follows that release's API:

    overlay = pynq.Overlay(xclbin, device=pynq.Device.devices[index])
    buf = pynq.allocate((nbytes,), np.uint8, target=overlay.HBM<bank>)
    buf[offset:offset + n] = bytes; buf[offset:offset + n].sync_to_device()
    handle = overlay.<kernel>_1.start(*args in spec order); handle.wait()
    buf[offset:offset + n].sync_from_device()

Syncing a slice moves only its bytes, as on the xrt target; a packed allocation is one
buffer per argument, each in the bank the manifest maps it to. PYNQ 3.0.1's wait handle
completes only inside `wait()` (polling `done` alone never sees the run finish) and has no
timeout, so `wait()` runs on a helper thread joined with the run's timeout; and `wait()`
returns even when the run failed, the ERT state being recorded only in the handle's future
(RuntimeError("Execution failed: <state>")), which the driver reads after it:

    COMPLETED (4)                              ok
    no completion within the timeout, TIMEOUT (8)   FpgaTimeout (a run that never completed
                                               also leaves the device lost: a hung compute
                                               unit runs nothing more until the card reopens)
    ERROR (5)                                  AxiError
    ABORT (6), NORESPONSE (9), a failed sync or start   DeviceLost (the device stays lost)

The xclbin is found and its checksum checked through the bitstream manifest before PYNQ
programs the card (the full metadata check, platform and bank map, is the xrt driver's; the
checksum ties the file to the build recorded there). Times are `measured` (wall clock
around sync and run; a run's `cycles` is the measured time at the manifest's kernel clock)
on a card, `modeled` (the PCIe and cycle models, as emu) over `pynq_emu`.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
import time
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import AllocationError, AxiError, DeviceLost, FpgaTimeout, NoDeviceError, XclbinError
from ..kernels import KernelSpec
from ..kernels.spec import Arg
from .device import Buffer, FpgaDevice, Launch, Timing, as_count
from .manifest import Manifest
from .pcie import GEN3_X16

#: ERT command states (XRT's ert.h) a failed run reports, and what each means.
_AXI_STATES = {5: "ERT_CMD_STATE_ERROR", 10: "ERT_CMD_STATE_SKERROR"}
_LOST_STATES = {
    6: "ERT_CMD_STATE_ABORT",
    9: "ERT_CMD_STATE_NORESPONSE",
    11: "ERT_CMD_STATE_SKCRASHED",
}
_TIMEOUT_STATES = {8: "ERT_CMD_STATE_TIMEOUT"}


def import_pynq() -> ModuleType:
    """PYNQ, or NoDeviceError saying it is missing."""
    try:
        return importlib.import_module("pynq")
    except ImportError as exc:
        raise NoDeviceError(
            f"pynq: PYNQ does not import ({exc}); pip install 'hetmem[hw]' (pynq==3.0.1, the "
            "last release that drives Alveo cards) on a machine with XRT and a card, or use "
            "the emu or xrt_emu target"
        ) from None


def run_failure(handle: Any) -> str | None:
    """What a finished run failed with, or None. PYNQ 3.0.1's `wait()` does not raise: a
    failed run leaves RuntimeError("Execution failed: <state>") in the handle's future."""
    future = getattr(handle, "_future", None)
    if future is None or not future.done():
        return None
    try:
        future.result()
    except Exception as exc:
        return str(exc) or type(exc).__name__
    return None


def _state_of(text: str) -> int | None:
    found = re.search(r"(\d+)\s*$", text)
    return int(found[1]) if found else None


class PynqDevice(FpgaDevice):
    """An Alveo card driven through a PYNQ Overlay (the real PYNQ, or `pynq_emu`)."""

    target = "pynq"

    def __init__(
        self,
        *,
        index: int = 0,
        xclbin: str | os.PathLike | None = None,
        manifest: str | os.PathLike | Manifest | None = None,
        clock_hz: float | None = None,
        pynq: ModuleType | None = None,
    ) -> None:
        super().__init__()
        self._pynq = import_pynq() if pynq is None else pynq
        self.emulated = bool(getattr(self._pynq, "EMULATED", False))
        self.transfer_source = "modeled" if self.emulated else "measured"
        self._lost: str | None = None
        manifest = Manifest.load(manifest)
        path, entry = manifest.resolve(xclbin)
        entry.check_specs()
        self.xclbin_sha256 = entry.check_checksum(path)
        index = as_count("index", index)
        cards = list(getattr(self._pynq.Device, "devices", []) or [])
        if index >= len(cards):
            raise NoDeviceError(f"pynq: no card {index} ({len(cards)} found)")
        card = cards[index]
        try:
            self._overlay = self._pynq.Overlay(str(path), device=card)
        except Exception as exc:
            raise XclbinError(f"{path}: PYNQ could not program the card with it: {exc}") from None
        self.entry, self.xclbin_path = entry, path
        self._ips = {name: self._find_ip(name, path.name) for name in entry.kernels}
        self.clock_hz = float(clock_hz) if clock_hz is not None else float(entry.clock_hz)
        label = "pynq over pynq_emu" if self.emulated else "pynq"
        self.name = f"{label} {getattr(card, 'name', card)} {entry.name}"

    @property
    def stages_appends(self) -> bool:  # type: ignore[override]
        """Over pynq_emu (xrt_emu's golden models) the kernels run the pre-phase (staged
        memory beats); on a card, not until its xclbin has it and the manifest says so."""
        card = getattr(self._overlay, "card", None) if self.emulated else None
        return bool(getattr(card, "stages_appends", False))

    def _find_ip(self, kernel: str, xclbin: str) -> Any:
        """The compute unit of `kernel`: Vitis names the first `<kernel>_1`."""
        names = list(getattr(self._overlay, "ip_dict", {}) or {})
        for candidate in (
            f"{kernel}_1",
            kernel,
            *sorted(n for n in names if n.startswith(kernel + "_")),
        ):
            if candidate in names:
                return getattr(self._overlay, candidate)
        raise XclbinError(f"{xclbin}: no compute unit of kernel {kernel} (IPs: {names})")

    # -- faults ------------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._lost is not None:
            raise DeviceLost(f"{self.name}: the card was lost ({self._lost}); open it again")

    def _lose(self, what: str, detail: Any) -> DeviceLost:
        self._lost = f"{what}: {detail}"
        return DeviceLost(f"{self.name}: the card stopped answering during {what}: {detail}")

    # -- the hooks -----------------------------------------------------------------------------
    def _alloc(self, spec: KernelSpec, arg: Arg, nbytes: int) -> Buffer:
        self._check_alive()
        bank = int(arg.bank)  # type: ignore[arg-type]
        try:
            target = getattr(self._overlay, f"HBM{bank}")
            handle = self._pynq.allocate((nbytes,), np.uint8, target=target)
        except Exception as exc:
            raise AllocationError(
                f"{spec.name}.{arg.name}: cannot allocate {nbytes} bytes in HBM bank {bank}: {exc}"
            ) from None
        return Buffer(spec.name, arg.name, bank, nbytes, handle)

    def _sync(self, view: Any, method: str, buf: Buffer) -> float:
        start = time.perf_counter()
        try:
            getattr(view, method)()
        except Exception as exc:
            raise self._lose(f"{method} of {buf.kernel}.{buf.arg}", exc) from None
        return time.perf_counter() - start

    def _transfer(self, seconds: float, nbytes: int) -> Timing:
        if self.emulated:
            return Timing(GEN3_X16.seconds(nbytes), "modeled", nbytes)
        return Timing(seconds, "measured", nbytes)

    def _write(self, buf: Buffer, raw: np.ndarray, offset: int) -> Timing:
        self._check_alive()
        view = buf.handle[offset : offset + raw.nbytes]
        view[:] = raw
        return self._transfer(self._sync(view, "sync_to_device", buf), raw.nbytes)

    def _read(self, buf: Buffer, nbytes: int, offset: int) -> tuple[np.ndarray, Timing]:
        self._check_alive()
        view = buf.handle[offset : offset + nbytes]
        seconds = self._sync(view, "sync_from_device", buf)
        return np.array(view, dtype=np.uint8), self._transfer(seconds, nbytes)

    def _run(
        self,
        spec: KernelSpec,
        buffers: dict[str, Buffer],
        scalars: dict[str, int],
        timeout_s: float,
    ) -> Timing:
        return self._run_async(spec, buffers, scalars, timeout_s).wait()

    def _run_async(
        self,
        spec: KernelSpec,
        buffers: dict[str, Buffer],
        scalars: dict[str, int],
        timeout_s: float,
    ) -> Launch:
        """Start the run now; the launch's wait joins PYNQ's `wait()` with the timeout."""
        try:
            self._check_alive()
            ip = self._ips.get(spec.name)
            if ip is None:
                raise XclbinError(f"{self.xclbin_path.name} has no kernel {spec.name}")
            args = [buffers[a.name].handle if a.is_buffer else scalars[a.name] for a in spec.args]
            start = time.perf_counter()
            try:
                handle = ip.start(*args)
            except Exception as exc:
                raise self._lose(f"the start of {spec.name}", exc) from None
        except Exception as exc:
            return Launch.finished(spec.name, None, exc)
        return Launch(spec.name, lambda: self._finish(spec, handle, start, timeout_s))

    def _finish(self, spec: KernelSpec, handle: Any, start: float, timeout_s: float) -> Timing:
        failed: list[BaseException] = []

        def wait() -> None:
            try:
                handle.wait()
            except BaseException as exc:  # handed to the caller's thread
                failed.append(exc)

        waiter = threading.Thread(target=wait, name=f"hetmem-pynq-wait-{spec.name}", daemon=True)
        waiter.start()
        waiter.join(timeout_s)
        if waiter.is_alive():  # PYNQ's wait stays pending, and the compute unit is hung
            self._lost = f"a run of {spec.name} never completed"
            raise FpgaTimeout(
                f"{spec.name}: no ap_done within {timeout_s} s (the run never completed; "
                "the card must be opened again)"
            )
        seconds = time.perf_counter() - start
        if failed:
            raise self._lose(f"a run of {spec.name}", failed[0])
        failure = run_failure(handle)
        if failure is not None:
            state = _state_of(failure)
            if state in _TIMEOUT_STATES:
                raise FpgaTimeout(f"{spec.name}: no ap_done within {timeout_s} s ({failure})")
            if state in _AXI_STATES:
                raise AxiError(
                    f"{spec.name}: the card answered with an error ({failure}, "
                    f"{_AXI_STATES[state]}: an AXI SLVERR/DECERR on a buffer access)"
                )
            name = _LOST_STATES.get(state, "an unknown ERT state")  # type: ignore[arg-type]
            raise self._lose(f"a run of {spec.name}", f"{failure} ({name})")
        if self.emulated:
            cycles = int(handle.modeled_cycles)
            if handle.modeled_seconds > timeout_s:
                raise FpgaTimeout(
                    f"{spec.name}: no ap_done within {timeout_s} s ({cycles} modeled cycles)"
                )
            return Timing(cycles / self.clock_hz, "modeled", 0, cycles)
        return Timing(seconds, "measured", 0, round(seconds * self.clock_hz))

    def _sub_handle(self, parent: Buffer, arg: str, offset: int, nbytes: int) -> Any:
        """No sub-buffers: a packed allocation is one PYNQ buffer per argument, each in the
        bank the manifest maps it to (a query write of several transfers; the xrt target
        packs them into sub-bos)."""
        return None

    def _free(self, buf: Buffer) -> None:
        release = getattr(buf.handle, "freebuffer", None)
        if callable(release):
            release()
        buf.handle = None

    def _close(self) -> None:
        free = getattr(self._overlay, "free", None)
        if callable(free):
            free()


def open_pynq_emu(**options: Any) -> PynqDevice:
    """The pynq driver over `pynq_emu`, on an emulated build when no `xclbin` is given
    (`xrt.with_emulated_build`: one build per process, shared with the xrt driver's)."""
    from . import pynq_emu
    from .xrt import with_emulated_build

    options = with_emulated_build(options)
    return PynqDevice(pynq=pynq_emu, **options)
