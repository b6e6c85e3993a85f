"""The bitstream manifest (bitstreams/manifest.json): for each xclbin the build produces,
its platform, kernels, argument-to-HBM-bank map, kernel clock and sha256 checksum.

The xrt and pynq drivers load an xclbin only after it matches its manifest entry: the
file's checksum, the platform (or its shell's VBNV, which an xclbin header records), the
kernels and their argument counts, and the bank each buffer argument is connected to. A
mismatch raises `XclbinError` saying what differs. The manifest itself must agree with the
kernel specs (the runtime allocates by the specs' banks).

No xclbin is committed; the build (fpga/vitis) writes one and its checksum is recorded with

    python -m hetmem.fpga.manifest record path/to/hetmem_hw.xclbin

xclbins are looked for in bitstreams/ and in the directories of $HETMEM_XCLBIN_PATH
(separated by os.pathsep).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import kernels
from ..errors import HetmemError, InputError, XclbinError
from .implementations import HLS_KERNELS, RTL_KERNELS

#: The repository's bitstreams/ folder (an editable install keeps it beside host/).
BITSTREAMS = Path(__file__).resolve().parents[3] / "bitstreams"
MANIFEST = BITSTREAMS / "manifest.json"
#: Extra directories to search for xclbins.
XCLBIN_PATH_ENV = "HETMEM_XCLBIN_PATH"
SCHEMA = 1
_HBM_TAG = re.compile(r"^HBM\[(\d+)\]$")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def search_paths() -> list[Path]:
    """Where xclbins are looked for: bitstreams/, then $HETMEM_XCLBIN_PATH."""
    extra = os.environ.get(XCLBIN_PATH_ENV, "")
    return [BITSTREAMS, *(Path(p) for p in extra.split(os.pathsep) if p)]


def hbm_bank(tag: str) -> int | None:
    """The pseudo-channel of a memory tag like 'HBM[5]' (None for DDR, PLRAM, ...)."""
    found = _HBM_TAG.match(tag.strip())
    return int(found.group(1)) if found else None


def spec_banks(kernel: str) -> dict[str, int]:
    """Buffer argument -> HBM bank of a kernel, by its spec (in argument order)."""
    spec = kernels.get(kernel)
    return {a.name: int(a.bank) for a in spec.args if a.is_buffer}  # type: ignore[arg-type]


@dataclass(frozen=True)
class XclbinEntry:
    """What one xclbin must be."""

    name: str  # file name, e.g. "hetmem_hw.xclbin"
    platform: str  # e.g. "xilinx_u55c_gen3x16_xdma_3_202210_1"
    kernels: dict[str, dict[str, int]]  # kernel -> buffer argument -> HBM bank
    sha256: str | None = None  # None until a build is recorded
    shell: str = ""  # the platform's shell VBNV, e.g. "xilinx_u55c_gen3x16_xdma_base_3"
    clock_hz: float = kernels.DEFAULT_CLOCK_HZ
    build: str = ""
    #: kernel -> what implements it in this xclbin: "rtl" (fpga/rtl) or "hls" (hls/)
    sources: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> XclbinEntry:
        try:
            return cls(
                name=str(data["name"]),
                platform=str(data["platform"]),
                kernels={k: {a: int(b) for a, b in v.items()} for k, v in data["kernels"].items()},
                sha256=data.get("sha256"),
                shell=str(data.get("shell", "")),
                clock_hz=float(data.get("clock_hz", kernels.DEFAULT_CLOCK_HZ)),
                build=str(data.get("build", "")),
                sources={str(k): str(v) for k, v in data.get("sources", {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise XclbinError(f"malformed manifest entry {data!r}: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "platform": self.platform,
            "shell": self.shell,
            "clock_hz": self.clock_hz,
            "sha256": self.sha256,
            "build": self.build,
            **({"sources": self.sources} if self.sources else {}),
            "kernels": self.kernels,
        }

    def platforms(self) -> tuple[str, ...]:
        """Names an xclbin header may carry for this platform (platform or shell VBNV)."""
        return tuple(p for p in (self.platform, self.shell) if p)

    def spec_mismatches(self) -> list[str]:
        """Where the entry's bank map disagrees with the kernel specs, one line each (empty
        when it agrees): unknown kernels, arguments missing or extra, banks that differ."""
        found = []
        for kernel, banks in self.kernels.items():
            try:
                expected = spec_banks(kernel)
            except InputError:
                found.append(f"unknown kernel {kernel!r}")
                continue
            for arg, bank in expected.items():
                if arg not in banks:
                    found.append(f"{kernel}.{arg} missing (spec: HBM[{bank}])")
                elif banks[arg] != bank:
                    found.append(f"{kernel}.{arg} in HBM[{banks[arg]}], spec HBM[{bank}]")
            found.extend(
                f"{kernel}.{arg} is no buffer argument of the spec" for arg in banks
                if arg not in expected
            )  # fmt: skip
        return found

    def check_specs(self) -> None:
        """The entry's bank map must be the kernel specs' (the runtime allocates by them)."""
        for kernel, banks in self.kernels.items():
            try:
                expected = spec_banks(kernel)
            except InputError:
                raise XclbinError(
                    f"{self.name}: manifest names unknown kernel {kernel!r}"
                ) from None
            if banks != expected:
                raise XclbinError(
                    f"{self.name}: manifest bank map of {kernel} {banks} disagrees with its "
                    f"kernel spec {expected}"
                )

    def check_checksum(self, path: Path) -> str:
        """The file's sha256 must be the recorded one; returns it."""
        digest = sha256_file(path)
        if self.sha256 is None:
            raise XclbinError(
                f"{path}: the manifest records no checksum for {self.name}; after checking the "
                f"build, record it: python -m hetmem.fpga.manifest record {path}"
            )
        if digest != self.sha256:
            raise XclbinError(
                f"{path}: sha256 {digest[:16]}... does not match the manifest's "
                f"{self.sha256[:16]}... for {self.name} (a different or corrupted build)"
            )
        return digest

    def check_metadata(
        self,
        platform: str,
        kernel_args: Mapping[str, int],
        banks: Mapping[str, Mapping[str, int | None]] | None = None,
    ) -> None:
        """Compare what an xclbin declares with the entry: its platform name, its kernels
        with their argument counts, and (when known) each buffer argument's HBM bank."""
        where = self.name
        if platform not in self.platforms():
            raise XclbinError(
                f"{where}: built for platform {platform!r}, the manifest expects "
                f"{' or '.join(repr(p) for p in self.platforms())}"
            )
        missing = sorted(set(self.kernels) - set(kernel_args))
        if missing:
            raise XclbinError(
                f"{where}: kernels {missing} are missing (the xclbin has {sorted(kernel_args)})"
            )
        for kernel in self.kernels:
            count = len(kernels.get(kernel).args)
            if int(kernel_args[kernel]) != count:
                raise XclbinError(
                    f"{where}: kernel {kernel} has {kernel_args[kernel]} arguments, its spec {count}"
                )
        for kernel, got in (banks or {}).items():
            want = self.kernels.get(kernel, {})
            for arg, bank in want.items():
                if got.get(arg) != bank:
                    raise XclbinError(
                        f"{where}: {kernel}.{arg} is connected to "
                        f"{_bank_name(got.get(arg))}, the manifest expects HBM[{bank}]"
                    )


def _bank_name(bank: int | None) -> str:
    return "a non-HBM memory" if bank is None else f"HBM[{bank}]"


@dataclass
class Manifest:
    """The xclbins the runtime accepts."""

    xclbins: dict[str, XclbinEntry]
    path: Path | None = None
    about: str = ""

    @classmethod
    def load(cls, path: str | os.PathLike | Manifest | None = None) -> Manifest:
        """Read a manifest (default: bitstreams/manifest.json); a Manifest passes through."""
        if isinstance(path, Manifest):
            return path
        path = Path(path) if path is not None else MANIFEST
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise XclbinError(f"no bitstream manifest at {path}") from None
        except (OSError, ValueError) as exc:
            raise XclbinError(f"cannot read the bitstream manifest {path}: {exc}") from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise XclbinError(f"{path}: expected a manifest with schema {SCHEMA}")
        entries = [XclbinEntry.from_json(e) for e in data.get("xclbins", [])]
        return cls({e.name: e for e in entries}, path, str(data.get("about", "")))

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "about": self.about,
            "xclbins": [e.to_json() for e in self.xclbins.values()],
        }

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the manifest as JSON (to `path`, default where it was read from)."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise InputError("path", "this manifest was not read from a file; give a path")
        target.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return target

    def entry(self, name: str) -> XclbinEntry:
        """The entry of xclbin file `name` (XclbinError when the manifest lacks it)."""
        try:
            return self.xclbins[name]
        except KeyError:
            raise XclbinError(
                f"xclbin {name!r} is not in the manifest {self.path or ''} "
                f"(it lists {sorted(self.xclbins)})"
            ) from None

    def default(self) -> XclbinEntry:
        """The first xclbin of the manifest: the one the drivers load unless told."""
        if not self.xclbins:
            raise XclbinError(f"the manifest {self.path or ''} lists no xclbin")
        return next(iter(self.xclbins.values()))

    def with_checksum(self, name: str, sha256: str) -> Manifest:
        """A copy in which xclbin `name` has checksum `sha256` (recording a build)."""
        entry = replace(self.entry(name), sha256=sha256)
        return Manifest({**self.xclbins, name: entry}, self.path, self.about)

    def locate(self, name: str, paths: Iterable[Path] | None = None) -> Path | None:
        """Where xclbin `name` is, in the search paths; None when it is nowhere."""
        for directory in search_paths() if paths is None else paths:
            candidate = Path(directory) / name
            if candidate.is_file():
                return candidate
        return None

    def resolve(self, xclbin: str | os.PathLike | None = None) -> tuple[Path, XclbinEntry]:
        """The xclbin file to load and its entry: `xclbin` is a path, or a manifest name
        looked up in the search paths (default: the manifest's first). The entry is the
        one named by the file's name; XclbinError when the file or entry is missing."""
        if xclbin is None:
            entry = self.default()
        else:
            given = Path(xclbin)
            if given.name != str(xclbin):  # a path, not a bare name
                if not given.is_file():
                    raise XclbinError(f"xclbin {given} not found (no such file)")
                return given, self.entry(given.name)
            entry = self.entry(given.name)
        path = self.locate(entry.name)
        if path is None:
            raise XclbinError(
                f"xclbin {entry.name} not found in {[str(p) for p in search_paths()]}; "
                f"build it (fpga/vitis) or set ${XCLBIN_PATH_ENV}"
            )
        return path, entry

    def status(self) -> list[dict[str, Any]]:
        """Each xclbin: entry, where it was found (or None), whether its checksum is
        'match', 'mismatch' or 'unrecorded' (None when absent), and `specs`: where its bank
        map disagrees with the kernel specs (empty when it agrees)."""
        rows = []
        for entry in self.xclbins.values():
            path = self.locate(entry.name)
            check = None
            if path is not None:
                if entry.sha256 is None:
                    check = "unrecorded"
                else:
                    check = "match" if sha256_file(path) == entry.sha256 else "mismatch"
            rows.append(
                {"entry": entry, "path": path, "checksum": check, "specs": entry.spec_mismatches()}
            )
        return rows


def expected_entry(
    name: str = "hetmem_hw.xclbin",
    platform: str = "xilinx_u55c_gen3x16_xdma_3_202210_1",
    shell: str = "xilinx_u55c_gen3x16_xdma_base_3",
) -> XclbinEntry:
    """The entry an xclbin holding every kernel, connected as the specs say, would have."""
    return XclbinEntry(
        name=name,
        platform=platform,
        shell=shell,
        kernels={k: spec_banks(k) for k in kernels.names()},
        sha256=None,
        clock_hz=kernels.DEFAULT_CLOCK_HZ,
        build=(
            "fpga/vitis: make hetmem TARGET=hw (writes build/hetmem_hw.xclbin); the RTL kernels "
            "packaged from fpga/rtl, bm25 compiled from hls/bm25.cpp by v++ -c"
        ),
        sources=kernel_sources(),
    )


def kernel_sources() -> dict[str, str]:
    """What implements each kernel in the one xclbin: its RTL where fpga/rtl has it
    (`RTL_KERNELS`), else its HLS C++ (`HLS_KERNELS`)."""
    return {
        k: "rtl" if k in RTL_KERNELS else "hls"
        for k in kernels.names()
        if k in RTL_KERNELS or k in HLS_KERNELS
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m hetmem.fpga.manifest record PATH`: record a built xclbin's checksum."""
    parser = argparse.ArgumentParser(prog="python -m hetmem.fpga.manifest")
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="record the sha256 of a built xclbin in the manifest")
    rec.add_argument("xclbin", type=Path)
    rec.add_argument("--manifest", type=Path, default=MANIFEST)
    args = parser.parse_args(argv)
    try:
        manifest = Manifest.load(args.manifest)
        entry = manifest.entry(args.xclbin.name)
        digest = sha256_file(args.xclbin)
        manifest.with_checksum(entry.name, digest).save(args.manifest)
    except (HetmemError, OSError) as exc:  # an error line and status 2, not a traceback
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(f"{entry.name}: sha256 {digest} recorded in {args.manifest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
