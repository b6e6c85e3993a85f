"""The bundled LM's architecture, and the heads its training supervises.

Apart from train.py so that the model card (card.py) reads the shape without importing the
trainer that writes the card.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelShape:
    """The architecture: a Llama small enough to train on two CPU cores."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 32
    max_position_embeddings: int = 16384
    rope_theta: float = 500_000.0
    tie_embeddings: bool = False
    #: Std of the input embeddings at init: large, so a token's identity dominates its
    #: residual stream and a head that attends to it can copy it (tied, it must stay small).
    embed_std: float = 1.0


def retrieval_heads(shape: ModelShape) -> list[tuple[int, int]]:
    """(layer, query head) pairs whose attention is supervised onto the source of copies:
    one head in each of the last two layers, in different KV groups."""
    last = shape.num_hidden_layers - 1
    return [(last, 0), (last - 1, shape.num_attention_heads - 1)]


def previous_token_heads(shape: ModelShape) -> list[tuple[int, int]]:
    """(layer, query head) pairs supervised to attend to the previous token: the other half
    of an induction circuit (the key at a copy's source must know the token before it)."""
    return [(0, 0)]
