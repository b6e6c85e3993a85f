"""`hls`: the FPGA target whose kernels are the HLS C++ of hls/, C-simulated with g++.

The kernels (hls/<kernel>.cpp, Vitis HLS style: ap_int types, m_axi bundles per HBM
argument, s_axilite control in the spec's argument order) and the C-simulation ABI
(hls/csim_abi.cpp) are compiled by `make -C hls lib` against the ap_types headers that
hls4ml ships (`pip install 'hetmem[hls]'`) into one shared library, built once per hash of
the sources, the compiler and the headers into a cache folder ($HETMEM_CACHE/hls, else
build/hls/ under the repository) and loaded with ctypes. A call runs the kernel's top
function over the bytes of the buffers it binds.

Timing: the C-simulation counts the cycles of the kernel's schedule as its loops run
(trip counts x the II each loop's pragma asks for + pipeline depth, an HBM read latency per
burst; hls/hetmem_hls.h). No HLS scheduler confirmed those IIs here, so kernel times are
`modeled` (a formula evaluated on the actual trip counts), not `simulated`. Transfers follow
the PCIe model: `modeled`.

Kernels without an HLS implementation (the RTL-only ones) raise `XclbinError` at
allocation or run, as the xrt driver does for a kernel missing from the xclbin, so the
pipeline's fault policy applies; they are never run on the golden model under this label.
A call is checked the way the golden model checks it before anything runs (`InputError`
naming the argument); the kernel itself refuses what it can see (n, k, dim, mode, segments,
term and document ids) by writing nothing.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, NoDeviceError, XclbinError
from ..kernels import KernelInputs, KernelSpec
from ..kernels.spec import MAX_SHIFT, MODE_THRESHOLD, MODE_TOPK, SEGS, STAGED, Arg
from ..kernels.topk import check_k
from .device import Buffer
from .emu import BANK_BYTES, EmuDevice, view_inputs
from .implementations import HLS_KERNELS as HLS_KERNELS  # re-exported
from .pcie import GEN3_X16, PcieLink

ROOT = Path(__file__).resolve().parents[3]
#: The HLS C++ kernels and their Makefile.
HLS_DIR = ROOT / "hls"
#: The library the Makefile builds.
LIBRARY = "libhetmem_hls.so"

#: hm::Status codes of hls/hetmem_hls.h -> (argument, what the kernel refused).
REFUSALS = {
    1: ("n", "is 0 or beyond the HLS build's NMAX"),
    2: ("k", "is outside [1, rows] of a query"),
    3: (SEGS, "a segment's rows are outside [1, n]"),
    4: ("dim", "is 0 or beyond the HLS build's DMAX"),
    5: ("mode", "is neither top-k (0) nor threshold (1)"),
    6: ("terms", "a term id is outside [-1, vocab)"),
    7: ("doc_ids", "a posting names a document >= n"),
    8: ("terms_per_query", "more terms per query than the score width holds"),
    9: (STAGED, "the HLS kernels copy no staged memory beats (staged must be 0)"),
}


# -- what this machine has ---------------------------------------------------------------------


def ap_types_dir() -> Path | None:
    """The ap_types headers hls4ml ships ($HETMEM_AP_TYPES overrides), or None."""
    env = os.environ.get("HETMEM_AP_TYPES")
    if env:
        return Path(env) if (Path(env) / "ap_int.h").is_file() else None
    spec = importlib.util.find_spec("hls4ml")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "templates" / "vivado" / "ap_types"
    return path if (path / "ap_int.h").is_file() else None


def missing(hls_dir: Path = HLS_DIR) -> str | None:
    """Why the hls target cannot run here, or None when it can."""
    for tool in ("g++", "make"):
        if shutil.which(tool) is None:
            return f"the C-simulation needs {tool}, which is not on PATH"
    if ap_types_dir() is None:
        return "no ap_types headers: hls4ml is not installed (pip install 'hetmem[hls]')"
    if not (hls_dir / "Makefile").is_file():
        return f"no Makefile in {hls_dir}"
    if not any((hls_dir / f"{k}.cpp").is_file() for k in HLS_KERNELS):
        return f"no HLS kernel (<kernel>.cpp) in {hls_dir}"
    return None


def available() -> bool:
    """Whether `open_device("hls")` can run here (list_devices asks)."""
    return missing() is None


def no_hls(kernel: str) -> str:
    return (
        f"hls: {kernel} has no HLS implementation (hls/ has {', '.join(HLS_KERNELS)}); "
        "run it on the emu or cosim target"
    )


def compiler_version() -> str:
    """`g++ --version`'s first line ("" when g++ is missing): part of the cache key."""
    try:
        out = subprocess.run(["g++", "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.splitlines()[0].strip() if out.stdout else ""


def cache_root() -> Path:
    """Where built libraries live: $HETMEM_CACHE/hls, else build/hls in the repository."""
    env = os.environ.get("HETMEM_CACHE")
    return Path(env) / "hls" if env else ROOT / "build" / "hls"


# -- building the library ----------------------------------------------------------------------


@dataclass(frozen=True)
class Library:
    """The built C-simulation library: where it is and how it was built."""

    path: Path
    key: str
    #: True when this call compiled it; False when it came from the cache.
    built: bool
    #: Wall seconds the build took (when it was built, in whichever process).
    build_seconds: float
    compiler: str


def _sources(hls_dir: Path) -> list[Path]:
    sources = [*hls_dir.glob("*.h"), *hls_dir.glob("*.cpp"), *hls_dir.glob("tb/*.cpp")]
    return sorted([*sources, hls_dir / "Makefile"])


def library_key(hls_dir: Path = HLS_DIR) -> str:
    """The cache key: the HLS sources and Makefile, the ap_types headers and g++."""
    h = hashlib.sha256()
    for path in _sources(hls_dir):
        h.update(path.relative_to(hls_dir).as_posix().encode() + b"\0" + path.read_bytes())
    ap = ap_types_dir()
    if ap is not None:
        for path in sorted(ap.rglob("*.h")):
            h.update(path.relative_to(ap).as_posix().encode() + b"\0" + path.read_bytes())
    h.update(compiler_version().encode())
    return h.hexdigest()[:16]


def build_library(*, hls_dir: Path | None = None, cache_dir: Path | None = None) -> Library:
    """The C-simulation library: from the cache when it is there, else compiled into it by
    `make -C hls lib` (under a file lock, so concurrent processes build it once)."""
    hls_dir = Path(hls_dir) if hls_dir is not None else HLS_DIR
    reason = missing(hls_dir)
    if reason:
        raise NoDeviceError(f"hls: {reason}")
    key = library_key(hls_dir)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    root.mkdir(parents=True, exist_ok=True)
    directory = root / key
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = False
        if not (directory / LIBRARY).is_file():
            _compile(hls_dir, root, directory)
            built = True
    info = json.loads((directory / "build.json").read_text())
    return Library(
        directory / LIBRARY, key, built, float(info["build_seconds"]), info.get("compiler", "")
    )


def _compile(hls_dir: Path, root: Path, directory: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix=".hls-", dir=root))
    work.chmod(0o755)  # mkdtemp makes it private; the cache is shared
    try:
        cmd = ["make", "-C", str(hls_dir), "lib", f"BUILD={work}", f"AP_TYPES={ap_types_dir()}"]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0 or not (work / LIBRARY).is_file():
            tail = (proc.stdout + proc.stderr)[-4000:]
            raise NoDeviceError(f"hls: building the C-simulation library failed:\n{tail}")
        info = {"build_seconds": seconds, "compiler": compiler_version(), "kernels": HLS_KERNELS}
        (work / "build.json").write_text(json.dumps(info))
        for obj in work.glob("*.o"):
            obj.unlink()
        work.rename(directory)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


# -- the C ABI ---------------------------------------------------------------------------------

_P = ctypes.c_void_p
_U32 = ctypes.c_uint32
_LOADED: dict[Path, ctypes.CDLL] = {}


def load(path: Path) -> ctypes.CDLL:
    """The library at `path`, its hm_csim_<kernel> functions typed (loaded once)."""
    if path not in _LOADED:
        lib = ctypes.CDLL(str(path))
        for kernel in HLS_KERNELS:
            fn = getattr(lib, f"hm_csim_{kernel}")
            spec_args = _spec(kernel).args
            fn.argtypes = [_P if a.is_buffer else _U32 for a in spec_args] + [
                ctypes.POINTER(ctypes.c_uint64)
            ]
            fn.restype = ctypes.c_int
        _LOADED[path] = lib
    return _LOADED[path]


def _spec(kernel: str) -> KernelSpec:
    from .. import kernels

    return kernels.get(kernel)


def check_call(spec: KernelSpec, inputs: KernelInputs) -> None:
    """What the golden model checks before it computes, so the C kernel only sees calls it
    can run within the buffers given (`InputError` naming the argument)."""
    spec.check_inputs(inputs)
    s = inputs.scalars
    mode = int(s.get("mode", MODE_TOPK))
    threshold = mode == MODE_THRESHOLD and "mode" in spec.scalar_args()
    if not threshold and mode != MODE_TOPK:
        raise InputError("mode", f"{spec.name} does not support mode {mode}")
    n = int(s["n"])
    if threshold and n == 0:
        raise InputError("n", "is 0: there is nothing to select from")
    if not threshold:
        check_k(s["k"], n)
    segs = spec.segments(inputs)
    if spec.name == "block_gate":
        base, rows = segs  # type: ignore[misc]
        shifts = inputs.arrays["shifts"]
        if not len(rows):
            return
        # the rows some segment scans: their shifts must be in range (as the golden model's)
        cover = np.zeros(int((base + rows).max()) + 1, dtype=np.int64)
        np.add.at(cover, base, 1)
        np.add.at(cover, base + rows, -1)
        scanned = np.cumsum(cover[:-1]) > 0
        if (shifts[: scanned.size][scanned] > MAX_SHIFT).any():
            raise InputError("shifts", f"expected row shifts in [0, {MAX_SHIFT}]")
    elif spec.name == "bm25":
        docs, impacts = inputs.arrays["doc_ids"], inputs.arrays["impacts"]
        if impacts.shape[0] != docs.shape[0]:
            raise InputError("impacts", f"has {impacts.shape[0]} postings, doc_ids {docs.shape[0]}")
        terms, offsets = inputs.arrays["terms"], inputs.arrays["term_offsets"]
        vocab = int(s["vocab"])
        if (terms < -1).any() or (terms >= vocab).any():
            raise InputError("terms", f"expected ids in [0, {vocab}) or -1")
        used = terms[terms >= 0].astype(np.int64)
        start, stop = offsets[used].astype(np.int64), offsets[used + 1].astype(np.int64)
        if (stop < start).any() or (stop > docs.shape[0]).any():
            raise InputError("term_offsets", "points past the end of doc_ids, or decreases")


def simulate(lib: ctypes.CDLL, spec: KernelSpec, inputs: KernelInputs) -> tuple[np.ndarray, int]:
    """Run one checked call on the C-simulated kernel: (out uint32 [queries, k or words],
    the cycles its schedule counted)."""
    if spec.name not in HLS_KERNELS:
        raise XclbinError(no_hls(spec.name))
    inputs = spec.complete(inputs)
    check_call(spec, inputs)
    scalars = {name: int(inputs.scalars[name]) for name in spec.scalar_args()}
    out = np.zeros(spec.buffer_shape("out", scalars, 0), dtype=np.uint32)
    keep: list[np.ndarray] = []
    args: list[Any] = []
    for arg in spec.args:
        if arg.direction == "scalar":
            args.append(scalars[arg.name])
            continue
        arr = out if arg.direction == "out" else np.ascontiguousarray(inputs.arrays[arg.name])
        keep.append(arr)
        args.append(arr.ctypes.data if arr.size else None)
    cycles = ctypes.c_uint64(0)
    status = getattr(lib, f"hm_csim_{spec.name}")(*args, ctypes.byref(cycles))
    if status:
        name, what = REFUSALS.get(status, ("call", f"refused with status {status}"))
        raise InputError(name, f"the {spec.name} HLS kernel refused the call: {what}")
    return out, int(cycles.value)


# -- the device --------------------------------------------------------------------------------


@dataclass
class HlsStats:
    """Totals of one device's kernel calls."""

    calls: int = 0
    cycles: int = 0
    wall_s: float = 0.0


class HlsDevice(EmuDevice):
    """The HLS C++ of hls/ on a simulated U55C: buffers and transfers as `emu` (32 banks,
    PCIe model), kernels C-simulated with g++, kernel times from their loop schedules
    (`modeled`, see the module docstring).

    cache_dir: where the C-simulation library is built (default `cache_root()`).
    """

    target = "hls"
    transfer_source = "modeled"
    timing_source = "modeled"
    #: The C kernels take the stage arguments but copy no beats (staged must be 0).
    stages_appends = False

    def __init__(
        self,
        clock_hz: float | None = None,
        *,
        cache_dir: str | os.PathLike | None = None,
        hls_dir: str | os.PathLike | None = None,
        link: PcieLink = GEN3_X16,
        bank_bytes: int = BANK_BYTES,
    ) -> None:
        self.hls_dir = Path(hls_dir) if hls_dir is not None else HLS_DIR
        reason = missing(self.hls_dir)
        if reason:
            raise NoDeviceError(f"hls: {reason}")
        super().__init__(clock_hz, link, bank_bytes)
        self.library = build_library(
            hls_dir=self.hls_dir, cache_dir=Path(cache_dir) if cache_dir is not None else None
        )
        self._lib = load(self.library.path)
        self.name = (
            f"hls (HLS C++ of hls/ C-simulated with {self.library.compiler or 'g++'}, "
            f"schedule modeled at {self.clock_hz / 1e6:g} MHz)"
        )
        self.stats = HlsStats()

    def _alloc(self, spec: KernelSpec, arg: Arg, nbytes: int) -> Buffer:
        if spec.name not in HLS_KERNELS:
            raise XclbinError(no_hls(spec.name))
        return super()._alloc(spec, arg, nbytes)

    def _execute(
        self, spec: KernelSpec, raw: Mapping[str, np.ndarray], scalars: Mapping[str, int]
    ) -> tuple[np.ndarray, int]:
        """The C-simulated kernel over raw buffer bytes: (out uint32, schedule cycles)."""
        self._check_open()
        if spec.name not in HLS_KERNELS:
            raise XclbinError(no_hls(spec.name))
        start = time.perf_counter()
        out, cycles = simulate(self._lib, spec, view_inputs(spec, raw, scalars))
        self.stats.calls += 1
        self.stats.cycles += cycles
        self.stats.wall_s += time.perf_counter() - start
        return out, cycles

    def execute(
        self, spec: KernelSpec, raw: Mapping[str, np.ndarray], scalars: Mapping[str, int]
    ) -> tuple[np.ndarray, int]:
        """An executor for xrt_emu (`xrt_emu.device(executor=...)`): the HLS C++ runs it."""
        return self._execute(spec, raw, scalars)

    def simulate(self, kernel: str, inputs: KernelInputs) -> tuple[np.ndarray, int]:
        """One call straight from quantized inputs (no buffers): (out, schedule cycles)."""
        self._check_open()
        return simulate(self._lib, _spec(kernel), inputs)
