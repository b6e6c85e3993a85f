"""`open_device("xrt_emu", executor="cosim")`: the xrt driver over `xrt_emu` whose kernels
run on a cosim device (the RTL in Verilator), so the host code of a real card runs end to
end with the RTL as the card. Kernel times are `simulated`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from ..errors import InputError
from ..kernels import KernelSpec
from ..kernels.spec import Arg
from .cosim import CosimDevice
from .device import Buffer, FpgaDevice, Timing
from .implementations import RTL_KERNELS
from .manifest import Manifest, XclbinEntry

# -- the xrt driver over xrt_emu, executed by cosim ------------------------------------------------


class XrtOnCosim(FpgaDevice):
    """The xrt driver over `xrt_emu` whose kernels run on a cosim device: the host code of
    a real card end to end, with the RTL as the card. Kernel times are `simulated`."""

    target = "xrt"

    def __init__(self, inner: FpgaDevice, executor: CosimDevice, owned: bool) -> None:
        super().__init__()
        self.inner, self.executor, self._owned = inner, executor, owned
        # The driver's emulated card: its kernel runs go to the RTL.
        inner._dev.executor = executor.execute  # type: ignore[attr-defined]
        self.clock_hz = inner.clock_hz
        self.transfer_source = inner.transfer_source
        self.name = f"{inner.name}, executed by {executor.name}"

    @property
    def stages_appends(self) -> bool:  # type: ignore[override]
        """The RTL's pre-phase copies staged beats (as the cosim device does)."""
        return bool(self.executor.stages_appends)

    def _alloc(self, spec: KernelSpec, arg: Arg, nbytes: int) -> Buffer:
        return self.inner._alloc(spec, arg, nbytes)

    def _write(self, buf: Buffer, raw: np.ndarray, offset: int) -> Timing:
        return self.inner._write(buf, raw, offset)

    def _read(self, buf: Buffer, nbytes: int, offset: int) -> tuple[np.ndarray, Timing]:
        return self.inner._read(buf, nbytes, offset)

    def _run(
        self,
        spec: KernelSpec,
        buffers: dict[str, Buffer],
        scalars: dict[str, int],
        timeout_s: float,
    ) -> Timing:
        timing = self.inner._run(spec, buffers, scalars, timeout_s)
        return replace(timing, source=self.executor.timing_source)

    def _free(self, buf: Buffer) -> None:
        self.inner._free(buf)

    def _close(self) -> None:
        self.inner.close()
        if self._owned:
            self.executor.close()


def _rtl_xclbin(options: dict[str, Any]) -> dict[str, Any]:
    """Without an `xclbin` option: an emulated build of the manifest's first xclbin whose
    kernels all have RTL (the card cosim stands for), as `open_xrt_emu` builds the default
    one (`xrt.with_emulated_build`); a kernel without RTL is then missing from the card
    (XclbinError), not a failing run."""
    from .xrt import with_emulated_build

    def rtl_entry(manifest: Manifest) -> XclbinEntry:
        rtl = [e for e in manifest.xclbins.values() if set(e.kernels) <= set(RTL_KERNELS)]
        return rtl[0] if rtl else manifest.default()

    return with_emulated_build(options, rtl_entry)


def open_xrt_cosim(executor: Any = "cosim", **options: Any) -> XrtOnCosim:
    """`open_device("xrt_emu", executor="cosim")`: the xrt driver over xrt_emu, its kernels
    run by a cosim device (`executor`: "cosim", a mapping of CosimDevice options, or an open
    CosimDevice, which is shared and not closed here). Other options go to the driver; the
    xclbin defaults to an emulated build of the manifest's RTL-only xclbin."""
    from .xrt import open_xrt_emu

    if isinstance(executor, CosimDevice):
        cosim, owned = executor, False
    elif executor == "cosim":
        cosim, owned = CosimDevice(), True
    elif isinstance(executor, Mapping):
        cosim, owned = CosimDevice(**executor), True
    else:
        raise InputError(
            "executor", f"expected 'emu', 'cosim', cosim options or a CosimDevice, got {executor!r}"
        )
    try:
        inner = open_xrt_emu(**_rtl_xclbin(options))
    except BaseException:
        if owned:
            cosim.close()
        raise
    return XrtOnCosim(inner, cosim, owned)
