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


class UnsupportedModel(InputError):
    """`hetmem.models.wrap` was given a model whose attention hetmem cannot decode exactly.

    `architecture` is the model's class, `feature` the attention feature it refuses, `reason`
    why; raised before anything on the model is changed."""

    def __init__(self, architecture: str, feature: str, reason: str):
        self.architecture = architecture
        self.feature = feature
        self.reason = reason
        super().__init__(
            "model", f"{architecture} uses {feature}, which hetmem does not support: {reason}"
        )


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
