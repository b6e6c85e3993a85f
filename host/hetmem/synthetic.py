"""Synthetic but realistic inputs for demos, benchmarks and tests.

Keys carry a few outlier channels (as real LLM keys do) and heavy-tailed components; each
query attends strongly to a small set of "heavy hitter" tokens, so sparse selection has
something real to find.
"""

from __future__ import annotations

import torch

from .attention import AttentionQuery, KVCache
from .checks import check_positive_int
from .errors import InputError


def synthetic_kv(
    batch: int = 2,
    q_heads: int = 8,
    kv_heads: int = 2,
    length: int = 4096,
    dim: int = 64,
    *,
    lengths: list[int] | None = None,
    hitters: int = 32,
    outliers: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[KVCache, AttentionQuery]:
    """A KV cache [B, Hkv, length, D] and a one-token decode query [B, Hq, 1, D].

    Each row's query heads share a direction with `hitters` random earlier tokens of their
    KV head, so dense attention mass concentrates there.
    """
    for name, value in (("batch", batch), ("q_heads", q_heads), ("kv_heads", kv_heads),
                        ("length", length), ("dim", dim)):  # fmt: skip
        check_positive_int(name, value)
    for name, value in (("hitters", hitters), ("outliers", outliers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(name, f"expected an int >= 0, got {value!r}")
    gen = torch.Generator().manual_seed(seed)
    t = torch.distributions.StudentT(3.0)
    torch.manual_seed(seed)
    keys = t.sample((batch, kv_heads, length, dim)).clamp(-20, 20)
    channels = torch.randperm(dim, generator=gen)[:outliers]
    keys[..., channels] *= 8.0
    values = torch.randn(batch, kv_heads, length, dim, generator=gen)
    lens = torch.tensor(lengths if lengths is not None else [length] * batch, dtype=torch.long)
    group = q_heads // kv_heads
    q = 0.3 * torch.randn(batch, q_heads, 1, dim, generator=gen)
    for b in range(batch):
        n = int(lens[b])
        for h in range(kv_heads):
            idx = torch.randint(0, n, (hitters,), generator=gen)
            direction = torch.randn(dim, generator=gen)
            direction /= direction.norm()
            keys[b, h, idx] += 6.0 * direction
            q[b, h * group : (h + 1) * group, 0] += 1.5 * direction
    kv = KVCache(keys.to(dtype).to(device), values.to(dtype).to(device), lens.to(device))
    return kv, AttentionQuery(q.to(dtype).to(device))
