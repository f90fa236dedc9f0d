"""Background requests (`Prefer: respond-async`): accepted like any completion, answered 202 at once, run in
the queue at their priority, their answer kept in the database for ASYNC_RESULT_TTL seconds.

A request is stored before its 202 goes out, and its answer when it ends; one the gateway stopped before it
ended (a restart, a drain) is accepted again at the next start, under the same id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable

import orjson

from app.backends.base import BackendResponse
from app.batches.store import Background, Store
from app.batches.webhooks import Webhooks
from app.errors import (
    GatewayError,
    InvalidRequest,
    RetryLater,
    ShuttingDown,
    StorageUnavailable,
    UpstreamHTTPError,
)
from app.limits.keys import KeyAccount
from app.queue.job import Job
from app.queue.service import Admitted, CompletionService
from app.schemas import CompletionRequest, parse_completion_request
from app.settings import Settings
from app.types import CompletionKind, Priority

log = logging.getLogger("app.background")

_PURGE_SECONDS = 60.0
_RETRY_SECONDS = 1.0


class BackgroundRequests:
    """Accepts, runs and remembers the background requests of every key."""

    def __init__(
        self,
        store: Store,
        service: CompletionService,
        settings: Settings,
        account: Callable[[str], KeyAccount | None],
        webhooks: Webhooks,
        clock: Callable[[], float] = time.time,
    ):
        self._store = store
        self._service = service
        self._settings = settings
        self._account = account
        self._webhooks = webhooks
        self._clock = clock
        self.ttl = settings.async_result_ttl
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Take up the requests a previous run accepted and did not finish; forget results past their TTL."""
        for item in await self._store.unfinished_background():
            self._spawn(self._resume(item))
        self._spawn(self._purge())

    async def aclose(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _spawn(self, work: object) -> None:
        task: asyncio.Task[None] = asyncio.create_task(work)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def submit(
        self,
        request: CompletionRequest,
        request_id: str,
        priority: Priority,
        key: KeyAccount | None,
        session: str | None,
        lifetime: float | None,
    ) -> Job:
        """Accept the request (raising what refuses it, as for any completion), store it, and run it."""
        if request.stream:
            raise InvalidRequest("a background request (Prefer: respond-async) cannot stream", param="stream")
        admitted = await self._service.accept(request, request_id, priority, key, session, lifetime)
        owner = key.name if key is not None else ""
        item = Background(
            owner, request_id, request.kind, priority.value, request.body, self._clock(), None, None, None
        )
        try:
            await self._store.add_background(item)
        except (sqlite3.Error, OSError) as exc:
            self._service.abort(admitted.job, ShuttingDown("the request could not be stored"))
            self._spawn(self._finish(admitted, owner, stored=False))
            log.error("a background request could not be stored: %s", exc)
            raise StorageUnavailable(f"the request could not be stored ({exc}); it was not run") from None
        self._spawn(self._finish(admitted, owner))
        return admitted.job

    async def result(self, owner: str | None, request_id: str) -> Background | None:
        """The stored request (None: unknown to `owner`, None meaning any, or its result is past its TTL)."""
        item = await self._store.background(owner, request_id)
        if item is None or (item.ended_at is not None and item.ended_at < self._clock() - self.ttl):
            return None
        return item

    async def _finish(self, admitted: Admitted, owner: str, stored: bool = True) -> None:
        job = admitted.job
        try:
            async with self._service.run(admitted) as answer:
                assert isinstance(answer, BackendResponse)  # submit() refuses streams
                status, body = answer.status, answer.body
        except ShuttingDown:
            return  # stopped by the gateway, not answered: the next start runs it again
        except GatewayError as exc:
            status = exc.status_code
            body = exc.raw_body if isinstance(exc, UpstreamHTTPError) else _error_body(exc)
        if not stored:
            return
        await self._store.end_background(owner, job.id, status, body, self._clock())
        event = "completed" if 200 <= status < 300 else "cancelled" if status == 499 else "failed"
        await self._webhooks.emit(owner, f"request.{event}", {"id": job.id, "status_code": status})

    async def _resume(self, item: Background) -> None:
        """Accept a stored request again; a refusal that says "later" is tried again, any other is its answer."""
        settings = self._settings
        priority = Priority(item.priority)  # as it was when first accepted
        while True:
            try:
                request = parse_completion_request(
                    item.body,
                    _kind(item.kind),
                    settings.max_tokens_limit,
                    settings.forward_service_tier,
                    lambda _asked, _tier: priority,
                )
                admitted = await self._service.accept(request, item.id, priority, self._account(item.owner), None, None)
            except ShuttingDown:
                return
            except RetryLater as exc:
                await asyncio.sleep(exc.retry_after or _RETRY_SECONDS)
                continue
            except GatewayError as exc:
                await self._store.end_background(item.owner, item.id, exc.status_code, _error_body(exc), self._clock())
                return
            await self._finish(admitted, item.owner)
            return

    async def _purge(self) -> None:
        while True:
            try:
                await self._store.forget_background(self._clock() - self.ttl)
            except Exception:
                log.exception("forgetting old background results failed")
            await asyncio.sleep(_PURGE_SECONDS)


def _kind(value: str) -> CompletionKind:
    return "chat" if value == "chat" else "completion"


def _error_body(exc: GatewayError) -> bytes:
    return orjson.dumps(exc.body())
