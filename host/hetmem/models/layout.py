"""From transformers' cache layout to hetmem's, and back.

transformers keeps one padded length for the whole batch: with left padding, row b's real
tokens sit at the end of the key axis and the attention mask marks the padding. hetmem's
`KVCache` is right padded with a length per row. `compact` moves each row's real tokens to
the front, in order, so the padding is simply outside the row's length: no method ever
scores, selects or attends it, and a row's compact index equals the rotary position that
`generate()` gives the token (the count of real tokens before it). `Validity` remembers
which padded positions hold real tokens, so that the padded layout can be rebuilt from the
compact one (`padded`) whenever a dense call needs it.
"""

from __future__ import annotations

import torch

from ..attention import Growth, KVCache
from ..errors import InputError


def _mask_2d(attention_mask: torch.Tensor, row: int) -> torch.Tensor:
    """Query row `row` of the model's 4D mask (any over heads) as bool [B, keys]."""
    mask = attention_mask
    if mask.dim() == 4:
        mask = mask[:, :, row, :].any(dim=1) if mask.dtype == torch.bool else mask[:, 0, row, :]
    if mask.dim() != 2:
        raise InputError(
            "attention_mask", f"expected a 2D or 4D mask, got shape {tuple(attention_mask.shape)}"
        )
    if mask.dtype != torch.bool:
        # An additive float mask: the minimum of the dtype (or -inf) hides a key.
        mask = mask > torch.finfo(mask.dtype).min if mask.is_floating_point() else mask != 0
    return mask


def key_validity(attention_mask: torch.Tensor | None, keys: int) -> torch.Tensor | None:
    """Which keys are real tokens, [B, keys] bool; None when the mask hides none.

    Read from the last query's row of the model's 4D mask: the last query sees every real
    token up to it, and the cache's last token is that query's own.
    """
    if attention_mask is None:
        return None
    mask = _mask_2d(attention_mask, -1)
    if mask.shape[-1] != keys:
        raise InputError("attention_mask", f"covers {mask.shape[-1]} keys, the cache holds {keys}")
    return mask


def fresh_validity(
    attention_mask: torch.Tensor | None, keys: int, fresh: int
) -> torch.Tensor | None:
    """Which of the last `fresh` keys (the ones this call adds) are real tokens, [B, fresh]
    bool; None when the mask hides none of them.

    Read from the diagonal of the model's mask: query j is the token of key keys-fresh+j,
    and a query sees its own key unless that key is padding, whatever else the mask hides
    (a sliding window, the future). A 2D mask [B, keys] is read as is.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4 and attention_mask.shape[2] == fresh:
        if attention_mask.shape[-1] != keys:
            raise InputError(
                "attention_mask", f"covers {attention_mask.shape[-1]} keys, the cache holds {keys}"
            )
        j = torch.arange(fresh, device=attention_mask.device)
        diagonal = attention_mask[:, :, j, keys - fresh + j]  # [B, heads, fresh]
        valid = _mask_2d(diagonal[:, :, None, :], 0)  # [B, fresh]
        return None if bool(valid.all()) else valid
    mask = _mask_2d(attention_mask, -1)
    if mask.shape[-1] != keys:
        raise InputError("attention_mask", f"covers {mask.shape[-1]} keys, the cache holds {keys}")
    valid = mask[:, keys - fresh :]
    return None if bool(valid.all()) else valid


def compact(
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor | None,
    growth: Growth | None = None,
) -> KVCache:
    """A right-padded `KVCache` of the valid tokens of each row, in order.

    With a `growth` the buffers get the spare room it says (the cache adopts them). Slots past a row's length are zeroed:
    padding tokens may carry NaN (a fully masked query row), and a gathered-then-masked NaN
    value would still poison a matmul.
    """
    b, h, s, d = keys.shape
    if valid is None:
        if growth is None:
            return KVCache(keys, values)
        valid = torch.ones(b, s, dtype=torch.bool, device=keys.device)
    valid = valid.to(keys.device)
    lengths = valid.sum(dim=-1)
    longest = max(int(lengths.max()), 1) if b else 1
    # A stable sort of "is padding" puts each row's real tokens first, in their order.
    order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices[:, :longest]
    index = order[:, None, :, None].expand(b, h, longest, d)
    capacity = longest if growth is None else growth.capacity(longest)
    buffers = []
    for t in (keys, values):
        packed = t.gather(2, index)
        if capacity > longest:
            buffer = t.new_zeros(b, h, capacity, d)
            buffer[:, :, :longest] = packed
            packed = buffer
        buffers.append(packed)
    if growth is None:
        return KVCache(buffers[0], buffers[1], lengths)
    return KVCache.adopt(buffers[0], buffers[1], longest, lengths, growth)


class Validity:
    """Which padded positions of each row hold real tokens.

    Left padding (every position from a row's first real token on is real) is kept as one
    offset per row; any other pattern (right padding, a masked token later on) as the full
    [B, S] mask. A real token at padded position p of row b has compact index
    `count of real tokens before p` (p - pad_b under left padding).
    """

    def __init__(self, valid: torch.Tensor | None, batch: int, length: int, device: torch.device):
        self.length = length
        self.pad = torch.zeros(batch, dtype=torch.long, device=device)
        self.mask: torch.Tensor | None = None
        if valid is not None:
            self.set(valid)

    def set(self, valid: torch.Tensor) -> None:
        """Take a [B, S] mask, kept as left-padding offsets when it is one."""
        valid = valid.to(torch.bool)
        b, s = valid.shape
        self.length = s
        seen = valid.any(dim=-1)
        first = valid.to(torch.int8).argmax(dim=-1)
        self.pad = torch.where(seen, first, torch.full_like(first, s))
        left = torch.arange(s, device=valid.device)[None, :] >= self.pad[:, None]
        self.mask = None if bool((left == valid).all()) else valid

    def full(self) -> torch.Tensor:
        """[B, S] bool."""
        if self.mask is not None:
            return self.mask
        return torch.arange(self.length, device=self.pad.device)[None, :] >= self.pad[:, None]

    def extend(self, fresh: torch.Tensor | None, count: int) -> None:
        """`count` more positions; `fresh` [B, count] says which are real (None: all)."""
        if fresh is None and self.mask is None:
            self.length += count
            return
        if fresh is None:
            fresh = torch.ones(self.pad.shape[0], count, dtype=torch.bool, device=self.pad.device)
        self.set(torch.cat([self.full(), fresh.to(self.pad.device, torch.bool)], dim=-1))

    def crop(self, length: int) -> None:
        if self.mask is not None:
            self.set(self.mask[:, :length])
        else:
            self.pad = self.pad.clamp(max=length)
            self.length = length

    def select_rows(self, index: torch.Tensor) -> None:
        index = index.to(self.pad.device)
        self.pad = self.pad.index_select(0, index)
        if self.mask is not None:
            self.mask = self.mask.index_select(0, index)

    def lengths(self) -> torch.Tensor:
        """Real tokens per row, [B]."""
        if self.mask is not None:
            return self.mask.sum(dim=-1)
        return (self.length - self.pad).clamp(min=0)


def padded(kv: KVCache, validity: Validity) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' padded layout [B, Hkv, S, D] rebuilt from the compact cache: each real
    token at its padded position, zeros at padding (which the model's mask hides)."""
    valid = validity.full().to(kv.device)  # [B, S]
    b, s = valid.shape
    h, d = kv.kv_heads, kv.dim
    if kv.capacity == 0 or s == 0:
        empty = kv.keys.new_zeros(b, h, s, d)
        return empty, empty.clone()
    index = (valid.cumsum(dim=-1) - 1).clamp(min=0, max=kv.capacity - 1)
    index = index[:, None, :, None].expand(b, h, s, d)
    hide = ~valid[:, None, :, None]
    keys = kv.keys.gather(2, index).masked_fill_(hide, 0.0)
    values = kv.values.gather(2, index).masked_fill_(hide, 0.0)
    return keys, values
