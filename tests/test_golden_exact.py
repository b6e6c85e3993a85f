"""The golden models' float-BLAS dot products are exact integers: at the extremes of every
dtype, on both sides of the float32 / float64 exactness bounds, against int64 arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from hetmem import kernels
from hetmem.errors import InputError
from hetmem.kernels import spec as kspec


def extremes(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Values drawn from the two ends of a dtype's range: the largest sums of |products|."""
    info = np.iinfo(dtype)
    return np.where(rng.random(shape) < 0.5, info.min, info.max).astype(dtype)


def int64_dot(q: np.ndarray, keys: np.ndarray) -> np.ndarray:
    return np.einsum("...d,nd->...n", q.astype(np.int64), keys.astype(np.int64))


def test_exact_float_picks_the_narrowest_exact_type():
    assert kspec.exact_float(2**24) is np.float32
    assert kspec.exact_float(2**24 + 1) is np.float64
    assert kspec.exact_float(2**53) is np.float64
    assert kspec.exact_float(2**53 + 1) is None


@pytest.mark.parametrize(
    ("key_dtype", "dim", "path"),
    [
        (np.int8, 1024, np.float32),  # 128 * 128 * 1024 = 2**24: the last exact float32 width
        (np.int8, 1025, np.float64),
        (np.int16, 128, np.float64),
    ],
)
def test_exact_dot_at_the_bounds(key_dtype, dim, path):
    rng = np.random.default_rng(dim)
    q = extremes(rng, (2, 3, dim), np.int8)
    keys = extremes(rng, (700, dim), key_dtype)
    # One row of all -128 against a query of all -128 reaches the bound exactly.
    q[0, 0, :] = -128
    keys[0, :] = np.iinfo(key_dtype).min
    got = kspec.exact_dot(q, keys)
    assert got.dtype == path
    np.testing.assert_array_equal(got.astype(np.int64), int64_dot(q, keys))
    assert int(got[0, 0, 0]) == 128 * -int(np.iinfo(key_dtype).min) * dim
    np.testing.assert_array_equal(kspec.int_dot(q, keys), int64_dot(q, keys))


def test_exact_dot_concatenates_key_arrays_without_copying_them():
    rng = np.random.default_rng(1)
    a, b = extremes(rng, (300, 40), np.int16), extremes(rng, (300, 24), np.int16)
    q = extremes(rng, (4, 64), np.int8)
    np.testing.assert_array_equal(
        kspec.exact_dot(q, a, b).astype(np.int64), int64_dot(q, np.concatenate([a, b], 1))
    )
    with pytest.raises(InputError):
        kspec.exact_dot(q[:, :10], a, b)


def test_exact_dot_beyond_float64_falls_back_to_int64():
    rng = np.random.default_rng(2)
    q = extremes(rng, (2, 1024), np.int32)  # 2**31 * 2**15 * 1024 = 2**56 > 2**53
    keys = extremes(rng, (50, 1024), np.int16)
    got = kspec.exact_dot(q, keys)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, int64_dot(q, keys))
    with pytest.raises(InputError):  # past int64 too: refused, never wrapped
        kspec.exact_dot(q.astype(np.int64), keys)


def test_token_indexer_head_sum_is_exact_at_the_extremes():
    """w * ReLU(dot) summed over heads reaches ~2**45 here: float64-exact, not float32."""
    rng = np.random.default_rng(3)
    n, heads, dim = 600, 16, 128
    keys = extremes(rng, (n, dim), np.int8)
    q = extremes(rng, (2, heads, dim), np.int8)
    q[0] = -128
    keys[:5] = -128  # dot = 2**21 for query 0 on these rows, every head
    w = extremes(rng, (2, heads), np.int16)
    shifts = rng.integers(0, kspec.MAX_SHIFT + 1, n).astype(np.uint8)
    inputs = kernels.KernelInputs(
        {"keys": keys, "shifts": shifts, "q": q, "w": w},
        {"n": n, "k": 7, "queries": 2, "heads": heads, "dim": dim},
    )
    dots = np.maximum(int64_dot(q, keys), 0)  # [Q, H, n]
    expected = np.einsum("qh,qhn->qn", w.astype(np.int64), dots) << shifts.astype(np.int64)
    got = kernels.get("token_indexer").scores(inputs)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)
    assert np.abs(expected).max() > 2**40


def test_page_indexer_bound_is_exact_at_the_extremes():
    rng = np.random.default_rng(4)
    n, heads, dim = 500, 4, 128
    x, y = extremes(rng, (n, dim), np.int16), extremes(rng, (n, dim), np.int16)
    mins, maxs = np.minimum(x, y), np.maximum(x, y)
    q = extremes(rng, (3, heads, dim), np.int8)
    inputs = kernels.KernelInputs(
        {"mins": mins, "maxs": maxs, "q": q},
        {"n": n, "k": 5, "queries": 3, "heads": heads, "dim": dim},
    )
    q64 = q.astype(np.int64)
    expected = (int64_dot(np.maximum(q64, 0), maxs) + int64_dot(np.minimum(q64, 0), mins)).max(
        axis=1
    )
    np.testing.assert_array_equal(kernels.get("page_indexer").scores(inputs), expected)
