"""The queue's own routes: overall status, and one request's status or cancellation."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from app.api.deps import Owner, SchedulerDep
from app.errors import Conflict, NotFound, RequestCancelled
from app.queue.job import Job
from app.queue.scheduler import Scheduler
from app.schemas import QueueStatus, RequestStatus
from app.settings import Priority

router = APIRouter(prefix="/v1/queue", tags=["queue"])

_LEVELS = {p.rank: p for p in Priority}
# How long DELETE waits for a running request to wind down, so it can report the final state.
_CANCEL_SETTLE_SECONDS = 5.0


def _find(scheduler: Scheduler, request_id: str, owner: str | None) -> Job:
    job = scheduler.lookup(request_id)
    # With keys on, another key's request does not exist for you: 404, not 403, so ids do not leak.
    if job is None or (owner is not None and job.owner != owner):
        raise NotFound(f"no request with id {request_id!r}", param="request_id")
    return job


def _describe(scheduler: Scheduler, job: Job) -> RequestStatus:
    return RequestStatus(
        id=job.id,
        status=job.state,
        completion_type=job.kind,
        timestamp=job.arrived_wall,
        error=job.error.message if job.error is not None else None,
        priority=job.priority,
        position=scheduler.position(job),
        waiting_for=scheduler.waiting_for(job),
        level=_LEVELS[job.rank],
        queued_at=job.arrived_wall,
        started_at=job.wall_time(job.started),
        finished_at=job.wall_time(job.finished),
    )


@router.get("/status")
async def queue_status(_: Owner, scheduler: SchedulerDep) -> QueueStatus:
    """How many wait and run, totals by outcome, and each worker's health."""
    return scheduler.status()


@router.get("/request/{request_id}")
async def request_status(request_id: str, owner: Owner, scheduler: SchedulerDep) -> RequestStatus:
    """One request's state, its place in the queue while it waits, and its times."""
    return _describe(scheduler, _find(scheduler, request_id, owner))


@router.delete("/request/{request_id}")
async def cancel_request(request_id: str, owner: Owner, scheduler: SchedulerDep) -> RequestStatus:
    """Cancel a waiting or running request; its client receives a 499 (or an SSE error event)."""
    job = _find(scheduler, request_id, owner)
    if not scheduler.abort(job, RequestCancelled(f"request {request_id} was cancelled")):
        raise Conflict(f"request {request_id!r} has already finished ({job.state.value})", code="already_finished")
    try:
        async with asyncio.timeout(_CANCEL_SETTLE_SECONDS):
            await job.wait_finished()
    except TimeoutError:
        pass  # reported as still processing; it will end as cancelled once the backend lets go
    return _describe(scheduler, job)
