"""The floor under hetmem's B=1 dispatch overhead, measured: DSA's decode layer-step four ways
over the same Llama-3-8B-shaped layer, 1k context, budget 128 (decode_e2e.py's overhead case):

- dense: transformers' `StaticLayer.update` and sdpa over the whole static cache;
- hetmem: `HetmemLayer.update` and the registered `hetmem` attention function (the wrapped
  model's path), its one-row step on hetmem's native ops (`hetmem.native`) where they built;
- hetmem, Python path: the same with the native ops off (the Python lean step, `lean_one`);
- by hand: the operators hetmem's lean decode step at one batch row runs (the finiteness
  screen, the KV and index writes, the indexer's projection and matmul, the partial top-k
  with its tie check, the gather and sdpa) written out in Python over a second hetmem
  layer's own memory, with no other Python around them.

`by hand - dense` is what the method's work costs beside dense attention; `hetmem - by hand` is
what hetmem's code around the same operators costs (the cache layer, the attention function,
the pipeline's profile, the methods' checks and hooks; negative where the native step saves
more Python than hetmem adds). The three outputs are checked equal to the bit. Rounds
interleaved, medians, wall time (measured):

    python bench/decode_floor.py                 # bf16, 2 threads, 9 rounds of 20 steps
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import decode_e2e as e2e
import hetmem
from hetmem import native
from hetmem.methods.dsa import SHAPE_QUANTUM
from hetmem.models import attention_fn
from hetmem.models.wrap import new_cache

RESULTS = Path(__file__).resolve().parent / "results"


def _none() -> None:
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS / "decode_floor.json")
    parser.add_argument(
        "--shape",
        nargs=4,
        type=int,
        metavar=("HIDDEN", "HEADS", "KV_HEADS", "INTERMEDIATE"),
        default=(4096, 32, 8, 14336),
        help="the layer (default Llama-3-8B's; KV rows must be wider than DSA's 128-dim index)",
    )
    args = parser.parse_args(argv)
    hidden, heads, kv_heads, intermediate = args.shape
    if kv_heads * (hidden // heads) <= 128:
        parser.error("--shape: KV_HEADS * HIDDEN / HEADS must exceed 128 (DSA's own index)")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    layer = {"--hidden": hidden, "--heads": heads, "--kv-heads": kv_heads}
    layer["--intermediate"] = intermediate
    flags = [str(x) for pair in layer.items() for x in pair]
    opts = e2e.parse(["--layers", "1", "--methods", "dsa", "--dtype", args.dtype, *flags])
    model = e2e.build_model(opts, torch.device("cpu"), dtype)
    c, module = model.config, model.model.layers[0].self_attn
    context, budget = 1024, 128
    total = (args.rounds + 1) * args.steps + 4
    gen = torch.Generator().manual_seed(0)
    hkv, hq, d = c.num_key_value_heads, c.num_attention_heads, c.head_dim
    keys = torch.randn(1, hkv, context, d, generator=gen).to(dtype)
    values = torch.randn(1, hkv, context, d, generator=gen).to(dtype)
    q = torch.randn(1, hq, 1, d, generator=gen).to(dtype)
    new = [
        tuple(torch.randn(1, hkv, 1, d, generator=gen).to(dtype) for _ in range(2))
        for _ in range(total)
    ]

    def dense():
        from transformers import StaticCache
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        cache = StaticCache(config=c, max_cache_len=context + total)
        cache.update(keys, values, 0)
        layer, seen, i = cache.layers[0], torch.arange(context + total), [0]

        def step():
            k, v = layer.update(*new[i[0]])
            mask = (seen <= context + i[0])[None, None, None, :]
            i[0] += 1
            return sdpa_attention_forward(module, q, k, v, mask, scaling=module.scaling)[0]

        return step

    def wrapped_layer():
        copy = e2e.shared_copy(model)
        hetmem.wrap(
            copy,
            "dsa",
            budget=budget,
            method_options=e2e.method_options(opts, "dsa"),
            placement="cpu/cpu/cpu/cpu",
        )
        cache = new_cache(copy, context + total)
        cache.update(keys, values, 0)
        return cache.layers[0]

    def through_hetmem(python_path: bool = False):
        layer, i = wrapped_layer(), [0]
        native_library = native.library

        def step():
            k, v = layer.update(*new[i[0]])
            i[0] += 1
            fn = attention_fn.hetmem_attention_forward
            if not python_path:
                return fn(module, q, k, v, None, scaling=module.scaling)[0]
            native.library = _none  # this layer's step on the Python path
            try:
                return fn(module, q, k, v, None, scaling=module.scaling)[0]
            finally:
                native.library = native_library

        return step

    def by_hand():
        layer, i = wrapped_layer(), [1]
        k0, v0 = layer.update(*new[0])  # the first step prepares the memory and the weights
        attention_fn.hetmem_attention_forward(module, q, k0, v0, None, scaling=module.scaling)
        memory, weights = layer.pipeline.memory, layer.pipeline.method.weights
        kv, index, k_top = memory.kv, memory.keys, budget
        heads, di = weights.heads, weights.blocks.shape[2]

        def step():
            k, v = new[i[0]]
            i[0] += 1
            if not math.isfinite(float(torch.dot(k.reshape(-1), v.reshape(-1)))):
                raise ValueError("not finite")
            n = kv.capacity
            for store, t in ((kv._keys, k), (kv._values, v)):
                store.reserve(n + 1)
                store.buffer.narrow(2, n, 1).copy_(t)
                store.length = n + 1
            kv._lengths += 1
            feats = k.permute(0, 2, 1, 3).flatten(2).to(weights.wk.dtype)
            index.reserve(n + 1)
            index.length = n + 1
            index.buffer.narrow(1, n, 1).copy_((feats @ weights.wk).to(index.buffer.dtype))
            n += 1
            qi = torch.bmm(q.reshape(hkv, hq // hkv, d).to(torch.float32), weights.blocks)
            padded = (
                index.padded(SHAPE_QUANTUM) if index.buffer.dtype != torch.float32 else index.data
            )
            logits = torch.bmm(padded, qi.to(padded.dtype).view(1, heads, di).transpose(1, 2))
            scores = logits[:, :n].to(torch.float32).relu_().sum(-1)
            scores = scores.mul_(1.0 / (heads * math.sqrt(di)))
            top = torch.topk(scores, k_top, dim=-1, sorted=False).values
            picked = (scores >= top.amin(-1, keepdim=True)).nonzero()[:, -1]
            kb, vb = kv._keys.buffer, kv._values.buffer
            ks = kb.reshape(hkv, -1, d).index_select(1, picked).view(1, hkv, k_top, d)
            vs = vb.reshape(hkv, -1, d).index_select(1, picked).view(1, hkv, k_top, d)
            out = F.scaled_dot_product_attention(
                q.reshape(1, hkv, hq // hkv, d), ks, vs, scale=module.scaling
            )
            return out.reshape(1, hq, 1, d).transpose(1, 2).contiguous()

        return step

    runners = {
        "dense": dense(),
        "hetmem": through_hetmem(),
        "hetmem, Python path": through_hetmem(python_path=True),
        "by hand": by_hand(),
    }
    times: dict[str, list[float]] = {name: [] for name in runners}
    outs: dict[str, list[torch.Tensor]] = {name: [] for name in runners}
    with torch.no_grad():
        for name, step in runners.items():  # the hand-written one is a step ahead: align
            step()
            if name != "by hand":
                step()
        for _ in range(args.rounds):
            for name, step in runners.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    outs[name].append(step())
                times[name].append((time.perf_counter() - start) / args.steps * 1e6)
    equal = all(
        torch.equal(a, b) and torch.equal(a, c)
        for a, b, c in zip(
            outs["hetmem"], outs["hetmem, Python path"], outs["by hand"], strict=True
        )
    )
    med = {name: statistics.median(v) for name, v in times.items()}
    result = {
        "command": "python bench/decode_floor.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "dtype": args.dtype,
        "threads": args.threads,
        "context": context,
        "budget": budget,
        "us_per_layer_step": med,
        "rounds_us": times,
        "native_ops": native.library() is not None,
        "method_work_us": med["by hand"] - med["dense"],
        "code_around_us": med["hetmem"] - med["by hand"],
        "python_path_code_around_us": med["hetmem, Python path"] - med["by hand"],
        "outputs_equal": equal,
        "source": "measured",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"DSA, B=1, 1k, budget {budget}, {args.dtype}, {args.threads} threads (measured, medians "
        f"of {args.rounds} rounds): dense {med['dense']:.0f} us, hetmem {med['hetmem']:.0f} us "
        f"(native ops: {result['native_ops']}), hetmem's Python path "
        f"{med['hetmem, Python path']:.0f} us, by hand {med['by hand']:.0f} us -> the method's "
        f"work beside dense {result['method_work_us']:+.0f} us, hetmem's code around it "
        f"{result['code_around_us']:+.0f} us ({result['python_path_code_around_us']:+.0f} us "
        f"on the Python path); the three equal: {equal}"
    )
    print(f"wrote {args.out}")
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
