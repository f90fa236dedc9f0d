"""A batch's lines through the queue: each line runs at Priority.BATCH until it has an answer, then commits it.

BATCH_MAX_IN_FLIGHT lines are queued or running at once, all batches together. A refusal before a line
reached a backend (a rate limit, an open breaker, a full upstream) is not its answer: the line waits and goes
again. What a backend answered, 2xx or not, is the line's result, committed when it ends; a line whose batch
stops first is left without one (the next start runs it, unless the batch has ended).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from app.backends.base import BackendResponse
from app.batches import objects
from app.batches.objects import COMPLETED, FAILED
from app.batches.store import Line, Store
from app.errors import (
    BackendNotReady,
    GatewayError,
    InvalidRequest,
    RequestTimeout,
    RetryLater,
    ShuttingDown,
    UpstreamHTTPError,
)
from app.limits.keys import KeyAccount
from app.metrics import Metrics
from app.queue.job import Job
from app.queue.service import CompletionService
from app.schemas import COMPLETION_ROUTES, parse_completion_request
from app.settings import Settings
from app.types import CompletionKind, Priority

_RETRY_SECONDS = 1.0  # a line refused without a Retry-After goes again after this long


class Run:
    """A batch being worked on: its record, the jobs of its lines in the queue, and why it stops (if it does)."""

    __slots__ = ("jobs", "owner", "record", "stop", "task")

    def __init__(self, owner: str, record: dict[str, Any]):
        self.owner = owner
        self.record = record
        self.jobs: dict[int, Job] = {}
        self.stop: str | None = None  # CANCELLED, EXPIRED, or "shutdown" (the lines stay for the next start)
        self.task: asyncio.Task[None] | None = None

    @property
    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = self.record["request_counts"]
        return counts


class Stopped(RequestTimeout):
    """What a line's request is stopped with when its batch expires or is cancelled."""


class LineSender:
    """Sends the lines of every running batch through the completion service and commits their answers."""

    def __init__(
        self,
        store: Store,
        service: CompletionService,
        settings: Settings,
        account: Callable[[str], KeyAccount | None],
        metrics: Metrics,
        clock: Callable[[], float],
    ):
        self._store = store
        self._service = service
        self._settings = settings
        self._account = account  # the account of an owner's key; raises Unauthorized if it is gone
        self._metrics = metrics
        self._clock = clock
        self._slots = asyncio.Semaphore(settings.batch_max_in_flight)

    async def execute(self, run: Run) -> None:
        """Send the lines without a result through the queue, BATCH_MAX_IN_FLIGHT at most across batches."""
        record = run.record
        counts = await self._store.line_counts(record["id"])
        run.counts.update(completed=counts.get(COMPLETED, 0), failed=counts.get(FAILED, 0))
        kind = COMPLETION_ROUTES[record["endpoint"]]
        tasks: set[asyncio.Task[None]] = set()
        try:
            async with contextlib.aclosing(self._store.pending_lines(record["id"])) as pages:
                await self._send(run, pages, kind, tasks)
            while tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for task in tasks:
                task.cancel()

    async def _send(
        self, run: Run, pages: AsyncIterator[list[Line]], kind: CompletionKind, tasks: set[asyncio.Task[None]]
    ) -> None:
        """Start a task per line as slots free, until the lines run out or the batch stops."""
        async for page in pages:
            for line in page:
                await self._slots.acquire()
                if run.stop is not None or self._service.scheduler.draining:
                    self._slots.release()
                    run.stop = run.stop or "shutdown"
                    return
                task = asyncio.create_task(self._line(run, line, kind))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

    async def _line(self, run: Run, line: Line, kind: CompletionKind) -> None:
        """Run one line until it has an answer, then commit it; leave it without one if the batch stops first."""
        try:
            answer = await self._answer(run, line, kind)
            if answer is None:
                return
            status, body = answer
            outcome = COMPLETED if 200 <= status < 300 else FAILED
            result = orjson.dumps(objects.answered_line(line.id, line.custom_id, status, body))
            await self._store.end_line(run.record["id"], line.line, outcome, result)
            run.counts[outcome] += 1
            self._metrics.batch_line(outcome)
        finally:
            self._slots.release()

    async def _answer(self, run: Run, line: Line, kind: CompletionKind) -> tuple[int, Any] | None:
        """The line's answer: (status, body); None if its batch stops or its window ends first."""
        expires_at = run.record["expires_at"]
        while run.stop is None:
            lifetime = expires_at - self._clock()
            if lifetime <= 0:
                return None
            job: Job | None = None
            try:
                settings = self._settings
                request = parse_completion_request(
                    line.body.encode(),
                    kind,
                    settings.max_tokens_limit,
                    settings.forward_service_tier,
                    lambda _asked, _tier: Priority.BATCH,
                )
                key = self._account(run.owner)
                admitted = await self._service.accept(
                    request, line.id, Priority.BATCH, key.for_batch() if key is not None else None, None, lifetime
                )
                job = run.jobs[line.line] = admitted.job
                async with self._service.run(admitted) as answer:
                    if not isinstance(answer, BackendResponse):  # a body that asked to stream: refused at validation
                        raise InvalidRequest("a batch request cannot stream", param="stream")
                    return answer.status, _json(answer.body)
            except GatewayError as exc:
                if run.stop is not None or self._clock() >= expires_at or isinstance(exc, ShuttingDown):
                    return None
                if (job is None or job.started is None) and _not_yet(exc):
                    await asyncio.sleep(max(0.05, getattr(exc, "retry_after", _RETRY_SECONDS)))
                    continue
                return _error_answer(exc)
            finally:
                run.jobs.pop(line.line, None)
        return None


def _not_yet(exc: GatewayError) -> bool:
    """Whether a refusal before any backend saw the line only means "later" (its answer is still to come)."""
    return isinstance(exc, RetryLater | BackendNotReady | RequestTimeout)


def _error_answer(exc: GatewayError) -> tuple[int, Any]:
    if isinstance(exc, UpstreamHTTPError):
        return exc.status_code, _json(exc.raw_body)
    return exc.status_code, exc.body()


def _json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return {
            "error": {"message": body.decode(errors="replace"), "type": "upstream_error", "param": None, "code": None}
        }
