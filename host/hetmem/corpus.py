"""Real text already on every machine: the help topics of Python's `pydoc_data`.

Used by the demo and the benchmarks; nothing is downloaded.
"""

from __future__ import annotations

import functools
import re


@functools.cache
def pydoc_paragraphs(min_words: int = 8) -> tuple[str, ...]:
    """The paragraphs of Python's help topics (about 1800), in a fixed order."""
    from pydoc_data.topics import topics

    paragraphs = (p.strip() for text in topics.values() for p in re.split(r"\n\s*\n", text))
    return tuple(p for p in paragraphs if len(p.split()) >= min_words)
