"""The FPGA device and its targets.

    from hetmem.fpga import open_device
    with open_device("emu") as dev:            # or "auto", "xrt", "xrt_emu", "pynq", "cosim"
        keys = dev.alloc("vector_search", "keys", capacity * dim)
        dev.write(keys, int8_rows, offset=rows_before * dim)   # only appended rows cross PCIe
        ...
        timing = dev.run("vector_search", buffers, scalars)    # Timing(seconds, source, ...)
        out, t = dev.read(buffers["out"], np.uint32, queries * k)

Targets: `emu` (golden models, modeled time; the default without a card), `cosim` (RTL in
Verilator, simulated time), `xrt` (a card through pyxrt, measured), `pynq` (a card through
PYNQ, measured), and `xrt_emu` (the xrt driver over an emulated pyxrt; modeled). Faults of
the card raise the `FpgaError` subclasses of `hetmem.errors`; `xrt_emu.inject` injects them.
"""

from __future__ import annotations

from .device import Buffer, DeviceInfo, FpgaDevice, Timing
from .targets import TARGETS, list_devices, open_device, register_target

__all__ = [
    "TARGETS",
    "Buffer",
    "DeviceInfo",
    "FpgaDevice",
    "Timing",
    "list_devices",
    "open_device",
    "register_target",
]
