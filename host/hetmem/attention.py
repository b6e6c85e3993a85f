"""Attention over a KV cache: the dense reference, sparse Apply over a selection, and
the attention-recall metric.

Layout: keys and values [batch, kv_heads, capacity, dim], right padded, with per-row
`lengths`; queries [batch, q_heads, queries, dim] at absolute `positions` [batch, queries].
A query at position p sees keys at positions s <= p and s < length (exact causal mask).
Grouped-query attention: q_heads is a multiple of kv_heads; query head h reads KV head
h // (q_heads // kv_heads).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .checks import check_dim, check_divides, check_tensor
from .errors import InputError
from .selection import Bitmap, Selection, TopK


@dataclass(frozen=True)
class Growth:
    """Bounded growth for buffers that must stay close to their length (a wrapped model's KV
    cache and the indexes built over it): room for about length/`fraction` more items, so a
    run of appends reallocates once per length/`fraction` items (amortized `fraction` item
    copies per append) and the spare room stays a few percent. The capacity is a multiple of
    `align` (whole blocks for a block gather) when that costs at most as much room again,
    else of the largest power-of-two divisor of `align` that does (a short buffer forgoes the
    alignment rather than carry a block of padding).

    `expected`: the length the buffer is known to reach (a `generate()`'s prompt plus its
    `max_new_tokens`, as a static cache's `max_cache_len`): up to it the capacity is that
    length (aligned), so a run of appends that stays within it never reallocates; past it,
    the fraction rule."""

    align: int = 1
    fraction: int = 64
    expected: int = 0

    def __post_init__(self) -> None:
        ints = all(
            isinstance(v, int) and not isinstance(v, bool)
            for v in (self.align, self.fraction, self.expected)
        )
        if not ints or self.align < 1 or self.fraction < 1 or self.expected < 0:
            raise InputError(
                "growth", f"align and fraction must be ints >= 1, expected >= 0, got {self}"
            )

    def capacity(self, length: int) -> int:
        if length <= self.expected:
            return self._aligned(self.expected, 0)
        return self._aligned(length, max(-(-length // self.fraction), 1))

    def _aligned(self, length: int, spare: int) -> int:
        """length + spare, rounded up to the alignment where that costs at most `spare` plus
        a fraction's room more."""
        room = spare + max(-(-length // self.fraction), 1)
        align = self.align
        while align > 1:
            capacity = -(-(length + spare) // align) * align
            if capacity - length <= room:
                return capacity
            align = align // 2 if align % 2 == 0 else 1
        return length + spare

    def within(self, unit: int) -> Growth:
        """The growth of an index with one entry per `unit` items of this buffer (same
        fraction, the expected length in entries)."""
        return Growth(fraction=self.fraction, expected=-(-self.expected // unit))


#: Floating dtypes narrower than float32 (a CPU matmul in them builds its kernel per shape).
HALF_DTYPES = (torch.bfloat16, torch.float16)


class Growable:
    """A tensor that grows along one axis by appends: doubling its capacity (amortized O(1)),
    or by a bounded `Growth` when one is given."""

    def __init__(
        self,
        initial: torch.Tensor,
        axis: int,
        min_capacity: int = 0,
        growth: Growth | None = None,
    ):
        self.axis = axis
        self.min_capacity = min_capacity
        self.growth = growth
        self.length = initial.shape[axis]
        if growth is None:
            capacity = max(self.length, min_capacity, 1)
        else:
            capacity = max(growth.capacity(self.length), min_capacity)
        shape = list(initial.shape)
        shape[axis] = capacity
        self.buffer = initial.new_zeros(shape)
        self.buffer.narrow(axis, 0, self.length).copy_(initial)

    @classmethod
    def adopt(
        cls, buffer: torch.Tensor, axis: int, length: int, growth: Growth | None = None
    ) -> Growable:
        """A Growable over an existing buffer whose first `length` items along `axis` are in
        use (no copy)."""
        out = object.__new__(cls)
        out.axis, out.length, out.buffer = axis, length, buffer
        out.min_capacity, out.growth = 0, growth
        return out

    @property
    def buffer(self) -> torch.Tensor:
        return self._buffer

    @buffer.setter
    def buffer(self, value: torch.Tensor) -> None:
        self._buffer = value
        self._view = None  # a view of the old buffer would keep it alive

    @property
    def data(self) -> torch.Tensor:
        """The items in use: a view of the buffer (kept while buffer and length stay)."""
        view = self._view
        if view is None or view[0] != self.length:
            view = self._view = (self.length, self._buffer.narrow(self.axis, 0, self.length))
        return view[1]

    @property
    def capacity(self) -> int:
        """Items the buffer holds before it must grow."""
        return self._buffer.shape[self.axis]

    @property
    def nbytes(self) -> int:
        """Bytes of the items in use (`data`'s), computed without making the view."""
        buf = self._buffer
        return buf.numel() // max(buf.shape[self.axis], 1) * self.length * buf.element_size()

    def padded(self, quantum: int) -> torch.Tensor:
        """The items in use and some of the buffer's next ones, for a half-precision CPU
        matmul, which builds its kernel per shape and copies an operand that is not one
        contiguous block: the whole buffer when it holds at most a quarter more (a cache
        allocated for its final length: one shape, no copy), else the items up to a multiple
        of `quantum` (one shape for `quantum` steps). The items past `length` are zeros or
        stale, finite items: slice their results away."""
        n = -(-self.length // quantum) * quantum
        if self._buffer.shape[self.axis] <= n + self.length // 4:
            return self._buffer
        return self._buffer.narrow(self.axis, 0, n)

    def reserve(self, length: int) -> None:
        capacity = self._buffer.shape[self.axis]
        if length <= capacity:
            return
        if self.growth is not None:
            new_capacity = self.growth.capacity(length)
        else:
            new_capacity = max(length, 2 * capacity)
            if self.min_capacity:
                new_capacity = -(-new_capacity // self.min_capacity) * self.min_capacity
        self._reallocate(new_capacity)

    def fit(self) -> None:
        """Give back room beyond what bounded growth keeps (after the length dropped)."""
        if self.growth is not None and self.capacity > self.growth.capacity(self.length):
            self._reallocate(self.growth.capacity(self.length))

    def _reallocate(self, capacity: int) -> None:
        shape = list(self.buffer.shape)
        shape[self.axis] = capacity
        grown = self.buffer.new_empty(shape)  # each byte written once: the data, then zeros
        grown.narrow(self.axis, 0, self.length).copy_(self.data)
        grown.narrow(self.axis, self.length, capacity - self.length).zero_()
        self.buffer = grown

    def to(self, device: torch.device) -> Growable:
        out = Growable.adopt(self.buffer.to(device), self.axis, self.length, self.growth)
        out.min_capacity = self.min_capacity
        return out


#: KV buffers without a `Growth` are allocated in multiples of this many tokens (a multiple
#: of every block size that divides it), so a block selection gathers contiguous blocks.
ALIGN = 256


class KVCache:
    """Per-row KV cache with different lengths per row; grows by appends, never rebuilt.

    Without `growth` the buffers start at a multiple of ALIGN tokens and double when full;
    with one (`Growth(align=unit)`) they keep a few percent of spare room (see `Growth`).
    """

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        lengths: torch.Tensor | None = None,
        *,
        growth: Growth | None = None,
    ):
        check_tensor("keys", keys, dims=("batch", "kv_heads", "tokens", "dim"), floating=True)
        check_tensor("values", values, dims=("batch", "kv_heads", "tokens", "dim"), floating=True)
        for name, t in (("keys", keys), ("values", values)):
            if t.shape[1] == 0 or t.shape[3] == 0:
                raise InputError(
                    name, f"needs at least one KV head and channel, got {tuple(t.shape)}"
                )
        if growth is not None and not isinstance(growth, Growth):
            raise InputError("growth", f"expected a hetmem Growth or None, got {growth!r}")
        if values.shape[:3] != keys.shape[:3]:
            raise InputError(
                "values", f"shape {tuple(values.shape)} does not match keys {tuple(keys.shape)}"
            )
        batch, _, tokens, _ = keys.shape
        if lengths is None:
            lengths = torch.full((batch,), tokens, dtype=torch.long, device=keys.device)
        check_tensor("lengths", lengths, ndim=1, floating=False)
        check_dim("lengths", lengths, 0, batch, "batch of keys")
        if bool((lengths < 0).any()) or bool((lengths > tokens).any()):
            raise InputError("lengths", f"every length must lie in [0, {tokens}]")
        # Without a growth policy: capacity in multiples of ALIGN tokens, so block methods can
        # gather whole blocks.
        reserve = -(-tokens // ALIGN) * ALIGN if growth is None else 0
        self._keys = Growable(keys, axis=2, min_capacity=reserve, growth=growth)
        self._values = Growable(values, axis=2, min_capacity=reserve, growth=growth)
        self.lengths = lengths.to(device=keys.device, dtype=torch.long).clone()
        self._zero_padding()  # padding may hold NaN (a masked row); the tokens may not
        _check_finite(self.keys, self.values)

    @classmethod
    def adopt(
        cls,
        keys: torch.Tensor,
        values: torch.Tensor,
        tokens: int,
        lengths: torch.Tensor,
        growth: Growth | None = None,
    ) -> KVCache:
        """A cache over buffers [B, Hkv, capacity, D] whose first `tokens` slots are in use
        (no copy); slots past each row's length are zeroed."""
        out = object.__new__(cls)
        out._keys = Growable.adopt(keys, 2, tokens, growth)
        out._values = Growable.adopt(values, 2, tokens, growth)
        out.lengths = lengths.to(device=keys.device, dtype=torch.long).clone()
        out._zero_padding()
        return out

    def _zero_padding(self) -> None:
        """Zero the slots past each row's length: padding may hold NaN (a fully masked row of
        a model), and a masked-out NaN value still poisons the probs @ values product."""
        if bool((self.lengths < self.capacity).any()):
            pad = torch.arange(self.capacity, device=self.device)[None, :] >= self.lengths[:, None]
            pad = pad[:, None, :, None]
            for store in (self._keys, self._values):
                store.data.masked_fill_(pad, 0.0)

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens in each row [B] (long, on the cache's device)."""
        return self._lengths

    @lengths.setter
    def lengths(self, value: torch.Tensor) -> None:
        self._lengths = value
        self._full: bool | None = None  # whether every row is as long as the cache: unknown

    @property
    def full(self) -> bool:
        """Every row holds `capacity` tokens (no padding anywhere): a decode append then
        writes one slice, and no query needs a padding mask. Cached until lengths change."""
        if self._full is None:
            self._full = bool((self._lengths == self.capacity).all())
        return self._full

    def shortest(self) -> int:
        """The shortest row's length (read from `capacity` when the cache is `full`: no
        device sync)."""
        return self.capacity if self.full else int(self._lengths.min())

    @property
    def growth(self) -> Growth | None:
        return self._keys.growth

    @property
    def keys(self) -> torch.Tensor:
        return self._keys.data

    @property
    def values(self) -> torch.Tensor:
        return self._values.data

    @property
    def batch(self) -> int:
        return self._keys._buffer.shape[0]

    @property
    def kv_heads(self) -> int:
        return self._keys._buffer.shape[1]

    @property
    def dim(self) -> int:
        """The keys' head dim (what queries have)."""
        return self._keys._buffer.shape[3]

    @property
    def value_dim(self) -> int:
        """The values' head dim (an attention output's); may differ from the keys' (MLA)."""
        return self._values._buffer.shape[3]

    @property
    def capacity(self) -> int:
        """The padded token axis of `keys`: the largest row length."""
        return self._keys.length

    @property
    def device(self) -> torch.device:
        return self._keys._buffer.device

    @property
    def nbytes(self) -> int:
        k = self.keys
        per_token = k.shape[1] * (self.dim + self.value_dim) * k.element_size()
        return int(self.lengths.sum()) * per_token

    def rows(self, rows: slice) -> KVCache:
        """A view of some batch rows, sharing storage (what a micro-batch's Apply reads)."""
        out = object.__new__(KVCache)
        out._keys, out._values = (
            Growable.adopt(store.buffer[rows], store.axis, store.length, store.growth)
            for store in (self._keys, self._values)
        )
        out.lengths = self.lengths[rows]
        return out

    def append(
        self, keys: torch.Tensor, values: torch.Tensor, positions: bool = True
    ) -> torch.Tensor | None:
        """Append T new tokens to every row at its own length; return their positions [B, T]
        (None when not asked for and every row was at the end: not built)."""
        check_tensor("keys", keys, dims=("batch", "kv_heads", "tokens", "dim"), floating=True)
        check_tensor("values", values, dims=("batch", "kv_heads", "tokens", "dim"), floating=True)
        for name, t, dim in (("keys", keys, self.dim), ("values", values, self.value_dim)):
            expected = (self.batch, self.kv_heads, keys.shape[2], dim)
            if tuple(t.shape) != expected:
                raise InputError(name, f"expected shape {expected}, got {tuple(t.shape)}")
        _check_finite(keys, values)
        new = keys.shape[2]
        if self.full and new:  # every row at the cache's end: one slice per buffer
            start = self._write_at_end(keys, values, new)
            return self._positions(start, new) if positions else None
        positions = self.lengths[:, None] + torch.arange(new, device=self.device)[None, :]
        end = int(positions.max()) + 1 if new else self.capacity
        rows = torch.arange(self.batch, device=self.device)[:, None]
        for store, t in ((self._keys, keys), (self._values, values)):
            store.reserve(end)
            if end > store.length:
                store.buffer.narrow(2, store.length, end - store.length).zero_()
                store.length = end
            if new == 1:  # a decode step: one token per row, one index_put per buffer
                store.buffer[rows[:, 0], :, positions[:, 0]] = t[:, :, 0].to(store.buffer.dtype)
                continue
            # [B, T, Hkv, D] written at (b, :, pos, :)
            store.buffer.permute(0, 2, 1, 3)[rows.expand_as(positions), positions] = t.to(
                store.buffer.dtype
            ).permute(0, 2, 1, 3)
        self.lengths = self._lengths + new
        return positions

    def append_token(self, keys: torch.Tensor, values: torch.Tensor) -> bool:
        """`append` of a decode step's token when every row is at the cache's end (`full`):
        keys/values [B, Hkv, 1, D] of the buffers' dtype (`token_fits`), screened for NaN
        and Inf, written with one slice per buffer, without `append`'s general checks; False
        (nothing done) for anything else."""
        if not self.token_fits(keys, values):
            return False
        _check_finite(keys, values)
        self._write_at_end(keys, values, 1)
        return True

    def token_fits(self, keys: torch.Tensor, values: torch.Tensor) -> bool:
        """Whether `append_token` takes these: plain tensors [B, Hkv, 1, D] of the buffers'
        dtype and shape, and a `full` cache."""
        kbuf, vbuf = self._keys._buffer, self._values._buffer
        if type(keys) is not torch.Tensor or type(values) is not torch.Tensor:
            return False
        shape, vshape, buffer = keys.shape, values.shape, kbuf.shape
        return (
            keys.dtype == kbuf.dtype
            and values.dtype == vbuf.dtype
            and len(shape) == 4
            and shape[0] == buffer[0]
            and shape[1] == buffer[1]
            and shape[2] == 1
            and shape[3] == buffer[3]
            and vshape[:3] == shape[:3]
            and len(vshape) == 4
            and vshape[3] == vbuf.shape[3]
            and self.full
        )

    def reserve_end(self, end: int) -> None:
        """Room in both buffers for `end` tokens a row."""
        if end > self._keys._buffer.shape[2] or end > self._values._buffer.shape[2]:
            self._keys.reserve(end)
            self._values.reserve(end)

    def _write_at_end(self, keys: torch.Tensor, values: torch.Tensor, new: int) -> int:
        """Write `new` tokens at the end of every row of a full cache (one slice per
        buffer); it stays full. Returns where they start."""
        kstore, vstore = self._keys, self._values
        start = kstore.length
        end = start + new
        self.reserve_end(end)
        kstore._buffer.narrow(2, start, new).copy_(keys)
        vstore._buffer.narrow(2, start, new).copy_(values)
        kstore.length = vstore.length = end
        self._lengths += new  # in place: still full
        return start

    def _positions(self, start: int, new: int) -> torch.Tensor:
        """Positions [B, T] of `new` tokens appended at `start` in every row."""
        return (_arange(new, self.device) + start).expand(self.batch, new)

    def truncate(self, lengths: torch.Tensor) -> None:
        """Keep the first `lengths` [B] tokens of each row (each at most the row's length):
        the rest is zeroed and, under a `Growth`, room beyond its bound is given back."""
        lengths = lengths.to(device=self.device, dtype=torch.long)
        check_dim("lengths", lengths, 0, self.batch, "batch of the KV cache")
        if bool((lengths < 0).any()) or bool((lengths > self.lengths).any()):
            raise InputError("lengths", "must lie between 0 and each row's length")
        self.lengths = lengths.clone()
        self._zero_padding()
        longest = int(lengths.max()) if self.batch else 0
        for store in (self._keys, self._values):
            store.length = longest
            store.fit()

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep the batch rows `index` [B'] (any order, repeats allowed): beam reordering,
        batch expansion and selection. The buffers are gathered once; the old ones are freed."""
        index = index.to(self.device)
        for store in (self._keys, self._values):
            store.buffer = store.buffer.index_select(0, index)
        self.lengths = self.lengths.index_select(0, index)

    def to(self, device: torch.device) -> KVCache:
        out = object.__new__(KVCache)
        out._keys, out._values = self._keys.to(device), self._values.to(device)
        out.lengths = self.lengths.to(device)
        return out


#: Up to this many elements the finiteness check multiplies by zero (a decode step's token:
#: fewer ops); beyond, `isfinite` (no full-size float temporary).
_SMALL = 1 << 16


def _check_finite(keys: torch.Tensor, values: torch.Tensor) -> None:
    """One `InputError` for NaN or Inf in keys or values (one device sync for both).

    A decode step's token (few elements) is screened with one operator: the dot product of
    keys and values is finite only if both are (a NaN, or an Inf times anything, makes the
    sum NaN or Inf); a non-finite dot (possibly an overflow of finite values) is settled by
    the exact check: x * 0 is 0 for every finite x and NaN for NaN and Inf."""
    if keys.numel() + values.numel() <= _SMALL:
        if keys.shape == values.shape and keys.dtype == values.dtype:
            if keys.requires_grad or values.requires_grad:
                keys, values = keys.detach(), values.detach()
            screen = torch.dot(keys.reshape(-1), values.reshape(-1))
            if math.isfinite(float(screen)):
                return
        ok = not math.isnan(float((keys.detach() * 0).sum() + (values.detach() * 0).sum()))
    else:
        ok = bool(torch.isfinite(keys).all() & torch.isfinite(values).all())
    if not ok:
        name = "keys" if not bool(torch.isfinite(keys).all()) else "values"
        raise InputError(name, "contains NaN or Inf")


def default_positions(lengths: torch.Tensor, queries: int) -> torch.Tensor:
    """The last `queries` tokens of each row: positions [B, T]."""
    return lengths[:, None] - queries + torch.arange(queries, device=lengths.device)[None, :]


def check_query(
    q: torch.Tensor, kv: KVCache, positions: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a query against a cache; return (q, positions)."""
    check_tensor(
        "query", q, dims=("batch", "q_heads", "queries", "dim"), floating=True, finite=True
    )
    if q.shape[1] == 0 or q.shape[2] == 0:
        raise InputError("query", f"needs at least one head and one query, got {tuple(q.shape)}")
    check_dim("query", q, 0, kv.batch, "batch of the KV cache")
    check_dim("query", q, 3, kv.dim, "head dim of the KV cache")
    check_divides("query", kv.kv_heads, q.shape[1], "q_heads (kv_heads must divide q_heads)")
    if kv.capacity == 0 or bool((kv.lengths == 0).all()):
        raise InputError("memory", "is empty: append keys before querying")
    if positions is None:
        positions = default_positions(kv.lengths, q.shape[2])
    check_tensor("positions", positions, dims=("batch", "queries"), floating=False)
    if tuple(positions.shape) != (q.shape[0], q.shape[2]):
        raise InputError(
            "positions", f"expected shape {(q.shape[0], q.shape[2])}, got {tuple(positions.shape)}"
        )
    if bool((positions < 0).any()):
        raise InputError("positions", "must be >= 0")
    return q, positions.to(q.device)


def visible_mask(
    kv: KVCache, positions: torch.Tensor, tokens: torch.Tensor | None = None
) -> torch.Tensor:
    """Bool mask of tokens each query may see: [B, T, S] (or the shape of `tokens`)."""
    if tokens is None:
        s = torch.arange(kv.capacity, device=kv.device)[None, None, :]
        return (s <= positions[:, :, None]) & (s < kv.lengths[:, None, None])
    extra = tokens.dim() - 2
    pos = positions.view(positions.shape[0], *([1] * (extra - 1)), positions.shape[1], 1)
    lens = kv.lengths.view(-1, *([1] * (tokens.dim() - 1)))
    return (tokens <= pos) & (tokens < lens)


def dense_attention(
    q: torch.Tensor,
    kv: KVCache,
    positions: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact causal attention with torch's scaled_dot_product_attention; [B, Hq, T, D]."""
    q, positions = check_query(q, kv, positions)
    mask = visible_mask(kv, positions)[:, None]  # [B, 1, T, S]
    keys, values = kv.keys.to(q.dtype), kv.values.to(q.dtype)
    groups = q.shape[1] // kv.kv_heads
    if groups > 1:
        keys = keys.repeat_interleave(groups, dim=1)
        values = values.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    # A query row that sees nothing (only possible for a fully padded row) gives zeros, not NaN.
    return torch.where(mask.any(-1, keepdim=True), out, torch.zeros_like(out))


def expand_units(selection: TopK) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn unit indices (blocks, pages) into token indices: [..., k * unit], ascending."""
    unit = selection.unit
    if unit == 1:
        return selection.indices, selection.valid
    valid = selection.valid[..., :, None].expand(*selection.valid.shape, unit)
    return _unit_tokens(selection.indices, unit), valid.flatten(-2)


def _unit_tokens(indices: torch.Tensor, unit: int) -> torch.Tensor:
    """The token indices [..., k * unit] of unit indices [..., k] (`expand_units` without
    the valid mask: two operators)."""
    return (indices.unsqueeze(-1) * unit + _arange(unit, indices.device)).flatten(-2)


def _grouped(t: torch.Tensor, kv_heads: int, q_heads: int) -> torch.Tensor:
    """[B, G, T, k] -> [B, kv_heads, G', T, k] with G' = 1 or q_heads // kv_heads."""
    g = t.shape[1]
    if g == 1:
        return t[:, :, None]
    if g == kv_heads:
        return t[:, :, None]
    if g == q_heads:
        return t.unflatten(1, (kv_heads, q_heads // kv_heads))
    raise InputError(
        "selection", f"group axis {g} must be 1, kv_heads={kv_heads} or q_heads={q_heads}"
    )


def gather_tokens(
    kv: KVCache, tokens: torch.Tensor, q_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather keys and values at token indices [B, G, T, n] -> [B, Hkv, G', T, n, D].

    One index_select over the flattened cache: reads only the selected rows.
    """
    tok = _grouped(tokens, kv.kv_heads, q_heads)
    b, h = kv.batch, kv.kv_heads
    kbuf, vbuf = kv._keys.buffer, kv._values.buffer  # contiguous; the `keys` view may not be
    cap = kbuf.shape[2]
    base = torch.arange(b, device=kv.device)[:, None] * h + torch.arange(h, device=kv.device)
    flat = (base.view(b, h, 1, 1, 1) * cap + tok.clamp(0, kv.capacity - 1)).reshape(-1)
    shape = (b, h, *tok.shape[2:])
    keys = kbuf.view(-1, kv.dim).index_select(0, flat).view(*shape, kv.dim)
    values = vbuf.view(-1, kv.value_dim).index_select(0, flat).view(*shape, kv.value_dim)
    return keys, values


#: Bytes of selected keys gathered per chunk of (batch, KV head, query) items: a chunk is
#: gathered into one reused buffer and multiplied by its query heads while it is still in the
#: last-level cache, so the selected keys cross DRAM once. Two items of a 2048-token budget
#: (1 MiB each at D=128, float32), so the chunk's matmul still splits over two cores.
CHUNK_BYTES = 2 << 20

#: Selected rows per bag of the value sums (`bag_values`): the R query heads of a group read
#: a piece of this many rows back to back, so all but the first read hit the core's cache.
PIECE = 128


def workspace_buffer(
    workspace: dict | None, name: str, numel: int, like: torch.Tensor
) -> torch.Tensor:
    """A flat buffer of `numel` elements of like's dtype and device, kept in `workspace`
    across calls when one is given (a fresh multi-MiB buffer per decode step costs its page
    faults every step)."""
    if workspace is None:
        return like.new_empty(numel)
    key = (name, like.dtype, like.device)
    buf = workspace.get(key)
    if buf is None or buf.numel() < numel:
        buf = workspace[key] = like.new_empty(numel)
    return buf[:numel]


def bag_values(probs: torch.Tensor, rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """sum_j probs[i, r, j] * table[rows[i, j]] for probs [N, R, n] and row numbers [N, n]
    into table [rows, D]; [N, R, D] in probs' dtype.

    One fused gather-and-weighted-sum (embedding_bag, mode sum): no gathered copy is written.
    Each item's rows are cut into pieces of about PIECE rows, and the R bags of a piece
    (one per query head) run back to back, so a piece crosses DRAM once."""
    n_items, r, n = probs.shape
    if n == 0:
        return probs.new_zeros(n_items, r, table.shape[-1])
    pieces = -(-n // PIECE)
    length = -(-n // pieces)
    pad = pieces * length - n
    if pad:  # row 0 with weight 0
        rows = F.pad(rows, (0, pad))
        probs = F.pad(probs, (0, pad))
    bags = rows.reshape(n_items, pieces, 1, length).expand(n_items, pieces, r, length)
    weights = probs.to(table.dtype).reshape(n_items, r, pieces, length).transpose(1, 2)
    offsets = _bases(bags.numel() // length, length, probs.device)
    out = F.embedding_bag(
        bags.reshape(-1),
        table,
        offsets,
        mode="sum",
        per_sample_weights=weights.reshape(-1),
    ).view(n_items, pieces, r, -1)
    out = out.sum(1) if pieces > 1 else out[:, 0]
    return out.to(probs.dtype)


def _row_index(
    kv: KVCache, rows: torch.Tensor, unit: int, clamp: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat row numbers into the cache buffers viewed as [rows, unit * D], for selections
    [B, Hkv, T, m] of `unit`-token rows; returns (index [B*Hkv*T, m], the buffer view pair).
    `clamp=False`: every row is known to lie in the buffer (the lean path's units)."""
    b, h = kv.batch, kv.kv_heads
    # The whole buffers (contiguous), not the `keys` view: reshaping a narrowed view copies.
    kbuf, vbuf = kv._keys.buffer, kv._values.buffer
    per_row = kbuf.shape[2] // unit
    base = _bases(b * h, per_row, kv.device).view(b, h, 1, 1)
    flat = (base + (rows.clamp(0, per_row - 1) if clamp else rows)).reshape(-1, rows.shape[-1])
    return flat, (kbuf.reshape(-1, unit * kv.dim), vbuf.reshape(-1, unit * kv.value_dim))


@functools.lru_cache(maxsize=64)
def _arange(n: int, device: torch.device) -> torch.Tensor:
    """0 .. n-1 (long), kept: read-only."""
    return torch.arange(n, device=device)


@functools.lru_cache(maxsize=64)
def _bases(items: int, per_item: int, device: torch.device) -> torch.Tensor:
    """0, per_item, 2 per_item, ...: the first row of each (batch row, KV head) item."""
    return torch.arange(items, device=device) * per_item


def _tiled_attention(
    q: torch.Tensor,
    index: torch.Tensor,
    buffers: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor | None,
    unit: int,
    scale: float,
    workspace: dict | None = None,
    tail: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Attention of q [N, R, D] over rows gathered at index [N, m] (each `unit` tokens) with
    mask [N, m * unit]: the keys chunk by chunk of items (each chunk gathered whole, with one
    index_select, into a reused buffer, then one bmm while it is in cache), one softmax, then
    the values in one fused gather-and-sum (`bag_values`). `mask=None`: every selected token
    is visible, but for `tail` = (buffer tokens per row, tokens in use): the tokens of a
    partial last unit past the cache's end."""
    n_batch, r, d = q.shape
    m = index.shape[1]
    n = m * unit
    keys, values = buffers
    per_item = n * d
    chunk = max(1, min(n_batch, CHUNK_BYTES // max(1, per_item * keys.element_size())))
    tile = workspace_buffer(workspace, "keys", chunk * per_item, keys)
    qs = q * scale
    logits = torch.empty(n_batch, r, n, dtype=q.dtype, device=q.device)
    for s in range(0, n_batch, chunk):
        e = min(n_batch, s + chunk)
        rows = torch.index_select(
            keys, 0, index[s:e].reshape(-1), out=tile[: (e - s) * per_item].view(-1, unit * d)
        )
        kt = rows.view(e - s, n, d).to(q.dtype)
        torch.bmm(qs[s:e], kt.transpose(1, 2), out=logits[s:e])
    tokens = index if unit == 1 else _unit_tokens(index, unit)
    if mask is None and tail is not None:  # only the tokens past the cache's end are hidden
        logits.masked_fill_((tokens % tail[0] >= tail[1])[:, None, :], float("-inf"))
    elif mask is not None and not bool(mask.all()):
        logits.masked_fill_(~mask[:, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if mask is not None:
        seen = mask.any(-1)
        if not bool(seen.all()):
            # A query that sees none of its selection (a fully padded row) gives zeros.
            probs = torch.where(seen[:, None, None], probs, torch.zeros_like(probs))
    return bag_values(probs, tokens, values.view(-1, values.shape[-1] // unit))


def sparse_attention(
    q: torch.Tensor,
    kv: KVCache,
    selection: Selection,
    positions: torch.Tensor | None = None,
    scale: float | None = None,
    workspace: dict | None = None,
    checked: bool = False,
    unmasked: bool = False,
) -> torch.Tensor:
    """Attention over the selected tokens only (Apply to Inference); [B, Hq, T, D].

    `unmasked`: the caller knows that every selected unit is valid and every token of the
    cache visible to every query (a decode step's plan at the end of rows of equal length,
    `StepPlan.at_end` with `KVCache.full`): no mask is built, only a partial last unit's
    tokens past the end are hidden (the lean decode path).

    Selected tokens that are invalid, padding, or in the future of the query are masked,
    so causality is exact whatever the selection holds. A selection shared by a KV group
    gathers each token once for the whole group (no per-head copies), chunk by chunk;
    `workspace` (a dict the caller keeps, e.g. a method's memory) holds the gather buffer
    across calls. `checked`: q and positions were validated once for the step (a plan).
    """
    if not (checked and positions is not None):
        q, positions = check_query(q, kv, positions)
    if isinstance(selection, Bitmap):
        selection = selection.to_topk()
    if unmasked and selection.indices.shape[1] in (1, kv.kv_heads):
        return _lean_attention(q, kv, selection, scale, workspace)
    tokens, valid = expand_units(selection)
    if tokens.shape[0] != q.shape[0] or tokens.shape[2] != q.shape[2]:
        raise InputError(
            "selection",
            f"shape {tuple(tokens.shape)} does not match the query's batch and queries "
            f"({q.shape[0]}, {q.shape[2]})",
        )
    hq, hkv = q.shape[1], kv.kv_heads
    grouped = _grouped(tokens, hkv, hq)
    mask = _grouped(valid, hkv, hq) & visible_mask(kv, positions, grouped)  # [B, ., G', T, n]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qg = q.unflatten(1, (hkv, hq // hkv))  # [B, Hkv, R, T, D]
    b, t, r, n = q.shape[0], q.shape[2], hq // hkv, tokens.shape[-1]
    if grouped.shape[2] == 1:
        # One selection per KV head (or per batch row): the R heads of a group share the rows.
        unit = selection.unit
        if unit > 1 and kv._keys.buffer.shape[2] % unit:
            unit = 1  # the buffer is not laid out in whole blocks of this size
        rows = selection.indices if unit > 1 else tokens
        rows = rows.expand(b, hkv, *rows.shape[2:]) if rows.shape[1] == 1 else rows
        index, buffers = _row_index(kv, rows, unit)
        if t == 1 and b * n <= SMALL_APPLY:  # as the lean path, with the mask: equal to it
            keep = mask[:, :, 0].expand(b, hkv, 1, n)
            return _small_attention(q, index, buffers, rows, unit, scale, keep=keep)
        m = mask[:, :, 0].expand(b, hkv, t, n).reshape(b * hkv * t, n)
        qt = qg.transpose(2, 3).reshape(b * hkv * t, r, -1)  # [B*Hkv*T, R, D]
        out = _tiled_attention(qt, index, buffers, m, unit, scale, workspace)
        return out.view(b, hkv, t, r, -1).transpose(2, 3).flatten(1, 2)
    keys, values = gather_tokens(kv, tokens, hq)  # [B, Hkv, G', T, n, D]
    keys, values = keys.to(q.dtype), values.to(q.dtype)
    logits = (qg.unsqueeze(-2) @ keys.transpose(-1, -2)).squeeze(-2) * scale  # [B,Hkv,R,T,n]
    logits = logits.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    out = (probs.unsqueeze(-2) @ values).squeeze(-2)
    return out.flatten(1, 2)


def _lean_attention(
    q: torch.Tensor, kv: KVCache, selection: TopK, scale: float | None, workspace: dict | None
) -> torch.Tensor:
    """`sparse_attention` of a selection shared by each KV group when nothing is masked
    (`unmasked`): the rows gathered and attended with no mask."""
    kbuf = kv._keys._buffer
    hq, hkv, cap = q.shape[1], kbuf.shape[1], kbuf.shape[2]
    b, t, r = q.shape[0], q.shape[2], hq // hkv
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    unit = selection.unit
    rows, mask, tail = selection.indices, None, None
    used = kv._keys.length
    if unit > 1 and cap % unit:  # the buffer is not laid out in whole units: token rows,
        rows = _unit_tokens(selection.indices, unit)  # and those of a partial last unit
        unit = 1  # past the end are hidden (before `_row_index` clamps them into the buffer)
        if used % selection.unit:
            mask = (rows < used).expand(b, hkv, *rows.shape[2:]).reshape(b * hkv * t, -1)
    elif used % unit:  # whole units: a partial last unit's tokens past the end are hidden
        tail = (cap, used)
    if b == 1 and t == 1 and mask is None and rows.shape[-1] * unit <= SMALL_APPLY:
        return _one_row_attention(q, kv, rows, unit, scale, None if tail is None else used)
    rows = rows.expand(b, hkv, *rows.shape[2:]) if rows.shape[1] == 1 else rows
    index, buffers = _row_index(kv, rows, unit, clamp=mask is not None)
    if t == 1 and b * rows.shape[-1] * unit <= SMALL_APPLY:
        hide = used if (tail is not None or mask is not None) else None
        return _small_attention(q, index, buffers, rows, unit, scale, hide)
    qt = q.unflatten(1, (hkv, r)).transpose(2, 3).reshape(b * hkv * t, r, -1)
    out = _tiled_attention(qt, index, buffers, mask, unit, scale, workspace, tail)
    return out.view(b, hkv, t, r, -1).transpose(2, 3).flatten(1, 2)


#: Selected tokens (batch rows x tokens) up to which a one-query decode step's Apply
#: gathers its rows whole and runs one fused `scaled_dot_product_attention` (few operators:
#: at B=1 and 128 tokens, 88 us against 156 us for the tiled path, bf16, measured); above
#: it the tiled path, whose fused value sum reads each selected row once, is faster (B=8,
#: 128 tokens: 580 against 872 us; B=1, 2048 tokens: 1.2 against 4.3 ms).
SMALL_APPLY = 512


def _small_attention(
    q: torch.Tensor,
    index: torch.Tensor,
    buffers: tuple[torch.Tensor, torch.Tensor],
    rows: torch.Tensor,
    unit: int,
    scale: float,
    hide_from: int | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query per row over few selected tokens: the selected rows (`unit`
    tokens each, rows [B, Hkv, 1, m]) of keys and values gathered into [B, Hkv, n, D], then
    one sdpa in which a KV group's R query heads are its R queries (35 against 59 us for
    sdpa's own GQA at 128 tokens, bf16, measured). [B, Hq, 1, D].

    What is hidden: `hide_from` (the lean path) hides the tokens at and past it (a partial
    last unit's past the cache's end); `keep` [B, Hkv, 1, n] (the masked path) hides the
    others, and a query that keeps none gives zeros. Both give the same sdpa the same
    gathered rows, and a hidden token weighs 0 either way: the masked path's output equals
    the lean path's to the bit (test)."""
    b, hq, _, d = q.shape
    hkv, m = rows.shape[1], rows.shape[-1]
    flat = index.reshape(-1)
    keys = buffers[0].index_select(0, flat).view(b, hkv, m * unit, -1)
    values = buffers[1].index_select(0, flat).view(b, hkv, m * unit, -1)
    mask = keep
    if hide_from is not None:
        last, rest = divmod(hide_from, unit)  # the partial unit; its first `rest` tokens are real
        mask = (rows.reshape(b, hkv, m, 1) < last) | _first(unit, rest, rows.device)
        mask = mask.view(b, hkv, 1, m * unit)
    out = F.scaled_dot_product_attention(
        q.reshape(b, hkv, hq // hkv, d), keys.to(q.dtype), values.to(q.dtype),
        attn_mask=mask, scale=scale,
    )  # fmt: skip
    if keep is not None:
        seen = keep.any(-1, keepdim=True)  # [B, Hkv, 1, 1]
        if not bool(seen.all()):  # a fully padded row sees nothing: zeros, not NaN
            out = torch.where(seen, out, 0.0)
    return out.reshape(b, hq, 1, -1)


def _one_row_attention(
    q: torch.Tensor,
    kv: KVCache,
    rows: torch.Tensor,
    unit: int,
    scale: float,
    hide_from: int | None = None,
) -> torch.Tensor:
    """`_small_attention` of a single batch row (the lean path of a decode step at B=1):
    the selected rows (`unit` tokens each, rows [1, 1 or Hkv, 1, m]) gathered straight from
    the buffers viewed as [Hkv, units, unit * D], one index_select per buffer for a
    selection shared by the KV heads, then the same sdpa on the same gathered keys and
    values, `hide_from` hiding the same tokens (a partial last unit's past the cache's
    end): equal to `_small_attention` to the bit (test), in a third of its operators."""
    _, hq, _, d = q.shape
    kbuf, vbuf = kv._keys._buffer, kv._values._buffer
    hkv, m, dk, dv = kbuf.shape[1], rows.shape[-1], kbuf.shape[3], vbuf.shape[3]
    if rows.shape[1] == 1:
        flat = rows.reshape(m)
        keys = kbuf.reshape(hkv, -1, unit * dk).index_select(1, flat)
        values = vbuf.reshape(hkv, -1, unit * dv).index_select(1, flat)
    else:  # one selection per KV head: rows of the buffers viewed flat
        flat = _bases(hkv, kbuf.shape[2] // unit, kbuf.device).view(hkv, 1) + rows.view(hkv, m)
        flat = flat.view(-1)
        keys = kbuf.reshape(-1, unit * dk).index_select(0, flat)
        values = vbuf.reshape(-1, unit * dv).index_select(0, flat)
    keys = keys.view(1, hkv, m * unit, -1)
    values = values.view(1, hkv, m * unit, -1)
    if keys.dtype != q.dtype or values.dtype != q.dtype:
        keys, values = keys.to(q.dtype), values.to(q.dtype)
    mask = None
    if hide_from is not None:  # as `_small_attention`'s
        last, rest = divmod(hide_from, unit)
        mask = (rows.reshape(1, rows.shape[1], m, 1) < last) | _first(unit, rest, kbuf.device)
        mask = mask.view(1, rows.shape[1], 1, m * unit)
    out = F.scaled_dot_product_attention(
        q.reshape(1, hkv, hq // hkv, d), keys, values, attn_mask=mask, scale=scale
    )
    return out.reshape(1, hq, 1, -1)


@functools.lru_cache(maxsize=256)
def _first(unit: int, rest: int, device: torch.device) -> torch.Tensor:
    """[unit] bool: a unit's first `rest` tokens."""
    return torch.arange(unit, device=device) < rest


def attention_probs(
    q: torch.Tensor, kv: KVCache, positions: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """Dense softmax attention probabilities [B, Hq, T, S] (exact causal mask)."""
    q, positions = check_query(q, kv, positions)
    groups = q.shape[1] // kv.kv_heads
    keys = kv.keys.to(q.dtype).repeat_interleave(groups, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = (q @ keys.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~visible_mask(kv, positions)[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def selection_token_mask(
    selection: Selection, shape: tuple[int, ...], q_heads: int
) -> torch.Tensor:
    """Dense bool mask [B, Hq, T, S] of the tokens a selection keeps."""
    if isinstance(selection, Bitmap):
        selection = selection.to_topk()
    tokens, valid = expand_units(selection)
    b, _, t, s = shape
    g = tokens.shape[1]
    rep = q_heads // g
    tokens = tokens.repeat_interleave(rep, dim=1)
    valid = valid.repeat_interleave(rep, dim=1) & (tokens < s)
    hits = torch.zeros((b, q_heads, t, s), dtype=torch.int32, device=tokens.device)
    hits.scatter_add_(-1, tokens.clamp(0, s - 1), valid.to(torch.int32))
    return hits > 0


def attention_recall(
    q: torch.Tensor,
    kv: KVCache,
    selection: Selection,
    positions: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Share of the dense softmax mass held by the selected tokens, per [B, Hq, T].

    1.0 means the selection keeps every token that matters; average it for a summary.
    """
    probs = attention_probs(q, kv, positions, scale)
    keep = selection_token_mask(selection, tuple(probs.shape), q.shape[1])
    return (probs * keep).sum(-1)


@dataclass
class AttentionQuery:
    """A decode (or chunk) query: q [B, Hq, T, D] at `positions` [B, T] (default: the last
    T tokens of each row). `features` [B, T, F] feed a learned indexer (DSA); by default
    the method derives them from q."""

    q: torch.Tensor
    positions: torch.Tensor | None = None
    features: torch.Tensor | None = None
    #: The decode step's `hetmem.plan.StepPlan`, shared by every layer: positions and
    #: visibility come from it, already validated (set by the pipeline, not by users).
    plan: Any = None

    def to(self, device: torch.device) -> AttentionQuery:
        q, positions, features = self.q, self.positions, self.features
        if (
            q.device == device
            and (positions is None or positions.device == device)
            and (features is None or features.device == device)
        ):
            return self  # already there (a decode step on one device: every step's case)
        tensors = (q, positions, features)
        return AttentionQuery(*(None if t is None else t.to(device) for t in tensors), self.plan)

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in (self.q, self.positions, self.features)
            if t is not None
        )


@dataclass
class KVChunk:
    """New tokens to append: keys/values [B, Hkv, T, D] and optional indexer features [B, T, F]."""

    keys: torch.Tensor
    values: torch.Tensor
    features: torch.Tensor | None = None

    def to(self, device: torch.device) -> KVChunk:
        features = self.features
        if (
            self.keys.device == device
            and self.values.device == device
            and (features is None or features.device == device)
        ):
            return self
        return KVChunk(
            self.keys.to(device),
            self.values.to(device),
            None if self.features is None else self.features.to(device),
        )

    @property
    def nbytes(self) -> int:
        k, v, f = self.keys, self.values, self.features
        n = k.numel() * k.element_size() + v.numel() * v.element_size()
        return n if f is None else n + f.numel() * f.element_size()
