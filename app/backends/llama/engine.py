"""One llama.cpp model and context, owned by one thread: continuous batching over up to n_seq sequences.

Every step, each generating sequence adds its last token to one llama_batch and the earliest placed
prompt fills the rest, short prompts riding along (chunked, so a long prompt never stalls the others for more
than a step); one llama_decode serves them all. A sequence that ends frees its slot at once, so the next
request joins at the next step rather than when the whole batch ends; its KV cells stay for a later prompt
with the same prefix (llama_memory_seq_rm trims them to it). Each sequence has its own KV buffer, so greedy
tokens do not depend on what is batched beside them. ctypes releases the GIL during llama_decode, so the
event loop keeps serving HTTP while the model computes.

Choices (n > 1): the first choice's sequence evaluates the prompt; the others are forks of it. At the step
its prompt's last token is decoded, every fork samples its first token from those same logits with its own
sampler, then takes a slot holding a copy of the prompt's cells: the prompt is evaluated once for all.

Preemption: a sequence asked to park leaves the batch at the next step with everything it has (its tokens,
its pending token, its sampler chain); its cells are copied to one of n_parked parking sequences, freeing its
slot. Resumed, it is copied back into a free slot and goes on from the very token it stopped at, so nothing
is evaluated again and its output is the one it would have produced without the pause.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from app.backends.llama import placement
from app.backends.llama.events import Delta, Done, Embedded, Event, Failed
from app.backends.llama.model import EngineConfig, LlamaModel
from app.backends.llama.sequence import Embedding, Sequence
from app.backends.llama.slots import Slots

log = logging.getLogger("app.backends.llama")

# Receives a step's events as (sequence.sink, event) pairs, on the engine thread. One call per step rather
# than one per sequence: each call wakes the event loop, which then competes with llama.cpp's threads.
Deliver = Callable[[list[tuple[Any, Event]]], None]

# A park makes room for a high-priority request on its way from the queue: the step waits this long at most
# for it to arrive rather than run without it (it is usually there within a millisecond).
URGENT_WAIT_SECONDS = 0.02


class LlamaEngine:
    """The model, its context and the thread that drives them. Thread-safe: submit() and cancel()."""

    def __init__(self, config: EngineConfig, deliver: Deliver):
        self.config = config
        self._deliver = deliver
        self._outbox: list[tuple[Any, Event]] = []
        self._cond = threading.Condition()
        self._inbox: list[Sequence] = []
        self._embeddings: list[Embedding] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        self._model: LlamaModel | None = None
        self.slots = Slots(config.n_seq, config.n_parked)
        self._waiting: deque[Sequence] = deque()
        # Prompt tokens so far, by where their KV cells came from: the model (evaluated) or a slot that held them
        # (reused: the prefix cache, a request's first choice). Written by the engine thread, read by metrics.
        self.prompt_evaluated = 0
        self.prompt_reused = 0

    def load(self) -> None:
        """Start the engine thread, which loads the model (blocking); raises RuntimeError if llama.cpp cannot."""
        loaded = threading.Event()
        failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(loaded, failure), name="llama-engine", daemon=True)
        self._thread.start()
        loaded.wait()
        if failure:
            raise failure[0]

    @property
    def model(self) -> LlamaModel:
        """The loaded model, for its vocabulary and metadata (safe to read from any thread)."""
        if self._model is None:
            raise RuntimeError("LlamaEngine.load() has not succeeded")
        return self._model

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # The request side (any thread) ---------------------------------------------------------------------

    def submit(self, sequence: Sequence, *forks: Sequence) -> None:
        """Start generating; its events go to `deliver` with sequence.sink.

        `forks` are further choices of the same prompt (n > 1), each with its own sampling: the prompt is
        evaluated once, by `sequence`, and each fork goes on from its cells in a slot of its own.
        """
        assert all(fork.prompt == sequence.prompt for fork in forks)
        with self._cond:
            if self._closing:
                self._deliver([(s.sink, Failed("the model is shutting down")) for s in (sequence, *forks)])
                return
            sequence.forks = list(forks)
            self._inbox.append(sequence)
            self._cond.notify()

    def embed(self, embedding: Embedding) -> None:
        """Embed the inputs between two steps (on the engine thread, as every computation is)."""
        with self._cond:
            if self._closing:
                self._deliver([(embedding.sink, Failed("the model is shutting down"))])
                return
            self._embeddings.append(embedding)
            self._cond.notify()

    def cancel(self, sequence: Sequence) -> None:
        """Stop a sequence at the next step and free its slot; it emits nothing more."""
        sequence.cancelled = True
        with self._cond:
            self._cond.notify()

    def park(self, sequence: Sequence) -> None:
        """Take the sequence off the batch at the next step, keeping all it has; it emits nothing until resumed."""
        with self._cond:
            sequence.park_wanted = True
            self._cond.notify()

    def resume(self, sequence: Sequence) -> None:
        """Put a parked sequence back in a slot as soon as one is free (or keep it going if not parked yet)."""
        with self._cond:
            sequence.park_wanted = False
            if sequence.parked:
                self._inbox.append(sequence)
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
            self._model = self.slots.model = model = LlamaModel(self.config)
        except BaseException as exc:
            failure.append(exc)
            return
        finally:
            loaded.set()
        try:
            while True:
                with self._cond:
                    while not (self._inbox or self._embeddings or self.slots.active or self._waiting or self._closing):
                        self._cond.wait()
                    if self._closing:
                        break
                    self._waiting.extend(self._inbox)
                    self._inbox.clear()
                    embeddings, self._embeddings = self._embeddings, []
                for embedding in embeddings:
                    self._embed(embedding)
                self._step()
                self._flush()
        except Exception:  # a bug here must not leave clients waiting forever
            log.exception("the llama.cpp engine thread failed")
        finally:
            with self._cond:
                self._closing = True
                orphans: list[Sequence | Embedding] = [
                    *self.slots.active,
                    *self._waiting,
                    *self._inbox,
                    *self.slots.parked,
                    *self._embeddings,
                ]
                orphans += [fork for s in orphans if isinstance(s, Sequence) for fork in s.forks]
            self._outbox.extend((s.sink, Failed("the model stopped")) for s in orphans if not s.cancelled)
            self._flush()
            model.free()

    def _step(self) -> None:
        slots = self.slots
        slots.copied.clear()
        self._take_in()
        slots.close_gaps()
        model = self.model
        # Every generating sequence adds its one token (that keeps every stream moving) and the prompts in
        # progress share the rest of n_batch (placement.prompt_chunks): the earliest placed first (the queue
        # dispatches by priority), then the short ones along with it. An urgent prompt (high priority) goes
        # first and alone: the others wait that step, so its first token comes about as fast as on an idle
        # model. Tokens go in ascending sequence id: with a KV buffer per sequence, llama.cpp puts into one
        # micro-batch only sequences whose ids follow each other in batch order, and any other order costs a
        # pass over the weights per sequence (measured: 4 streams at 34-39 ms a step out of order, 23 ms in
        # order).
        prompting = slots.prompting
        urgent = next((i for i, s in enumerate(prompting) if s.urgent), None)
        alone = urgent is not None
        room = self.config.n_batch - (0 if alone else sum(s.generating for s in slots.active))
        rests = [len(s.prompt) - s.prefilled for s in prompting]
        chunks = dict(zip(prompting, placement.prompt_chunks(rests, urgent or 0, room, alone), strict=True))
        for sequence in slots.active:  # kept in id order
            if sequence.generating and not alone:
                token = sequence.next_token
                assert token is not None
                position = sequence.prefilled + sequence.generated - 1
                sequence.logit_index = model.add(sequence.id, token, position, True)
                sequence.history.append(token)
                sequence.next_token = None
            elif chunks.get(sequence):
                start = sequence.prefilled
                end = start + chunks[sequence]
                # A fork has its first token already: the prompt's last logits were its leader's.
                last = len(sequence.prompt) - 1 if sequence.next_token is None else -1
                for position in range(start, end):
                    index = model.add(sequence.id, sequence.prompt[position], position, position == last)
                    if position == last:
                        sequence.logit_index = index
                sequence.history.extend(sequence.prompt[start:end])
                sequence.prefilled = end
                self.prompt_evaluated += end - start
                if end == len(sequence.prompt):
                    prompting.remove(sequence)
        if model.batch.n_tokens == 0:
            return
        status = model.decode()
        if status != 0:
            log.error(
                "llama_decode failed with status %d; ending the %d sequences in the batch", status, len(slots.active)
            )
            for sequence in list(slots.active):
                forks, sequence.forks = sequence.forks, []
                self._release(sequence, keep=False)
                for failed in (sequence, *forks):
                    self._emit(failed, Failed(f"the model failed to decode (status {status})"))
            return
        for sequence in list(slots.active):
            index = sequence.logit_index
            if index >= 0:
                if sequence.forks:
                    self._fork(sequence, index)
                self._pick(sequence, index)
                sequence.logit_index = -1

    def _pick(self, sequence: Sequence, index: int) -> None:
        """Sample the sequence's next token from the logits at batch index `index`, and take it."""
        model = self.model
        token = model.sample(sequence.sampler, index, sequence.grammar, sequence.shortlist)
        if sequence.logprobs is not None:
            sequence.pending.append(model.logprob(index, token, sequence.logprobs))
        self._accept(sequence, token)

    def _fork(self, leader: Sequence, index: int) -> None:
        """The leader's prompt is in: each fork samples its first token from the same logits, then waits (at
        the head of the line) for a slot, where it goes on from a copy of the prompt's cells."""
        forks, leader.forks = leader.forks, []
        ready = []
        for fork in forks:
            if fork.cancelled:
                continue
            fork.build_samplers(self.model)
            fork.cached = len(fork.prompt)  # every prompt token was evaluated by the leader
            self._pick(fork, index)
            if fork.next_token is not None:  # it did not end on its first token
                ready.append(fork)
            else:
                self.prompt_reused += len(fork.prompt)  # its leader's, all of it: it never takes a slot
        self._waiting.extendleft(reversed(ready))

    def _embed(self, embedding: Embedding) -> None:
        if embedding.cancelled:
            return
        try:
            self._outbox.append((embedding.sink, Embedded(self.model.embed(embedding.inputs))))
        except RuntimeError as exc:
            log.error("%s", exc)
            self._outbox.append((embedding.sink, Failed(str(exc))))

    def _take_in(self) -> None:
        """Free the slots of cancelled sequences, park those asked to, and place waiting ones in free slots."""
        slots = self.slots
        for sequence in [s for s in slots.active if s.cancelled]:
            self._release(sequence)
        for sequence in [s for s in slots.parked if s.cancelled]:
            self._unpark(sequence)
        parked = False
        for sequence in [s for s in slots.active if s.park_wanted]:
            # Out of parking room, or its cells are a copy this very step: it asks again at the next one.
            if slots.park_ids and sequence.id not in slots.copied:
                parked = self._park(sequence) or parked
        if parked and not any(s.urgent for s in self._waiting):
            with self._cond:
                self._cond.wait_for(lambda: self._closing or any(s.urgent for s in self._inbox), URGENT_WAIT_SECONDS)
                self._waiting.extend(self._inbox)
                self._inbox.clear()
        deferred = []
        while self._waiting and slots.free_ids:
            sequence = self._waiting.popleft()
            if sequence.cancelled:
                self._hand_down(sequence)
                if sequence.parked:
                    self._unpark(sequence)
                else:
                    sequence.free_samplers()  # a fork has its own already
            elif not sequence.parked:
                self.prompt_reused += slots.place(sequence)
            elif sequence.park_id in slots.copied:
                deferred.append(sequence)  # parked this very step: its cells are there only after the decode
            else:
                self._unpark(sequence, min(slots.free_ids))
        self._waiting.extendleft(reversed(deferred))

    def _emit(self, sequence: Sequence, event: Event) -> None:
        self._outbox.append((sequence.sink, event))

    def _flush(self) -> None:
        if self._outbox:
            outbox, self._outbox = self._outbox, []
            self._deliver(outbox)

    def _park(self, sequence: Sequence) -> bool:
        """Take an active sequence off the batch (Slots.park), unless it was resumed before its turn came."""
        with self._cond:
            if not sequence.park_wanted:
                return False  # resumed before its turn to park came: it simply goes on
            sequence.park_wanted = False
            sequence.parked = True
        self.slots.park(sequence)
        return True

    def _unpark(self, sequence: Sequence, slot: int | None = None) -> None:
        """Bring a parked sequence back into `slot` (None: it was cancelled, and only its parking is freed)."""
        with self._cond:
            sequence.parked = False
        self.slots.unpark(sequence, slot)

    def _accept(self, sequence: Sequence, token: int) -> None:
        piece, end = self.model.decoded(token)
        if end:
            if sequence.pending:
                sequence.pending.pop()  # the end token is not part of the answer
            self._finish(sequence, "stop")
            return
        sequence.generated += 1
        text, stopped = sequence.text.feed(piece)
        if text:
            self._text(sequence, text)
        if stopped:
            sequence.pending.clear()
            self._finish(sequence, "stop", flush=False)  # what was held back belongs to the stop string
        elif sequence.generated >= sequence.max_tokens:
            self._finish(sequence, "length")
        else:
            sequence.next_token = token

    def _text(self, sequence: Sequence, text: str) -> None:
        """Emit text, with the logprobs of the tokens fed since the last text (if asked for)."""
        if sequence.pending:
            logprobs, sequence.pending = tuple(sequence.pending), []
            self._emit(sequence, Delta(text, logprobs))
        else:
            self._emit(sequence, Delta(text))

    def _finish(self, sequence: Sequence, reason: str, flush: bool = True) -> None:
        rest = sequence.text.flush() if flush else ""
        if rest or sequence.pending:
            self._text(sequence, rest)
        self._release(sequence)  # before Done: the next request may already be on its way here
        self._emit(sequence, Done(reason, len(sequence.prompt), sequence.generated, sequence.cached))

    def _release(self, sequence: Sequence, keep: bool = True) -> None:
        """Free the sequence's slot (Slots.release), its forks handed down first."""
        self._hand_down(sequence)
        self.slots.release(sequence, keep)

    def _hand_down(self, sequence: Sequence) -> None:
        """A leader cancelled before its prompt was in leaves its forks to the first of them still wanted,
        which then evaluates the prompt itself (next in line)."""
        heirs = [fork for fork in sequence.forks if not fork.cancelled]
        sequence.forks = []
        if heirs:
            heirs[0].forks = heirs[1:]
            self._waiting.appendleft(heirs[0])
