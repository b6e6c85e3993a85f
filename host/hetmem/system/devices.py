"""Device profiles: GPUs, FPGA cards and the links between them, every figure with its
citation and its source.

A profile is data: `DeviceProfile(name, kind, figures)`, each `Figure` carrying its value,
unit, the document it comes from and a source:

- `datasheet`: the vendor's public data sheet, named in `cite`;
- `reported`: a measurement someone else reported (named in `cite`), not taken here;
- `measured`: taken on this machine (`hetmem profile-device`);
- `assumed`: not in any data sheet; a stated assumption, to be replaced by a measurement;
- `derived`: computed from other figures (the formula in `note`).

Built-in profiles: GPUs `MI210`, `A100-80GB`, `H100-SXM`, `H200`; cards `U55C`, `U280`
(the V80 is left out: its data sheet's power figures were not available to check). A user
profile comes from a JSON or TOML file (`load_profile`), registered with `register`.

The FPGA side has no second performance model: a card's kernel times are the kernel specs'
cycle models (`hetmem.kernels`) at the manifest's kernel clock; the card's figures here serve
energy (power) and capacity (HBM), and its PCIe generation picks the link.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ..errors import InputError
from ..fpga import pcie

Kind = Literal["gpu", "fpga"]
FIGURE_SOURCES = ("datasheet", "reported", "measured", "assumed", "derived")


class ProfileError(InputError):
    """A device profile that cannot be used: unknown name, malformed file, missing figure."""


@dataclass(frozen=True)
class Figure:
    """One figure of a profile: value in `unit`, where it comes from (`cite`), its source."""

    value: float
    unit: str
    cite: str
    source: str = "datasheet"
    note: str = ""

    def __post_init__(self) -> None:
        if self.source not in FIGURE_SOURCES:
            raise ProfileError("source", f"expected one of {FIGURE_SOURCES}, got {self.source!r}")
        if isinstance(self.value, bool) or not isinstance(self.value, int | float):
            raise ProfileError("value", f"expected a number, got {self.value!r}")
        if not (math.isfinite(self.value) and self.value >= 0):
            raise ProfileError("value", f"expected a finite number >= 0, got {self.value}")


#: Figures every profile of a kind needs (units in `UNITS`).
REQUIRED: dict[str, tuple[str, ...]] = {
    "gpu": ("mem_bw", "fp16", "bf16", "int8", "tdp_w", "idle_w", "pcie_gen", "pcie_lanes",
            "hbm_bytes"),
    "fpga": ("mem_bw", "tdp_w", "idle_w", "pcie_gen", "pcie_lanes", "hbm_bytes",
             "hbm_channels"),
}  # fmt: skip
UNITS = {
    "mem_bw": "B/s",
    "fp16": "FLOP/s",
    "bf16": "FLOP/s",
    "fp32": "FLOP/s",
    "int8": "OP/s",
    "tdp_w": "W",
    "idle_w": "W",
    "busy_w": "W",
    "pcie_gen": "",
    "pcie_lanes": "",
    "hbm_bytes": "B",
    "hbm_channels": "",
    "hbm_stacks": "",
    "clock_hz": "Hz",
    "topk_rate": "scores/s",  # measured by `hetmem profile-device`; informative
}


@dataclass(frozen=True)
class Efficiency:
    """Roofline factors of a GPU: the share of peak bandwidth and FLOP/s a step reaches,
    and the fixed cost of one kernel launch. Assumed unless a calibration measured them
    (`source`)."""

    bandwidth: float = 0.8
    flops: float = 0.7
    launch_s: float = 4e-6
    source: str = "assumed"
    note: str = (
        "assumed: 80% of peak bandwidth and 70% of peak FLOP/s for large kernels, 4 us per "
        "kernel launch; replace with `hetmem profile-device` on the GPU"
    )

    def __post_init__(self) -> None:
        for name in ("bandwidth", "flops"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and 0 < v <= 1):
                raise ProfileError(f"efficiency.{name}", f"expected a share in (0, 1], got {v!r}")
        if not (isinstance(self.launch_s, int | float) and 0 <= self.launch_s < 1):
            raise ProfileError(
                "efficiency.launch_s", f"expected seconds >= 0, got {self.launch_s!r}"
            )


@dataclass(frozen=True)
class DeviceProfile:
    """A GPU or an FPGA card: its figures by name (see `REQUIRED`, `UNITS`)."""

    name: str
    kind: Kind
    figures: Mapping[str, Figure]
    efficiency: Efficiency = field(default_factory=Efficiency)
    source: str = "datasheet"  # "measured" for a profile written by `hetmem profile-device`
    about: str = ""

    def __post_init__(self) -> None:
        if self.kind not in REQUIRED:
            raise ProfileError("kind", f"expected 'gpu' or 'fpga', got {self.kind!r}")
        missing = [f for f in REQUIRED[self.kind] if f not in self.figures]
        if missing:
            raise ProfileError(
                "figures", f"profile {self.name!r} ({self.kind}) lacks {', '.join(missing)}"
            )

    def value(self, name: str) -> float:
        """The value of figure `name` (ProfileError when the profile lacks it)."""
        fig = self.figures.get(name)
        if fig is None:
            raise ProfileError(name, f"profile {self.name!r} has no figure {name!r}")
        return float(fig.value)

    @property
    def mem_bw(self) -> float:
        return self.value("mem_bw")

    def peak(self, dtype: str) -> float:
        """Peak dense throughput for `dtype` (fp16, bf16, int8, fp32), FLOP/s or OP/s."""
        if dtype == "fp32" and "fp32" not in self.figures:
            return self.value("fp16") / 4  # not given: a quarter of the matrix FP16 rate
        return self.value(dtype)

    @property
    def idle_w(self) -> float:
        return self.value("idle_w")

    @property
    def busy_w(self) -> float:
        """Power while a step runs: `busy_w` when given, else the TDP (an upper bound)."""
        return self.value("busy_w") if "busy_w" in self.figures else self.value("tdp_w")

    @property
    def clock_hz(self) -> float:
        """A card's kernel clock: the profile's `clock_hz`, else the manifest's."""
        if "clock_hz" in self.figures:
            return self.value("clock_hz")
        return manifest_clock_hz()

    def with_figures(self, **figures: Figure) -> DeviceProfile:
        return replace(self, figures={**self.figures, **figures})

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "source": self.source,
            "about": self.about,
            "figures": {
                k: {"value": f.value, "unit": f.unit, "cite": f.cite, "source": f.source,
                    **({"note": f.note} if f.note else {})}
                for k, f in self.figures.items()
            },
            "efficiency": {
                "bandwidth": self.efficiency.bandwidth,
                "flops": self.efficiency.flops,
                "launch_s": self.efficiency.launch_s,
                "source": self.efficiency.source,
                "note": self.efficiency.note,
            },
        }  # fmt: skip


def manifest_clock_hz() -> float:
    """The kernel clock of the manifest's default xclbin (bitstreams/manifest.json)."""
    from ..fpga.manifest import Manifest

    return float(Manifest.load().default().clock_hz)


# -- links ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """A transfer path: seconds(nbytes) = latency_s + nbytes / bandwidth, the formula of
    `hetmem.fpga.pcie.PcieLink` (which the Gen3 card link is)."""

    name: str
    latency_s: float
    bandwidth: float
    cite: str
    source: str = "derived"

    def __post_init__(self) -> None:
        if not (self.latency_s >= 0 and self.bandwidth > 0):
            raise ProfileError("link", f"{self.name}: latency >= 0 and bandwidth > 0 needed")

    def seconds(self, nbytes: int) -> float:
        nbytes = int(nbytes)
        if nbytes < 0:
            raise InputError("nbytes", f"expected >= 0, got {nbytes}")
        return 0.0 if nbytes == 0 else self.latency_s + nbytes / self.bandwidth


def _pcie_raw(gen: int, lanes: int = 16) -> float:
    """Raw bytes/s one direction: GT/s per lane x lanes x 128b/130b / 8."""
    return {3: 8e9, 4: 16e9, 5: 32e9}[gen] * lanes * (128 / 130) / 8


_DMA_SHARE = pcie.DMA_BANDWIDTH / pcie.RAW_BANDWIDTH  # Gen3 XDMA: 12 of 15.75 GB/s

LINKS: dict[str, Link] = {
    "pcie3-x16": Link(
        "pcie3-x16", pcie.LATENCY_S, pcie.DMA_BANDWIDTH,
        "hetmem.fpga.pcie (the emulated card's link: XDMA Gen3 x16, 12 GB/s, 5 us)", "derived",
    ),
    "pcie4-x16": Link(
        "pcie4-x16", pcie.LATENCY_S, _pcie_raw(4) * _DMA_SHARE,
        "PCIe 4.0: 16 GT/s x16, 128b/130b; the Gen3 DMA share of the raw rate", "derived",
    ),
    "pcie5-x16": Link(
        "pcie5-x16", pcie.LATENCY_S, _pcie_raw(5) * _DMA_SHARE,
        "PCIe 5.0: 32 GT/s x16, 128b/130b; the Gen3 DMA share of the raw rate", "derived",
    ),
    "p2p-gen3": Link(
        "p2p-gen3", pcie.LATENCY_S, 7.3e9,
        "GPU<->FPGA peer-to-peer DMA on Gen3 x16 as the paper's code reports it: 7.0-7.6 GB/s "
        "(midpoint taken); latency as hetmem.fpga.pcie", "reported",
    ),
}  # fmt: skip


def get_link(name: str) -> Link:
    try:
        return LINKS[name]
    except (KeyError, TypeError):
        raise ProfileError("link", f"unknown link {name!r}; links are {sorted(LINKS)}") from None


def card_link(gpu: DeviceProfile, card: DeviceProfile, p2p: bool = True) -> Link:
    """The GPU<->card path: the paper's reported P2P figure on a Gen3 card, else the PCIe
    link of the lower generation of the two."""
    gen = int(min(gpu.value("pcie_gen"), card.value("pcie_gen")))
    if p2p and gen == 3:
        return LINKS["p2p-gen3"]
    return LINKS.get(f"pcie{gen}-x16") or LINKS["pcie3-x16"]


# -- built-in profiles --------------------------------------------------------------------

_MI210 = "AMD Instinct MI210 Accelerator data sheet"
_A100 = "NVIDIA A100 Tensor Core GPU data sheet (80GB SXM)"
_H100 = "NVIDIA H100 Tensor Core GPU data sheet (H100 SXM)"
_H200 = "NVIDIA H200 Tensor Core GPU data sheet (H200 SXM)"
_U55C = "AMD Alveo U55C Data Center Accelerator Cards Data Sheet (DS978)"
_U280 = "AMD Alveo U280 Data Center Accelerator Card Data Sheet (DS963)"
_UG1393 = "AMD Vitis UG1393, HBM Configuration and Use (32 pseudo-channels x 14.375 GB/s)"
_IDLE = (
    "not in the data sheet: assumed 15% of the TDP; replace with a measured idle reading "
    "(nvidia-smi / rocm-smi / xbutil)"
)
_BUSY = "not in the data sheet: the board's maximum power taken as its busy power (upper bound)"


def _f(value: float, unit: str, cite: str, source: str = "datasheet", note: str = "") -> Figure:
    return Figure(float(value), unit, cite, source, note)


def _gpu(name: str, cite: str, *, bw: float, fp16: float, int8: float, tdp: float, gen: int,
         hbm: float, stacks: int, note: str = "") -> DeviceProfile:  # fmt: skip
    figures = {
        "mem_bw": _f(bw, "B/s", cite),
        "fp16": _f(fp16, "FLOP/s", cite, note="dense (without structured sparsity)"),
        "bf16": _f(fp16, "FLOP/s", cite, note="dense (without structured sparsity)"),
        "int8": _f(int8, "OP/s", cite, note="dense (without structured sparsity)"),
        "tdp_w": _f(tdp, "W", cite),
        "idle_w": _f(0.15 * tdp, "W", cite, "assumed", _IDLE),
        "busy_w": _f(tdp, "W", cite, "assumed", _BUSY),
        "pcie_gen": _f(gen, "", cite),
        "pcie_lanes": _f(16, "", cite),
        "hbm_bytes": _f(hbm, "B", cite),
        "hbm_stacks": _f(stacks, "", cite),
    }
    return DeviceProfile(name, "gpu", figures, about=note)


def _card(name: str, cite: str, *, tdp: float, hbm: float, note: str = "") -> DeviceProfile:
    figures = {
        "mem_bw": _f(460e9, "B/s", cite, note="HBM2, 32 pseudo-channels; " + _UG1393),
        "int8": _f(24.5e12, "OP/s", cite, note="peak INT8 TOPs of the data sheet (uncertain)"),
        "tdp_w": _f(tdp, "W", cite, note="maximum total power"),
        "idle_w": _f(0.15 * tdp, "W", cite, "assumed", _IDLE),
        "busy_w": _f(tdp, "W", cite, "assumed", _BUSY),
        "pcie_gen": _f(3, "", cite, note="Gen3 x16 (the card also runs Gen4 x8)"),
        "pcie_lanes": _f(16, "", cite),
        "hbm_bytes": _f(hbm, "B", cite),
        "hbm_channels": _f(32, "", _UG1393),
    }
    return DeviceProfile(name, "fpga", figures, about=note)


BUILTIN: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        _gpu("MI210", _MI210, bw=1.6384e12, fp16=181e12, int8=181e12, tdp=300, gen=4,
             hbm=64e9, stacks=4, note="PCIe card, 64 GB HBM2e, 1.6 TB/s"),
        _gpu("A100-80GB", _A100, bw=2.039e12, fp16=312e12, int8=624e12, tdp=400, gen=4,
             hbm=80e9, stacks=5, note="SXM4, 80 GB HBM2e, 2,039 GB/s"),
        _gpu("H100-SXM", _H100, bw=3.35e12, fp16=989.5e12, int8=1979e12, tdp=700, gen=5,
             hbm=80e9, stacks=5, note="SXM5, 80 GB HBM3, 3.35 TB/s"),
        _gpu("H200", _H200, bw=4.8e12, fp16=989.5e12, int8=1979e12, tdp=700, gen=5,
             hbm=141e9, stacks=6, note="SXM, 141 GB HBM3e, 4.8 TB/s"),
        _card("U55C", _U55C, tdp=150, hbm=16e9, note="16 GB HBM2, 460 GB/s, Gen3 x16"),
        _card("U280", _U280, tdp=225, hbm=8e9,
              note="8 GB HBM2, 460 GB/s (and 32 GB DDR4), Gen3 x16"),
    )
}  # fmt: skip

_REGISTERED: dict[str, DeviceProfile] = {}


def names() -> tuple[str, ...]:
    return (*BUILTIN, *(n for n in _REGISTERED if n not in BUILTIN))


def register(profile: DeviceProfile) -> DeviceProfile:
    """Make a profile available by name (a user's, or a measured one replacing a built-in)."""
    if not isinstance(profile, DeviceProfile):
        raise ProfileError("profile", f"expected a DeviceProfile, got {type(profile).__name__}")
    _REGISTERED[profile.name] = profile
    return profile


def get_device(name: str | DeviceProfile, kind: Kind | None = None) -> DeviceProfile:
    """The profile of device `name` (registered first, then built-in), or a profile file's
    (a path ending in .json or .toml)."""
    if isinstance(name, DeviceProfile):
        profile = name
    elif isinstance(name, str) and name.endswith((".json", ".toml")):
        profile = load_profile(name)
    else:
        profile = _REGISTERED.get(name) or BUILTIN.get(name)  # type: ignore[arg-type]
        if profile is None:
            raise ProfileError("device", f"unknown device {name!r}; devices are {names()}")
    if kind is not None and profile.kind != kind:
        raise ProfileError("device", f"{profile.name!r} is a {profile.kind}, expected a {kind}")
    return profile


def profile_from_dict(data: Any, origin: str = "profile") -> DeviceProfile:
    """A profile from parsed JSON/TOML: {"name", "kind", "figures": {name: number or
    {"value", "unit", "cite", "source", "note"}}, "cite" (default for bare numbers),
    "source", "efficiency": {...}}."""
    if not isinstance(data, Mapping):
        raise ProfileError(origin, "expected a table/object at the top")
    for key in ("name", "kind", "figures"):
        if key not in data:
            raise ProfileError(origin, f"lacks {key!r}")
    name, kind, figs = data["name"], data["kind"], data["figures"]
    if not isinstance(name, str) or not name:
        raise ProfileError(f"{origin}: name", f"expected a non-empty string, got {name!r}")
    if not isinstance(figs, Mapping):
        raise ProfileError(f"{origin}: figures", "expected a table of figures")
    cite = str(data.get("cite", origin))
    default_source = str(data.get("figure_source", "measured" if data.get("source") ==
                                  "measured" else "datasheet"))  # fmt: skip
    figures: dict[str, Figure] = {}
    for key, raw in figs.items():
        if key not in UNITS:
            raise ProfileError(
                f"{origin}: figures.{key}", f"unknown figure; known: {sorted(UNITS)}"
            )
        try:
            if isinstance(raw, Mapping):
                figures[key] = Figure(
                    raw["value"],
                    str(raw.get("unit", UNITS[key])),
                    str(raw.get("cite", cite)),
                    str(raw.get("source", default_source)),
                    str(raw.get("note", "")),
                )
            else:
                figures[key] = Figure(raw, UNITS[key], cite, default_source)
        except KeyError:
            raise ProfileError(f"{origin}: figures.{key}", "lacks 'value'") from None
        except ProfileError as exc:
            raise ProfileError(f"{origin}: figures.{key}", str(exc)) from None
    eff = data.get("efficiency", {})
    if not isinstance(eff, Mapping):
        raise ProfileError(f"{origin}: efficiency", "expected a table")
    try:
        efficiency = Efficiency(**{k: eff[k] for k in eff})
    except TypeError as exc:
        raise ProfileError(f"{origin}: efficiency", str(exc)) from None
    return DeviceProfile(name, kind, figures, efficiency, str(data.get("source", "datasheet")),
                         str(data.get("about", "")))  # fmt: skip


def load_profile(path: str | Path) -> DeviceProfile:
    """Read a profile from a .json or .toml file (ProfileError naming the file and field)."""
    if not isinstance(path, str | Path):
        raise ProfileError("profile", f"expected a file path, got {type(path).__name__}")
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ProfileError("profile", f"cannot read {path}: {exc}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ProfileError("profile", f"{path} is not valid {path.suffix[1:]}: {exc}") from None
    return profile_from_dict(data, str(path))


def save_profile(profile: DeviceProfile, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(profile.to_json(), indent=2) + "\n")
    return path
