"""The bundled model's trained selectors: their maps, the calibration activations they are
profiled on, the committed precisions and the built maps."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import InputError
from .build import ROOT, GateMap, build_map
from .fixed import ROUNDING, SATURATION, WIDTHS, MapPrecision, choose_precision
from .maps import dsa_maps, profile, seer_maps

#: The committed precisions (written by `profile_bundled`, read by `bundled_maps`).
PRECISION_FILE = ROOT / "hls" / "attngate" / "precision.json"
#: The selectors whose maps are converted, and their maps.
SELECTORS = {"seer": ("key", "query"), "dsa": ("key", "query")}


@dataclass(frozen=True)
class Calibration:
    """Which activations the precisions were profiled on."""

    sequences: int = 8
    tokens: int = 1024
    queries: int = 32
    seed: int = 0


def bundled_selectors() -> Any:
    from ...bundled import path
    from ...selectors.weights import load_selectors

    return load_selectors(path())


def capture_bundled(sequences: int, tokens: int, queries: int, seed: int) -> list[Any]:
    """The bundled model's attention activations per layer (`hetmem.selectors.activations`'s
    `capture`) on the calibration text and tasks of `seed`."""
    from ...bundled import path
    from ...selectors.activations import capture
    from ...selectors.calibrate import load_local
    from ...selectors.data import calibration_ids

    model, tok = load_local(path())
    ids = calibration_ids(tok, sequences, tokens, seed=seed)
    return capture(model, ids, queries=queries, seed=seed)


def seer_rows(act: Any, block: int) -> dict[str, np.ndarray]:
    """The AttnGate maps' input rows of one layer: "key" the pooled blocks (complete ones
    and each sampled query's partial block) [M, Hkv*3D], "query" the grouped queries
    [N*T, Hkv*R*D], each row all KV heads in order (as `block_diagonal` lays them)."""
    from ...methods.seer import group_queries
    from ...selectors.objective import block_pools

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
    from ...bundled import path
    from ...selectors.weights import SELECTORS_FILE

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
