"""From transformers' cache layout to hetmem's.

transformers keeps one padded length for the whole batch: with left padding, row b's real
tokens sit at the end of the key axis and the attention mask marks the padding. hetmem's
`KVCache` is right padded with a length per row. `compact` moves each row's real tokens to
the front, in order, so the padding is simply outside the row's length: no method ever
scores, selects or attends it, and a row's compact index equals the rotary position that
`generate()` gives the token (the count of real tokens before it).
"""

from __future__ import annotations

import torch

from ..attention import KVCache
from ..errors import InputError


def key_validity(attention_mask: torch.Tensor | None, keys: int) -> torch.Tensor | None:
    """Which keys are real tokens, [B, keys] bool; None when the mask hides none.

    Read from the last query's row of the model's 4D mask: the last query sees every real
    token up to it, and the cache's last token is that query's own.
    """
    if attention_mask is None:
        return None
    mask = attention_mask
    if mask.dim() == 4:
        mask = mask[:, :, -1, :].any(dim=1) if mask.dtype == torch.bool else mask[:, 0, -1, :]
    if mask.dim() != 2:
        raise InputError(
            "attention_mask", f"expected a 2D or 4D mask, got shape {tuple(attention_mask.shape)}"
        )
    if mask.dtype != torch.bool:
        # An additive float mask: the minimum of the dtype (or -inf) hides a key.
        mask = mask > torch.finfo(mask.dtype).min if mask.is_floating_point() else mask != 0
    if mask.shape[-1] != keys:
        raise InputError("attention_mask", f"covers {mask.shape[-1]} keys, the cache holds {keys}")
    return mask


def compact(keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor | None) -> KVCache:
    """A right-padded `KVCache` of the valid tokens of each row, in order.

    Slots past a row's length are zeroed: padding tokens may carry NaN (a fully masked
    query row), and a gathered-then-masked NaN value would still poison a matmul.
    """
    if valid is None:
        return KVCache(keys, values)
    b, h, _, d = keys.shape
    valid = valid.to(keys.device)
    lengths = valid.sum(dim=-1)
    longest = max(int(lengths.max()), 1) if b else 1
    # A stable sort of "is padding" puts each row's real tokens first, in their order.
    order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices[:, :longest]
    index = order[:, None, :, None].expand(b, h, longest, d)
    keep = (torch.arange(longest, device=keys.device)[None, :] < lengths[:, None])[:, None, :, None]
    packed_keys = keys.gather(2, index).masked_fill(~keep, 0.0)
    packed_values = values.gather(2, index).masked_fill(~keep, 0.0)
    return KVCache(packed_keys, packed_values, lengths)
