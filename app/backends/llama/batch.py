"""A llama_batch filled token by token, as the model's decode steps and the embedder fill theirs."""

from __future__ import annotations

from typing import Any


def add_to_batch(batch: Any, seq: int, token: int, position: int, logits: bool) -> int:
    """Append a token of sequence `seq` to a llama_batch; its index there."""
    index = batch.n_tokens
    batch.token[index] = token
    batch.pos[index] = position
    batch.n_seq_id[index] = 1
    batch.seq_id[index][0] = seq
    batch.logits[index] = logits
    batch.n_tokens = index + 1
    return int(index)
