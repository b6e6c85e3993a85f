"""`python -m hetmem.fpga.hls4ml_gate profile | csim`."""

from __future__ import annotations

import argparse
from pathlib import Path

from .bundled import PRECISION_FILE, SELECTORS, bundled_maps, profile_bundled
from .selection import stress_rows


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
