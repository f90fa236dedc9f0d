"""Runs completions through the queue: prepare, accept, wait for a slot, call a backend (another one if it
fails first), retire once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from app.backends.base import Backend, BackendResponse, BackendStream, Turn, Usage
from app.errors import BackendNotReady, ClientDisconnected, GatewayError, UpstreamError, UpstreamHTTPError
from app.limits.keys import KeyAccount
from app.queue.affinity import conversation
from app.queue.job import Job
from app.queue.scheduler import Scheduler
from app.schemas import CompletionRequest
from app.types import JobState, Priority

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
    """A request the queue accepted: its job, the request, and what a backend prepared from it."""

    __slots__ = ("job", "prepared", "request", "stream")

    def __init__(self, job: Job, request: CompletionRequest, backend: Backend[Any], prepared: object):
        self.job = job
        self.request = request
        self.stream = request.stream
        # By id(backend): prepared once per backend that gets it (a pool may mix local models and proxies).
        self.prepared: dict[int, object] = {id(backend): prepared}


_MISSING = object()


def _worth_another_member(error: GatewayError, retry_on_timeout: bool) -> bool:
    """Whether another member may well answer what this one failed: it could not be reached, broke off, is
    not ready, refused for its own load (429), or, with UPSTREAM_RETRY_ON_TIMEOUT, did not answer in time."""
    if isinstance(error, UpstreamError):
        return error.kind != "timeout" or retry_on_timeout
    if isinstance(error, UpstreamHTTPError):
        return error.status_code == 429
    return isinstance(error, BackendNotReady)


class CompletionService:
    """The one way completions reach the backends. Errors are raised as GatewayError.

    Use: `admitted = await service.accept(...)`, then `async with service.run(admitted) as answer:`. The
    body of `run` is entered once the request is dispatched and a backend has accepted it (so status
    codes for a refusal, a timeout in the queue or a cancel are still real statuses), and its exit retires
    the request, whatever happened: the one place a request ends.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        *,
        default_max_tokens: int = 512,
        failovers: int = 0,
        retry_on_timeout: bool = False,
    ):
        self.scheduler = scheduler
        self._default_max_tokens = default_max_tokens
        self._failovers = failovers  # UPSTREAM_MAX_RETRIES: attempts on other members after a failure
        self._retry_on_timeout = retry_on_timeout

    async def accept(
        self,
        request: CompletionRequest,
        request_id: str,
        priority: Priority,
        key: KeyAccount | None,
        session: str | None = None,
        lifetime: float | None = None,
    ) -> Admitted:
        """Prepare the request and queue it (or dispatch it at once) at `priority`, in its model's pool.

        `session` is the X-Session-ID header, which names the conversation for affinity; the client's
        own limit in seconds, `lifetime` (see app.api.deadline). Raises
        InvalidRequest (400) for what the backend cannot serve, ModelNotFound (404), KeyRateLimited or
        KeyQueueLimit (429), QueueFull, BreakerOpen or ShuttingDown (503), Conflict (409).
        """
        scheduler = self.scheduler
        pool = scheduler.roster.pool_for(request.model)
        if request.model is not None and request.model in scheduler.roster.aliases:
            request = request.for_model(scheduler.roster.aliases[request.model])
        members = pool.members
        backend = members[0].backend
        prepared = await backend.prepare(request)
        size = 0 if request.kind == "embedding" else request.max_tokens or self._default_max_tokens
        cost = 0
        if (key is not None and key.counts_tokens) or any(m.counts_tokens for m in members):
            cost = backend.prompt_tokens(prepared) + request.choices * size  # each choice may use max_tokens
        # Replicas (REDIS_URL) keep the keys' budgets in Redis, and the order of the pools they share.
        shared = scheduler.shared
        if key is not None:
            try:
                if shared is not None:
                    await shared.spend(key, cost)
                else:
                    key.spend(cost)
            except GatewayError as exc:
                scheduler.admission.count(
                    priority, "key_rate_limit" if exc.status_code == 429 else "coordination_unavailable"
                )
                raise
        affinity = conversation(request, session) if len(members) > 1 else None
        try:
            job = scheduler.submit(
                request_id,
                request.kind,
                priority,
                key,
                cost,
                request.model,
                affinity,
                lifetime,
                request.choices,
                size,
            )
            if job.pool is not None and job.pool.shared and job.state is JobState.QUEUED:
                assert scheduler.shared is not None
                await scheduler.shared.admit(job)
        except GatewayError:
            if key is not None:
                if shared is not None:
                    shared.refund(key, cost)
                else:
                    key.refund(cost)
            raise
        return Admitted(job, request, backend, prepared)

    def abort(self, job: Job, error: GatewayError) -> bool:
        """Stop a request wherever it is; False if it had already ended."""
        return self.scheduler.abort(job, error)

    @asynccontextmanager
    async def run(
        self, admitted: Admitted, waiting: Callable[[Job], Awaitable[None]] | None = None
    ) -> AsyncIterator[BackendResponse | BackendStream]:
        """The backend's answer, once dispatched: a whole response, or a stream to relay inside the block.

        `waiting` is how to wait for the slot (default: job.dispatched); it raises what ends the request
        meanwhile. The block runs inside the job's abort scope: a timeout, a cancel or a disconnect stops it,
        raising the job's error. Leaving the block closes a stream and retires the job with how it ended.
        """
        job = admitted.job
        error: GatewayError | None = None
        usage: Usage | None = None
        try:
            if waiting is not None:
                await waiting(job)
            elif job.state is not JobState.PROCESSING:  # else it went to a backend as it arrived
                await job.dispatched()
            with job.abortable():
                answer = await self._open(admitted)
                if isinstance(answer, BackendStream):
                    try:
                        yield answer
                    finally:
                        await answer.aclose()
                        usage = answer.usage
                else:
                    usage = answer.usage
                    yield answer
        except BaseException as exc:
            error = _as_gateway_error(exc)
            if isinstance(exc, Exception) and not isinstance(exc, GatewayError | OSError):
                raise error from exc  # a bug of ours: logged once, answered 500 in the OpenAI shape
            raise
        finally:
            self.scheduler.retire(job, error, usage)
            # The error's traceback holds this frame: without this, frame and error form a cycle that keeps the
            # request's body alive until the cyclic collector runs.
            error = None

    async def _open(self, admitted: Admitted) -> BackendResponse | BackendStream:
        """Ask the job's member for the answer; what fails before the client saw a byte goes on to another
        member of the pool (UPSTREAM_MAX_RETRIES times at most, never to the same one twice in a row)."""
        job = admitted.job
        failovers = 0
        while True:
            member = job.member
            assert member is not None
            backend: Backend[Any] = member.backend
            try:
                prepared = admitted.prepared.get(id(backend), _MISSING)
                if prepared is _MISSING:
                    prepared = admitted.prepared[id(backend)] = await backend.prepare(admitted.request)
                # The local model lends its requests a turn: the queue may take their slot back for a while
                # (preemption, where the member has parking room) and read their progress.
                turn = job.turn = Turn() if member.kind == "local" else None
                if admitted.stream:
                    return await backend.stream(prepared, job.deadline, turn)
                return await backend.complete(prepared, job.deadline, turn)
            except GatewayError as exc:
                if not _worth_another_member(exc, self._retry_on_timeout) or not self.scheduler.reroute(
                    job, exc, retry=failovers < self._failovers
                ):
                    raise
                failovers += 1
                log.info("request %s failed at backend %s (%s); trying another", job.id, member.name, exc.message)
            await job.dispatched()
