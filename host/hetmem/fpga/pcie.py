"""The modeled PCIe link between the host and an Alveo U55C (Gen3 x16), used for transfer
times on the emulated targets (`emu`, `xrt` over `xrt_emu`); real cards measure instead.

One DMA transfer of `nbytes` takes

    seconds(nbytes) = LATENCY_S + nbytes / DMA_BANDWIDTH

so the effective bandwidth nbytes / seconds rises with the transfer size toward
DMA_BANDWIDTH: half of it at nbytes = LATENCY_S * DMA_BANDWIDTH (60 KB), 90% at 540 KB.

Where the constants come from:
- Raw link: Gen3 signals 8 GT/s per lane, 16 lanes, 128b/130b encoding:
  8e9 * 16 * 128/130 / 8 = 15.75 GB/s per direction (`RAW_BANDWIDTH`).
- Protocol: with the usual 256-byte max payload, each TLP carries ~24 bytes of header,
  sequence number, LCRC and framing (~91% payload efficiency, ~14.4 GB/s), and the DMA
  engine adds descriptor fetches and completions; XDMA shells are typically measured at
  11-13 GB/s for large host-to-card and card-to-host transfers. We take 12 GB/s
  (`DMA_BANDWIDTH`).
- Latency: a buffer sync through XRT (ioctl, descriptor set-up, completion interrupt) costs
  a few microseconds before any byte moves; we take 5 us (`LATENCY_S`).

These are a model, not a measurement: every figure computed here carries the source
`modeled`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from ..errors import InputError

#: Gen3: 8 GT/s per lane, x16, 128b/130b encoding -> bytes per second, one direction.
RAW_BANDWIDTH = 8e9 * 16 * (128 / 130) / 8
#: Typical measured large-transfer DMA bandwidth of an XDMA shell (11-13 GB/s).
DMA_BANDWIDTH = 12e9
#: Fixed cost of one transfer (sync call, descriptors, completion).
LATENCY_S = 5e-6


@dataclass(frozen=True)
class PcieLink:
    """A PCIe link's transfer model: a fixed latency plus bytes at the DMA bandwidth."""

    latency_s: float = LATENCY_S
    bandwidth: float = DMA_BANDWIDTH  # bytes per second, large transfers

    def __post_init__(self) -> None:
        if not self.latency_s >= 0:
            raise InputError("latency_s", f"expected >= 0, got {self.latency_s}")
        if not 0 < self.bandwidth <= RAW_BANDWIDTH:
            raise InputError(
                "bandwidth", f"expected 0 < bandwidth <= {RAW_BANDWIDTH:.4g}, got {self.bandwidth}"
            )

    def seconds(self, nbytes: int) -> float:
        """Modeled time of one transfer of `nbytes` (0 bytes: no transfer, no time)."""
        nbytes = _check_nbytes(nbytes)
        return 0.0 if nbytes == 0 else self.latency_s + nbytes / self.bandwidth

    def effective_bandwidth(self, nbytes: int) -> float:
        """Bytes per second one transfer of `nbytes` achieves: rises toward `bandwidth`."""
        nbytes = _check_nbytes(nbytes)
        return 0.0 if nbytes == 0 else nbytes / self.seconds(nbytes)


def _check_nbytes(nbytes: object) -> int:
    try:
        value = operator.index(nbytes)  # type: ignore[arg-type]
    except TypeError:
        value = -1
    if isinstance(nbytes, bool) or value < 0:
        raise InputError("nbytes", f"expected a non-negative int, got {nbytes!r}")
    return value


#: The U55C's link: PCIe Gen3 x16 through the XDMA shell.
GEN3_X16 = PcieLink()


def transfer_seconds(nbytes: int, link: PcieLink = GEN3_X16) -> float:
    """Modeled seconds of one host<->card transfer of `nbytes` over `link`."""
    return link.seconds(nbytes)
