"""Runs completions through the queue: admit, wait for a slot, call the backend, retire exactly once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable

from app.backends.base import Backend, BackendResponse
from app.errors import ClientDisconnected, GatewayError
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

    def __init__(self, scheduler: Scheduler, backend: Backend):
        self.scheduler = scheduler
        self.backend = backend

    def admit(self, request: CompletionRequest, request_id: str, priority: Priority, owner: str | None) -> Job:
        """Queue a request (or dispatch it at once); raises QueueFull, ShuttingDown or Conflict."""
        return self.scheduler.submit(request_id, request.kind, priority, owner)

    def abort(self, job: Job, error: GatewayError) -> bool:
        """Stop a request wherever it is; False if it had already ended."""
        return self.scheduler.abort(job, error)

    async def complete(self, job: Job, request: CompletionRequest) -> BackendResponse:
        """Wait for a slot, then answer the request whole."""
        try:
            await job.dispatched()
            async with job.abortable():
                response = await self.backend.complete(request)
        except BaseException as exc:
            self.scheduler.finish(job, _as_gateway_error(exc))
            raise
        self.scheduler.finish(job, None)
        return response

    async def open_stream(self, job: Job, request: CompletionRequest) -> AsyncGenerator[bytes, None]:
        """Wait for a slot and open the backend's stream; pump() must follow."""
        try:
            await job.dispatched()
            async with job.abortable():
                return await self.backend.stream(request)
        except BaseException as exc:
            self.scheduler.finish(job, _as_gateway_error(exc))
            raise

    async def pump(
        self, job: Job, chunks: AsyncGenerator[bytes, None], send: Callable[[bytes], Awaitable[None]]
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
            self.scheduler.finish(job, error)

    def release(self, job: Job, exc: BaseException) -> None:
        """Retire a job whose response will never be produced (the stream was opened but not pumped)."""
        self.scheduler.finish(job, _as_gateway_error(exc))
