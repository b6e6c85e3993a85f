"""`xrt`: a real Alveo card through pyxrt (XRT's Python binding), or the same driver over
`xrt_emu` (`open_device("xrt_emu")`).

Opening: the card (`pyxrt.device(index)`), the xclbin file found through the bitstream
manifest and checked against it (checksum, platform, kernels and argument counts) before
it is loaded, then each kernel (`pyxrt.kernel(device, uuid, name, shared)`) with the bank
of every buffer argument read back through `kernel.group_id` and the xclbin's memory tags
and checked against the manifest. Buffers are `pyxrt.bo`s in the memory group the kernel
argument is connected to; writes are `bo.write` + sync to the device of exactly the bytes
written, reads a sync from the device + `bo.read`; a run is `kernel(*args)` in the spec's
argument order and `run.wait(timeout_ms)`, whose state maps to the errors:

    ERT_CMD_STATE_COMPLETED                          ok
    ERT_CMD_STATE_TIMEOUT, or still NEW/QUEUED/RUNNING/SUBMITTED   FpgaTimeout
    ERT_CMD_STATE_ERROR, ERT_CMD_STATE_SKERROR       AxiError
    ERT_CMD_STATE_ABORT, NORESPONSE, SKCRASHED       DeviceLost

A failed sync, or any call after the card stopped answering, is `DeviceLost`, and the
device stays lost (open a new one to recover). Times are `measured` (wall clock around
sync and run) on a card; over `xrt_emu` they are `modeled` (PCIe model, cycle model).
"""

from __future__ import annotations

import importlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from .. import kernels
from ..errors import (
    AllocationError,
    AxiError,
    DeviceLost,
    FpgaError,
    FpgaTimeout,
    NoDeviceError,
    XclbinError,
)
from ..kernels import KernelSpec
from ..kernels.engine import port_of
from ..kernels.spec import Arg
from .device import Buffer, FpgaDevice, Timing, as_count
from .manifest import Manifest, XclbinEntry, hbm_bank, sha256_file
from .pcie import GEN3_X16

_TIMEOUT_STATES = {
    "ERT_CMD_STATE_TIMEOUT",
    "ERT_CMD_STATE_NEW",
    "ERT_CMD_STATE_QUEUED",
    "ERT_CMD_STATE_RUNNING",
    "ERT_CMD_STATE_SUBMITTED",
}
_AXI_STATES = {"ERT_CMD_STATE_ERROR", "ERT_CMD_STATE_SKERROR"}
_LOST_STATES = {"ERT_CMD_STATE_ABORT", "ERT_CMD_STATE_NORESPONSE", "ERT_CMD_STATE_SKCRASHED"}


def import_pyxrt() -> ModuleType:
    """The real pyxrt (from an XRT install), or NoDeviceError saying it is missing."""
    try:
        return importlib.import_module("pyxrt")
    except ImportError as exc:
        raise NoDeviceError(
            f"xrt: pyxrt does not import ({exc}); install XRT and source "
            "/opt/xilinx/xrt/setup.sh, or use the emu or xrt_emu target"
        ) from None


def _state_name(state: Any) -> str:
    return str(getattr(state, "name", state)).rsplit(".", 1)[-1]


class XrtDevice(FpgaDevice):
    """An Alveo card driven through `pyxrt` (the real module, or `xrt_emu`)."""

    target = "xrt"

    def __init__(
        self,
        pyxrt: ModuleType | None = None,
        *,
        index: int | str = 0,
        xclbin: str | os.PathLike | None = None,
        manifest: str | os.PathLike | Manifest | None = None,
        clock_hz: float | None = None,
    ) -> None:
        super().__init__()
        self._xrt = import_pyxrt() if pyxrt is None else pyxrt
        self.emulated = bool(getattr(self._xrt, "EMULATED", False))
        self.transfer_source = "modeled" if self.emulated else "measured"
        self._lost: str | None = None
        manifest = Manifest.load(manifest)
        path, entry = manifest.resolve(xclbin)
        entry.check_specs()
        try:
            self._dev = self._xrt.device(index)
        except Exception as exc:
            raise NoDeviceError(f"xrt: cannot open card {index!r}: {exc}") from None
        self.entry = entry
        self.xclbin_path = path
        self.xclbin_sha256 = entry.check_checksum(path)
        self._load(path, entry)
        self.clock_hz = float(clock_hz) if clock_hz is not None else float(entry.clock_hz)
        label = "xrt over xrt_emu" if self.emulated else "xrt"
        self.name = f"{label} {self._info('name')} ({self._info('bdf')}) {entry.name}"

    # -- opening ---------------------------------------------------------------------------
    def _info(self, key: str) -> str:
        try:
            return str(self._dev.get_info(getattr(self._xrt.xrt_info_device, key)))
        except Exception:
            return "?"

    def _load(self, path: Path, entry: XclbinEntry) -> None:
        """Check the xclbin's metadata against the manifest, load it, open the kernels and
        check the bank of every buffer argument."""
        try:
            image = self._xrt.xclbin(str(path))
        except Exception as exc:
            raise XclbinError(f"{path}: not a loadable xclbin: {exc}") from None
        try:
            platform = str(image.get_xsa_name())
            kernel_args = {k.get_name(): int(k.get_num_args()) for k in image.get_kernels()}
            tags = {int(m.get_index()): str(m.get_tag()) for m in image.get_mems()}
        except Exception as exc:
            raise XclbinError(f"{path}: cannot read its metadata: {exc}") from None
        entry.check_metadata(platform, kernel_args)
        try:
            self._uuid = self._dev.load_xclbin(image)
        except Exception as exc:
            raise XclbinError(f"{path}: the card refused to load it: {exc}") from None
        self._kernels: dict[str, Any] = {}
        self._groups: dict[tuple[str, str], int] = {}
        banks: dict[str, dict[str, int | None]] = {}
        mode = self._xrt.kernel.cu_access_mode.shared
        for name in entry.kernels:
            try:
                handle = self._xrt.kernel(self._dev, self._uuid, name, mode)
            except Exception as exc:
                raise XclbinError(f"{path}: cannot open kernel {name}: {exc}") from None
            self._kernels[name] = handle
            spec = kernels.get(name)
            banks[name] = {}
            for i, arg in enumerate(spec.args):
                if not arg.is_buffer:
                    continue
                try:
                    group = int(handle.group_id(i))
                except Exception as exc:
                    raise XclbinError(
                        f"{path}: {name}.{arg.name} has no memory group: {exc}"
                    ) from None
                self._groups[(name, arg.name)] = group
                banks[name][arg.name] = hbm_bank(tags.get(group, ""))
        entry.check_metadata(platform, kernel_args, banks)

    @property
    def stages_appends(self) -> bool:  # type: ignore[override]
        """Over xrt_emu the kernels run the pre-phase (staged memory beats) when its
        executor does (the golden models, the RTL in cosim); on a card, not until its xclbin
        is built from RTL with the pre-phase and the manifest says so."""
        return bool(self.emulated and getattr(self._dev, "stages_appends", False))

    # -- faults ------------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._lost is not None:
            raise DeviceLost(f"{self.name}: the card was lost ({self._lost}); open it again")

    def _lose(self, what: str, exc: BaseException | str) -> DeviceLost:
        self._lost = f"{what}: {exc}"
        return DeviceLost(f"{self.name}: the card stopped answering during {what}: {exc}")

    def _alive(self) -> bool:
        """Whether the card still answers (asked after a failed allocation)."""
        try:
            offline = str(self._dev.get_info(self._xrt.xrt_info_device.offline))
        except Exception:
            return False
        return offline.strip().lower() not in ("true", "1")

    # -- the hooks -----------------------------------------------------------------------------
    def _alloc(self, spec: KernelSpec, arg: Arg, nbytes: int) -> Buffer:
        self._check_alive()
        if spec.name not in self._kernels:
            raise XclbinError(f"{self.xclbin_path.name} has no kernel {spec.name}")
        group = self._groups[(spec.name, arg.name)]
        handle = self._bo(
            f"allocating {spec.name}.{arg.name}",
            f"{spec.name}.{arg.name}: cannot allocate {nbytes} bytes in HBM bank {arg.bank} "
            f"(memory group {group})",
            self._dev, nbytes, self._xrt.bo.flags.normal, group,
        )  # fmt: skip
        return Buffer(spec.name, arg.name, int(arg.bank), nbytes, handle)  # type: ignore[arg-type]

    def _bo(self, doing: str, refused: str, *args: Any) -> Any:
        """`pyxrt.bo(*args)`: a card that stopped answering is lost (`doing` says when);
        any other failure an `AllocationError` (`refused`: what was asked)."""
        try:
            return self._xrt.bo(*args)
        except Exception as exc:
            if not self._alive():
                raise self._lose(doing, exc) from None
            raise AllocationError(f"{refused}: {exc}") from None

    def _sub_handle(self, parent: Buffer, arg: str, offset: int, nbytes: int) -> Any:
        """A sub-bo of `parent` (`pyxrt.bo(parent, size, offset)`) where `arg` rides on the
        AXI master that carries the parent's argument: the query side's arguments share one,
        connected to an HBM range that reaches each of their banks (fpga/gen.py's
        connectivity), so a packed query goes as one write and one sync (one PCIe
        transaction). Else None: each argument its own bo in its own bank."""
        if port_of(parent.kernel, arg) != port_of(parent.kernel, parent.arg):
            return None
        self._check_alive()
        return self._bo(
            f"a sub-buffer of {parent.kernel}.{parent.arg}",
            f"{parent.kernel}.{arg}: cannot make a {nbytes}-byte sub-buffer at {offset} of "
            f"{parent.arg}'s bo",
            parent.handle, nbytes, offset,
        )  # fmt: skip

    def _sync(self, buf: Buffer, direction: str, nbytes: int, offset: int) -> float:
        flag = getattr(self._xrt.xclBOSyncDirection, direction)
        start = time.perf_counter()
        try:
            buf.handle.sync(flag, nbytes, offset)
        except Exception as exc:
            raise self._lose(f"a sync of {buf.kernel}.{buf.arg}", exc) from None
        return time.perf_counter() - start

    def _transfer(self, seconds: float, nbytes: int) -> Timing:
        if self.emulated:
            return Timing(GEN3_X16.seconds(nbytes), "modeled", nbytes)
        return Timing(seconds, "measured", nbytes)

    def _write(self, buf: Buffer, raw: np.ndarray, offset: int) -> Timing:
        self._check_alive()
        buf.handle.write(raw, offset)
        seconds = self._sync(buf, "XCL_BO_SYNC_BO_TO_DEVICE", raw.nbytes, offset)
        return self._transfer(seconds, raw.nbytes)

    def _read(self, buf: Buffer, nbytes: int, offset: int) -> tuple[np.ndarray, Timing]:
        self._check_alive()
        seconds = self._sync(buf, "XCL_BO_SYNC_BO_FROM_DEVICE", nbytes, offset)
        data = np.asarray(buf.handle.read(nbytes, offset)).view(np.uint8).copy()
        return data, self._transfer(seconds, nbytes)

    def _run(
        self,
        spec: KernelSpec,
        buffers: dict[str, Buffer],
        scalars: dict[str, int],
        timeout_s: float,
    ) -> Timing:
        self._check_alive()
        handle = self._kernels.get(spec.name)
        if handle is None:
            raise XclbinError(f"{self.xclbin_path.name} has no kernel {spec.name}")
        args = [buffers[a.name].handle if a.is_buffer else scalars[a.name] for a in spec.args]
        timeout_ms = max(1, int(np.ceil(timeout_s * 1e3)))
        start = time.perf_counter()
        try:
            run = handle(*args)
            state = run.wait(timeout_ms)
        except Exception as exc:
            raise self._lose(f"a run of {spec.name}", exc) from None
        seconds = time.perf_counter() - start
        name = _state_name(state)
        detail = getattr(run, "message", "")
        detail = f": {detail}" if detail else ""
        if name in _TIMEOUT_STATES:
            raise FpgaTimeout(f"{spec.name}: no ap_done within {timeout_s} s ({name}){detail}")
        if name in _AXI_STATES:
            raise AxiError(
                f"{spec.name}: the card answered with an error ({name}: an AXI SLVERR/DECERR "
                f"on a buffer access){detail}"
            )
        if name in _LOST_STATES:
            raise self._lose(f"a run of {spec.name}", f"{name}{detail}")
        if name != "ERT_CMD_STATE_COMPLETED":
            raise FpgaError(f"{spec.name}: the run ended in an unexpected state {name}{detail}")
        if self.emulated:
            cycles = int(run.modeled_cycles)
            return Timing(cycles / self.clock_hz, "modeled", 0, cycles)
        return Timing(seconds, "measured", 0, round(seconds * self.clock_hz))

    def _free(self, buf: Buffer) -> None:
        buf.handle = None  # XRT frees a bo when its last reference goes

    def _close(self) -> None:
        self._kernels = {}
        self._dev = None


def open_xrt(**options: Any) -> XrtDevice:
    """The xrt target on a real card (pyxrt from XRT)."""
    return XrtDevice(import_pyxrt(), **options)


_EMULATED_BUILDS: dict[tuple[str, str], tuple[Path, str]] = {}


def with_emulated_build(
    options: dict[str, Any], choose: Callable[[Manifest], XclbinEntry] | None = None
) -> dict[str, Any]:
    """`options` with an `xclbin`: without one, an emulated build of the manifest's xclbin
    (`choose(manifest)`'s entry; default the manifest's default) is written (once per
    process) and its checksum recorded in a copy of the manifest, as a build would; a
    driver then checks it like any xclbin (the xrt and pynq drivers over their emulated
    APIs, and xrt over cosim)."""
    from . import xrt_emu

    if options.get("xclbin") is not None:
        return options
    manifest = Manifest.load(options.get("manifest"))
    entry = manifest.default() if choose is None else choose(manifest)
    key = (str(manifest.path), entry.name)
    if key not in _EMULATED_BUILDS or not _EMULATED_BUILDS[key][0].is_file():
        directory = Path(tempfile.mkdtemp(prefix="hetmem-xrt-emu-"))
        path = xrt_emu.write_xclbin(
            directory / entry.name,
            kernels=entry.kernels,
            platform=entry.shell or entry.platform,
            clock_hz=entry.clock_hz,
        )
        _EMULATED_BUILDS[key] = (path, sha256_file(path))
    path, digest = _EMULATED_BUILDS[key]
    return {**options, "xclbin": path, "manifest": manifest.with_checksum(entry.name, digest)}


def open_xrt_emu(**options: Any) -> XrtDevice:
    """The xrt driver over `xrt_emu`, on an emulated build when no `xclbin` is given
    (`with_emulated_build`)."""
    from . import xrt_emu

    options = with_emulated_build(options)
    if "index" in options and not isinstance(options["index"], str):
        options["index"] = as_count("index", options["index"])
    return XrtDevice(xrt_emu, **options)
