"""Print the HLS-vs-RTL table of hls/README.md: for block_gate (both implement it), the
cycles the HLS C++'s loop schedule counts in C-simulation (hls target, `modeled`) against
the RTL engine's calibrated cycle model (kernels/block_gate.py, within 5% of the RTL's
simulated cycles); bm25 (HLS only) against the spec's uncalibrated model.

    .venv/bin/python hls/compare.py
"""

from __future__ import annotations

import numpy as np

from hetmem import kernels
from hetmem.fpga import open_device
from hetmem.kernels import KernelInputs
from hetmem.kernels.spec import MODE_THRESHOLD, MODE_TOPK


def block_gate(rng, n: int, dim: int, queries: int, k: int, mode: int) -> KernelInputs:
    arrays = {
        "keys": rng.integers(-127, 128, (n, dim)).astype(np.int8),
        "shifts": rng.integers(0, 8, n).astype(np.uint8),
        "q": rng.integers(-127, 128, (queries, dim)).astype(np.int8),
        "delta": np.full(queries, 1 << 16, dtype=np.uint32),
    }
    scalars = {"n": n, "k": k, "queries": queries, "dim": dim, "mode": mode}
    return kernels.get("block_gate").complete(KernelInputs(arrays, scalars))


def bm25(rng, n: int, queries: int, k: int) -> KernelInputs:
    vocab = 4000
    df = np.minimum(n, (n / np.arange(1, vocab + 1) ** 0.9).astype(np.int64) // 8 + 1)
    docs = np.concatenate([rng.choice(n, size=int(c), replace=False) for c in df])
    arrays = {
        "term_offsets": np.concatenate([[0], np.cumsum(df)]).astype(np.uint32),
        "doc_ids": docs.astype(np.uint32),
        "impacts": rng.integers(1, 65536, docs.size).astype(np.uint16),
        "terms": rng.integers(0, vocab, (queries, 6)).astype(np.int32),
        "idf": rng.integers(1, 65536, (queries, 6)).astype(np.uint16),
    }
    scalars = {"n": n, "k": k, "queries": queries, "terms_per_query": 6, "vocab": vocab}
    return KernelInputs(arrays, scalars)


def main() -> None:
    rng = np.random.default_rng(0)
    rows = []
    with open_device("hls") as dev:
        for n, dim, queries, k, mode in [
            (4096, 128, 1, 64, MODE_TOPK),
            (4096, 128, 8, 64, MODE_TOPK),
            (16384, 128, 8, 256, MODE_TOPK),
            (65536, 128, 1, 2048, MODE_TOPK),
            (4096, 128, 8, 0, MODE_THRESHOLD),
        ]:
            inputs = block_gate(rng, n, dim, queries, k, mode)
            spec = kernels.get("block_gate")
            rtl = spec.cycles(**spec.shape(inputs))
            _, hls = dev.simulate("block_gate", inputs)
            what = f"top-k k={k}" if mode == MODE_TOPK else "threshold"
            rows.append(("block_gate", f"n={n} dim={dim} queries={queries} {what}", hls, rtl))
        for n, queries, k in [(8192, 1, 64), (65536, 4, 256)]:
            inputs = bm25(rng, n, queries, k)
            spec = kernels.get("bm25")
            model = spec.cycles(**spec.shape(inputs))
            _, hls = dev.simulate("bm25", inputs)
            rows.append(("bm25", f"n={n} queries={queries} k={k}", hls, model))
    print("| kernel | call | HLS schedule (cycles) | RTL cycle model (cycles) | HLS / RTL |")
    print("|---|---|---:|---:|---:|")
    for kernel, call, hls, rtl in rows:
        print(f"| {kernel} | {call} | {hls:,} | {rtl:,} | {hls / rtl:.2f} |")


if __name__ == "__main__":
    main()
