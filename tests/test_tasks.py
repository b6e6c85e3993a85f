"""Retrieval task generators: exact lengths, determinism, answers that match the facts, the
scorer, and bad input."""

from __future__ import annotations

import re

import pytest

from hetmem import bundled, tasks
from hetmem.errors import InputError

pytestmark = pytest.mark.skipif(
    not (bundled.path() / "tokenizer.json").exists(), reason="the bundled tokenizer is missing"
)


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(bundled.path() / "tokenizer.json"))


@pytest.mark.parametrize("length", [200, 1000, 2048, 8192])
@pytest.mark.parametrize("kind", tasks.KINDS)
def test_prompt_has_exactly_length_tokens(tok, kind, length):
    for seed in range(3):
        task = tasks.make_task(
            kind, length, seed, tok, **({"pairs": 3, "queries": 2} if kind == "recall" else {})
        )
        ids = tok.encode(task.prompt).ids
        assert len(ids) == length == task.n_tokens
        assert ids[0] == tok.token_to_id("<s>")


def test_default_tokenizer_is_the_bundled_one(tok):
    task = tasks.passkey(512, seed=4)
    assert task.n_tokens == 512 == len(tok.encode(task.prompt).ids)


def test_transformers_tokenizer_counts_the_same(tok):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(bundled.path(), local_files_only=True)
    a = tasks.passkey(1024, seed=7, tokenizer=hf)
    b = tasks.passkey(1024, seed=7, tokenizer=tok)
    assert a == b
    assert len(hf(a.prompt)["input_ids"]) == 1024


def test_seeded_and_deterministic(tok):
    a = tasks.passkey(1024, seed=3, tokenizer=tok)
    assert a == tasks.passkey(1024, seed=3, tokenizer=tok)
    others = {tasks.passkey(1024, seed=s, tokenizer=tok).answer for s in range(10)}
    assert len(others) >= 9  # random 5-digit keys
    assert tasks.passkey(2048, seed=3, tokenizer=tok).prompt != a.prompt


def test_passkey_layout(tok):
    task = tasks.passkey(2048, seed=11, tokenizer=tok)
    key = task.answer
    assert re.fullmatch(r"\d{5}", key)
    assert task.text == task.prompt + " " + key
    assert task.prompt.endswith(tasks.PASSKEY_QUESTION)
    assert task.prompt.count(key) == 2  # stated once in the needle, repeated right after
    assert task.prompt.startswith(tasks.PASSKEY_HEADER)
    (a, b, role_a), (c, d, role_b) = task.spans
    assert (role_a, role_b) == ("random", "answer")
    assert task.text[a:b] == task.text[c:d] == " " + key
    assert task.answers == (key,)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_depth(tok, depth):
    task = tasks.passkey(4096, seed=2, tokenizer=tok, depth=depth)
    where = task.prompt.index("The pass key is") / len(task.prompt)
    assert abs(where - depth) < 0.06
    assert task.depth == depth


def test_recall_answers_match_the_stated_codes(tok):
    for seed in range(5):
        task = tasks.associative_recall(1500, seed, tok, pairs=10, queries=6)
        facts = dict(re.findall(r"\nThe code of (\w+) is (\d{4})\.", task.text))
        asked = re.findall(r"\nThe code of (\w+) is (\d{4})?", task.text)[-6:]
        assert len(facts) == 10
        assert [facts[w] for w, _ in asked] == list(task.answers)
        assert task.answer == task.answers[-1] == facts[asked[-1][0]]
        assert task.prompt.endswith(f"The code of {asked[-1][0]} is")
        assert task.text == task.prompt + " " + task.answer
        assert [r for *_, r in task.spans].count("random") == 10


def test_filler_is_machine_text(tok):
    task = tasks.passkey(1024, seed=0, tokenizer=tok)
    body = task.prompt[len(tasks.PASSKEY_HEADER) :]
    words = {w for p in tasks.filler_words() for w in p}
    filler = [w for w in body.split() if not w.isdigit() and w != "."]
    assert sum(w in words for w in filler) / len(filler) > 0.95


def test_task_set_is_fixed_by_its_arguments(tok):
    a = tasks.task_set("recall", 600, 4, seed=5, tokenizer=tok)
    assert [t.seed for t in a] == [5, 6, 7, 8]
    assert a == tasks.task_set("recall", 600, 4, seed=5, tokenizer=tok)
    assert a[1] == tasks.associative_recall(600, 6, tok)


def test_score():
    assert tasks.score("68120", " 68120. Remember")
    assert tasks.score("68120", "68120")
    assert tasks.score("68120", "\n 68120 is")
    assert not tasks.score("68120", " 681201")  # extra digits
    assert not tasks.score("68120", " 6812")
    assert not tasks.score("68120", " The pass key is 68120")  # must come first
    assert not tasks.score("68120", "")


def test_accuracy(tok):
    ts = tasks.task_set("passkey", 300, 4, tokenizer=tok)
    right = [" " + t.answer for t in ts]
    assert tasks.accuracy(ts, right) == 1.0
    assert tasks.accuracy(ts, [*right[:2], " 0", "x"]) == 0.5


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda tok: tasks.passkey(0, tokenizer=tok), "length"),
        (lambda tok: tasks.passkey(True, tokenizer=tok), "length"),
        (lambda tok: tasks.passkey(20, tokenizer=tok), "length"),
        (lambda tok: tasks.passkey(512, seed=1.5, tokenizer=tok), "seed"),
        (lambda tok: tasks.passkey(512, tokenizer=tok, depth=1.5), "depth"),
        (lambda tok: tasks.passkey(512, tokenizer=object()), "tokenizer"),
        (lambda tok: tasks.associative_recall(512, tokenizer=tok, pairs=0), "pairs"),
        (lambda tok: tasks.associative_recall(512, tokenizer=tok, pairs=100), "pairs"),
        (lambda tok: tasks.associative_recall(512, tokenizer=tok, pairs=2, queries=3), "queries"),
        (lambda tok: tasks.associative_recall(100, tokenizer=tok, pairs=16), "length"),
        (lambda tok: tasks.make_task("needle", 512, tokenizer=tok), "kind"),
        (lambda tok: tasks.task_set("passkey", 512, 0, tokenizer=tok), "n"),
        (lambda tok: tasks.score("12a", "12"), "task"),
        (lambda tok: tasks.score("12", None), "completion"),
        (
            lambda tok: tasks.accuracy(tasks.task_set("passkey", 300, 2, tokenizer=tok), [" 1"]),
            "completions",
        ),
    ],
)
def test_bad_input(tok, call, argument):
    with pytest.raises(InputError) as e:
        call(tok)
    assert e.value.argument == argument
