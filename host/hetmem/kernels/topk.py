"""Integer selection shared by every kernel: top-k and threshold bitmaps.

Top-k contract: the k largest scores; ties go to the lower index; output indices ascending;
k <= 0 or k > n (candidates) raises `InputError`. The model mirrors the engine: find the
k-th largest score (the threshold), keep every candidate above it and the first
(k - #above) candidates equal to it in index order, then emit the kept candidates by an
index-ascending scan of the n-bit bitmap, so the output is ascending by construction.

Bitmaps: [queries, ceil(n/32)] uint32, candidate j is bit j % 32 of word j // 32; the bits
past n in the last word are zero.
"""

from __future__ import annotations

import operator

import numpy as np

from ..errors import InputError


def check_k(k: object, n: int) -> int:
    """1 <= k <= n, or `InputError` naming `k` (never a silent clip)."""
    k = as_k(k)
    if k > n:
        raise InputError("k", f"k={k} exceeds the {n} candidates")
    return k


def as_k(k: object) -> int:
    """A positive int k (checked against n later, by `check_k`)."""
    if isinstance(k, bool):
        raise InputError("k", f"expected an int, got {k!r}")
    try:
        k = operator.index(k)  # type: ignore[arg-type]
    except TypeError:
        raise InputError("k", f"expected an int, got {type(k).__name__}") from None
    if k <= 0:
        raise InputError("k", f"expected a positive integer, got {k}")
    return k


def _check_scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise InputError("scores", f"expected [queries, n], got shape {scores.shape}")
    if not np.issubdtype(scores.dtype, np.integer):
        raise InputError("scores", f"expected integer scores, got dtype {scores.dtype}")
    return scores


def topk_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Bool [queries, n]: exactly k candidates per row, by the top-k contract."""
    scores = _check_scores(scores)
    q, n = scores.shape
    k = check_k(k, n)
    if k == n:
        return np.ones((q, n), dtype=bool)
    kth = np.partition(scores, n - k, axis=1)[:, n - k, None]  # the k-th largest
    keep = scores > kth
    need = k - keep.sum(axis=1, keepdims=True)  # >= 1: slots left for scores equal to kth
    tie = scores == kth
    keep |= tie & (np.cumsum(tie, axis=1) <= need)
    return keep


def topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Top-k indices [queries, k] uint32, ascending per row, ties to the lower index."""
    keep = topk_mask(scores, k)
    _, cols = np.nonzero(keep)  # row-major: ascending within each row
    return cols.reshape(keep.shape[0], -1).astype(np.uint32)


def pack_bitmap(mask: np.ndarray) -> np.ndarray:
    """Bool [queries, n] -> uint32 [queries, ceil(n/32)], bit j % 32 of word j // 32."""
    mask = np.asarray(mask, dtype=bool)
    q, n = mask.shape
    words = -(-n // 32)
    padded = np.zeros((q, words * 32), dtype=bool)
    padded[:, :n] = mask
    packed = np.packbits(padded, axis=1, bitorder="little")  # byte b, bit i = element 8b+i
    return np.ascontiguousarray(packed).view("<u4").astype(np.uint32)


def unpack_bitmap(bitmap: np.ndarray, n: int) -> np.ndarray:
    """uint32 [queries, words] -> bool [queries, n] (the inverse of `pack_bitmap`)."""
    words = np.ascontiguousarray(np.asarray(bitmap, dtype=np.uint32).astype("<u4"))
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")
    return bits[:, :n].astype(bool)


def threshold_bitmap(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Keep candidate j of query i when scores[i, j] >= thresholds[i]; packed bitmap."""
    scores = _check_scores(scores)
    if scores.shape[1] == 0:
        raise InputError("n", "is 0: there is nothing to select from")
    thresholds = np.asarray(thresholds, dtype=np.int64).reshape(-1, 1)
    return pack_bitmap(scores >= thresholds)
