"""Runs completions through the queue: admit, wait for a slot, call the backend, retire exactly once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable

from app.backends.base import Backend, BackendResponse
from app.errors import ClientDisconnected, GatewayError
from app.limits.keys import Tenant
from app.metrics import Metrics
from app.queue.job import Job
from app.queue.scheduler import Scheduler
from app.schemas import CompletionRequest
from app.settings import Priority

log = logging.getLogger("app.queue")


def _as_gateway_error(exc: BaseException) -> GatewayError:
    """What ended a request, for its record, when the cause was not one of ours."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, asyncio.CancelledError | OSError):
        return ClientDisconnected("the client went away")
    log.exception("unexpected error while serving a request", exc_info=exc)
    return GatewayError("internal error while serving the request")


class CompletionService:
    """The one way completions reach the backend. Errors are raised as GatewayError."""

    def __init__(
        self,
        scheduler: Scheduler,
        backend: Backend,
        metrics: Metrics,
        *,
        counts_tokens: bool = False,
        default_max_tokens: int = 512,
    ):
        self.scheduler = scheduler
        self.backend = backend
        self._metrics = metrics
        self._counts_tokens = counts_tokens  # the backend has a token budget (RATE_LIMIT_TPM)
        self._default_max_tokens = default_max_tokens

    async def admit(
        self, request: CompletionRequest, request_id: str, asked: Priority, tenant: Tenant | None
    ) -> tuple[Job, Priority]:
        """Queue a request (or dispatch it at once) at the priority its key allows; returns it and that priority.

        Raises KeyRateLimited or KeyQueueLimit (429), QueueFull, BreakerOpen or ShuttingDown (503), Conflict.
        """
        priority = asked if tenant is None else tenant.allowed_priority(asked)
        owner = None if tenant is None else tenant.name
        if tenant is not None and not tenant.limited:
            tenant = None  # nothing to count for it: keep the queue's fast path
        cost = 0
        if self._counts_tokens or (tenant is not None and tenant.counts_tokens):
            prompt = await self.backend.count_prompt_tokens(request)
            cost = prompt + (request.max_tokens or self._default_max_tokens)
            request.track_usage = True
        if tenant is not None:
            try:
                tenant.admit(cost)
            except GatewayError:
                self.scheduler.count_rejection(priority, "key_rate_limit")
                raise
        try:
            job = self.scheduler.submit(request_id, request.kind, priority, owner, cost=cost, tenant=tenant)
        except GatewayError:
            if tenant is not None:
                tenant.refund(cost)
            raise
        return job, priority

    def abort(self, job: Job, error: GatewayError) -> bool:
        """Stop a request wherever it is; False if it had already ended."""
        return self.scheduler.abort(job, error)

    async def complete(self, job: Job, request: CompletionRequest) -> BackendResponse:
        """Wait for a slot, then answer the request whole."""
        request.deadline = job.deadline
        try:
            await job.dispatched()
            async with job.abortable():
                response = await self.backend.complete(request)
        except BaseException as exc:
            self._record_usage(job, request)
            self.scheduler.finish(job, _as_gateway_error(exc))
            raise
        self._record_usage(job, request)
        self.scheduler.finish(job, None)
        return response

    async def open_stream(self, job: Job, request: CompletionRequest) -> AsyncGenerator[bytes, None]:
        """Wait for a slot and open the backend's stream; pump() must follow."""
        request.deadline = job.deadline
        try:
            await job.dispatched()
            async with job.abortable():
                return await self.backend.stream(request)
        except BaseException as exc:
            self.scheduler.finish(job, _as_gateway_error(exc))
            raise

    async def pump(
        self,
        job: Job,
        request: CompletionRequest,
        chunks: AsyncGenerator[bytes, None],
        send: Callable[[bytes], Awaitable[None]],
    ) -> None:
        """Relay the stream to `send` until it ends, the job is aborted or the backend fails.

        Raises the GatewayError that stopped the stream, for the caller to send as an SSE error event.
        """
        error: GatewayError | None = None
        try:
            async with job.abortable():
                async for chunk in chunks:
                    await send(chunk)
        except BaseException as exc:
            error = _as_gateway_error(exc)
            raise
        finally:
            await chunks.aclose()
            self._record_usage(job, request)
            self.scheduler.finish(job, error)

    def _record_usage(self, job: Job, request: CompletionRequest) -> None:
        job.used_tokens = request.used_tokens
        if request.used_tokens is not None:
            completion = request.completion_tokens or 0
            self._metrics.tokens(request.used_tokens - completion, completion)

    def release(self, job: Job, exc: BaseException) -> None:
        """Retire a job whose response will never be produced (the stream was opened but not pumped)."""
        self.scheduler.finish(job, _as_gateway_error(exc))
