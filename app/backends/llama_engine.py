"""One llama.cpp model and context, owned by one thread: continuous batching over up to n_seq sequences.

Every step, each generating sequence adds its last token to one llama_batch and the earliest admitted
prompt fills the rest (chunked, so a long prompt never stalls the others for more than a step); one
llama_decode serves them all. A sequence that ends frees its slot at once, so the next request joins at the
next step rather than when the whole batch ends; its KV cells stay for a later prompt with the same prefix
(llama_memory_seq_rm trims them to it). Each sequence has its own KV buffer, so greedy tokens do not depend
on what is batched beside them. ctypes releases the GIL during llama_decode, so the event loop keeps
serving HTTP while the model computes.
"""

from __future__ import annotations

import bisect
import codecs
import ctypes
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import llama_cpp as ll

log = logging.getLogger("app.backends.llama")

# Events for a sequence: ("delta", text) any number of times, then exactly one of
# ("done", finish_reason, prompt_tokens, completion_tokens, cached_prompt_tokens) or ("error", message).
Event = tuple[Any, ...]
# Receives a step's events as (sequence.sink, event) pairs, on the engine thread. One call per step rather
# than one per sequence: each call wakes the event loop, which then competes with llama.cpp's threads.
Deliver = Callable[[list[tuple[Any, Event]]], None]

_PENALTY_LAST_N = 64  # tokens the repetition penalties look back over (llama.cpp's default)
_PIECE_BYTES = 256
# Copying another slot's KV buffer costs about what evaluating this many prompt tokens does (measured with
# the bundled model: a 47 MB buffer in ~5 ms, prompts at ~250 tokens/s on 2 cores); below it, evaluate.
_MIN_COPY_TOKENS = 16
_PREFIX_BLOCK = 256


@dataclass(frozen=True, slots=True)
class Sampling:
    """How one sequence picks its tokens; temperature 0 is greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0


class StopText:
    """Turns token bytes into text deltas, holding back what could still become a stop string."""

    __slots__ = ("_decoder", "_pending", "_stops")

    def __init__(self, stops: tuple[str, ...]):
        self._stops = stops
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = ""

    def feed(self, data: bytes) -> tuple[str, bool]:
        """Text safe to send now, and whether a stop string was reached (its text is never sent)."""
        self._pending += self._decoder.decode(data)
        pending = self._pending
        if not self._stops:
            self._pending = ""
            return pending, False
        cut = min((i for i in (pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            return pending[:cut], True
        hold = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(pending)), hold, -1):
                if pending.endswith(stop[:size]):
                    hold = size
                    break
        self._pending = pending[len(pending) - hold :]
        return pending[: len(pending) - hold], False

    def flush(self) -> str:
        """Whatever is left once generation ends without a stop string."""
        rest = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return rest


class Sequence:
    """One request's generation. Its fields belong to the engine thread once submitted."""

    __slots__ = (
        "cached",
        "cancelled",
        "generated",
        "history",
        "id",
        "logit_index",
        "max_tokens",
        "next_token",
        "prefilled",
        "prompt",
        "sampler",
        "sampling",
        "sink",
        "text",
    )

    def __init__(
        self,
        prompt: list[int],
        sampling: Sampling,
        max_tokens: int,
        stops: tuple[str, ...],
        sink: Any,
    ):
        self.prompt = prompt
        self.sampling = sampling
        self.max_tokens = max_tokens
        self.text = StopText(stops)
        self.sink = sink  # where this sequence's events go; opaque to the engine
        self.cancelled = False
        self.id = -1
        self.prefilled = 0
        self.generated = 0
        self.next_token: int | None = None
        self.logit_index = -1
        self.sampler: Any = None
        self.cached = 0  # prompt tokens whose KV was reused from the previous request on this id
        self.history: list[int] = []  # tokens decoded into this sequence's KV cells


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """What the engine loads and how it runs."""

    model_path: str
    n_ctx: int  # per sequence
    n_seq: int
    n_threads: int
    n_gpu_layers: int
    n_batch: int = 512


class LlamaEngine:
    """The model, its context and the thread that drives them. Thread-safe: submit() and cancel()."""

    def __init__(self, config: EngineConfig, deliver: Deliver):
        self.config = config
        self._deliver = deliver
        self._outbox: list[tuple[Any, Event]] = []
        self._cond = threading.Condition()
        self._inbox: list[Sequence] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        self._model: Any = None
        self._ctx: Any = None
        self._vocab: Any = None
        self._memory: Any = None
        self._batch: Any = None
        self._piece = ctypes.create_string_buffer(_PIECE_BYTES)
        self._free_ids: list[int] = []
        # Per sequence id, the tokens in its KV cells (an active sequence's history, or what the last one
        # left): a new request evaluates only what no slot holds yet (chat requests repeat a system prompt).
        self._resident: list[list[int]] = []
        self._copied: set[int] = set()
        self._active: list[Sequence] = []  # in id order
        self._prompting: deque[Sequence] = deque()  # active sequences whose prompt is not all in, in admission order
        self._waiting: deque[Sequence] = deque()
        # Keep the ctypes callback alive as long as llama.cpp may call it.
        self._log_callback = ll.llama_log_callback(_forward_log)

    # Loading (blocking: call from a worker thread) ----------------------------------------------------

    def load(self) -> None:
        """Start the engine thread, which loads the model; raises RuntimeError if llama.cpp cannot."""
        loaded = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(loaded, failure), name="llama-engine", daemon=True)
        self._thread.start()
        loaded.wait()
        if failure:
            raise failure[0]

    def _load(self) -> None:
        # Runs on the engine thread. llama.cpp's OpenMP workers belong to the thread that first computes; a
        # second thread's team left spinning beside the decoding one cost a quarter of the decode speed
        # (measured), so the thread that decodes also loads, and nothing else ever computes.
        ll.llama_log_set(self._log_callback, ctypes.c_void_p(0))
        ll.llama_backend_init()
        model_params = ll.llama_model_default_params()
        model_params.n_gpu_layers = self.config.n_gpu_layers if self.config.n_gpu_layers >= 0 else 0x7FFFFFFF
        self._model = ll.llama_model_load_from_file(self.config.model_path.encode(), model_params)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load the model at {self.config.model_path}")
        self._vocab = ll.llama_model_get_vocab(self._model)
        params = ll.llama_context_default_params()
        params.n_ctx = self.config.n_ctx * self.config.n_seq
        params.n_batch = self.config.n_batch
        params.n_ubatch = self.config.n_batch
        params.n_seq_max = self.config.n_seq
        params.n_threads = self.config.n_threads
        params.n_threads_batch = self.config.n_threads
        # A KV buffer per sequence: attention then spans only that sequence's own cells, so a request's
        # greedy tokens do not depend on what else is batched with it (a shared buffer broke that, measured).
        params.kv_unified = False
        self._ctx = ll.llama_init_from_model(self._model, params)
        if not self._ctx:
            raise RuntimeError("llama.cpp could not create a context (out of memory?)")
        self._memory = ll.llama_get_memory(self._ctx)
        self._batch = ll.llama_batch_init(self.config.n_batch, 0, 1)
        self._free_ids = list(range(self.config.n_seq))
        self._resident = [[] for _ in range(self.config.n_seq)]

    def _unload(self) -> None:
        if self._batch is not None:
            ll.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            ll.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            ll.llama_model_free(self._model)
            self._model = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def metadata(self, key: str) -> str | None:
        """A GGUF metadata string, such as tokenizer.chat_template."""
        size = ll.llama_model_meta_val_str(self._model, key.encode(), None, 0)
        if size < 0:
            return None
        buffer = ctypes.create_string_buffer(size + 1)
        ll.llama_model_meta_val_str(self._model, key.encode(), buffer, size + 1)
        return buffer.value.decode("utf-8", "replace")

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        """Text to token ids (thread-safe: the vocabulary is read-only)."""
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

    @property
    def bos_token(self) -> int:
        return int(ll.llama_vocab_bos(self._vocab))

    @property
    def eos_token(self) -> int:
        return int(ll.llama_vocab_eos(self._vocab))

    @property
    def vocab_size(self) -> int:
        return int(ll.llama_vocab_n_tokens(self._vocab))

    # The request side (any thread) ---------------------------------------------------------------------

    def submit(self, sequence: Sequence) -> None:
        """Start generating; its events go to `deliver` with sequence.sink."""
        with self._cond:
            if self._closing:
                self._deliver([(sequence.sink, ("error", "the model is shutting down"))])
                return
            self._inbox.append(sequence)
            self._cond.notify()

    def cancel(self, sequence: Sequence) -> None:
        """Stop a sequence at the next step and free its slot; it emits nothing more."""
        sequence.cancelled = True
        with self._cond:
            self._cond.notify()

    def close(self) -> None:
        """Stop the thread and free the model (blocking)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(30)

    # The engine thread --------------------------------------------------------------------------------

    def _run(self, loaded: threading.Event, failure: list[BaseException]) -> None:
        try:
            self._load()
        except BaseException as exc:
            failure.append(exc)
            self._unload()
            return
        finally:
            loaded.set()
        try:
            while True:
                with self._cond:
                    while not self._inbox and not self._active and not self._waiting and not self._closing:
                        self._cond.wait()
                    if self._closing:
                        break
                    self._waiting.extend(self._inbox)
                    self._inbox.clear()
                self._step()
                self._flush()
        except Exception:  # a bug here must not leave clients waiting forever
            log.exception("the llama.cpp engine thread failed")
        finally:
            with self._cond:
                self._closing = True
                orphans = [*self._active, *self._waiting, *self._inbox]
            self._outbox.extend((s.sink, ("error", "the model stopped")) for s in orphans if not s.cancelled)
            self._flush()
            self._unload()

    def _step(self) -> None:
        self._copied.clear()
        for sequence in [s for s in self._active if s.cancelled]:
            self._release(sequence)
        while self._waiting and self._free_ids:
            sequence = self._waiting.popleft()
            if not sequence.cancelled:
                self._admit(sequence)
        self._close_gaps()
        batch = self._batch
        batch.n_tokens = 0
        # Every generating sequence adds its one token (that keeps every stream moving) and one prompt, the
        # earliest admitted (the queue admits by priority), gets the rest of n_batch: a request's first
        # token then waits for its own prompt only, not for prompts that arrived with it. Tokens go in
        # ascending sequence id: with a KV buffer per sequence, llama.cpp puts into one micro-batch only
        # sequences whose ids follow each other in batch order, and any other order costs a pass over the
        # weights per sequence (measured: 4 streams at 34-39 ms a step out of order, 23 ms in order).
        prompting = self._prompting[0] if self._prompting else None
        room = self.config.n_batch - sum(s.next_token is not None for s in self._active)
        for sequence in self._active:  # kept in id order
            if sequence.next_token is not None:
                self._add(sequence, sequence.next_token, sequence.prefilled + sequence.generated - 1, True)
                sequence.history.append(sequence.next_token)
                sequence.next_token = None
            elif sequence is prompting:
                start = sequence.prefilled
                end = min(start + room, len(sequence.prompt))
                last = len(sequence.prompt) - 1
                for position in range(start, end):
                    self._add(sequence, sequence.prompt[position], position, position == last)
                sequence.history.extend(sequence.prompt[start:end])
                sequence.prefilled = end
                if end == len(sequence.prompt):
                    self._prompting.popleft()
        if batch.n_tokens == 0:
            return
        status = ll.llama_decode(self._ctx, batch)
        if status != 0:
            log.error(
                "llama_decode failed with status %d; ending the %d sequences in the batch", status, len(self._active)
            )
            for sequence in list(self._active):
                self._release(sequence, keep=False)
                self._emit(sequence, ("error", f"the model failed to decode (status {status})"))
            return
        for sequence in list(self._active):
            if sequence.logit_index >= 0:
                token = ll.llama_sampler_sample(sequence.sampler, self._ctx, sequence.logit_index)
                sequence.logit_index = -1
                self._accept(sequence, token)

    def _emit(self, sequence: Sequence, event: Event) -> None:
        self._outbox.append((sequence.sink, event))

    def _flush(self) -> None:
        if self._outbox:
            outbox, self._outbox = self._outbox, []
            self._deliver(outbox)

    def _add(self, sequence: Sequence, token: int, position: int, logits: bool) -> None:
        batch = self._batch
        index = batch.n_tokens
        batch.token[index] = token
        batch.pos[index] = position
        batch.n_seq_id[index] = 1
        batch.seq_id[index][0] = sequence.id
        batch.logits[index] = logits
        if logits:
            sequence.logit_index = index
        batch.n_tokens = index + 1

    def _admit(self, sequence: Sequence) -> None:
        prompt = sequence.prompt
        # How much of the prompt each slot's cells hold. The last prompt token is always evaluated: its logits
        # give the first generated token.
        held = [min(_common_prefix(tokens, prompt), len(prompt) - 1) for tokens in self._resident]
        taken = [s.id for s in self._active]
        # Fewest runs of consecutive ids first (each run is a micro-batch, a pass over the weights, at every
        # step while they generate), then the longest resident prefix (paid once), then the lowest id.
        best = min(self._free_ids, key=lambda seq_id: (_runs([*taken, seq_id]), -held[seq_id], seq_id))
        self._free_ids.remove(best)
        shared = held[best]
        # A slot filled by a copy this step holds its cells only once the next decode has run.
        donors = [seq_id for seq_id in range(len(held)) if seq_id != best and seq_id not in self._copied]
        donor = max(donors, key=held.__getitem__, default=-1)
        if donor >= 0 and held[donor] - shared >= _MIN_COPY_TOKENS:
            # Another slot holds more of this prompt (a system prompt most often): copying its KV buffer
            # costs about what evaluating a few tokens does, so take its cells and cut them to the prefix.
            ll.llama_memory_seq_rm(self._memory, best, -1, -1)
            ll.llama_memory_seq_cp(self._memory, donor, best, -1, -1)
            self._copied.add(best)
            shared = held[donor]
        if not ll.llama_memory_seq_rm(self._memory, best, shared, -1):
            ll.llama_memory_seq_rm(self._memory, best, -1, -1)  # this memory cannot cut a sequence: start over
            shared = 0
        sequence.id = best
        sequence.prefilled = sequence.cached = shared
        sequence.history = self._resident[best] = prompt[:shared]
        sequence.sampler = _sampler_chain(sequence.sampling)
        bisect.insort(self._active, sequence, key=_by_id)
        self._prompting.append(sequence)

    def _close_gaps(self) -> None:
        """Move the highest sequence into the gaps between active ids: one run of ids, one micro-batch.

        A move copies one KV buffer (about 5 ms with the bundled model); a gap costs a micro-batch (about
        as much) at every step until it closes.
        """
        while self._active and self._active[-1].id - self._active[0].id >= len(self._active):
            sequence = self._active.pop()
            hole = min(seq_id for seq_id in self._free_ids if seq_id > self._active[0].id)
            ll.llama_memory_seq_rm(self._memory, hole, -1, -1)
            ll.llama_memory_seq_cp(self._memory, sequence.id, hole, -1, -1)
            ll.llama_memory_seq_rm(self._memory, sequence.id, -1, -1)
            self._free_ids.remove(hole)
            self._free_ids.append(sequence.id)
            self._resident[sequence.id] = []
            self._resident[hole] = sequence.history
            self._copied.add(hole)
            sequence.id = hole
            bisect.insort(self._active, sequence, key=_by_id)

    def _accept(self, sequence: Sequence, token: int) -> None:
        if ll.llama_vocab_is_eog(self._vocab, token):
            self._finish(sequence, "stop")
            return
        sequence.generated += 1
        size = ll.llama_token_to_piece(self._vocab, token, self._piece, _PIECE_BYTES, 0, False)
        text, stopped = sequence.text.feed(self._piece.raw[: max(size, 0)])
        if text:
            self._emit(sequence, ("delta", text))
        if stopped:
            self._finish(sequence, "stop", flush=False)  # what was held back belongs to the stop string
        elif sequence.generated >= sequence.max_tokens:
            self._finish(sequence, "length")
        else:
            sequence.next_token = token

    def _finish(self, sequence: Sequence, reason: str, flush: bool = True) -> None:
        rest = sequence.text.flush() if flush else ""
        if rest:
            self._emit(sequence, ("delta", rest))
        self._release(sequence)  # before "done": the next request may already be on its way here
        self._emit(sequence, ("done", reason, len(sequence.prompt), sequence.generated, sequence.cached))

    def _release(self, sequence: Sequence, keep: bool = True) -> None:
        """Free the slot; its KV cells stay for a request with the same prefix unless `keep` is False."""
        if not keep:
            ll.llama_memory_seq_rm(self._memory, sequence.id, -1, -1)
            self._resident[sequence.id] = []
        ll.llama_sampler_free(sequence.sampler)
        sequence.sampler = None
        self._active.remove(sequence)
        if sequence.prefilled < len(sequence.prompt):
            self._prompting.remove(sequence)
        self._free_ids.append(sequence.id)


def _by_id(sequence: Sequence) -> int:
    return sequence.id


def _runs(ids: list[int]) -> int:
    """How many runs of consecutive numbers a set of sequence ids makes."""
    ordered = sorted(ids)
    return sum(1 for index, seq_id in enumerate(ordered) if index == 0 or seq_id != ordered[index - 1] + 1)


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two lists share.

    Runs on the engine thread for every slot at every admission: whole blocks are compared as slices (in C),
    and only the block with the first difference token by token.
    """
    limit = min(len(a), len(b))
    index = 0
    while index + _PREFIX_BLOCK <= limit and a[index : index + _PREFIX_BLOCK] == b[index : index + _PREFIX_BLOCK]:
        index += _PREFIX_BLOCK
    while index < limit and a[index] == b[index]:
        index += 1
    return index


def _sampler_chain(sampling: Sampling) -> Any:
    chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
    add = ll.llama_sampler_chain_add
    if sampling.repeat_penalty != 1.0 or sampling.frequency_penalty or sampling.presence_penalty:
        # The bindings declare an old five-argument signature (n_vocab first); llama.cpp now takes four.
        # Passing the look-back in both integer places is right under either.
        add(
            chain,
            ll.llama_sampler_init_penalties(
                _PENALTY_LAST_N,
                _PENALTY_LAST_N,
                sampling.repeat_penalty,
                sampling.frequency_penalty,
                sampling.presence_penalty,
            ),
        )
    if sampling.temperature <= 0:
        add(chain, ll.llama_sampler_init_greedy())
        return chain
    if sampling.top_k > 0:
        add(chain, ll.llama_sampler_init_top_k(sampling.top_k))
    if sampling.top_p < 1.0:
        add(chain, ll.llama_sampler_init_top_p(sampling.top_p, 1))
    if sampling.min_p > 0.0:
        add(chain, ll.llama_sampler_init_min_p(sampling.min_p, 1))
    add(chain, ll.llama_sampler_init_temp(sampling.temperature))
    add(
        chain,
        ll.llama_sampler_init_dist(ll.LLAMA_DEFAULT_SEED if sampling.seed is None else sampling.seed & 0xFFFFFFFF),
    )
    return chain


# ggml_log_level as this llama.cpp sends it (observed: 3 for its warnings); 5 continues the previous line.
_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_last_level = [logging.DEBUG]


def _forward_log(level: int, text: bytes, _: Any) -> None:
    """llama.cpp's own log lines into ours: its chatter at debug, its warnings and errors as such."""
    severity = _last_level[0] if level == 5 else _LEVELS.get(level, logging.DEBUG)
    _last_level[0] = severity
    message = text.decode("utf-8", "replace").rstrip()
    if message:
        log.log(severity, "%s", message)
