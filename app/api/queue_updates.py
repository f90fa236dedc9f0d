"""Live queue position on a stream (X-Queue-Updates: true): the response starts at once and, while the request
waits, SSE comment lines say where it stands; SSE clients (the openai SDK among them) skip comments."""

from __future__ import annotations

import time

from starlette.types import Send

from app.queue.job import Job
from app.queue.scheduler import Scheduler
from app.types import Priority

TICK_SECONDS = 0.25  # the most often a position is reported
KEEP_ALIVE_SECONDS = 10.0  # a comment at least this often, so proxies and clients keep the connection
_KEEP_ALIVE = b": keep-alive\n\n"


def wanted(header: str | None) -> bool:
    """Whether the X-Queue-Updates header asks for updates."""
    return header is not None and header.strip().lower() in ("true", "1", "yes", "on")


class QueueUpdates:
    """Waits for a request's slot while telling its client, in comments, its position and ETA when they change.

    Passed to CompletionService.run as its way of waiting: it starts the response (200, `headers`) before the
    first comment, so `started` tells the caller that what fails after it must be an SSE error event.
    """

    __slots__ = ("_headers", "_scheduler", "_send", "started")

    def __init__(self, scheduler: Scheduler, send: Send, headers: list[tuple[bytes, bytes]]):
        self._scheduler = scheduler
        self._send = send
        self._headers = headers
        self.started = False

    async def __call__(self, job: Job) -> None:
        await self._send({"type": "http.response.start", "status": 200, "headers": self._headers})
        self.started = True
        reported: tuple[int | None, Priority] | None = None
        last_sent = time.monotonic()
        while True:
            place = (self._scheduler.waiting_room.position(job), Priority.at(job.rank))
            now = time.monotonic()
            if place != reported and place[0] is not None:
                await self._body(self._comment(job, *place))
                reported, last_sent = place, now
            elif now - last_sent >= KEEP_ALIVE_SECONDS:
                await self._body(_KEEP_ALIVE)
                last_sent = now
            if await job.dispatched_within(TICK_SECONDS):
                return

    def _comment(self, job: Job, position: int | None, level: Priority) -> bytes:
        eta = self._scheduler.eta(job)
        eta_ms = "" if eta is None else f" eta_ms={round(eta * 1000)}"
        return f": queue position={position}{eta_ms} priority={level.value}\n\n".encode()

    async def _body(self, chunk: bytes) -> None:
        await self._send({"type": "http.response.body", "body": chunk, "more_body": True})
