"""Long-context retrieval tasks: passkey retrieval and multi-query associative recall.

One generator serves training (`hetmem.bundled.train`), the accuracy harness and
`hetmem run`, so all three ask the model the same questions. A task is seeded and
deterministic, and its prompt has exactly `length` tokens as the model sees them (the
`<s>` token included) under the bundled tokenizer; under another tokenizer it has at most
`length`, a few short when the tokenizer does not count pieces additively.

The filler between the facts is real text already on the machine: the paragraphs of
Python's help topics (`hetmem.corpus.pydoc_paragraphs`), whitespace collapsed.

    task = passkey(2048, seed=0, tokenizer=tok)
    out = generate(task.prompt)          # e.g. " 68120. Rem"
    score(task, out)                     # True when the completion starts with the key
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .checks import check_positive_int
from .corpus import pydoc_paragraphs
from .errors import InputError

Kind = Literal["passkey", "recall"]
KINDS: tuple[Kind, ...] = ("passkey", "recall")
#: Role of a span of a task's text. `answer`: predictable from the context (what the model
#: is asked for; training weights it up). `random`: a fresh random value, unpredictable
#: where it first appears (training leaves it out of the loss).
Role = Literal["answer", "random"]

PASSKEY_DIGITS = 5
CODE_DIGITS = 4

PASSKEY_HEADER = (
    "A pass key is hidden in the text below. Find it and remember it: "
    "you will be asked for it at the end."
)
PASSKEY_NEEDLE = "\nThe pass key is{key}. Remember it.{key} is the pass key."
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"

RECALL_HEADER = (
    "Some words in the text below are given codes. Remember every code: "
    "you will be asked for them at the end."
)
RECALL_FACT = "\nThe code of {word} is{code}."
RECALL_QUESTION = "\nThe code of {word} is"

#: Keys of the associative-recall task: short, common words, each a few tokens at most.
RECALL_WORDS = (
    "apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle", "forest", "rocket",
    "garden", "silver", "window", "dragon", "pepper", "island", "mirror", "violet", "thunder",
    "marble", "falcon", "ribbon", "anchor", "meadow", "copper", "harbor", "lantern", "orange",
    "pillow", "saddle", "tunnel", "walnut", "basket", "cotton", "desert", "engine", "feather",
    "glacier", "hammer", "jacket", "kettle", "ladder", "magnet", "needle", "oyster", "parrot",
    "quartz", "rabbit", "spider", "teapot", "velvet", "wagon", "yellow", "zebra", "button",
    "cactus", "dolphin", "ember", "fossil", "ginger", "helmet", "insect", "jungle", "koala",
)  # fmt: skip

#: The unit of filler used to close the last few tokens of the budget (one token under
#: the bundled tokenizer).
_PAD_UNIT = " ."


@dataclass(frozen=True)
class Task:
    """One prompt of a retrieval task, with its answer.

    `text` holds the whole example, every answer written out; `prompt` is `text` up to the
    last answer, which is `answer` (digits only). `spans` are (start, end, role) character
    ranges of `text`, for the loss weights of training. `n_tokens` counts the prompt's tokens
    (with `<s>`) under the tokenizer it was built with.
    """

    kind: Kind
    text: str
    prompt: str
    answer: str
    spans: tuple[tuple[int, int, Role], ...]
    length: int
    n_tokens: int
    seed: int
    depth: float

    @property
    def answers(self) -> tuple[str, ...]:
        """Every answer in `text`, in order (recall asks several; the last is `answer`)."""
        return tuple(self.text[a:b].strip() for a, b, role in self.spans if role == "answer")


class TokenCounter:
    """Counts tokens under a `tokenizers.Tokenizer` or a transformers tokenizer.

    Counts of filler units are cached: a prompt of 8k tokens is built from thousands of
    them and most repeat.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._fast = hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "token_to_id")
        if not self._fast and not callable(getattr(tokenizer, "encode", None)):
            raise InputError(
                "tokenizer", f"expected a tokenizers.Tokenizer or a transformers tokenizer, "
                f"got {type(tokenizer).__name__}"
            )  # fmt: skip
        self.specials = len(self.ids("", special=True))
        self._cache: dict[str, int] = {}

    def ids(self, text: str, special: bool = False) -> list[int]:
        if self._fast:
            return list(self.tokenizer.encode(text, add_special_tokens=special).ids)
        return list(self.tokenizer.encode(text, add_special_tokens=special))

    def count(self, text: str) -> int:
        n = self._cache.get(text)
        if n is None:
            n = self._cache[text] = len(self.ids(text))
        return n

    def prompt_tokens(self, text: str) -> int:
        return len(self.ids(text, special=True))


@functools.cache
def filler_words() -> tuple[tuple[str, ...], ...]:
    """The help topics as paragraphs of words (whitespace collapsed)."""
    return tuple(tuple(p.split()) for p in pydoc_paragraphs())


#: The bundled model's tokenizer (`hetmem.bundled.path() / "tokenizer.json"`), named by
#: its place in the package: tasks sit below the bundled LM (which trains and evaluates on
#: them) and do not import it.
BUNDLED_TOKENIZER = Path(__file__).resolve().parent / "bundled" / "hetmem-lm" / "tokenizer.json"


@functools.cache
def _bundled_counter() -> TokenCounter:
    from tokenizers import Tokenizer

    file = BUNDLED_TOKENIZER
    if not file.exists():
        raise InputError("tokenizer", f"no tokenizer given and the bundled one is missing ({file})")
    return TokenCounter(Tokenizer.from_file(str(file)))


#: Counters of the tokenizers seen so far, by id (the tokenizer is kept alive beside it).
_COUNTERS: dict[int, tuple[Any, TokenCounter]] = {}


def _counter(tokenizer: Any) -> TokenCounter:
    if tokenizer is None:
        return _bundled_counter()
    if isinstance(tokenizer, TokenCounter):
        return tokenizer
    hit = _COUNTERS.get(id(tokenizer))
    if hit is None or hit[0] is not tokenizer:
        hit = _COUNTERS[id(tokenizer)] = (tokenizer, TokenCounter(tokenizer))
    return hit[1]


def _filler(counter: TokenCounter, rng: random.Random, budget: int) -> list[str]:
    """Units of filler (each starts with a space or a newline) worth exactly `budget` tokens.

    Whole paragraphs from a random start, then the next words that still fit, then
    one-token pads: every unit starts at a word boundary, so counts add up.
    """
    paragraphs = filler_words()
    units: list[str] = []
    left = budget
    p = rng.randrange(len(paragraphs))
    misses = 0
    while left > 0 and misses < 64:
        for i, word in enumerate(paragraphs[p]):
            unit = ("\n" if i == 0 else " ") + word
            n = counter.count(unit)
            if n <= left:
                units.append(unit)
                left -= n
                misses = 0
            else:
                misses += 1
            if left == 0 or misses >= 64:
                break
        p = (p + 1) % len(paragraphs)
    pad = counter.count(_PAD_UNIT)
    while left >= pad:
        units.append(_PAD_UNIT)
        left -= pad
    return units


def _check_common(length: object, seed: object) -> tuple[int, int]:
    length = check_positive_int("length", length)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError("seed", f"expected an int, got {type(seed).__name__}")
    return length, seed


Piece = tuple[str, "Role | None"]


def _sentence_start(filler: Sequence[str], cut: int, reach: int = 48) -> int:
    """The first unit at or after `cut` that starts a paragraph or a sentence, so a fact
    does not land mid-sentence; `cut` itself when none is within `reach` units."""
    for j in range(cut, min(cut + reach, len(filler) + 1)):
        if j in (0, len(filler)) or filler[j][0] == "\n" or filler[j - 1][-1] in ".!?:":
            return j
    return cut


def _layout(
    head: str,
    facts: Sequence[Sequence[Piece]],
    positions: Sequence[float],
    filler: Sequence[str],
    tail: Sequence[Piece],
) -> tuple[str, str, tuple[tuple[int, int, Role], ...]]:
    """Header, the filler with each fact at its relative position, then the questions;
    the prompt stops before the last piece (the final answer)."""
    pieces: list[Piece] = [(head, None)]
    start = 0
    for i in sorted(range(len(facts)), key=lambda i: positions[i]):
        cut = _sentence_start(filler, max(start, round(positions[i] * len(filler))))
        pieces += [(u, None) for u in filler[start:cut]]
        pieces += list(facts[i])
        start = cut
    pieces += [(u, None) for u in filler[start:]]
    pieces += list(tail)
    text, spans = "", []
    prompt_end = 0
    for piece, role in pieces:
        prompt_end = len(text)
        if role is not None:
            spans.append((len(text), len(text) + len(piece), role))
        text += piece
    return text, text[:prompt_end], tuple(spans)


def _build(
    kind: Kind,
    counter: TokenCounter,
    rng: random.Random,
    length: int,
    seed: int,
    head: str,
    facts: Sequence[Sequence[Piece]],
    positions: Sequence[float],
    tail: Sequence[Piece],
    depth: float,
) -> Task:
    """Fill the room the fixed pieces leave with filler, so the prompt has `length` tokens.

    The bundled tokenizer counts pieces additively and is exact at once; another tokenizer
    may merge across pieces, so the filler is resized by the miss and counted again, and
    the prompt never exceeds `length`.
    """
    fixed = [head] + [t for fact in facts for t, _ in fact] + [t for t, _ in tail[:-1]]
    room = length - counter.specials - sum(counter.count(t) for t in fixed)
    if room < 0:
        raise InputError("length", f"{length} tokens cannot hold the {kind} task itself")
    filler_seed = rng.getrandbits(64)
    best: tuple[str, str, tuple[tuple[int, int, Role], ...], int] | None = None
    for _ in range(8):
        filler = _filler(counter, random.Random(filler_seed), max(room, 0))
        text, prompt, spans = _layout(head, facts, positions, filler, tail)
        n = counter.prompt_tokens(prompt)
        if n <= length and (best is None or n > best[3]):
            best = (text, prompt, spans, n)
        if n == length or room <= 0:
            break
        room += length - n if n < length else min(-1, length - n)
    if best is None:
        raise InputError("length", f"{length} tokens cannot hold the {kind} task itself")
    text, prompt, spans, n = best
    answer = text[spans[-1][0] : spans[-1][1]].strip()
    return Task(kind, text, prompt, answer, spans, length, n, seed, depth)


def passkey(length: int, seed: int = 0, tokenizer: Any = None, depth: float | None = None) -> Task:
    """A passkey-retrieval prompt of `length` tokens: a random 5-digit key stated once at
    `depth` (0: right after the header, 1: right before the question; default random) in
    filler text, asked for at the end.

    `tokenizer` (default: the bundled model's) counts the tokens.
    """
    length, seed = _check_common(length, seed)
    if depth is not None and (
        isinstance(depth, bool) or not isinstance(depth, int | float) or not 0 <= depth <= 1
    ):
        raise InputError("depth", f"expected a number in [0, 1] or None, got {depth!r}")
    counter = _counter(tokenizer)
    rng = random.Random(f"passkey/{length}/{seed}")
    key = f" {rng.randrange(10 ** (PASSKEY_DIGITS - 1), 10**PASSKEY_DIGITS)}"
    at = rng.random() if depth is None else float(depth)
    before, middle, after = PASSKEY_NEEDLE.split("{key}")
    needle: list[Piece] = [
        (before, None),
        (key, "random"),
        (middle, None),
        (key, None),
        (after, None),
    ]
    tail: list[Piece] = [(PASSKEY_QUESTION, None), (key, "answer")]
    return _build("passkey", counter, rng, length, seed, PASSKEY_HEADER, [needle], [at], tail, at)


def associative_recall(
    length: int, seed: int = 0, tokenizer: Any = None, pairs: int = 8, queries: int = 4
) -> Task:
    """A multi-query associative-recall prompt of `length` tokens: `pairs` words get random
    4-digit codes, stated at random places in filler text; at the end `queries` of them are
    asked one after another. The earlier questions come answered (in-context examples, and
    answers to train on); the prompt stops at the last, whose code is `answer`.
    """
    length, seed = _check_common(length, seed)
    pairs = check_positive_int("pairs", pairs)
    queries = check_positive_int("queries", queries)
    if pairs > len(RECALL_WORDS):
        raise InputError("pairs", f"at most {len(RECALL_WORDS)} (the key words), got {pairs}")
    if queries > pairs:
        raise InputError("queries", f"{queries} exceeds the {pairs} pairs that can be asked")
    counter = _counter(tokenizer)
    rng = random.Random(f"recall/{length}/{seed}/{pairs}/{queries}")
    words = rng.sample(RECALL_WORDS, pairs)
    codes = [f" {rng.randrange(10 ** (CODE_DIGITS - 1), 10**CODE_DIGITS)}" for _ in words]
    positions = [rng.random() for _ in words]
    before, after = RECALL_FACT.split("{code}")
    facts: list[list[Piece]] = [
        [(before.format(word=w), None), (c, "random"), (after, None)]
        for w, c in zip(words, codes, strict=True)
    ]
    asked = rng.sample(range(pairs), queries)
    tail: list[Piece] = []
    for j, i in enumerate(asked):
        tail += [(RECALL_QUESTION.format(word=words[i]), None), (codes[i], "answer")]
        if j < queries - 1:
            tail.append((after, None))
    return _build(
        "recall", counter, rng, length, seed, RECALL_HEADER, facts, positions, tail,
        positions[asked[-1]],
    )  # fmt: skip


def make_task(
    kind: Kind, length: int, seed: int = 0, tokenizer: Any = None, **options: Any
) -> Task:
    """`passkey` or `associative_recall` by name."""
    if kind == "passkey":
        return passkey(length, seed, tokenizer, **options)
    if kind == "recall":
        return associative_recall(length, seed, tokenizer, **options)
    raise InputError("kind", f"expected one of {KINDS}, got {kind!r}")


def task_set(
    kind: Kind, length: int, n: int, seed: int = 0, tokenizer: Any = None, **options: Any
) -> list[Task]:
    """`n` tasks of one kind and length: task i has seed `seed + i`, so a set is fixed by
    (kind, length, n, seed). Training draws its seeds from 2**32 up, away from these."""
    n = check_positive_int("n", n)
    return [make_task(kind, length, seed + i, tokenizer, **options) for i in range(n)]


_DIGITS = re.compile(r"\s*(\d+)")


def score(task: Task | str, completion: str) -> bool:
    """Whether `completion` (the generated text after the prompt) starts with the answer:
    leading whitespace skipped, then exactly the answer's digits (no more digits after)."""
    answer = task.answer if isinstance(task, Task) else task
    if not isinstance(answer, str) or not answer.isdigit():
        raise InputError("task", f"expected a Task or a string of digits, got {task!r}")
    if not isinstance(completion, str):
        raise InputError("completion", f"expected a str, got {type(completion).__name__}")
    m = _DIGITS.match(completion)
    return m is not None and m.group(1) == answer


def accuracy(tasks: Sequence[Task], completions: Sequence[str]) -> float:
    """Fraction of `tasks` whose completion `score`s."""
    if len(tasks) != len(completions) or not tasks:
        raise InputError(
            "completions", f"expected one per task ({len(tasks)}), got {len(completions)}"
        )
    return sum(score(t, c) for t, c in zip(tasks, completions, strict=True)) / len(tasks)
