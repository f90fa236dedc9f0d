"""Embeddings of the local model: a second llama.cpp context on the same weights, made for mean pooling."""

from __future__ import annotations

import math
from typing import Any

import llama_cpp as ll

from app.backends.llama.batch import add_to_batch


class Embedder:
    """A second context on the same weights, made for embeddings: mean pooling, up to n_embed sequences of
    n_ctx tokens in one decode. Sequences do not attend to each other, so an input's vector is the same
    whatever is batched with it; the memory is cleared after each decode."""

    def __init__(self, model: Any, n_ctx: int, n_embed: int, n_threads: int):
        params = ll.llama_context_default_params()
        self.n_seq = n_embed
        self.n_tokens = n_ctx * n_embed
        params.n_ctx = self.n_tokens
        params.n_batch = params.n_ubatch = self.n_tokens  # a pooled sequence must be in one micro-batch
        params.n_seq_max = n_embed
        params.n_threads = params.n_threads_batch = n_threads
        params.embeddings = True
        params.pooling_type = ll.LLAMA_POOLING_TYPE_MEAN
        params.kv_unified = True
        self._ctx = ll.llama_init_from_model(model, params)
        if not self._ctx:
            raise RuntimeError("llama.cpp could not create the embedding context (out of memory?)")
        self._batch = ll.llama_batch_init(self.n_tokens, 0, 1)
        self._n_embd = int(ll.llama_model_n_embd(model))

    def free(self) -> None:
        ll.llama_batch_free(self._batch)
        ll.llama_free(self._ctx)

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        vectors: list[list[float]] = []
        start = 0
        while start < len(inputs):
            end, used = start, 0
            while end < len(inputs) and end - start < self.n_seq and used + len(inputs[end]) <= self.n_tokens:
                used += len(inputs[end])
                end += 1
            vectors += self._decode(inputs[start:end])
            start = end
        return vectors

    def _decode(self, inputs: list[list[int]]) -> list[list[float]]:
        batch = self._batch
        batch.n_tokens = 0
        for seq, tokens in enumerate(inputs):
            for position, token in enumerate(tokens):
                add_to_batch(batch, seq, token, position, True)
        status = int(ll.llama_decode(self._ctx, batch))
        try:
            if status != 0:
                raise RuntimeError(f"the model failed to embed (llama_decode status {status})")
            vectors = []
            for seq in range(len(inputs)):
                values = ll.llama_get_embeddings_seq(self._ctx, seq)[: self._n_embd]
                norm = math.sqrt(sum(v * v for v in values)) or 1.0
                vectors.append([v / norm for v in values])
            return vectors
        finally:
            ll.llama_memory_clear(ll.llama_get_memory(self._ctx), True)
