"""Selections from the fixed-point maps: integer scores of the gate and the indexer, their
recall of the float selectors' top-k, and stress inputs for the C simulation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .build import GateMap
from .bundled import dsa_rows, seer_rows


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
    from ...kernels.topk import topk_mask

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
