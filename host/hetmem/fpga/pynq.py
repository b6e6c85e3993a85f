"""`pynq`: a real Alveo card through PYNQ 3.x, the alternative to pyxrt.

    overlay = pynq.Overlay(xclbin, device=pynq.Device.devices[index])
    buf = pynq.allocate((nbytes,), np.uint8, target=overlay.HBM<bank>)
    buf[offset:offset + n] = bytes; buf[offset:offset + n].sync_to_device()
    handle = overlay.<kernel>_1.start(*args in spec order); poll handle.done; handle.wait()
    buf[offset:offset + n].sync_from_device()

Syncing a slice moves only its bytes, as on the xrt target. The xclbin is found and its
checksum checked through the bitstream manifest before PYNQ programs the card (the full
metadata check, platform and bank map, is the xrt driver's; the checksum ties the file to
the build recorded there). Times are `measured` (wall clock around sync and run);
a run's `cycles` is the measured time at the manifest's kernel clock.
"""

from __future__ import annotations

import importlib
import os
import time
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import AllocationError, AxiError, DeviceLost, FpgaTimeout, NoDeviceError, XclbinError
from ..kernels import KernelSpec
from ..kernels.spec import Arg
from .device import Buffer, FpgaDevice, Timing, as_count
from .manifest import Manifest


def import_pynq() -> ModuleType:
    """PYNQ, or NoDeviceError saying it is missing."""
    try:
        return importlib.import_module("pynq")
    except ImportError as exc:
        raise NoDeviceError(
            f"pynq: PYNQ does not import ({exc}); pip install 'hetmem[hw]' on a machine with "
            "XRT and a card, or use the emu or xrt_emu target"
        ) from None


class PynqDevice(FpgaDevice):
    """An Alveo card driven through a PYNQ Overlay."""

    target = "pynq"
    transfer_source = "measured"

    def __init__(
        self,
        *,
        index: int = 0,
        xclbin: str | os.PathLike | None = None,
        manifest: str | os.PathLike | Manifest | None = None,
        clock_hz: float | None = None,
        poll_s: float = 1e-4,
        pynq: ModuleType | None = None,
    ) -> None:
        super().__init__()
        self._pynq = import_pynq() if pynq is None else pynq
        manifest = Manifest.load(manifest)
        path, entry = manifest.resolve(xclbin)
        entry.check_specs()
        entry.check_checksum(path)
        index = as_count("index", index)
        cards = list(getattr(self._pynq.Device, "devices", []) or [])
        if index >= len(cards):
            raise NoDeviceError(f"pynq: no card {index} ({len(cards)} found)")
        card = cards[index]
        try:
            self._overlay = self._pynq.Overlay(str(path), device=card)
        except Exception as exc:
            raise XclbinError(f"{path}: PYNQ could not program the card with it: {exc}") from None
        self._ips = {name: self._find_ip(name, path.name) for name in entry.kernels}
        self.entry, self.xclbin_path = entry, path
        self.clock_hz = float(clock_hz) if clock_hz is not None else float(entry.clock_hz)
        self.poll_s = float(poll_s)
        self.name = f"pynq {getattr(card, 'name', card)} {entry.name}"

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

    def _alloc(self, spec: KernelSpec, arg: Arg, nbytes: int) -> Buffer:
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
            raise DeviceLost(
                f"{self.name}: {method} of {buf.kernel}.{buf.arg} failed: {exc}"
            ) from None
        return time.perf_counter() - start

    def _write(self, buf: Buffer, raw: np.ndarray, offset: int) -> Timing:
        view = buf.handle[offset : offset + raw.nbytes]
        view[:] = raw
        return Timing(self._sync(view, "sync_to_device", buf), "measured", raw.nbytes)

    def _read(self, buf: Buffer, nbytes: int, offset: int) -> tuple[np.ndarray, Timing]:
        view = buf.handle[offset : offset + nbytes]
        seconds = self._sync(view, "sync_from_device", buf)
        return np.array(view, dtype=np.uint8), Timing(seconds, "measured", nbytes)

    def _run(
        self,
        spec: KernelSpec,
        buffers: dict[str, Buffer],
        scalars: dict[str, int],
        timeout_s: float,
    ) -> Timing:
        ip = self._ips.get(spec.name)
        if ip is None:
            raise XclbinError(f"{self.xclbin_path.name} has no kernel {spec.name}")
        args = [buffers[a.name].handle if a.is_buffer else scalars[a.name] for a in spec.args]
        start = time.perf_counter()
        deadline = start + timeout_s
        try:
            handle = ip.start(*args)
            while hasattr(handle, "done") and not handle.done:
                if time.perf_counter() > deadline:
                    raise FpgaTimeout(f"{spec.name}: no ap_done within {timeout_s} s")
                time.sleep(self.poll_s)
            handle.wait()
        except FpgaTimeout:
            raise
        except Exception as exc:
            text = str(exc)
            if "ERROR" in text.upper():
                raise AxiError(f"{spec.name}: the card answered with an error: {text}") from None
            raise DeviceLost(f"{self.name}: a run of {spec.name} failed: {text}") from None
        seconds = time.perf_counter() - start
        return Timing(seconds, "measured", 0, round(seconds * self.clock_hz))

    def _free(self, buf: Buffer) -> None:
        release = getattr(buf.handle, "freebuffer", None)
        if callable(release):
            release()
        buf.handle = None

    def _close(self) -> None:
        free = getattr(self._overlay, "free", None)
        if callable(free):
            free()
