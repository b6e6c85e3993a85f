"""The learned scorers' projections as hls4ml-generated HLS C++, C-simulated with g++ and held
bit for bit against a golden fixed-point model.

What is converted: the linear maps of a learned selector, each one torch module (`LinearMap`, a
bias-free `nn.Linear`) that hls4ml converts (PyTorch frontend, Vitis backend, io_parallel,
Latency strategy; hls4ml core only) into an HLS project and compiles with g++, which is its C
simulation:

- SeerAttention-R's AttnGate (`GateWeights`, methods/seer.py): the key map wk [Hkv, 3D, Dg]
  (a block's keys pooled by max, min and mean -> its gate key) and the query map
  wq [Hkv, R*D, Dg] (a KV group's R query heads -> its gate query). Each map covers every KV
  head at once: one Dense of Hkv*in -> Hkv*Dg whose weight is block-diagonal by head (`
  block_diagonal`; hls4ml counts the zeros, n_zeros, and HLS drops their products).
- DSA's lightning indexer (`IndexerWeights`, methods/dsa.py): the key map wk [F, Di] and the
  query map wq [Fq, H*Di].

Precision, per model layer and map, from hls4ml's numerical profiling (`profile`:
`hls4ml.model.profiling.weights_torch` and `activations_torch` on calibration activations,
`array_to_summary` on the inputs, the boxplot summaries' `whishi`, the largest magnitude):
integer bits = floor(log2(peak)) + 2 (the sign and the profiled peak, so nothing profiled
saturates), widths by design (`WIDTHS`): input 16, weight 16, result 8. An 8-bit result is
the int8 of the `block_gate` kernel: the gate keys and queries go to it as they are (row
shift 0), so the AttnGate and the block gate chain on the card without a host step. The
input and the result round to nearest, ties to even (AP_RND_CONV) and saturate (AP_SAT);
weights are rounded the same way here, before hls4ml sees them, so the values it writes are
exact. The accumulator is hls4ml's 'auto': it infers a width that holds every sum exactly.

The golden model (`golden_dense`) reads the types hls4ml gave the compiled layer (the input's
result_t, weight_t, accum_t, result_t) and does what its Dense (nnet_dense_latency.h) does in
integers: the input cast from double by the input type's modes, each product cast to accum_t,
the sum wrapping in accum_t, the cast to result_t by its modes. So the golden model adopts
hls4ml's precision exactly, and `GateMap.csim` (the g++-compiled project, called through the
C bridge hls4ml generates) equals `GateMap.golden` bit for bit (tests/test_hls4ml_gate.py).

Built projects are cached by a hash of the weights, the precision, hls4ml's version and g++
($HETMEM_CACHE/hls4ml, else build/hls4ml/ in the repository): the C simulation reads its
weights from the project folder, so a project is built where it stays.

    python -m hetmem.fpga.hls4ml_gate profile   # profile the bundled model, write the precisions
    python -m hetmem.fpga.hls4ml_gate csim      # build every map, C-simulate, compare to golden
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import io
import json
import math
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, NoDeviceError

ROOT = Path(__file__).resolve().parents[3]
#: The committed precisions (written by `profile_bundled`, read by `bundled_maps`).
PRECISION_FILE = ROOT / "hls" / "attngate" / "precision.json"
#: Bit widths by design; the integer bits come from the profile.
WIDTHS = {"input": 16, "weight": 16, "result": 8}
#: Quantization and overflow modes of the input and the result (and the weight rounding).
ROUNDING, SATURATION = "RND_CONV", "SAT"
#: The selectors whose maps are converted, and their maps.
SELECTORS = {"seer": ("key", "query"), "dsa": ("key", "query")}
#: hls4ml conversion settings (the Dense kernel the golden model follows).
BACKEND, IO_TYPE, STRATEGY = "Vitis", "io_parallel", "Latency"

_ROUNDINGS = ("TRN", "TRN_ZERO", "RND", "RND_ZERO", "RND_INF", "RND_MIN_INF", "RND_CONV")
_SATURATIONS = ("WRAP", "SAT", "SAT_ZERO", "SAT_SYM")


# -- fixed point -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fixed:
    """An ap_fixed / ap_ufixed type: `width` bits, `integer` of them left of the binary point
    (may be negative or beyond the width), quantization and overflow modes as Vitis names
    them without the AP_ prefix. Values are held as integers v meaning v * 2**-frac."""

    width: int
    integer: int
    signed: bool = True
    rounding: str = "TRN"
    saturation: str = "WRAP"

    def __post_init__(self) -> None:
        if self.width < 1:
            raise InputError("width", f"expected a positive bit width, got {self.width}")
        if self.rounding not in _ROUNDINGS:
            raise InputError("rounding", f"expected one of {_ROUNDINGS}, got {self.rounding!r}")
        if self.saturation not in _SATURATIONS:
            raise InputError(
                "saturation", f"expected one of {_SATURATIONS}, got {self.saturation!r}"
            )

    @property
    def frac(self) -> int:
        return self.width - self.integer

    @property
    def lo(self) -> int:
        return -(1 << (self.width - 1)) if self.signed else 0

    @property
    def hi(self) -> int:
        return (1 << (self.width - 1)) - 1 if self.signed else (1 << self.width) - 1

    def hls(self) -> str:
        """The C++ type, e.g. ap_fixed<16,5,AP_RND_CONV,AP_SAT>."""
        name = "ap_fixed" if self.signed else "ap_ufixed"
        modes = ""
        if (self.rounding, self.saturation) != ("TRN", "WRAP"):
            modes = f",AP_{self.rounding},AP_{self.saturation}"
        return f"{name}<{self.width},{self.integer}{modes}>"

    @classmethod
    def from_hls4ml(cls, precision: Any) -> Fixed:
        """From hls4ml's FixedPrecisionType or IntegerPrecisionType (integers: frac 0)."""
        width, integer = int(precision.width), int(precision.integer)
        rounding = getattr(precision, "rounding_mode", None)
        saturation = getattr(precision, "saturation_mode", None)
        bits = getattr(precision, "saturation_bits", None)
        if bits not in (None, 0):
            raise InputError("precision", f"{precision}: saturation bits are not modeled")
        return cls(
            width,
            integer,
            bool(precision.signed),
            str(rounding) if rounding is not None else "TRN",
            str(saturation) if saturation is not None else "WRAP",
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "integer": self.integer,
            "signed": self.signed,
            "rounding": self.rounding,
            "saturation": self.saturation,
            "hls": self.hls(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Fixed:
        return cls(
            int(data["width"]),
            int(data["integer"]),
            bool(data.get("signed", True)),
            str(data.get("rounding", "TRN")),
            str(data.get("saturation", "WRAP")),
        )

    # the arithmetic ----------------------------------------------------------------------

    def _overflow(self, v: np.ndarray) -> np.ndarray:
        lo, hi = self.lo, self.hi
        s = self.saturation
        if s == "WRAP":
            m = 1 << self.width
            v = np.mod(v - lo, m) + lo
            return v
        out = v.copy()
        over, under = v > hi, v < lo
        if s == "SAT":
            out[over], out[under] = hi, lo
        elif s == "SAT_ZERO":
            out[over | under] = 0
        elif s == "SAT_SYM":
            bottom = -hi if self.signed else 0
            out[v > hi], out[v < bottom] = hi, bottom
        return out

    def _up(
        self,
        floor: np.ndarray,
        rest_gt: np.ndarray,
        rest_eq: np.ndarray,
        rest_nz: np.ndarray,
        negative: np.ndarray,
    ) -> np.ndarray:
        """Whether the mode rounds floor up by one LSB, given the dropped rest relative to half
        an LSB (gt, eq), whether any bit was dropped and the value's sign."""
        r = self.rounding
        if r == "TRN":
            return np.zeros_like(rest_nz)
        if r == "TRN_ZERO":
            return rest_nz & negative
        if r == "RND":
            return rest_gt | rest_eq
        if r == "RND_ZERO":
            return rest_gt | (rest_eq & negative)
        if r == "RND_INF":
            return rest_gt | (rest_eq & ~negative)
        if r == "RND_MIN_INF":
            return rest_gt
        # RND_CONV: ties to even
        return rest_gt | (rest_eq & (np.mod(floor, 2) == 1))

    def quantize(self, x: Any) -> np.ndarray:
        """Float values -> this type's integers (int64), as ap_fixed's constructor from double
        does: exact scaling by 2**frac, then this type's quantization and overflow modes."""
        x = np.asarray(x, dtype=np.float64)
        if not np.isfinite(x).all():
            raise InputError("x", "holds NaN or Inf")
        scaled = np.ldexp(x, self.frac)  # exact: a power-of-two scale
        if np.abs(scaled).max(initial=0.0) >= 2.0**62:
            raise InputError("x", f"values beyond what {self.hls()} can be computed for here")
        floor = np.floor(scaled)
        rest = scaled - floor  # exact, in [0, 1)
        up = self._up(floor, rest > 0.5, rest == 0.5, rest != 0.0, x < 0)
        return self._overflow(floor.astype(np.int64) + up.astype(np.int64))

    def cast(self, v: Any, frac: int) -> np.ndarray:
        """Integers v meaning v * 2**-frac -> this type's integers (int64), by its modes."""
        v = np.asarray(v, dtype=np.int64)
        shift = frac - self.frac
        if shift <= 0:
            if shift < -62 or ((v != 0).any() and np.abs(v).max() >= 2 ** (62 + shift)):
                raise InputError("v", f"too wide to cast to {self.hls()} here")
            return self._overflow(v << -shift)
        floor = v >> shift  # arithmetic shift: floor division by 2**shift
        rest = v - (floor << shift)  # in [0, 2**shift)
        half = 1 << (shift - 1)
        up = self._up(floor, rest > half, rest == half, rest != 0, v < 0)
        return self._overflow(floor + up.astype(np.int64))

    def to_float(self, v: Any) -> np.ndarray:
        return np.ldexp(np.asarray(v, dtype=np.float64), -self.frac)


def integer_bits(peak: float) -> int:
    """Integer bits of a signed type that holds +-peak without saturating: the sign, and
    floor(log2(peak)) + 1 bits of magnitude (negative for a peak below 1/4)."""
    if not (peak > 0 and math.isfinite(peak)):
        raise InputError("peak", f"expected a positive finite magnitude, got {peak}")
    return math.floor(math.log2(peak)) + 2


@dataclass(frozen=True)
class MapPrecision:
    """What the profile chose for one map: input, weight and result types (accum: auto)."""

    input: Fixed
    weight: Fixed
    result: Fixed

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k).to_json() for k in ("input", "weight", "result")}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MapPrecision:
        return cls(*(Fixed.from_json(data[k]) for k in ("input", "weight", "result")))


def choose_precision(
    peaks: Mapping[str, float], widths: Mapping[str, int] = WIDTHS
) -> MapPrecision:
    """Per-map types from the profiled peaks (largest |value| of input, weight, result)."""
    types = {}
    for part in ("input", "weight", "result"):
        types[part] = Fixed(
            int(widths[part]), integer_bits(float(peaks[part])), True, ROUNDING, SATURATION
        )
    return MapPrecision(**types)


# -- the torch modules hls4ml converts ---------------------------------------------------------


def _torch():
    import torch

    return torch


def linear_map(weight: Any) -> Any:
    """The torch module of one map: y = x @ weight (weight [n_in, n_out]), a bias-free
    nn.Linear named `proj` (hls4ml's layer name)."""
    torch = _torch()

    class LinearMap(torch.nn.Module):
        def __init__(self, w: Any) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(w.shape[0], w.shape[1], bias=False)
            with torch.no_grad():
                self.proj.weight.copy_(torch.as_tensor(w, dtype=torch.float32).T)

        def forward(self, x: Any) -> Any:
            return self.proj(x)

    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2 or 0 in w.shape:
        raise InputError("weight", f"expected [n_in, n_out], got shape {w.shape}")
    if not np.isfinite(w).all():
        raise InputError("weight", "holds NaN or Inf")
    return LinearMap(w).eval()


def block_diagonal(w: Any) -> np.ndarray:
    """[H, n_in, n_out] -> [H*n_in, H*n_out], head h's block on the diagonal."""
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 3:
        raise InputError("weight", f"expected [heads, n_in, n_out], got shape {w.shape}")
    h, n_in, n_out = w.shape
    out = np.zeros((h * n_in, h * n_out))
    for i in range(h):
        out[i * n_in : (i + 1) * n_in, i * n_out : (i + 1) * n_out] = w[i]
    return out


def seer_maps(wq: Any, wk: Any) -> dict[str, np.ndarray]:
    """The AttnGate's maps as [n_in, n_out] weights over every KV head (block-diagonal)."""
    return {"key": block_diagonal(_np(wk)), "query": block_diagonal(_np(wq))}


def dsa_maps(wq: Any, wk: Any) -> dict[str, np.ndarray]:
    """The lightning indexer's maps: keys [F, Di], queries [Fq, H*Di]."""
    return {"key": _np(wk).astype(np.float64), "query": _np(wq).astype(np.float64)}


def _np(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().cpu().double().numpy()
    return np.asarray(t, dtype=np.float64)


# -- profiling ---------------------------------------------------------------------------------


def profiling_missing() -> str | None:
    """Why hls4ml's numerical profiling cannot run here (it needs pandas, seaborn), or None."""
    try:
        import hls4ml.model.profiling  # noqa: F401
    except ImportError as exc:
        return f"hls4ml's profiling needs {exc.name} (pip install 'hls4ml[profiling]')"
    return None


def profile(weight: Any, x: Any) -> dict[str, float]:
    """Peaks (largest |value|) of one map's input, weight and result on calibration inputs
    x [N, n_in], by hls4ml's numerical profiling (boxplot summaries, `whishi`)."""
    reason = profiling_missing()
    if reason:
        raise NoDeviceError(reason)
    from hls4ml.model.profiling import activations_torch, array_to_summary, weights_torch

    model = linear_map(weight).float()
    x = np.asarray(x, dtype=np.float32)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints each layer's name
        weights = weights_torch(model, fmt="summary", plot="boxplot")
        acts = activations_torch(model, x, fmt="summary", plot="boxplot")
    magnitudes = np.abs(x[x != 0])
    if magnitudes.size == 0:
        raise InputError("x", "is all zeros: nothing to profile")
    inputs = array_to_summary(magnitudes, fmt="boxplot")
    w = [s for s in weights if s["weight"].endswith("/w")]
    if len(w) != 1 or len(acts) != 1:
        raise InputError("weight", "expected one Dense layer in the profile")
    return {
        "input": float(inputs["whishi"]),
        "weight": float(w[0]["whishi"]),
        "result": float(acts[0]["whishi"]),
    }


# -- building with hls4ml ----------------------------------------------------------------------


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


def golden_dense(x: np.ndarray, weight: np.ndarray, types: Mapping[str, Fixed]) -> np.ndarray:
    """hls4ml's Dense (io_parallel, Latency, no bias) in integers: int64 [N, n_out].

    x: doubles [N, n_in]; weight: the weight type's integers [n_in, n_out].
    """
    t_in, t_w, t_acc, t_res = (types[k] for k in ("input", "weight", "accum", "result"))
    if t_acc.saturation != "WRAP":
        raise InputError("accum", f"{t_acc.hls()}: only a wrapping accumulator is modeled")
    xi = t_in.quantize(x)
    frac_p = t_in.frac + t_w.frac  # a product's fractional bits (exact: decltype(a * w))
    bound = int(np.abs(xi).max(initial=0)) * int(np.abs(weight).max(initial=0)) * xi.shape[1]
    if bound >= 2**62:
        raise InputError("x", "products beyond int64: not modeled")
    if t_acc.frac >= frac_p:
        # each product is exact in accum_t up to its wrap; wrapping commutes with the sum
        acc = (xi @ weight) << (t_acc.frac - frac_p)
    else:  # products rounded into accum_t one by one
        prods = t_acc.cast(xi[:, :, None] * weight[None], frac_p)
        acc = prods.sum(axis=1)
    acc = t_acc.cast(acc, t_acc.frac)  # the wrap of the running sum (bias is 0)
    return t_res.cast(acc, t_acc.frac)


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


# -- the bundled model's selectors -------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """Which activations the precisions were profiled on."""

    sequences: int = 8
    tokens: int = 1024
    queries: int = 32
    seed: int = 0


def bundled_selectors() -> Any:
    from ..bundled import path
    from ..selectors.weights import load_selectors

    return load_selectors(path())


def capture_bundled(sequences: int, tokens: int, queries: int, seed: int) -> list[Any]:
    """The bundled model's attention activations per layer (`hetmem.selectors.activations`'s
    `capture`) on the calibration text and tasks of `seed`."""
    from ..bundled import path
    from ..selectors.activations import capture
    from ..selectors.calibrate import load_local
    from ..selectors.data import calibration_ids

    model, tok = load_local(path())
    ids = calibration_ids(tok, sequences, tokens, seed=seed)
    return capture(model, ids, queries=queries, seed=seed)


def seer_rows(act: Any, block: int) -> dict[str, np.ndarray]:
    """The AttnGate maps' input rows of one layer: "key" the pooled blocks (complete ones
    and each sampled query's partial block) [M, Hkv*3D], "query" the grouped queries
    [N*T, Hkv*R*D], each row all KV heads in order (as `block_diagonal` lays them)."""
    from ..methods.seer import group_queries
    from ..selectors.objective import block_pools

    full, partial = block_pools(act, block)  # [N, Hkv, Nb, 3D], [N, Hkv, T, 3D]
    grouped = group_queries(act.q, act.k.shape[1])  # [N, Hkv, T, R*D]

    def rows(t: Any) -> np.ndarray:  # [N, H, M, F] -> [N*M, H*F]
        return t.permute(0, 2, 1, 3).flatten(2).flatten(0, 1).double().numpy()

    return {"key": np.concatenate([rows(full), rows(partial)]), "query": rows(grouped)}


def dsa_rows(act: Any) -> dict[str, np.ndarray]:
    """The lightning indexer maps' input rows of one layer: "key" every token's keys over
    the KV heads [N*S, Hkv*D], "query" the sampled queries over the query heads [N*T, Hq*D]
    (the default features, as `hetmem.selectors.objective.indexer_logits` takes them)."""
    kf = act.k.permute(0, 2, 1, 3).flatten(2).flatten(0, 1)
    qf = act.q.permute(0, 2, 1, 3).flatten(2).flatten(0, 1)
    return {"key": kf.double().numpy(), "query": qf.double().numpy()}


def selector_maps(selectors: Any, kind: str, layer: int) -> dict[str, np.ndarray]:
    if kind == "seer":
        g = selectors.gates[layer]
        return seer_maps(g.wq, g.wk)
    if kind == "dsa":
        ix = selectors.indexers[layer]
        if ix.ww is not None:
            raise InputError("selectors", "DSA with learned head weights ww is not converted")
        return dsa_maps(ix.wq, ix.wk)
    raise InputError("kind", f"expected one of {tuple(SELECTORS)}, got {kind!r}")


def layer_rows(act: Any, kind: str, block: int) -> dict[str, np.ndarray]:
    return seer_rows(act, block) if kind == "seer" else dsa_rows(act)


def profile_bundled(
    calibration: Calibration = Calibration(),
    kinds: Sequence[str] = ("seer", "dsa"),
    out: str | os.PathLike | None = PRECISION_FILE,
) -> dict[str, Any]:
    """Profile every map of the bundled model's trained selectors on calibration
    activations and choose its precision; write them to `out` (hls/attngate/precision.json)."""
    from ..bundled import path
    from ..selectors.weights import SELECTORS_FILE

    selectors = bundled_selectors()
    c = calibration
    acts = capture_bundled(c.sequences, c.tokens, c.queries, c.seed)
    digest = hashlib.sha256((path() / SELECTORS_FILE).read_bytes()).hexdigest()
    doc: dict[str, Any] = {
        "about": (
            "Per-layer fixed-point types of the bundled model's selector maps for hls4ml, "
            "chosen from hls4ml's numerical profiling (peaks = whishi of the boxplot "
            "summaries): integer bits floor(log2(peak)) + 2, widths by design; accum is "
            "hls4ml's 'auto' (exact). Written by python -m hetmem.fpga.hls4ml_gate profile."
        ),
        "selectors_sha256": digest,
        "calibration": c.__dict__,
        "block_size": selectors.block_size,
        "widths": dict(WIDTHS),
        "rounding": ROUNDING,
        "saturation": SATURATION,
    }
    for kind in kinds:
        layers = []
        for i, act in enumerate(acts):
            maps = selector_maps(selectors, kind, i)
            rows = layer_rows(act, kind, selectors.block_size)
            entry = {}
            for m in SELECTORS[kind]:
                peaks = profile(maps[m], rows[m])
                entry[m] = {"peaks": peaks, "precision": choose_precision(peaks).to_json()}
            layers.append(entry)
        doc[kind] = layers
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def load_precisions(path: str | os.PathLike = PRECISION_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InputError(
            "path", f"{path} does not exist: run python -m hetmem.fpga.hls4ml_gate profile"
        )
    return json.loads(path.read_text())


def bundled_maps(
    kind: str = "seer",
    layers: Sequence[int] | None = None,
    *,
    precisions: Mapping[str, Any] | None = None,
    selectors: Any = None,
    cache_dir: str | os.PathLike | None = None,
    result_width: int | None = None,
) -> list[dict[str, GateMap]]:
    """The bundled model's `kind` maps per layer, built by hls4ml at the committed precisions."""
    doc = precisions if precisions is not None else load_precisions()
    if kind not in doc:
        raise InputError("kind", f"no {kind} precisions in the precision file")
    selectors = selectors if selectors is not None else bundled_selectors()
    layers = range(len(doc[kind])) if layers is None else layers
    out = []
    for i in layers:
        maps = selector_maps(selectors, kind, i)
        built = {}
        for m in SELECTORS[kind]:
            precision = MapPrecision.from_json(doc[kind][i][m]["precision"])
            suffix = ""
            if result_width is not None and result_width != precision.result.width:
                # the same integer bits, more or fewer fractional ones
                precision = replace(precision, result=replace(precision.result, width=result_width))
                suffix = f"_r{result_width}"
            built[m] = build_map(
                f"{kind}_l{i}_{m}{suffix}", maps[m], precision, cache_dir=cache_dir
            )
        out.append(built)
    return out


# -- selections from the fixed-point maps ------------------------------------------------------


def _project(gate: GateMap, x: np.ndarray, golden: bool) -> np.ndarray:
    return gate.golden(x) if golden else gate.csim(x)


def seer_scores(
    act: Any, maps: Mapping[str, GateMap], block: int, *, golden: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Integer gate logits of one layer from the fixed-point maps: (scores int64
    [N, Hkv, T, Nb] = Q . K of the result types' integers, the query's own block from its
    partial pooling as `hetmem.selectors.objective.gate_logits` does; visible bool
    [N, Hkv, T, Nb])."""
    n, hkv, s, _ = act.k.shape
    t = act.q.shape[2]
    nb = -(-s // block)
    rows = seer_rows(act, block)
    keys = _project(maps["key"], rows["key"], golden)
    query = _project(maps["query"], rows["query"], golden)
    dg = keys.shape[1] // hkv
    full = keys[: n * nb].reshape(n, nb, hkv, dg).transpose(0, 2, 1, 3)
    part = keys[n * nb :].reshape(n, t, hkv, dg).transpose(0, 2, 1, 3)
    q = query.reshape(n, t, hkv, dg).transpose(0, 2, 1, 3)
    scores = np.einsum("nhtd,nhbd->nhtb", q, full)
    own = (q * part).sum(-1)  # [N, Hkv, T]
    blk = (act.positions // block).numpy()  # [N, T]
    idx = np.broadcast_to(blk[:, None, :, None], (n, hkv, t, 1))
    np.put_along_axis(scores, idx, own[..., None], axis=-1)
    visible = np.arange(nb)[None, None, None, :] <= blk[:, None, :, None]
    return scores, np.broadcast_to(visible, scores.shape)


def dsa_scores(
    act: Any, maps: Mapping[str, GateMap], heads: int, *, golden: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Integer indexer scores of one layer: (sum_h ReLU(Q_h . K_s) int64 [N, T, S], visible
    [N, T, S]); the float score's positive factors (1/H, 1/sqrt(Di), the types' scales)
    change no order."""
    n, _, s, _ = act.k.shape
    t = act.q.shape[2]
    rows = dsa_rows(act)
    keys = _project(maps["key"], rows["key"], golden).reshape(n, s, -1)
    query = _project(maps["query"], rows["query"], golden).reshape(n, t, heads, -1)
    scores = np.zeros((n, t, s), dtype=np.int64)
    for h in range(heads):
        scores += np.maximum(np.einsum("ntd,nsd->nts", query[:, :, h], keys), 0)
    visible = np.arange(s)[None, None, :] <= act.positions.numpy()[:, :, None]
    return scores, visible


def recall(
    reference: np.ndarray, scores: np.ndarray, visible: np.ndarray, k: int
) -> tuple[float, int]:
    """Mean over the rows with more than k visible candidates of the fraction of the float
    reference's top-k that the integer scores' top-k (the kernels' contract: ties to the
    lower index) also selects; and how many rows that is."""
    from ..kernels.topk import topk_mask

    ref = np.asarray(reference, dtype=np.float64).reshape(-1, reference.shape[-1])
    sc = np.asarray(scores).reshape(-1, scores.shape[-1])
    vis = np.asarray(visible).reshape(-1, visible.shape[-1])
    hits, rows = 0.0, 0
    for r in range(ref.shape[0]):
        count = int(vis[r].sum())
        if count <= k:
            continue
        cand = np.flatnonzero(vis[r])
        mine = set(cand[topk_mask(sc[r, cand][None], k)[0]].tolist())
        theirs = set(cand[np.argsort(-ref[r, cand], kind="stable")[:k]].tolist())
        hits += len(mine & theirs) / k
        rows += 1
    return (hits / rows if rows else float("nan")), rows


def stress_rows(gate: GateMap, rows: int, seed: int = 0) -> np.ndarray:
    """Random rows that reach every case of the arithmetic: values on the input grid, exact
    half-LSB ties of the input cast, values beyond the input's range (saturation) and large
    enough to saturate the result, and rows whose result lands exactly half a result LSB
    between two values (`result_ties`), in equal shares."""
    rng = np.random.default_rng(seed)
    t = gate.types["input"]
    span = 2.0 ** (t.integer - 1)
    kind = rng.integers(0, 5, (rows, 1))
    grid = rng.integers(t.lo, t.hi + 1, (rows, gate.n_in))
    x = np.where(kind == 0, t.to_float(grid), 0.0)
    x = np.where(kind == 1, t.to_float(grid) + np.ldexp(0.5, -t.frac), x)  # exact ties
    x = np.where(kind == 2, rng.standard_normal((rows, gate.n_in)) * span * 0.1, x)
    x = np.where(kind == 3, rng.standard_normal((rows, gate.n_in)) * span * 1.5, x)
    ties = result_ties(gate, int((kind == 4).sum()), rng)
    if len(ties):
        x[np.flatnonzero(kind[:, 0] == 4)[: len(ties)]] = ties
    return x


def result_ties(gate: GateMap, rows: int, rng: np.random.Generator) -> np.ndarray:
    """Rows [<= rows, n_in] with one input on the grid, chosen so that some output is
    exactly a tie of the result cast: X * W = odd * 2**s, s = frac_in + frac_w - frac_res - 1
    (X = +-2**(s - a) for a weight W with a trailing zero bits). Empty where none exists."""
    t_in, t_w, t_res = (gate.types[k] for k in ("input", "weight", "result"))
    s = t_in.frac + t_w.frac - t_res.frac - 1
    w = gate.weight
    nz = w != 0
    if s < 0 or rows == 0 or not nz.any():
        return np.zeros((0, gate.n_in))
    low = np.where(nz, w & -w, 0)  # the lowest set bit of each weight
    a = np.where(nz, np.log2(np.maximum(low, 1)).astype(np.int64), -1)
    ok = nz & (a <= s) & (s - a <= t_in.width - 2)  # X = 2**(s - a) fits the input type
    cand = np.argwhere(ok)
    if not len(cand):
        return np.zeros((0, gate.n_in))
    pick = cand[rng.integers(0, len(cand), rows)]
    x = np.zeros((rows, gate.n_in))
    sign = rng.choice([-1.0, 1.0], rows)
    x[np.arange(rows), pick[:, 0]] = sign * t_in.to_float(2 ** (s - a[pick[:, 0], pick[:, 1]]))
    return x


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hetmem.fpga.hls4ml_gate")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("profile", help="profile the bundled selectors, write the precisions")
    p.add_argument("--out", type=Path, default=PRECISION_FILE)
    c = sub.add_parser("csim", help="build every map, C-simulate, compare with the golden model")
    c.add_argument("--kind", choices=tuple(SELECTORS), action="append")
    c.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args(argv)
    if args.command == "profile":
        doc = profile_bundled(out=args.out)
        for kind in SELECTORS:
            for i, entry in enumerate(doc.get(kind, [])):
                for m, e in entry.items():
                    p_ = e["precision"]
                    print(
                        f"{kind} layer {i} {m:5s}: input {p_['input']['hls']}, weight "
                        f"{p_['weight']['hls']}, result {p_['result']['hls']}"
                    )
        print(f"wrote {args.out}")
        return 0
    bad = 0
    for kind in args.kind or ["seer"]:
        for i, maps in enumerate(bundled_maps(kind)):
            for m, gate in maps.items():
                x = stress_rows(gate, args.rows, seed=i)
                got, want = gate.csim(x), gate.golden(x)
                same = int((got == want).all(axis=1).sum())
                bad += same != len(x)
                how = "built" if gate.built else "cached"
                print(
                    f"{kind} layer {i} {m:5s} {gate.n_in}->{gate.n_out} "
                    f"accum {gate.types['accum'].hls()}: {same}/{len(x)} rows equal "
                    f"({how}, {gate.build_seconds:.1f} s build)"
                )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
