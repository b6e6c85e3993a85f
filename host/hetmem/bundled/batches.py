"""The bundled model's training batches: windows of the machine's text with copied spans, and
retrieval tasks with their answers written out, each token with a loss weight, a role and
links to where a retrieving head should look."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..tasks import KINDS, TokenCounter, make_task
from .config import TrainConfig
from .data import BOS, PAD, machine_text

#: Training tasks draw their seeds from here up; evaluation sets use small seeds.
TRAIN_SEED_BASE = 2**32
#: What a training token is, for the progress figures: text, a copied span, a task's answer.
LM, COPY, ANSWER = 0, 1, 2


class Batches:
    """Training batches: LM windows of the machine's text and retrieval tasks, with a
    per-token loss weight (answers up, unpredictable random values out, a sample of the
    LM positions in) and position ids that may skip ahead."""

    def __init__(self, tok: Any, cfg: TrainConfig):
        self.tok, self.cfg = tok, cfg
        self.counter = TokenCounter(tok)
        self.rng = random.Random(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        texts = machine_text()
        held = max(1, len(texts) // 20)
        self.held_out = texts[-held:]
        ids = [
            i
            for e in tok.encode_batch(list(texts[:-held]), add_special_tokens=False)
            for i in e.ids
        ]
        self.lm = torch.tensor(ids, dtype=torch.long)
        self.bos, self.pad = tok.token_to_id(BOS), tok.token_to_id(PAD)

    def _lm(self, length: int) -> Example:
        """A window of text; usually with a few of its spans copied further on.

        A copy is predictable only by looking back at the original (an induction head, the
        mechanism retrieval runs on): its tokens are weighted up and linked to their source,
        which teaches attention to look things up long before the tasks' sparse answers do.
        """
        start = self.rng.randrange(len(self.lm) - length)
        ids = torch.cat([torch.tensor([self.bos]), self.lm[start : start + length - 1]])
        weight = (torch.rand(length, generator=self.gen) < self.cfg.lm_keep).float()
        role = torch.full((length,), LM)
        links = []
        if self.rng.random() < self.cfg.repeat_prob and length >= 64:
            for _ in range(self.rng.randint(1, 3)):
                m = self.rng.randint(8, max(8, min(64, length // 4)))
                src = self.rng.randrange(1, length // 2 - m + 1)
                dst = self.rng.randrange(src + m, length - m + 1)
                ids[dst : dst + m] = ids[src : src + m].clone()
                weight[dst + 1 : dst + m] = self.cfg.copy_weight
                role[dst + 1 : dst + m] = COPY
                k = torch.arange(1, m)
                links.append(torch.stack([dst + k - 1, src + k], 1))
        return Example(ids, weight, role, _cat_links(links))

    def _task(self, length: int) -> Example:
        """A passkey or recall task of about `length` tokens, every answer written out.

        Each answer token is linked to the same token of the value where it was stated."""
        kind = self.rng.choice(KINDS)
        seed = TRAIN_SEED_BASE + self.rng.getrandbits(40)
        if kind == "recall":
            pairs = self.rng.randint(1, max(1, min(16, (length - 48) // 32)))
            options = {"pairs": pairs, "queries": self.rng.randint(1, pairs)}
        else:
            options = {}
        task = make_task(kind, length - 8, seed, self.counter, **options)
        enc = self.tok.encode(task.text)
        ids = torch.tensor(enc.ids[:length], dtype=torch.long)
        starts = np.array([a for a, _ in enc.offsets[:length]])
        weight = (torch.rand(len(ids), generator=self.gen) < self.cfg.lm_keep).numpy()
        weight = weight.astype(np.float32)
        role = np.full(len(ids), LM)
        stated: dict[str, np.ndarray] = {}
        links = []
        for a, b, kind_ in task.spans:
            inside = np.flatnonzero((starts >= a) & (starts < b))
            value = task.text[a:b]
            if kind_ == "answer":
                weight[inside] = self.cfg.answer_weight
                role[inside] = ANSWER
                source = stated.get(value)
                if source is not None and len(source) == len(inside):
                    links.append(torch.from_numpy(np.stack([inside - 1, source], 1)))
            else:
                weight[inside] = 0.0
                stated.setdefault(value, inside)
        weight[0] = 0.0
        return Example(ids, torch.from_numpy(weight), torch.from_numpy(role), _cat_links(links))

    def _positions(self, length: int) -> torch.Tensor:
        pos = torch.arange(length)
        room = self.cfg.skip_to - length
        if room > 0 and self.rng.random() < self.cfg.skip_prob:
            cut = self.rng.randrange(1, length)
            pos[cut:] += self.rng.randrange(room + 1)
        return pos

    def batch(self, length: int) -> dict[str, torch.Tensor]:
        """`batch_tokens // length` sequences of `length` tokens (at least one)."""
        rows = max(1, self.cfg.batch_tokens // length)
        ids = torch.full((rows, length), self.pad, dtype=torch.long)
        weight = torch.zeros(rows, length)
        pos = torch.zeros(rows, length, dtype=torch.long)
        roles = torch.zeros(rows, length, dtype=torch.long)
        links = []
        for r in range(rows):
            lm = self.rng.random() < self.cfg.lm_fraction
            ex = self._lm(length) if lm else self._task(length)
            n = len(ex.ids)
            ids[r, :n], weight[r, :n], roles[r, :n] = ex.ids, ex.weight, ex.role
            pos[r] = self._positions(length)
            if len(ex.links):
                links.append(torch.cat([torch.full((len(ex.links), 1), r), ex.links], 1))
        return {
            "input_ids": ids,
            "weight": weight,
            "position_ids": pos,
            "role": roles,
            "links": torch.cat(links) if links else torch.zeros(0, 3, dtype=torch.long),
            "previous": self._previous(rows, length),
        }

    def _previous(self, rows: int, length: int, per_row: int = 32) -> torch.Tensor:
        """Links (row, p, p - 1) at random positions, for the previous-token heads."""
        p = torch.randint(1, length, (rows, per_row), generator=self.gen)
        r = torch.arange(rows)[:, None].expand(rows, per_row)
        return torch.stack([r, p, p - 1], -1).reshape(-1, 3)


@dataclass
class Example:
    """One training sequence: tokens, loss weight and role per token, and links (query
    position, source position): where a retrieving head should look from that query."""

    ids: torch.Tensor
    weight: torch.Tensor
    role: torch.Tensor
    links: torch.Tensor


def _cat_links(links: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(links).long() if links else torch.zeros(0, 2, dtype=torch.long)
