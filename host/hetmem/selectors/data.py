"""What `hetmem calibrate` trains on: real text (the pydoc help topics) and passkey /
associative-recall prompts (`hetmem.tasks`), seeded away from the evaluation sets; for the
gate, task examples with their answers and the decode queries that write them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..checks import check_positive_int
from ..errors import InputError
from .activations import sample_positions


def text_sequences(tokenizer: Any, sequences: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """[N, S] token ids of real text: the pydoc help topics, shuffled, cut into sequences."""
    from ..corpus import pydoc_paragraphs

    paragraphs = list(pydoc_paragraphs())
    order = torch.randperm(len(paragraphs), generator=torch.Generator().manual_seed(seed))
    ids: list[int] = []
    need = sequences * tokens
    for i in order.tolist():
        ids.extend(tokenizer(paragraphs[i] + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise InputError("tokens", f"the corpus holds {len(ids)} tokens, {need} were asked for")
    return torch.tensor(ids[:need]).view(sequences, tokens)


#: Seeds of calibration prompts start here, away from the evaluation sets (seeds 0, 1, ...).
CALIBRATION_SEED = 2**31


def task_sequences(
    tokenizer: Any, sequences: int, tokens: int, seed: int = 0
) -> torch.Tensor | None:
    """[N, S] token ids of passkey and associative-recall prompts (`hetmem.tasks`, half
    each), seeded away from the evaluation sets; each prompt has S tokens as the model
    sees it, `<s>` included (a prompt the tokenizer makes shorter is left out). None when
    no task fits S tokens."""
    from .. import tasks

    rows: list[list[int]] = []
    for i in range(2 * sequences):
        if len(rows) == sequences:
            break
        kind = tasks.KINDS[i % 2]
        try:
            task = tasks.make_task(kind, tokens, CALIBRATION_SEED + seed + i, tokenizer)
        except InputError:  # too short a context for this task under this tokenizer
            continue
        ids = tokenizer(task.prompt)["input_ids"]
        if len(ids) == tokens:
            rows.append(ids)
    return torch.tensor(rows) if rows else None


def answer_queries(task: Any, tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """Positions of the queries that write the task's final answer when decoding: the
    token before each of the answer's tokens, in `ids` (the tokens of `task.text`)."""
    start, end = next((a, b) for a, b, role in reversed(task.spans) if role == "answer")
    try:
        enc = tokenizer(task.text, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, TypeError, KeyError, ValueError):
        offsets = None
    if offsets is not None and len(offsets) == len(ids):
        inside = [i for i, (a, b) in enumerate(offsets) if b > a and a >= start and b <= end]
    else:  # a tokenizer without offsets: count the tokens before and through the answer
        first = len(tokenizer(task.text[:start])["input_ids"])
        last = len(tokenizer(task.text[:end])["input_ids"])
        inside = list(range(first, last))
    return [i - 1 for i in inside if 0 < i < len(ids)]


def gate_sequences(
    tokenizer: Any, sequences: int, tokens: int, queries: int = 64, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the Seer gate trains on at one context length: (input_ids [N, S], query
    positions [N, T]), S a few tokens over `tokens`.

    Half the sequences are passkey / associative-recall examples with their answers
    written out (`Task.text`), and their query positions hold the decode queries that
    write the final answer (the queries a sparse decode step asks: the prompt's last
    token is prefill's), the rest sampled over the sequence as `sample_positions` does;
    the other half is real text with sampled positions. A task prompt stops before the
    answer, so without these rows no query the gate trains on reads the needle back.
    """
    from .. import tasks

    check_positive_int("sequences", sequences)
    check_positive_int("tokens", tokens)
    rows: list[list[int]] = []
    wanted: list[list[int]] = []
    for i in range(2 * (sequences // 2)):
        if len(rows) == sequences // 2:
            break
        kind = tasks.KINDS[i % 2]
        try:
            task = tasks.make_task(kind, tokens, CALIBRATION_SEED + seed + i, tokenizer)
        except InputError:  # too short a context for this task under this tokenizer
            continue
        ids = tokenizer(task.text)["input_ids"]
        asked = answer_queries(task, tokenizer, ids)
        if asked:
            rows.append(ids)
            wanted.append(asked[: max(queries // 4, 1)])
    # Right-padded to the longest: a causal query never sees the tokens after it.
    length = max([len(r) for r in rows], default=tokens)
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    rows = [r + [pad] * (length - len(r)) for r in rows]
    text = text_sequences(tokenizer, sequences - len(rows), length, seed + tokens)
    drawn = sample_positions(sequences, length, queries, seed + tokens)
    positions = []
    for j in range(sequences):
        if j < len(rows):
            fill = sample_positions(1, length, queries - len(wanted[j]), seed + tokens + j)[0]
            positions.append(torch.sort(torch.cat([torch.tensor(wanted[j]), fill])).values)
        else:
            positions.append(drawn[j])
    ids = torch.cat([torch.tensor(rows, dtype=torch.long).view(-1, length), text])
    # Interleaved, so the held-out sixth of the sequences mixes both kinds.
    order = torch.randperm(sequences, generator=torch.Generator().manual_seed(seed + tokens))
    return ids[order], torch.stack(positions)[order]


def gate_calibration_data(
    tokenizer: Any,
    sequences: int,
    lengths: Sequence[int],
    queries: int = 64,
    seed: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`gate_sequences` at each context length (the gate learns at every length it will
    rank blocks at: trained at one, it ranks a needle far worse at four times it)."""
    if tokenizer is None:
        raise InputError("model", "has no tokenizer in its directory: calibration needs one")
    return [gate_sequences(tokenizer, sequences, n, queries, seed) for n in lengths]


def calibration_ids(tokenizer: Any, sequences: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """What `hetmem calibrate` trains on: real text (the pydoc help topics) and, for half
    the sequences, passkey / associative-recall prompts."""
    if tokenizer is None:
        raise InputError("model", "has no tokenizer in its directory: calibration needs one")
    check_positive_int("sequences", sequences)
    check_positive_int("tokens", tokens)
    n_tasks = sequences // 2
    tasks = task_sequences(tokenizer, n_tasks, tokens, seed) if n_tasks else None
    n_tasks = 0 if tasks is None else tasks.shape[0]
    text = text_sequences(tokenizer, sequences - n_tasks, tokens, seed)
    if tasks is None:
        return text
    # Interleaved, so the last sequences (held out in training) mix both kinds.
    rows = [r for pair in zip(text, tasks, strict=False) for r in pair]
    return torch.stack(rows + list(text[n_tasks:]))
