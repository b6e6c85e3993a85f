"""The machine's own text, and the tokenizer trained on it.

The bundled model is trained from nothing downloaded: Python's help topics (`pydoc_data`)
and the docstrings of the standard library are on every machine that runs hetmem.
"""

from __future__ import annotations

import ast
import functools
import sysconfig
from pathlib import Path
from typing import Any

from ..corpus import pydoc_paragraphs

#: Special tokens of the bundled tokenizer, in id order (0, 1, 2).
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (BOS, EOS, PAD)


@functools.cache
def stdlib_docstrings(min_words: int = 8) -> tuple[str, ...]:
    """Docstrings of the standard library's modules, classes and functions, in path order.

    Parsed with `ast` (nothing is imported); tests and IDLE are left out as they are mostly
    code. A few thousand texts, about 1.5 MB.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    for path in sorted(root.rglob("*.py")):
        parts = set(path.relative_to(root).parts)
        if parts & {"test", "tests", "idlelib", "site-packages", "lib2to3"}:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= min_words:
                    texts.append(doc)
    return tuple(texts)


def machine_text() -> tuple[str, ...]:
    """All the training text: help topics first, then the docstrings."""
    return pydoc_paragraphs() + stdlib_docstrings()


def train_tokenizer(vocab_size: int = 4096, texts: tuple[str, ...] | None = None) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts` (default: `machine_text`).

    Digits are split one per token, so a passkey of n digits is always n tokens (plus the
    space before it) whatever the digits are. The post-processor puts `<s>` first.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts if texts is not None else machine_text(), trainer=trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos)]
    )
    return tok


def as_transformers(tok: Any) -> Any:
    """Wrap a `tokenizers.Tokenizer` as a transformers fast tokenizer: `<s>` first, `<pad>`
    for padding on the left (batched greedy decoding), no length limit of its own."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        model_max_length=16384,
        clean_up_tokenization_spaces=False,
    )
