"""Fixed-point types (ap_fixed) and the golden model of hls4ml's Dense in integers: what the
converted maps compute, bit for bit. numpy only."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import InputError

#: Bit widths by design; the integer bits come from the profile.
WIDTHS = {"input": 16, "weight": 16, "result": 8}
#: Quantization and overflow modes of the input and the result (and the weight rounding).
ROUNDING, SATURATION = "RND_CONV", "SAT"

_ROUNDINGS = ("TRN", "TRN_ZERO", "RND", "RND_ZERO", "RND_INF", "RND_MIN_INF", "RND_CONV")
_SATURATIONS = ("WRAP", "SAT", "SAT_ZERO", "SAT_SYM")


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
