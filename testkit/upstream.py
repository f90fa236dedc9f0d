"""A fake OpenAI-compatible upstream with fault injection: a real aiohttp server on loopback.

Tests set `upstream.behavior` fields to inject latency, a stream pace, error statuses (500, 429 with
Retry-After), dropped connections and hangs; `upstream.seen` records what arrived. Also runs on its own
for benchmarks: `python -m tests.fakes.upstream --port 9100`.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Behavior:
    """How the next requests are answered; change fields at any time."""

    latency: float = 0.0  # seconds before the answer (or before the first chunk)
    latency_spread: float = 0.0  # and up to this many more, drawn uniformly for each request
    # An LLM's time grows with what it generates: this many seconds more per max_tokens token asked for (16 when
    # a request names none), the whole latency then scaled by a factor drawn in [1 - jitter, 1 + jitter].
    latency_per_token: float = 0.0
    latency_jitter: float = 0.0
    chunks: int = 5  # SSE content chunks per stream
    pace: float = 0.0  # seconds between chunks
    status: int | None = None  # answer every completion with this status and an OpenAI error body
    retry_after: str | None = None  # Retry-After header sent with `status`
    drop: bool = False  # close the connection without answering
    drop_mid_stream: bool = False  # close the connection after the first chunk
    hang: bool = False  # never answer
    raw_body: bytes | None = None  # whole answers: 200 with these bytes as they are, whatever they hold
    hang_mid_event: bool = False  # streams: the first event, half the next, then hang; whole answers: hang
    fail_times: int | None = None  # with `status`: only the next N completions get it, then normal answers
    # A rate limit like OpenAI's: `rate_limit` requests per `rate_period` seconds, refilled continuously;
    # over it, 429 with Retry-After. `rate_headers` adds x-ratelimit-* headers to every answer.
    rate_limit: int | None = None
    rate_period: float = 60.0
    rate_headers: bool = False


@dataclass
class Seen:
    """One completion request as the upstream received it."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float = field(default_factory=time.monotonic)  # when it arrived


@dataclass
class FakeUpstream:
    """Serves /v1/chat/completions, /v1/completions and /v1/models on 127.0.0.1 from a thread of its own."""

    behavior: Behavior = field(default_factory=Behavior)
    seen: list[Seen] = field(default_factory=list)
    active: int = 0  # completions being answered now
    peak: int = 0  # the most completions answered at once
    models: tuple[str, ...] = ("fake-model",)  # what GET /v1/models lists
    # Prompt cache stand-in: the conversation openings (the messages up to the first user message) this
    # upstream has answered; each answer says (`prefix_cache` in its JSON, and the `x-prefix-cache` header)
    # whether it had seen the opening before.
    prefixes: set[bytes] = field(default_factory=set)
    cache_hits: int = 0
    abandoned: int = 0  # completions whose client hung up before the answer ended
    refused: int = 0  # completions refused 429 by the rate limit
    capacity: int | None = None  # the concurrency callers promise to keep to, if any
    over_capacity: int = 0  # completions that arrived while `capacity` were already being answered
    _level: float | None = None  # the rate limit's bucket
    _updated: float = 0.0
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)  # the gateway bounds bodies, not its upstream
        app.router.add_post("/v1/chat/completions", self._completion)
        app.router.add_post("/v1/completions", self._completion)
        app.router.add_post("/v1/embeddings", self._completion)
        app.router.add_get("/v1/models", self._models)
        return app

    async def _models(self, _: web.Request) -> web.Response:
        data = [{"id": model, "object": "model", "owned_by": "tests"} for model in self.models]
        return web.json_response({"object": "list", "data": data})

    def _seen_before(self, body: dict[str, Any]) -> bool:
        messages = body.get("messages")
        if not isinstance(messages, list):
            return False
        opening = next((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"), 0)
        key = orjson.dumps(messages[: opening + 1])
        seen = key in self.prefixes
        self.prefixes.add(key)
        if seen:
            self.cache_hits += 1
        return seen

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        body = await request.json(loads=orjson.loads)
        self.seen.append(Seen(request.path, dict(request.headers), body))
        b = self.behavior
        self.active += 1
        self.peak = max(self.peak, self.active)
        if self.capacity is not None and self.active > self.capacity:
            self.over_capacity += 1
        cached = "hit" if self._seen_before(body) else "miss"
        try:
            if b.hang or (b.hang_mid_event and not body.get("stream")):
                await asyncio.Event().wait()
            if b.latency or b.latency_spread or b.latency_per_token:
                latency = b.latency + random.uniform(0.0, b.latency_spread)
                if b.latency_per_token:
                    latency += b.latency_per_token * (body.get("max_tokens") or 16)
                await asyncio.sleep(latency * random.uniform(1.0 - b.latency_jitter, 1.0 + b.latency_jitter))
            if b.drop:
                assert request.transport is not None
                request.transport.close()
                raise web.HTTPInternalServerError()  # never reaches the client: the socket is closed
            if b.status is not None and (b.fail_times is None or b.fail_times > 0):
                if b.fail_times is not None:
                    b.fail_times -= 1
                headers = {"Retry-After": b.retry_after} if b.retry_after else {}
                return _error(b.status, f"injected {b.status}", headers)
            headers = {"x-prefix-cache": cached}
            if b.rate_limit is not None:
                allowed, limits = self._rate_check(b)
                headers.update(limits)
                if not allowed:
                    self.refused += 1
                    return _error(429, "rate limit reached", headers)
            if body.get("stream"):
                return await self._stream(request, body, headers)
            if b.raw_body is not None:
                return web.Response(body=b.raw_body, content_type="application/json", headers=headers)
            answer = {**_answer(request.path, body), "prefix_cache": cached}
            return web.Response(body=orjson.dumps(answer), content_type="application/json", headers=headers)
        except (asyncio.CancelledError, ConnectionResetError):
            self.abandoned += 1
            raise
        finally:
            self.active -= 1

    def _rate_check(self, b: Behavior) -> tuple[bool, dict[str, str]]:
        """Spend one request of the bucket; whether it was there, and the headers that say what is left."""
        assert b.rate_limit is not None
        now = time.monotonic()
        rate = b.rate_limit / b.rate_period
        if self._level is None:
            self._level = float(b.rate_limit)
        else:
            self._level = min(float(b.rate_limit), self._level + (now - self._updated) * rate)
        self._updated = now
        allowed = self._level >= 1
        if allowed:
            self._level -= 1
        headers = {}
        if b.rate_headers:
            headers = {
                "x-ratelimit-limit-requests": str(b.rate_limit),
                "x-ratelimit-remaining-requests": str(int(self._level)),
                "x-ratelimit-reset-requests": f"{(b.rate_limit - self._level) / rate * 1000:.0f}ms",
            }
        if not allowed:
            headers["Retry-After"] = f"{(1 - self._level) / rate:.3f}"
        return allowed, headers

    async def _stream(self, request: web.Request, body: dict[str, Any], headers: dict[str, str]) -> web.StreamResponse:
        b = self.behavior
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **headers})
        await response.prepare(request)
        chat = request.path.endswith("chat/completions")
        for index in range(b.chunks):
            if index and b.pace:
                await asyncio.sleep(b.pace)
            event = b"data: " + orjson.dumps(_chunk(chat, body, index)) + b"\n\n"
            if b.hang_mid_event and index:
                await response.write(event[: len(event) // 2])
                await asyncio.Event().wait()
            await response.write(event)
            if b.drop_mid_stream:
                assert request.transport is not None
                request.transport.close()
                return response
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    # Running in a thread ---------------------------------------------------------------------------------

    def start(self) -> FakeUpstream:
        """Serve on `port` (a free one the first time; the same one again after stop(), to come back)."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            # handler_cancellation: a client hanging up cancels its handler, so `abandoned` sees it.
            self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
            loop.run_until_complete(self._runner.setup())
            loop.run_until_complete(web.SockSite(self._runner, sock).start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-upstream", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def kill(self) -> None:
        """Die as a crashed server does: every connection reset at once, the port closed (start() revives)."""
        loop, runner = self._loop, self._runner
        if loop is None or runner is None or self._thread is None:
            return

        def abort() -> None:
            server = runner.server
            for handler in list(server.connections if server is not None else ()):
                if handler.transport is not None:
                    handler.transport.abort()
            loop.stop()

        loop.call_soon_threadsafe(abort)
        self._thread.join(10)
        self._loop = self._thread = self._runner = None
        self.active = 0

    def wait_for(self, predicate: Any, timeout: float = 5.0) -> bool:
        """Poll a condition on this upstream's state from a test thread."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return True
            time.sleep(0.01)
        return bool(predicate())


def _error(status: int, message: str, headers: dict[str, str]) -> web.Response:
    error = {"message": message, "type": "fake_error", "param": None, "code": None}
    return web.json_response({"error": error}, status=status, headers=headers)


def _last_text(path: str, body: dict[str, Any]) -> str:
    if path.endswith("chat/completions"):
        content = body["messages"][-1].get("content")
        return content if isinstance(content, str) else ""
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, str) else ""


def _embeddings(body: dict[str, Any]) -> dict[str, Any]:
    """Vectors of 8 numbers derived from each input's text, so equal inputs get equal vectors."""
    value = body.get("input")
    items = (
        [value]
        if isinstance(value, str) or (isinstance(value, list) and value and isinstance(value[0], int))
        else value
    )
    data = []
    for index, item in enumerate(items or []):
        seed = sum(orjson.dumps(item)) + len(str(item))
        data.append(
            {"object": "embedding", "index": index, "embedding": [((seed * (k + 1)) % 97) / 97 for k in range(8)]}
        )
    tokens = sum(len(str(item)) // 4 + 1 for item in items or [])
    return {
        "object": "list",
        "data": data,
        "model": body.get("model", "fake-model"),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _answer(path: str, body: dict[str, Any]) -> dict[str, Any]:
    if path.endswith("/embeddings"):
        return _embeddings(body)
    text = "echo: " + _last_text(path, body)
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    if path.endswith("chat/completions"):
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "fake-model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": usage,
        }
    return {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.get("model", "fake-model"),
        "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
        "usage": usage,
    }


def _chunk(chat: bool, body: dict[str, Any], index: int) -> dict[str, Any]:
    model = body.get("model", "fake-model")
    if chat:
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "delta": {"content": f"tok{index} "}, "finish_reason": None}],
        }
    return {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "text": f"tok{index} ", "finish_reason": None, "logprobs": None}],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible upstream for tests and benchmarks")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--pace", type=float, default=0.0)
    parser.add_argument("--chunks", type=int, default=5)
    args = parser.parse_args()
    upstream = FakeUpstream(behavior=Behavior(latency=args.latency, pace=args.pace, chunks=args.chunks))
    web.run_app(upstream.app(), host="127.0.0.1", port=args.port, access_log=None, handler_cancellation=True)


if __name__ == "__main__":
    main()
