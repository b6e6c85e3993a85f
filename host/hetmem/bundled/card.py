"""The model card (README.md beside the weights), written from the run's records.

Every figure on the card comes from training.json (the run) or eval.json (the accuracy
harness), so the card cannot drift from what was measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .shape import ModelShape, previous_token_heads, retrieval_heads


def _size_mb(file: Path) -> str:
    return f"{file.stat().st_size / 1e6:.1f} MB" if file.exists() else "?"


def write_card(out: Path, record: dict[str, Any], ev: dict[str, Any]) -> Path:
    """Write `out/README.md` from the training record and the eval results; return its path."""
    cfg = record["config"]
    shape = cfg["shape"]
    lengths = sorted({int(k) for kind in ev["tasks"].values() for k in kind})
    head = "| task | " + " | ".join(f"{n:,} tokens" for n in lengths) + " |"
    rule = "|---|" + "---|" * len(lengths)
    rows = []
    for kind, per in ev["tasks"].items():
        cells = []
        for n in lengths:
            r = per.get(str(n))
            cells.append(f"{100 * r['accuracy']:.0f}% (n={r['n']})" if r else "-")
        rows.append(f"| {kind} | " + " | ".join(cells) + " |")
    minutes = record["train_wall_s"] / 60
    total = sum(share for _, share in cfg["curriculum"])
    phases = ", then ".join(
        f"{100 * share / total:.0f}% of the steps at {'/'.join(map(str, lengths))} tokens"
        for lengths, share in cfg["curriculum"]
    )
    longest = max(n for lengths, _ in cfg["curriculum"] for n in lengths)
    machine = record.get("machine", {})
    retrieval = retrieval_heads(ModelShape(**shape))
    previous = previous_token_heads(ModelShape(**shape))
    planned = record.get("planned_steps", record["steps"])
    stopped = (
        f" of {planned:,} planned (stopped at the {cfg['max_minutes']:g}-minute limit)"
        if planned > record["steps"]
        else ""
    )
    params = record.get("parameters")
    text = f"""# hetmem-lm

A small causal LM that ships inside hetmem, so that the main job (`hetmem run`) and the
sparse-attention accuracy harness run with nothing downloaded. It was trained from scratch
in this repository by `python -m hetmem.bundled.train`, on text the machine already
has, together with synthetic long-context retrieval tasks, so that its attention really
retrieves: the answer is a few tokens somewhere in thousands of tokens of filler, and only
attention to them gives it.

Load it offline:

```python
from hetmem import bundled
model, tok = bundled.load()             # float32, eval mode, greedy generation
acc = bundled.evaluate(model, tok, length=2048, n=50, seed=0)   # the 2k figure below
```

## Architecture

`LlamaForCausalLM` (transformers), so hetmem's Llama attention paths apply unchanged:
{shape["num_hidden_layers"]} layers, hidden {shape["hidden_size"]}, MLP {shape["intermediate_size"]},
{shape["num_attention_heads"]} query heads and {shape["num_key_value_heads"]} KV heads (GQA), head dim
{shape["head_dim"]}, RoPE theta {shape["rope_theta"]:,.0f}, {shape["max_position_embeddings"]:,} positions,
{"tied" if shape["tie_embeddings"] else "separate"} input and output embeddings, vocabulary {shape["vocab_size"]:,}.
{f"{params:,} parameters, " if params else ""}stored as float32 safetensors ({_size_mb(out / "model.safetensors")}).

Tokenizer: byte-level BPE trained with `tokenizers` on the same text, digits split one per
token (a 5-digit passkey is always a space token and 5 digit tokens); `<s>` is put first,
`<pad>` pads on the left for batched generation.

## Training data

- Language modelling: the paragraphs of Python's help topics (`pydoc_data.topics`) and the
  docstrings of the standard library (parsed with `ast`), Python {machine.get("python", "?")};
  the last 5% of the texts are held out.
- Passkey retrieval (`hetmem.tasks.passkey`): a random 5-digit key stated once at a random
  depth in help-topic filler, asked for at the end.
- Multi-query associative recall (`hetmem.tasks.associative_recall`): 1-16 words (fewer
  in short sequences) get random 4-digit codes scattered through the filler; some or all of
  them are asked in a row.

{100 * cfg["lm_fraction"]:.0f}% of the sequences are plain text ({100 * cfg["repeat_prob"]:.0f}% of those with 1-3 spans of
8-64 tokens copied further on), the rest tasks in equal shares. The loss on answer tokens is
weighted x{cfg["answer_weight"]:g} and on copied tokens x{cfg["copy_weight"]:g}; a code or key where it first
appears is random, so it is left out of the loss; a random {100 * cfg["lm_keep"]:.0f}% of the other
positions carry the language-modelling loss.

## How a model this small learns to retrieve on a CPU

Two choices make retrieval form within minutes instead of the hours a plateau would take:

- Supervised retrieval heads. Query head {retrieval[0][1]} of layer {retrieval[0][0]} and query head {retrieval[1][1]} of layer {retrieval[1][0]} get an
  extra loss (x{cfg["retrieval_weight"]:g}): -log of their attention weight, from the token before each answer
  (or copied) token, on the token it copies (the key's digit where it was stated). Query
  head {previous[0][1]} of layer {previous[0][0]} is pushed (x{cfg["previous_weight"]:g}) towards the previous token, the other half of
  an induction circuit. Attention is otherwise ordinary sdpa; the loss only shapes where
  those heads look, so sparse attention over this model has a real needle to find.
- Large input embeddings (std {shape["embed_std"]:g} at init, no weight decay), untied from the output
  layer, so that a token's identity stays legible in its residual stream and a head that
  attends to it can copy it. With small tied embeddings the heads above learned to attend
  to the right digit but the first layer's output drowned the digit's identity, and the
  answers stayed at chance.

## Training run

| | |
|---|---|
| steps | {record["steps"]:,}{stopped} (AdamW, peak lr {cfg["lr"]:g}, warm-up {cfg["warmup"]}, cosine to {cfg["min_lr_ratio"]:g}x) |
| tokens | {record["tokens"]:,} ({cfg["batch_tokens"]:,} per step) |
| curriculum | {phases} |
| positions | in {100 * cfg["skip_prob"]:.0f}% of the sequences the position ids jump ahead at a random point (positional skip-wise training), so distances up to {cfg["skip_to"]:,} are seen without 8k-token sequences |
| wall time | {minutes:.1f} min (`measured`, tokenizer training included), at most {machine.get("threads", "?")} CPU threads on a 2-core machine shared with other jobs, torch {machine.get("torch", "?")} |
| seed | {cfg["seed"]} |
| final losses (smoothed) | {", ".join(f"{k} {v:.3f}" for k, v in record["final"].items())} |
| held-out text loss | {record["held_out_lm_loss"]:.3f} nats/token |

## Accuracy

Greedy decoding; a prompt counts when the completion starts with exactly the answer's digits.
Prompts have exactly the stated number of tokens; the task sets are
`hetmem.tasks.task_set(kind, length, n, seed=0)`, disjoint from training's seeds.
Figures are in `eval.json` (the test `tests/test_bundled.py` re-runs the 2k passkey set and
checks it against this file within 2 points).

{head}
{rule}
{chr(10).join(rows)}

Recall asks the last of several queries (4 by default, 8 pairs), the earlier ones answered
in the prompt.

## Limits

A few million parameters trained for {minutes:.0f} minutes on a CPU: it writes Python-doc-like
text poorly, and is meant for one thing, retrieval through attention at long context, as a
test bed for sparse attention. It was not trained on sequences longer than {longest:,}
tokens; longer contexts rely on the skipped positions. Training is seeded, but threads
that vary with the machine's load make it reproducible in distribution, not bit for bit.
Evaluation is deterministic for a given machine; a different CPU may flip a borderline
prompt.
"""
    card = out / "README.md"
    card.write_text(text)
    return card
