"""Runs completions through the queue: prepare, accept, wait for a slot, call the backend, retire once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from app.backends.base import Backend, BackendResponse, BackendStream, Usage
from app.errors import ClientDisconnected, GatewayError
from app.limits.keys import KeyAccount
from app.queue.job import Job
from app.queue.scheduler import Scheduler
from app.schemas import CompletionRequest
from app.types import Priority

log = logging.getLogger("app.queue")


def _as_gateway_error(exc: BaseException) -> GatewayError:
    """What ended a request, for its record, when the cause was not one of ours."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, asyncio.CancelledError | OSError):
        return ClientDisconnected("the client went away")
    log.exception("unexpected error while serving a request", exc_info=exc)
    return GatewayError("internal error while serving the request")


class Admitted:
    """A request the queue accepted: its job, and what the backend prepared from it."""

    __slots__ = ("job", "prepared", "stream")

    def __init__(self, job: Job, prepared: object, stream: bool):
        self.job = job
        self.prepared = prepared
        self.stream = stream


class CompletionService:
    """The one way completions reach the backend. Errors are raised as GatewayError.

    Use: `admitted = await service.accept(...)`, then `async with service.run(admitted) as answer:`. The
    body of `run` is entered once the request is dispatched and the backend has accepted it (so status
    codes for a refusal, a timeout in the queue or a cancel are still real statuses), and its exit retires
    the request, whatever happened: the one place a request ends.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        backend: Backend[Any],
        *,
        counts_tokens: bool = False,
        default_max_tokens: int = 512,
    ):
        self.scheduler = scheduler
        self.backend = backend
        self._counts_tokens = counts_tokens  # the backend has a token budget (RATE_LIMIT_TPM)
        self._default_max_tokens = default_max_tokens

    async def accept(
        self, request: CompletionRequest, request_id: str, priority: Priority, key: KeyAccount | None
    ) -> Admitted:
        """Prepare the request and queue it (or dispatch it at once) at `priority`.

        Raises InvalidRequest (400) for what the backend cannot serve, KeyRateLimited or KeyQueueLimit (429),
        QueueFull, BreakerOpen or ShuttingDown (503), Conflict (409).
        """
        prepared = await self.backend.prepare(request)
        cost = 0
        if self._counts_tokens or (key is not None and key.counts_tokens):
            cost = self.backend.prompt_tokens(prepared) + (request.max_tokens or self._default_max_tokens)
        if key is not None:
            try:
                key.spend(cost)
            except GatewayError:
                self.scheduler.count_rejection(priority, "key_rate_limit")
                raise
        try:
            job = self.scheduler.submit(request_id, request.kind, priority, key, cost)
        except GatewayError:
            if key is not None:
                key.refund(cost)
            raise
        return Admitted(job, prepared, request.stream)

    def abort(self, job: Job, error: GatewayError) -> bool:
        """Stop a request wherever it is; False if it had already ended."""
        return self.scheduler.abort(job, error)

    @asynccontextmanager
    async def run(self, admitted: Admitted) -> AsyncIterator[BackendResponse | BackendStream]:
        """The backend's answer, once dispatched: a whole response, or a stream to relay inside the block.

        The block runs inside the job's abort scope: a timeout, a cancel or a disconnect stops it, raising
        the job's error. Leaving the block closes a stream and retires the job with how it ended.
        """
        job = admitted.job
        error: GatewayError | None = None
        usage: Usage | None = None
        try:
            await job.dispatched()
            async with job.abortable():
                if admitted.stream:
                    stream = await self.backend.stream(admitted.prepared, job.deadline)
                    try:
                        yield stream
                    finally:
                        await stream.aclose()
                        usage = stream.usage
                else:
                    response = await self.backend.complete(admitted.prepared, job.deadline)
                    usage = response.usage
                    yield response
        except BaseException as exc:
            error = _as_gateway_error(exc)
            if isinstance(exc, Exception) and not isinstance(exc, GatewayError | OSError):
                raise error from exc  # a bug of ours: logged once, answered 500 in the OpenAI shape
            raise
        finally:
            self.scheduler.retire(job, error, usage)
