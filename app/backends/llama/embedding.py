"""Embeddings from the local model: inputs tokenized and checked before they wait, the answer in OpenAI's shape."""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from app.errors import InvalidRequest
from app.schemas import CompletionRequest


@dataclass(slots=True, frozen=True)
class LocalEmbedding:
    """An embedding request as the engine takes it: each input's token ids."""

    inputs: list[list[int]]
    as_base64: bool  # encoding_format base64: each vector as the base64 of its little-endian float32s

    @property
    def tokens(self) -> int:
        return sum(len(tokens) for tokens in self.inputs)


def prepare_embedding(
    request: CompletionRequest,
    tokenize: Callable[[str, bool], list[int]],
    vocab_size: int,
    max_tokens: int,
    n_embd: int,
) -> LocalEmbedding:
    """Tokenize the inputs (the shapes are checked already, app.schemas) and check what the model allows:
    token ids in its vocabulary, at most `max_tokens` tokens per input, `dimensions` its own size."""
    payload = request.payload
    value = payload["input"]
    items: list[Any] = [value] if isinstance(value, str) or isinstance(value[0], int) else value
    inputs = []
    for index, item in enumerate(items):
        tokens = tokenize(item, True) if isinstance(item, str) else item
        if any(token < 0 or token >= vocab_size for token in tokens):
            raise InvalidRequest(
                f"input {index} holds a token id outside the vocabulary (0-{vocab_size - 1})", param="input"
            )
        if len(tokens) > max_tokens:
            raise InvalidRequest(
                f"input {index} is {len(tokens)} tokens; this model embeds at most {max_tokens}", param="input"
            )
        inputs.append(tokens)
    dimensions = payload.get("dimensions")
    if dimensions is not None and dimensions != n_embd:
        raise InvalidRequest(
            f"this model's embeddings have {n_embd} dimensions and cannot be shortened to {dimensions}",
            param="dimensions",
        )
    return LocalEmbedding(inputs, payload.get("encoding_format") == "base64")


def embedding_body(prepared: LocalEmbedding, vectors: list[list[float]], model: str) -> bytes:
    """OpenAI's embeddings list: one object per input, in order, with the usage."""
    data = []
    for index, vector in enumerate(vectors):
        embedding: Any = (
            base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if prepared.as_base64 else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    usage = {"prompt_tokens": prepared.tokens, "total_tokens": prepared.tokens}
    return orjson.dumps({"object": "list", "data": data, "model": model, "usage": usage})
