"""Errors raised by hetmem. Every public check raises a subclass of `HetmemError`."""

from __future__ import annotations


class HetmemError(Exception):
    """Base class of every error hetmem raises on purpose."""


class InputError(HetmemError, ValueError):
    """A public entry point was given a bad argument.

    `argument` names the offending argument; the message says what was expected.
    """

    def __init__(self, argument: str, message: str):
        self.argument = argument
        super().__init__(f"{argument}: {message}")


class PlacementError(InputError):
    """A placement maps a step to a device that cannot run it."""


class FpgaError(HetmemError):
    """A fault on the FPGA card or in its driver."""


class FpgaTimeout(FpgaError):
    """A kernel run did not finish within its timeout."""


class XclbinError(FpgaError):
    """The xclbin is missing, or does not match the bitstream manifest."""


class AllocationError(FpgaError):
    """A buffer could not be allocated in the HBM bank the kernel spec names."""


class DeviceLost(FpgaError):
    """The card stopped answering in the middle of a run."""


class AxiError(FpgaError):
    """The card answered a transaction with an AXI error response (SLVERR/DECERR)."""


class NoDeviceError(FpgaError):
    """The requested FPGA target is not available on this machine."""


class ConcurrentUse(HetmemError, RuntimeError):
    """A wrapped model's cache was used by a second thread while another thread was in the
    middle of a forward pass over it (one cache holds one sequence of decode steps; give each
    thread its own cache)."""
