"""Opening an FPGA device by target name, and listing what this machine has.

Targets are looked up lazily ("module:factory"), so a missing optional driver (pyxrt, PYNQ,
the cosim simulator) only matters when it is asked for. The cosim target lives in
`hetmem.fpga.cosim` (class `CosimDevice`, the RTL work); until that module exists,
opening it raises NoDeviceError.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import InputError, NoDeviceError
from .device import DeviceInfo, FpgaDevice

#: target -> "module:factory" (a callable taking the target's keyword options).
TARGETS: dict[str, str] = {
    "emu": "hetmem.fpga.emu:EmuDevice",
    "cosim": "hetmem.fpga.cosim:CosimDevice",
    "hls": "hetmem.fpga.hls:HlsDevice",
    "xrt": "hetmem.fpga.xrt:open_xrt",
    "xrt_emu": "hetmem.fpga.xrt:open_xrt_emu",
    "pynq": "hetmem.fpga.pynq:PynqDevice",
}


def register_target(name: str, factory: str | Callable[..., FpgaDevice]) -> None:
    """Add or replace a target: a factory, or its "module:attribute" path."""
    if not isinstance(name, str) or not name:
        raise InputError("name", f"expected a target name, got {name!r}")
    TARGETS[name] = factory  # type: ignore[assignment]


def _factory(target: str) -> Callable[..., FpgaDevice]:
    ref: Any = TARGETS[target]
    if callable(ref):
        return ref
    module_name, attr = ref.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise NoDeviceError(
            f"{target}: this target is not available ({module_name} is missing)"
        ) from None
    return getattr(module, attr)


def card_found() -> bool:
    """Whether pyxrt imports and sees at least one card."""
    try:
        pyxrt = importlib.import_module("pyxrt")
        return int(pyxrt.enumerate_devices()) > 0
    except Exception:
        return False


def open_device(target: str | FpgaDevice = "auto", **options: Any) -> FpgaDevice:
    """Open an FPGA device: "auto" (xrt when pyxrt imports and finds a card, else emu),
    "emu", "cosim", "hls", "xrt", "xrt_emu" or "pynq"; an FpgaDevice is returned as it is.
    "xrt_emu" takes `executor`: "emu" (default) or "cosim" (the RTL runs its kernels; also
    cosim options, or an open CosimDevice)."""
    if isinstance(target, FpgaDevice):
        if options:
            raise InputError("options", f"{sorted(options)} given with an already-open device")
        return target
    if target is None:
        target = "auto"
    if not isinstance(target, str) or (target != "auto" and target not in TARGETS):
        raise InputError(
            "target", f"unknown FPGA target {target!r}; targets are auto, {', '.join(TARGETS)}"
        )
    if target == "auto":
        target = "xrt" if card_found() else "emu"
    if target == "xrt_emu" and "executor" in options:  # what runs the emulated card's kernels
        executor = options.pop("executor")
        if executor is not None and executor != "emu":
            from .xrt_cosim import open_xrt_cosim

            return open_xrt_cosim(executor, **options)
    check_options(target, options)
    return _factory(target)(**options)


def check_options(target: str, options: Mapping[str, Any]) -> None:
    """An `InputError` naming an option that target's device does not take (checked before
    anything opens; a target whose module is missing, or "auto", is checked when opened)."""
    options = dict(options)
    if target == "xrt_emu" and options.pop("executor", None) not in (None, "emu"):
        return  # the cosim executor takes its own options (open_xrt_cosim checks them)
    if target not in TARGETS:
        return
    try:
        factory = _factory(target)
    except (NoDeviceError, ImportError):  # said when the device opens
        return
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as exc:
        raise InputError("options", f"{target}: {exc}") from None
    except ValueError:  # no signature to check (a builtin): the factory checks
        pass


def list_devices() -> list[DeviceInfo]:
    """Every target and whether it can open here; one line per card for xrt and pynq."""
    found = [DeviceInfo("emu", True, "golden models, modeled U55C", "timing: modeled")]
    try:
        cosim = _factory("cosim")
        module = importlib.import_module(cosim.__module__)
        check = getattr(module, "available", None)
        ok = bool(check()) if callable(check) else True
        found.append(DeviceInfo("cosim", ok, "RTL simulated by Verilator", "timing: simulated"))
    except Exception as exc:
        found.append(DeviceInfo("cosim", False, "RTL simulated by Verilator", str(exc)))
    try:
        from . import hls

        reason = hls.missing()
        found.append(
            DeviceInfo(
                "hls",
                reason is None,
                f"HLS C++ C-simulated with g++ ({', '.join(hls.HLS_KERNELS)})",
                reason or "timing: modeled (HLS loop schedule)",
            )
        )
    except Exception as exc:
        found.append(DeviceInfo("hls", False, "HLS C++ C-simulated with g++", str(exc)))
    found.extend(_xrt_cards())
    from . import xrt_emu

    for i, card in enumerate(xrt_emu.CARDS):
        found.append(
            DeviceInfo(
                "xrt_emu",
                True,
                f"{card.name} (emulated card {i})",
                "xrt driver over xrt_emu; timing: modeled",
            )
        )
    found.extend(_pynq_cards())
    return found


def _xrt_cards() -> list[DeviceInfo]:
    try:
        pyxrt = importlib.import_module("pyxrt")
    except ImportError as exc:
        return [
            DeviceInfo("xrt", False, "Alveo card through pyxrt", f"pyxrt does not import: {exc}")
        ]
    cards = []
    try:
        count = int(pyxrt.enumerate_devices())
    except Exception as exc:
        return [
            DeviceInfo("xrt", False, "Alveo card through pyxrt", f"cannot enumerate cards: {exc}")
        ]
    for i in range(count):
        try:
            dev = pyxrt.device(i)
            name = dev.get_info(pyxrt.xrt_info_device.name)
            bdf = dev.get_info(pyxrt.xrt_info_device.bdf)
            cards.append(DeviceInfo("xrt", True, str(name), f"card {i} at {bdf}; timing: measured"))
        except Exception as exc:
            cards.append(DeviceInfo("xrt", False, f"card {i}", f"cannot open: {exc}"))
    return cards or [
        DeviceInfo("xrt", False, "Alveo card through pyxrt", "pyxrt imports but finds no card")
    ]


def _pynq_cards() -> list[DeviceInfo]:
    try:
        pynq = importlib.import_module("pynq")
    except ImportError as exc:
        return [
            DeviceInfo("pynq", False, "Alveo card through PYNQ", f"pynq does not import: {exc}")
        ]
    try:
        cards = list(pynq.Device.devices)
    except Exception as exc:
        return [DeviceInfo("pynq", False, "Alveo card through PYNQ", f"cannot list cards: {exc}")]
    if not cards:
        return [
            DeviceInfo("pynq", False, "Alveo card through PYNQ", "PYNQ imports but finds no card")
        ]
    return [
        DeviceInfo("pynq", True, str(getattr(c, "name", c)), f"card {i}; timing: measured")
        for i, c in enumerate(cards)
    ]
