"""Building a map with hls4ml: conversion to an HLS project, its g++ C simulation, and the
cache of built projects."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import InputError, NoDeviceError
from .fixed import Fixed, MapPrecision, golden_dense
from .maps import linear_map

#: The repository (build/hls4ml and hls/attngate live there).
ROOT = Path(__file__).resolve().parents[4]
#: hls4ml conversion settings (the Dense kernel the golden model follows).
BACKEND, IO_TYPE, STRATEGY = "Vitis", "io_parallel", "Latency"


def hls4ml_missing() -> str | None:
    """Why hls4ml cannot convert and C-simulate here, or None."""
    try:
        import hls4ml  # noqa: F401
    except ImportError:
        return "hls4ml is not installed (pip install 'hetmem[hls]')"
    if shutil.which("g++") is None:
        return "the C simulation needs g++, which is not on PATH"
    return None


def cache_root() -> Path:
    """Where built projects live: $HETMEM_CACHE/hls4ml, else build/hls4ml in the repository."""
    env = os.environ.get("HETMEM_CACHE")
    return Path(env) / "hls4ml" if env else ROOT / "build" / "hls4ml"


@dataclass
class GateMap:
    """One map converted by hls4ml and compiled with g++ (its C simulation).

    weight: the integers of the quantized weight [n_in, n_out] (weight type's frac);
    types: the layer types hls4ml assigned (input, weight, accum, result, bias).
    """

    name: str
    weight: np.ndarray
    types: dict[str, Fixed]
    project: Path
    library: Path
    key: str
    built: bool
    build_seconds: float
    info: dict[str, Any] = field(default_factory=dict)
    _lib: Any = None

    @property
    def n_in(self) -> int:
        return int(self.weight.shape[0])

    @property
    def n_out(self) -> int:
        return int(self.weight.shape[1])

    def _check(self, x: Any) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_in:
            raise InputError("x", f"expected [rows, {self.n_in}], got shape {x.shape}")
        if not np.isfinite(x).all():
            raise InputError("x", "holds NaN or Inf")
        return np.ascontiguousarray(x)

    def csim(self, x: Any) -> np.ndarray:
        """The C-simulated projection of rows x [N, n_in] (doubles, cast to the input type by
        the generated bridge): int64 [N, n_out], the result type's integers."""
        x = self._check(x)
        if self._lib is None:
            self._lib = ctypes.CDLL(str(self.library))
            fn = getattr(self._lib, f"{self.name}_double")
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
            fn.restype = None
        fn = getattr(self._lib, f"{self.name}_double")
        out = np.zeros((x.shape[0], self.n_out), dtype=np.float64)
        for i in range(x.shape[0]):
            fn(x[i].ctypes.data, out[i].ctypes.data)
        res = self.types["result"]
        raw = np.ldexp(out, res.frac)
        ints = np.rint(raw)
        if not (ints == raw).all():  # a result type wider than a double's mantissa
            raise InputError("result", f"{res.hls()} does not pass through a double exactly")
        return ints.astype(np.int64)

    def golden(self, x: Any) -> np.ndarray:
        """The golden fixed-point model of the same rows: int64 [N, n_out]."""
        return golden_dense(self._check(x), self.weight, self.types)

    def dequantize(self, raw: Any) -> np.ndarray:
        return self.types["result"].to_float(raw)


def _compiler() -> str:
    import subprocess

    try:
        out = subprocess.run(["g++", "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.splitlines()[0].strip() if out.stdout else ""


def build_map(
    name: str,
    weight: Any,
    precision: MapPrecision,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> GateMap:
    """Convert one map with hls4ml and compile its C simulation (or reuse the cached build).

    name: the hls4ml project name (a C identifier); weight [n_in, n_out] float, quantized
    here to `precision.weight` (its modes) before hls4ml sees it.
    """
    reason = hls4ml_missing()
    if reason:
        raise NoDeviceError(f"hls4ml: {reason}")
    if not name.isidentifier():
        raise InputError("name", f"expected a C identifier, got {name!r}")
    import hls4ml

    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2:
        raise InputError("weight", f"expected [n_in, n_out], got shape {w.shape}")
    w_int = precision.weight.quantize(w)
    h = hashlib.sha256()
    for part in (
        name,
        json.dumps(precision.to_json(), sort_keys=True),
        str(w_int.shape),
        hls4ml.__version__,
        BACKEND + IO_TYPE + STRATEGY,
        _compiler(),
    ):
        h.update(part.encode() + b"\0")
    h.update(np.ascontiguousarray(w_int).tobytes())
    key = h.hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    root.mkdir(parents=True, exist_ok=True)
    project = root / f"{name}-{key}"
    built = False
    with open(root / f"{name}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (project / "hetmem_types.json").is_file():
            if project.exists():  # an interrupted build
                shutil.rmtree(project)
            _convert(name, w_int, precision, project)
            built = True
    info = json.loads((project / "hetmem_types.json").read_text())
    types = {k: Fixed.from_json(v) for k, v in info["types"].items()}
    if types["weight"] != precision.weight:
        raise NoDeviceError(f"hls4ml: {name}: weight type {types['weight']} is not the chosen one")
    return GateMap(
        name,
        w_int,
        types,
        project,
        project / info["library"],
        key,
        built,
        float(info["build_seconds"]),
        info,
    )


def _convert(name: str, w_int: np.ndarray, precision: MapPrecision, project: Path) -> None:
    import hls4ml

    t_w = precision.weight
    model = linear_map(t_w.to_float(w_int)).float()
    # float32 holds every weight exactly (16 bits of mantissa); check rather than trust
    back = model.proj.weight.detach().double().numpy().T
    if not (back == t_w.to_float(w_int)).all():
        raise InputError("weight", f"{t_w.hls()} values do not pass through float32 exactly")
    start = time.perf_counter()
    config = hls4ml.utils.config_from_pytorch_model(
        model, (w_int.shape[0],), granularity="name", backend=BACKEND
    )
    layers = config["LayerName"]
    inputs = [n for n in layers if n != "proj"]
    if "proj" not in layers or len(inputs) != 1:
        raise NoDeviceError(f"hls4ml: unexpected layers {sorted(layers)} for {name}")
    layers[inputs[0]]["Precision"]["result"] = precision.input.hls()
    layers["proj"]["Precision"].update(
        weight=t_w.hls(), result=precision.result.hls(), accum="auto"
    )
    config["Model"]["Strategy"] = STRATEGY
    with contextlib.redirect_stdout(io.StringIO()):
        graph = hls4ml.converters.convert_from_pytorch_model(
            model,
            output_dir=str(project),
            project_name=name,
            backend=BACKEND,
            hls_config=config,
            io_type=IO_TYPE,
        )
        graph.compile()
    seconds = time.perf_counter() - start
    found: dict[str, Fixed] = {}
    for layer in graph.get_layers():
        if layer.class_name == "Input":
            found["input"] = Fixed.from_hls4ml(layer.types["result_t"].precision)
        elif layer.class_name == "Dense":
            for k in ("weight", "accum", "result", "bias"):
                found[k] = Fixed.from_hls4ml(layer.types[f"{k}_t"].precision)
    if set(found) != {"input", "weight", "accum", "result", "bias"}:
        raise NoDeviceError(f"hls4ml: {name}: expected an Input and a Dense layer, got {found}")
    # the zero weights hls4ml told HLS about (their products are dropped)
    params = (project / "firmware" / "parameters.h").read_text()
    zeros = re.search(r"n_zeros = (\d+);", params)
    libraries = sorted((project / "firmware").glob(f"{name}-*.so"))
    if len(libraries) != 1:
        raise NoDeviceError(f"hls4ml: {name}: expected one compiled library, found {libraries}")
    info = {
        "name": name,
        "hls4ml": hls4ml.__version__,
        "backend": BACKEND,
        "io_type": IO_TYPE,
        "strategy": STRATEGY,
        "compiler": _compiler(),
        "build_seconds": seconds,
        "library": str(libraries[0].relative_to(project)),
        "n_in": int(w_int.shape[0]),
        "n_out": int(w_int.shape[1]),
        "n_zeros": int(zeros.group(1)) if zeros else None,
        "types": {k: v.to_json() for k, v in found.items()},
    }
    (project / "hetmem_types.json").write_text(json.dumps(info, indent=1))
