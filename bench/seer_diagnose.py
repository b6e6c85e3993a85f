"""SeerAttention-R inside a wrapped `generate()` against the accuracy bench's recall path.

    python bench/seer_diagnose.py                       # passkey, 1k, budget 1/2, 4 prompts
    python bench/seer_diagnose.py --context 2048 --fraction 4 --prompts 8 --kind recall

For every decode step of `model.generate()` on the bundled model wrapped with the trained
Seer selectors (placement cpu/cpu/cpu/cpu), and every layer, it records what the layer's
pipeline selected and prints, per layer:
- the dense attention mass the in-generate selection keeps (per query head, averaged);
- the same for the bench's recall path (`bench/accuracy.py`: a fresh `prepare` over the
  keys up to the query, `relevancy`, `retrieve`) on the very same query: both must agree;
- for the retrieval heads (query heads putting >= 0.3 of their dense mass on the needle:
  the fact's tokens), how often the needle's block is selected and the rank the gate gives
  it among the visible blocks (1 = first), beside the rank the gate's teacher gives it (its
  block mass, the most any head of the KV group puts there) and Quest's bound;
- the answers: dense `generate()` and Seer's, scored against the task.
No figure here is a time.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from hetmem import bundled, tasks
from hetmem.attention import AttentionQuery, KVCache, attention_probs, attention_recall
from hetmem.methods import get
from hetmem.methods.seer import SeerAttention
from hetmem.models import unwrap, wrap
from hetmem.selection import Bitmap
from hetmem.selectors.weights import load_selectors, selectors_for

RETRIEVAL = 0.3  # a query head is a retrieval head when this much of its mass is on the needle


def needle_tokens(task: tasks.Task, tokenizer: Any) -> torch.Tensor:
    """Token positions of the task's facts (passkey: the needle; recall: the fact that
    holds the asked code), from the tokenizer's character offsets."""
    enc = tokenizer(task.prompt, return_offsets_mapping=True)
    offsets = torch.tensor(enc["offset_mapping"])  # [S, 2]
    key = " " + task.answer
    at = task.prompt.index(key)  # the fact holding the answer's first occurrence
    start = task.prompt.rfind("\n", 0, at)
    if task.kind == "passkey":  # the needle states the key twice
        end = start + len(tasks.PASSKEY_NEEDLE.format(key=key))
    else:
        end = at + len(key) + 1
    inside = (offsets[:, 1] > start) & (offsets[:, 0] < end) & (offsets[:, 1] > offsets[:, 0])
    return inside.nonzero().flatten()


class Recorder:
    """Wraps each layer's method: records (query, memory keys, selection, scores) per call."""

    def __init__(self, methods: list[SeerAttention]):
        self.calls: list[list[dict[str, Any]]] = [[] for _ in methods]
        for layer, method in enumerate(methods):
            self._hook(layer, method)

    def _hook(self, layer: int, method: SeerAttention) -> None:
        relevancy, apply = method.relevancy, method.apply
        calls = self.calls[layer]
        state: dict[str, Any] = {}

        def rec_relevancy(memory: Any, query: Any) -> Any:
            scores = relevancy(memory, query)
            state["scores"] = scores.values.detach().clone()
            return scores

        def rec_apply(memory: Any, selection: Any, query: Any) -> Any:
            kv = memory.kv
            calls.append(
                {
                    "q": query.q.detach().clone(),
                    "positions": method.positions(memory, query).clone(),
                    "keys": kv.keys[:, :, : int(kv.lengths.max())].detach().clone(),
                    "selection": selection,
                    "scores": state.pop("scores", None),
                    "scale": method.scale,
                }
            )
            return apply(memory, selection, query)

        method.relevancy = rec_relevancy  # type: ignore[method-assign]
        method.apply = rec_apply  # type: ignore[method-assign]


def selected_units(selection: Any) -> torch.Tensor:
    """[B, G, n_units] bool: the units a selection keeps (one query)."""
    if isinstance(selection, Bitmap):
        return selection.mask[:, :, 0]
    idx, valid = selection.indices[:, :, 0], selection.valid[:, :, 0]
    n = int(idx.max()) + 1 if idx.numel() else 1
    out = torch.zeros(idx.shape[0], idx.shape[1], n + 1, dtype=torch.bool)
    out.scatter_(-1, idx.clamp(min=0), valid)
    return out


def bench_recall(method: SeerAttention, call: dict[str, Any], budget: int) -> torch.Tensor:
    """The bench's recall path on the same query (bench/accuracy.py `recall_by_budget`)."""
    p = int(call["positions"][0, 0])
    keys = call["keys"][:, :, : p + 1]
    kv = KVCache(keys, keys)
    query = AttentionQuery(call["q"])
    fresh = SeerAttention(method.weights, block_size=method.unit, mode=method.mode,
                          threshold=method.threshold)  # fmt: skip
    fresh.scale = call["scale"]
    memory = fresh.prepare(kv)
    selection = fresh.retrieve(fresh.relevancy(memory, query), budget)
    return attention_recall(query.q, kv, selection, scale=call["scale"])[0, :, 0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", default="passkey", choices=tasks.KINDS)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--fraction", type=int, default=2, help="budget = context / fraction")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="first task seed")
    parser.add_argument("--steps", type=int, default=8, help="new tokens per prompt")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--selectors",
        default=None,
        help="a selectors file (default: the one beside the bundled model)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, tokenizer = bundled.load()
    selectors = (selectors_for(model) if args.selectors is None
                 else load_selectors(args.selectors))  # fmt: skip
    budget = args.context // args.fraction
    items = tasks.task_set(args.kind, args.context, args.prompts, args.seed, tokenizer)
    gen = {"max_new_tokens": args.steps, "do_sample": False}
    layers = model.config.num_hidden_layers
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0] * layers)
    counts = [0] * layers
    right = {"dense": 0, "seer": 0}
    print(f"{args.kind} @ {args.context} tokens, budget {budget} (1/{args.fraction}), "
          f"Seer blocks of {selectors.block_size if selectors else '?'} tokens")  # fmt: skip
    for task in items:
        ids = tokenizer(task.prompt, return_tensors="pt")["input_ids"]
        needle = needle_tokens(task, tokenizer)
        with torch.no_grad():
            dense = model.generate(ids, **gen)[0, ids.shape[1] :]
        method = "seer" if args.selectors is None else selectors.spec("seer")
        wrap(model, method=method, budget=budget, placement="cpu/cpu/cpu/cpu")
        try:
            methods = model._hetmem_wrap.settings.methods
            recorder = Recorder(methods)
            with torch.no_grad():
                got = model.generate(ids, **gen)[0, ids.shape[1] :]
        finally:
            unwrap(model)
        ok_dense = tasks.score(task, tokenizer.decode(dense))
        ok_seer = tasks.score(task, tokenizer.decode(got))
        right["dense"] += ok_dense
        right["seer"] += ok_seer
        print(f"  seed {task.seed}: answer {task.answer!r} needle tokens "
              f"{int(needle[0])}-{int(needle[-1])}; dense {tokenizer.decode(dense)!r} "
              f"({'ok' if ok_dense else 'wrong'}), seer {tokenizer.decode(got)!r} "
              f"({'ok' if ok_seer else 'wrong'})")  # fmt: skip
        for layer, method in enumerate(methods):
            for call in recorder.calls[layer]:
                q, keys, sel, scale = call["q"], call["keys"], call["selection"], call["scale"]
                kv = KVCache(keys, keys)
                positions = call["positions"]
                in_gen = attention_recall(q, kv, sel, positions, scale)[0, :, 0]  # [Hq]
                bench = bench_recall(method, call, budget)
                probs = attention_probs(q, kv, positions, scale)[0, :, 0]  # [Hq, S]
                on_needle = probs[:, needle].sum(-1)  # [Hq]
                unit = method.unit
                needle_blocks = torch.unique(needle // unit)
                chosen = selected_units(sel)[0]  # [G, n]
                groups = chosen.shape[0]
                rep = q.shape[1] // groups
                scores = call["scores"][0, :, 0]  # [G, Nb]
                heads = (on_needle >= RETRIEVAL).nonzero().flatten().tolist()
                sums["in_generate"][layer] += float(in_gen.mean())
                sums["bench"][layer] += float(bench.mean())
                sums["abs_diff"][layer] += float((in_gen - bench).abs().max())
                counts[layer] += 1
                # The teacher's ranking (block mass, max over the group's heads) and Quest's
                # bound over the same keys, for the same query.
                s_len = probs.shape[-1]
                n_blocks = -(-s_len // unit)
                per_head = torch.nn.functional.pad(probs, (0, n_blocks * unit - s_len))
                per_head = per_head.view(probs.shape[0], n_blocks, unit).sum(-1)
                teacher = per_head.view(groups, rep, n_blocks).amax(1)
                quest = get("quest", page_size=unit)
                quest.scale = scale
                bound = quest.relevancy(quest.prepare(kv), AttentionQuery(q, positions))
                bound = bound.values[0, :, 0]
                for h in heads:
                    g = h // rep
                    # The needle's block holding the most of this head's mass.
                    mass = torch.stack([probs[h, b * unit : (b + 1) * unit].sum()
                                        for b in needle_blocks])  # fmt: skip
                    block = int(needle_blocks[mass.argmax()])
                    hit = bool(chosen[g, block]) if block < chosen.shape[1] else False
                    rank = int((scores[g] > scores[g, block]).sum()) + 1
                    sums["retrieval_heads"][layer] += 1
                    sums["needle_hit"][layer] += hit
                    sums["needle_rank"][layer] += rank
                    sums["teacher_rank"][layer] += int((teacher[g] > teacher[g, block]).sum()) + 1
                    sums["quest_rank"][layer] += int((bound[g] > bound[g, block]).sum()) + 1
                    sums["retrieval_in_gen"][layer] += float(in_gen[h])
    print(f"answers right: dense {right['dense']}/{len(items)}, seer {right['seer']}/{len(items)}")
    header = ("layer", "steps", "recall in generate()", "recall bench path", "max |diff|",
              "retrieval head-steps", "needle block selected", "mean gate rank",
              "retrieval heads' recall", "teacher rank", "Quest rank")  # fmt: skip
    print(" | ".join(header))
    for layer in range(layers):
        n = max(counts[layer], 1)
        r = sums["retrieval_heads"][layer]
        rr = max(r, 1)
        print(" | ".join([
            str(layer), str(counts[layer]),
            f"{sums['in_generate'][layer] / n:.3f}", f"{sums['bench'][layer] / n:.3f}",
            f"{sums['abs_diff'][layer] / n:.2e}", f"{int(r)}",
            f"{sums['needle_hit'][layer] / rr:.2f}", f"{sums['needle_rank'][layer] / rr:.1f}",
            f"{sums['retrieval_in_gen'][layer] / rr:.3f}",
            f"{sums['teacher_rank'][layer] / rr:.1f}", f"{sums['quest_rank'][layer] / rr:.1f}",
        ]))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
