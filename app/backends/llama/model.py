"""One GGUF model with its llama.cpp context, batch and KV memory, behind small typed methods.

Created and used on the engine thread only (tokenize() and the vocabulary reads are safe from any thread:
the vocabulary is read-only). llama.cpp's OpenMP workers belong to the thread that first computes; a second
thread's team left spinning beside the decoding one cost a quarter of the decode speed (measured), so the
thread that decodes also loads, and nothing else ever computes.
"""

from __future__ import annotations

import ctypes
import logging
import math
from dataclasses import dataclass
from typing import Any

import llama_cpp as ll
import numpy as np

from app.backends.llama.batch import add_to_batch
from app.backends.llama.embedder import Embedder
from app.backends.llama.events import TokenLogprob
from app.backends.llama.sampling import grammar_sampler, top_candidates

log = logging.getLogger("app.backends.llama")

_PIECE_BYTES = 256
# ggml_log_level as this llama.cpp sends it (observed: 3 for its warnings); 5 continues the previous line.
_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """What the engine loads and how it runs."""

    model_path: str
    n_ctx: int  # per sequence
    n_seq: int
    n_threads: int
    n_gpu_layers: int
    n_batch: int = 512
    n_parked: int = 0  # sequences that may be parked at once (preemption), each keeping its cells aside
    n_embed: int = 8  # embedding inputs evaluated together in one decode, at most


class LlamaModel:
    """The loaded model, its context (n_seq + n_parked sequences of n_ctx cells each) and one reusable batch."""

    def __init__(self, config: EngineConfig):
        self._log_callback = ll.llama_log_callback(_LogForwarder())  # alive as long as llama.cpp may call it
        ll.llama_log_set(self._log_callback, ctypes.c_void_p(0))
        ll.llama_backend_init()
        self._model: Any = None
        self._ctx: Any = None
        self.batch: Any = None
        model_params = ll.llama_model_default_params()
        model_params.n_gpu_layers = config.n_gpu_layers if config.n_gpu_layers >= 0 else 0x7FFFFFFF
        if uses_amx():
            # ggml's AMX weight layout crashes the first decode on some AMX CPUs (llama.cpp issue 20824, seen
            # here on a Xeon with amx_int8): the weights stay in plain CPU memory there, at the cost of the
            # other repacked layouts too (they speed Q4_0 and Q4_K models up, not the bundled Q4_1).
            model_params.use_extra_bufts = False
        self._model = ll.llama_model_load_from_file(config.model_path.encode(), model_params)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load the model at {config.model_path}")
        self._vocab = ll.llama_model_get_vocab(self._model)
        params = ll.llama_context_default_params()
        params.n_ctx = config.n_ctx * (config.n_seq + config.n_parked)
        params.n_batch = config.n_batch
        params.n_ubatch = config.n_batch
        params.n_seq_max = config.n_seq + config.n_parked
        params.n_threads = config.n_threads
        params.n_threads_batch = config.n_threads
        # A KV buffer per sequence: attention then spans only that sequence's own cells, so a request's
        # greedy tokens do not depend on what else is batched with it (a shared buffer broke that, measured).
        params.kv_unified = False
        self._ctx = ll.llama_init_from_model(self._model, params)
        if not self._ctx:
            self.free()
            raise RuntimeError("llama.cpp could not create a context (out of memory?)")
        self._memory = ll.llama_get_memory(self._ctx)
        self.batch = ll.llama_batch_init(config.n_batch, 0, 1)
        self._piece = ctypes.create_string_buffer(_PIECE_BYTES)
        self._config = config
        self._embedder: Embedder | None = None  # made on the first embedding request
        # The candidates a chain runs over when this class picks them (a shortlist, a grammar), in
        # llama_token_data's layout, made once.
        self._n_vocab = n_vocab = self.vocab_size
        self._candidates = np.zeros(n_vocab, dtype=[("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        self._candidates_data = self._candidates.ctypes.data_as(ctypes.POINTER(ll.llama_token_data))
        self._token_ids = np.arange(n_vocab, dtype=np.int32)
        # Each generated token's bytes and whether it ends generation, looked up once (engine thread).
        self._decoded: dict[int, tuple[bytes, bool]] = {}

    def free(self) -> None:
        """Release the batch, the contexts and the model."""
        if self._embedder is not None:
            self._embedder.free()
            self._embedder = None
        if self.batch is not None:
            ll.llama_batch_free(self.batch)
            self.batch = None
        if self._ctx is not None:
            ll.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            ll.llama_model_free(self._model)
            self._model = None

    # The vocabulary ---------------------------------------------------------------------------------

    def metadata(self, key: str) -> str | None:
        """A GGUF metadata string, such as tokenizer.chat_template."""
        size = ll.llama_model_meta_val_str(self._model, key.encode(), None, 0)
        if size < 0:
            return None
        buffer = ctypes.create_string_buffer(size + 1)
        ll.llama_model_meta_val_str(self._model, key.encode(), buffer, size + 1)
        return buffer.value.decode("utf-8", "replace")

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        """Text to token ids."""
        data = text.encode()
        capacity = len(data) + 16
        tokens = (ll.llama_token * capacity)()
        count = ll.llama_tokenize(self._vocab, data, len(data), tokens, capacity, add_special, True)
        if count < 0:  # the buffer was too small: -count is the size needed
            capacity = -count
            tokens = (ll.llama_token * capacity)()
            count = ll.llama_tokenize(self._vocab, data, len(data), tokens, capacity, add_special, True)
        return list(tokens[:count])

    def token_text(self, token: int) -> str:
        """A special token's text, such as the BOS and EOS strings chat templates use."""
        buffer = ctypes.create_string_buffer(_PIECE_BYTES)
        size = ll.llama_token_to_piece(self._vocab, token, buffer, _PIECE_BYTES, 0, True)
        return buffer.raw[: max(size, 0)].decode("utf-8", "replace")

    def detokenize(self, tokens: list[int]) -> str:
        """Token ids back to text, special tokens as text too (safe from any thread: its own buffer)."""
        array = (ll.llama_token * len(tokens))(*tokens)
        capacity = 8 * len(tokens) + 16
        buffer = ctypes.create_string_buffer(capacity)
        size = ll.llama_detokenize(self._vocab, array, len(tokens), buffer, capacity, False, False)
        if size < 0:  # the buffer was too small: -size is the size needed
            capacity = -size
            buffer = ctypes.create_string_buffer(capacity)
            size = ll.llama_detokenize(self._vocab, array, len(tokens), buffer, capacity, False, False)
        return buffer.raw[: max(size, 0)].decode("utf-8", "replace")

    def piece(self, token: int) -> bytes:
        """A generated token's bytes (engine thread: one buffer is reused)."""
        size = ll.llama_token_to_piece(self._vocab, token, self._piece, _PIECE_BYTES, 0, False)
        return self._piece.raw[: max(size, 0)]

    def is_end(self, token: int) -> bool:
        """Whether the token ends generation (end of text, end of turn)."""
        return bool(ll.llama_vocab_is_eog(self._vocab, token))

    def decoded(self, token: int) -> tuple[bytes, bool]:
        """A generated token's bytes and whether it ends generation, remembered (engine thread: two calls into
        llama.cpp per token of every stream otherwise)."""
        known = self._decoded.get(token)
        if known is None:
            known = self._decoded[token] = (self.piece(token), self.is_end(token))
        return known

    @property
    def bos_token(self) -> int:
        return int(ll.llama_vocab_bos(self._vocab))

    @property
    def eos_token(self) -> int:
        return int(ll.llama_vocab_eos(self._vocab))

    @property
    def vocab(self) -> Any:
        """llama.cpp's vocabulary (read-only: safe from any thread), for grammars."""
        return self._vocab

    def parses(self, grammar: str) -> bool:
        """Whether llama.cpp accepts a GBNF grammar (checked before a request waits, on any thread)."""
        sampler = grammar_sampler(self._vocab, grammar)
        if sampler is None:
            return False
        ll.llama_sampler_free(sampler)
        return True

    @property
    def vocab_size(self) -> int:
        return int(ll.llama_vocab_n_tokens(self._vocab))

    @property
    def n_embd(self) -> int:
        """The length of the model's embedding vectors."""
        return int(ll.llama_model_n_embd(self._model))

    # Embeddings -------------------------------------------------------------------------------------

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """Each input's vector (mean of its tokens' states, of unit length), n_embed inputs per decode."""
        if self._embedder is None:
            config = self._config
            self._embedder = Embedder(self._model, config.n_ctx, config.n_embed, config.n_threads)
        return self._embedder.embed(inputs)

    # Decoding and the KV memory ---------------------------------------------------------------------

    def add(self, slot: int, token: int, position: int, logits: bool) -> int:
        """Append a token of sequence `slot` to the batch; its index there."""
        return add_to_batch(self.batch, slot, token, position, logits)

    def decode(self) -> int:
        """Run the batch (0 on success, llama.cpp's status otherwise) and empty it for the next step."""
        status = int(ll.llama_decode(self._ctx, self.batch))
        self.batch.n_tokens = 0
        return status

    def sample(self, sampler: Any, index: int, grammar: Any = None, shortlist: int | None = None) -> int:
        """The next token from the logits at batch index `index`, by the chain `sampler` and, if given, within
        `grammar`.

        A chain that looks at the `shortlist` largest logits only (sampling.shortlist) runs over the few
        candidates that hold them (greedy: the largest is the token), not the whole vocabulary: the same token
        in less time (measured in the engine, 4 streams: greedy 98 -> 14 us a token, top_k 40 85 -> 64 us).

        With a grammar, as llama-server does it: the chain picks from every candidate, and only a token the
        grammar refuses sends the grammar over the whole vocabulary (its costly step) before the chain picks
        again. Greedy, the token is the one the grammar-first chain would pick; most tokens never pay for the
        grammar (measured: a JSON schema's overhead from 46% of the tokens per second down to a few).
        """
        if grammar is None:
            if shortlist is None:
                return int(ll.llama_sampler_sample(sampler, self._ctx, index))
            logits = self._logits(index)
            if shortlist == 1:
                return int(logits.argmax())  # the first of equal largest, as llama.cpp's greedy sampler takes
            ids = top_candidates(logits, shortlist)
            if ids is None:
                return int(ll.llama_sampler_sample(sampler, self._ctx, index))
            token = self._pick(sampler, logits, None, ids)
            ll.llama_sampler_accept(sampler, token)
            return token
        logits = self._logits(index)
        token = self._pick(sampler, logits, None)
        if not self._allows(grammar, token):
            token = self._pick(sampler, logits, grammar)
        ll.llama_sampler_accept(grammar, token)
        ll.llama_sampler_accept(sampler, token)
        return token

    def _logits(self, index: int) -> np.ndarray[Any, Any]:
        """The logits at batch index `index`, in llama.cpp's own buffer (valid until the next decode)."""
        return np.ctypeslib.as_array(ll.llama_get_logits_ith(self._ctx, index), shape=(self._n_vocab,))

    def _pick(
        self, sampler: Any, logits: np.ndarray[Any, Any], grammar: Any, ids: np.ndarray[Any, Any] | None = None
    ) -> int:
        """Run the chain (after `grammar`, if given) over the candidates `ids` (None: every token); the token it
        selects."""
        candidates = self._candidates
        if ids is None:  # samplers sort and cut the array in place: each pick starts afresh
            size = len(candidates)
            candidates["id"] = self._token_ids
            candidates["logit"] = logits
        else:
            size = len(ids)
            candidates["id"][:size] = ids
            candidates["logit"][:size] = logits[ids]
        candidates["p"][:size] = 0.0
        array = ll.llama_token_data_array(data=self._candidates_data, size=size, selected=-1, sorted=False)
        if grammar is not None:
            ll.llama_sampler_apply(grammar, ctypes.byref(array))
        ll.llama_sampler_apply(sampler, ctypes.byref(array))
        return int(candidates["id"][array.selected])

    def _allows(self, grammar: Any, token: int) -> bool:
        """Whether the grammar, where it stands, lets `token` come next."""
        single = ll.llama_token_data(id=token, logit=1.0, p=0.0)
        array = ll.llama_token_data_array(data=ctypes.pointer(single), size=1, selected=-1, sorted=False)
        ll.llama_sampler_apply(grammar, ctypes.byref(array))
        return bool(single.logit != -math.inf)

    def logprob(self, index: int, token: int, top: int) -> TokenLogprob:
        """`token`'s log-probability under the logits at batch index `index` (before any sampling setting), and
        the `top` most likely tokens' (numpy: a pass over the vocabulary in C, not in Python)."""
        pointer = ll.llama_get_logits_ith(self._ctx, index)
        logits = np.ctypeslib.as_array(pointer, shape=(self.vocab_size,))
        peak = float(logits.max())
        total = peak + math.log(float(np.exp(logits - peak).sum()))
        best: tuple[tuple[bytes, float], ...] = ()
        if top:
            ids = np.argpartition(logits, -top)[-top:]
            ids = ids[np.argsort(-logits[ids], kind="stable")]
            best = tuple((self.piece(int(i)), float(logits[i]) - total) for i in ids)
        return TokenLogprob(self.piece(token), float(logits[token]) - total, best)

    def clear(self, slot: int) -> None:
        """Forget every cell of a slot."""
        ll.llama_memory_seq_rm(self._memory, slot, -1, -1)

    def cut(self, slot: int, keep: int) -> bool:
        """Keep a slot's first `keep` cells; False if this memory cannot cut a sequence."""
        return bool(ll.llama_memory_seq_rm(self._memory, slot, keep, -1))

    def copy(self, source: int, target: int) -> None:
        """Give `target` a copy of every cell of `source` (clear `target` first)."""
        ll.llama_memory_seq_cp(self._memory, source, target, -1, -1)


def uses_amx() -> bool:
    """Whether this build of llama.cpp uses the CPU's AMX units (then the weights stay in plain CPU memory)."""
    return b"AMX_INT8 = 1" in ll.llama_print_system_info()


class _LogForwarder:
    """llama.cpp's own log lines into ours: its chatter at debug, its warnings and errors as such."""

    def __init__(self) -> None:
        self._last = logging.DEBUG  # the level a continuation line (5) takes

    def __call__(self, level: int, text: bytes, _: Any) -> None:
        severity = self._last if level == 5 else _LEVELS.get(level, logging.DEBUG)
        self._last = severity
        message = text.decode("utf-8", "replace").rstrip()
        if message:
            log.log(severity, "%s", message)
