"""The queue's own routes: overall status, and one request's status or cancellation."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from app.api.deps import Caller, SchedulerDep
from app.api.status import QueueStatus, RequestStatus, queue_status, request_status
from app.errors import Conflict, NotFound, RequestCancelled
from app.limits.keys import KeyAccount
from app.queue.job import Job
from app.queue.scheduler import Scheduler

router = APIRouter(prefix="/v1/queue", tags=["queue"])

# How long DELETE waits for a running request to wind down, so it can report the final state.
_CANCEL_SETTLE_SECONDS = 5.0


def _find(scheduler: Scheduler, request_id: str, caller: KeyAccount | None) -> Job:
    """The caller's request of that id (an admin key's: any key's); 404 for another key's, so ids do not leak."""
    if caller is not None and caller.admin:
        job = scheduler.lookup_any(request_id)
    else:
        job = scheduler.lookup(request_id, None if caller is None else caller.name)
    if job is None:
        raise NotFound(f"no request with id {request_id!r}", param="request_id")
    return job


@router.get("/status")
async def get_queue_status(caller: Caller, scheduler: SchedulerDep) -> QueueStatus:
    """How many wait and run, totals by outcome, and each worker's health (another key's requests as counts)."""
    return queue_status(scheduler, caller)


@router.get("/request/{request_id}")
async def get_request_status(request_id: str, caller: Caller, scheduler: SchedulerDep) -> RequestStatus:
    """One request's state, its place in the queue while it waits, and its times."""
    return request_status(scheduler, _find(scheduler, request_id, caller))


@router.delete("/request/{request_id}")
async def cancel_request(request_id: str, caller: Caller, scheduler: SchedulerDep) -> RequestStatus:
    """Cancel a waiting or running request; its client receives a 499 (or an SSE error event)."""
    job = _find(scheduler, request_id, caller)
    if not scheduler.abort(job, RequestCancelled(f"request {request_id} was cancelled")):
        raise Conflict(f"request {request_id!r} has already finished ({job.state.value})", code="already_finished")
    try:
        async with asyncio.timeout(_CANCEL_SETTLE_SECONDS):
            await job.wait_finished()
    except TimeoutError:
        pass  # reported as still processing; it will end as cancelled once the backend lets go
    return request_status(scheduler, job)
