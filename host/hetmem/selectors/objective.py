"""What the selectors train against: their scores on captured activations, the teachers
(the frozen model's dense attention) and the KL divergence between the two.

The students score with the methods' own functions (`hetmem.methods.dsa.query_key_logits`
and `indexer_scores`; `hetmem.methods.seer.pool_blocks`, `gate_queries`, `gate_keys` and
`gate_scores`), the ones `DSA.relevancy` and `SeerAttention.relevancy` call at decode time;
this module only lays the activations out as those see them and masks what a decode query
cannot see.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..methods.dsa import IndexerWeights, indexer_scores, query_key_logits
from ..methods.seer import GateWeights, gate_keys, gate_queries, gate_scores, pool_blocks
from .activations import LayerActivations, visible

# -- the two students --------------------------------------------------------------------


def indexer_logits(weights: IndexerWeights, act: LayerActivations) -> torch.Tensor:
    """DSA's relevancy of the sampled queries, [N, T, S] (invisible keys at -inf): the
    indexer queries, head weights and keys projected from the default features (queries
    and keys flattened over heads, as `DSA.indexer_query` and `DSA.prepare` take them),
    scored by `query_key_logits` and `indexer_scores` (a folded index scores the same)."""
    qf = act.q.permute(0, 2, 1, 3).flatten(2)  # [N, T, Hq*D]
    kf = act.k.permute(0, 2, 1, 3).flatten(2)  # [N, S, Hkv*D]
    w = None if weights.ww is None else qf @ weights.ww
    qi = weights.project(qf)  # [N, T, H, Di]
    logits = query_key_logits(qi, kf @ weights.wk).unflatten(-1, qi.shape[-3:-1])
    scores = indexer_scores(logits, w, weights.dim)  # logits [N, S, T, H]
    if act.causal:
        scores = scores.masked_fill(~visible(act.positions, act.k.shape[2]), float("-inf"))
    return scores


def block_pools(act: LayerActivations, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SeerAttention-R's pooled block keys (`pool_blocks`: max, min, mean; [3D]) as a decode
    step sees them.

    Returns the complete blocks [N, Hkv, Nb, 3D] (the last one as far as the sequence goes)
    and, per sampled query, the block holding it pooled over its tokens up to the query
    only [N, Hkv, T, 3D].
    """
    n, h, s, d = act.k.shape
    t = act.positions.shape[1]
    nb = -(-s // block)
    keys = torch.nn.functional.pad(act.k, (0, 0, 0, nb * block - s))  # [N, Hkv, Nb*block, D]
    valid = (torch.arange(nb * block) < s).view(nb, block, 1)
    full = pool_blocks(keys.view(n, h, nb, block, d), valid)
    offsets = torch.arange(block)
    first = (act.positions // block) * block  # [N, T]: the first token of each query's block
    tokens = (first[..., None] + offsets).flatten(1)  # [N, T*block]
    seen = offsets <= (act.positions % block)[..., None]  # [N, T, block]
    partial = torch.stack(  # one sequence at a time: [Hkv, T, block, D] gathered
        [
            pool_blocks(keys[i][:, tokens[i]].view(h, t, block, d), seen[i][..., None])
            for i in range(n)
        ]
    )
    return full, partial


def gate_logits(
    weights: GateWeights,
    act: LayerActivations,
    pools: tuple[torch.Tensor, torch.Tensor],
    block: int,
) -> torch.Tensor:
    """The AttnGate's block logits [N, Hkv, T, Nb] (invisible blocks at -inf), as
    `SeerAttention.relevancy` computes them at each sampled decode position (causal): the
    complete blocks before the query's, its own block pooled up to the query, nothing
    later; or with the whole sequence in memory (an encoder's bidirectional attention)."""
    full, partial = pools
    n, hkv = act.k.shape[:2]
    qg = gate_queries(act.q, weights.wq)  # [N, Hkv, T, Dg]
    logits = gate_scores(qg, gate_keys(full, weights.wk))  # [N, Hkv, T, Nb]
    if not act.causal:  # every query sees every (complete) block
        return logits
    own = gate_scores(qg[..., None, :], gate_keys(partial, weights.wk)[..., None, :])[..., 0]
    blk = (act.positions // block)[:, None, :, None].expand(n, hkv, -1, 1)
    logits = logits.scatter(-1, blk, own)
    later = torch.arange(logits.shape[-1])[None, None, None, :] > blk
    return logits.masked_fill(later, float("-inf"))


# -- the teachers and the loss -------------------------------------------------------------


def token_target(act: LayerActivations) -> torch.Tensor:
    """The indexer's teacher: dense attention summed over query heads, normalized, [N, T, S]."""
    return act.attention().mean(dim=1)


#: How the gate's teacher combines the query heads of a KV group (`block_target`).
GROUP_TEACHERS = ("max", "mean")


def block_target(act: LayerActivations, block: int, group: str = "max") -> torch.Tensor:
    """The gate's teacher, [N, Hkv, T, Nb]: each query head's attention mass per block,
    combined over each KV group's query heads and normalized.

    group="max" (the default): the largest mass any head of the group puts on the block.
    One selection serves the whole group, so a block that one head needs (a retrieval head
    on the needle, while its neighbours read the local text) must rank high for the group;
    the group's mean would divide that head's need by the group size. group="mean": the
    group's mean mass (the earlier teacher).
    """
    if group not in GROUP_TEACHERS:
        raise InputError("group", f"expected one of {GROUP_TEACHERS}, got {group!r}")
    probs = act.attention()  # [N, Hq, T, S]
    n, hq, t, s = probs.shape
    nb = -(-s // block)
    padded = torch.nn.functional.pad(probs, (0, nb * block - s))
    per_head = padded.view(n, act.kv_heads, hq // act.kv_heads, t, nb, block).sum(-1)
    if group == "mean":
        return per_head.mean(dim=2)
    most = per_head.amax(dim=2)  # [N, Hkv, T, Nb]
    return most / most.sum(-1, keepdim=True).clamp_min(1e-30)


def kl_divergence(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over queries of KL(target || softmax(logits)) along the last axis; entries at
    -inf carry no target mass (they are invisible to the query)."""
    log_q = torch.log_softmax(logits, dim=-1)
    keep = target > 0
    terms = torch.where(keep, target * (torch.log(target.clamp_min(1e-30)) - log_q), 0.0)
    return terms.sum(-1).mean()
