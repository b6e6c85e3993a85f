"""Accuracy of a causal LM on the retrieval tasks, by greedy decoding.

The model card's figures and the test that checks them call the same function on the same
seeded task set, so the two can only differ by the machine's arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..checks import check_positive_int
from ..errors import InputError
from ..tasks import KINDS, Kind, Task, score, task_set

#: Tokens generated after each prompt: the answer (space + digits) and one more, so that an
#: answer with extra digits is caught.
ANSWER_TOKENS = 8


def complete(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = ANSWER_TOKENS
) -> list[str]:
    """Greedy completions of `prompts` (one batch, left-padded), as text."""
    import torch

    enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model.generate(
            input_ids=enc["input_ids"].to(device),
            attention_mask=enc["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = out[:, enc["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new, skip_special_tokens=True)


def evaluate(
    model: Any,
    tokenizer: Any,
    length: int = 2048,
    n: int = 50,
    seed: int = 0,
    kind: Kind = "passkey",
    batch_size: int = 4,
    on_batch: Callable[[int, int], None] | None = None,
    **task_options: Any,
) -> float:
    """Accuracy (0..1) of greedy decoding on `hetmem.tasks.task_set(kind, length, n, seed)`.

    Every prompt has exactly `length` tokens, so batches need no padding. `on_batch(done,
    total)` reports progress.
    """
    results = evaluate_tasks(
        model, tokenizer, length, n, seed, kind, batch_size, on_batch, **task_options
    )
    return sum(ok for _, _, ok in results) / len(results)


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    length: int = 2048,
    n: int = 50,
    seed: int = 0,
    kind: Kind = "passkey",
    batch_size: int = 4,
    on_batch: Callable[[int, int], None] | None = None,
    **task_options: Any,
) -> list[tuple[Task, str, bool]]:
    """`evaluate`, task by task: (task, completion, correct)."""
    if kind not in KINDS:
        raise InputError("kind", f"expected one of {KINDS}, got {kind!r}")
    batch_size = check_positive_int("batch_size", batch_size)
    if not callable(getattr(model, "generate", None)):
        raise InputError("model", f"expected a transformers causal LM, got {type(model).__name__}")
    tasks = task_set(kind, length, n, seed, tokenizer, **task_options)
    results: list[tuple[Task, str, bool]] = []
    for i in range(0, len(tasks), batch_size):
        batch = tasks[i : i + batch_size]
        for task, text in zip(
            batch, complete(model, tokenizer, [t.prompt for t in batch]), strict=True
        ):
            results.append((task, text, score(task, text)))
        if on_batch is not None:
            on_batch(len(results), len(tasks))
    return results
