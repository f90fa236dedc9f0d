"""The SSE response of a queued stream, and the watcher that notices a client hanging up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.api.errors import sse_error_event
from app.errors import GatewayError
from app.queue.job import Job
from app.queue.service import CompletionService
from app.schemas import CompletionRequest

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx and friends: do not buffer a live stream
]


# A request still running after this long gets a watcher task; one that finishes sooner never needs one.
# A disconnect is then noticed within this delay plus a loop turn, inside the 100 ms the queue promises.
WATCH_AFTER_SECONDS = 0.05


class DisconnectWatcher:
    """Calls `on_disconnect` soon after the client hangs up, whatever the request is doing then.

    The server would otherwise notice only at its next write, which for a queued request or a slow
    upstream may be minutes away. Watching costs a task per request, so it starts only once the request
    has lived WATCH_AFTER_SECONDS: most proxied requests are answered before that, and pay one timer.
    """

    __slots__ = ("_on_disconnect", "_receive", "_task", "_timer")

    def __init__(self, receive: Receive, on_disconnect: Callable[[], object]):
        self._receive = receive
        self._on_disconnect = on_disconnect
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            WATCH_AFTER_SECONDS, self._start
        )

    def _start(self) -> None:
        self._timer = None
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._on_disconnect()
                return

    def stop(self) -> None:
        """The response is done: stop watching."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()
            self._task = None


class QueuedStreamResponse(Response):
    """Relays a dispatched job's stream; an error after the headers becomes one SSE error event."""

    def __init__(
        self,
        service: CompletionService,
        job: Job,
        request: CompletionRequest,
        chunks: AsyncGenerator[bytes, None],
        watcher: DisconnectWatcher,
        headers: list[tuple[bytes, bytes]],
    ):
        self.status_code = 200
        self.background = None
        self._service = service
        self._job = job
        self._request = request
        self._chunks = chunks
        self._watcher = watcher
        self.raw_headers = [*SSE_HEADERS, *headers]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_chunk(chunk: bytes) -> None:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

        try:
            try:
                await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            except BaseException as exc:
                self._service.release(self._job, exc)
                await self._chunks.aclose()
                raise
            try:
                await self._service.pump(self._job, self._request, self._chunks, send_chunk)
            except GatewayError as exc:
                await send_chunk(sse_error_event(exc))
            except OSError:
                return  # the client is gone; the job is already retired as cancelled
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self._watcher.stop()
