"""The queue's own routes: overall status, and one request's status or cancellation."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from app.api.deps import Caller, CoordinatorDep, SchedulerDep, viewer
from app.api.status import QueueStatus, RequestStatus, queue_status, request_status, shared_status
from app.batches import Persisted
from app.errors import Conflict, NotFound, RequestCancelled
from app.limits.keys import KeyAccount
from app.queue.job import Job
from app.queue.scheduler import Scheduler

router = APIRouter(prefix="/v1/queue", tags=["queue"])

# How long DELETE waits for a running request to wind down, so it can report the final state.
_CANCEL_SETTLE_SECONDS = 5.0


def _find(scheduler: Scheduler, request_id: str, caller: KeyAccount | None) -> Job | None:
    """The caller's request of that id (an admin key's: any key's) on this replica."""
    if caller is not None and caller.admin:
        return scheduler.registry.lookup_any(request_id)
    return scheduler.registry.lookup(request_id, None if caller is None else caller.name)


def _not_found(request_id: str) -> NotFound:
    # Another key's request answers the same: ids do not leak.
    return NotFound(f"no request with id {request_id!r}", param="request_id")


@router.get("/status")
async def get_queue_status(
    request: Request, caller: Caller, scheduler: SchedulerDep, coordinator: CoordinatorDep
) -> QueueStatus:
    """How many wait and run, totals by outcome, and each worker's health (another key's requests as counts);
    with replicas (REDIS_URL), the shared queue and slots, and each replica."""
    status = queue_status(scheduler, caller)
    if coordinator is not None:
        status = shared_status(status, coordinator, await coordinator.shared_view())
    persisted: Persisted = request.app.state.persisted
    status.batches = persisted.batches.running(viewer(caller))
    status.webhooks = dict(persisted.webhooks.counts)
    return status


@router.get("/request/{request_id}")
async def get_request_status(
    request_id: str, caller: Caller, scheduler: SchedulerDep, coordinator: CoordinatorDep
) -> RequestStatus:
    """One request's state, its place in the queue while it waits, and its times (held by any replica)."""
    job = _find(scheduler, request_id, caller)
    if job is not None:
        return request_status(scheduler, job)
    found = await coordinator.lookup.find(request_id, caller, cancel=False) if coordinator is not None else None
    if found is None:
        raise _not_found(request_id)
    return RequestStatus.model_validate(found["request"])


@router.delete("/request/{request_id}")
async def cancel_request(
    request_id: str, caller: Caller, scheduler: SchedulerDep, coordinator: CoordinatorDep
) -> RequestStatus:
    """Cancel a waiting or running request, on whichever replica holds it; its client receives a 499 (or an
    SSE error event)."""
    job = _find(scheduler, request_id, caller)
    if job is None:
        found = await coordinator.lookup.find(request_id, caller, cancel=True) if coordinator is not None else None
        if found is None:
            raise _not_found(request_id)
        if "finished" in found:
            state = found["finished"]["status"]
            raise Conflict(f"request {request_id!r} has already finished ({state})", code="already_finished")
        return RequestStatus.model_validate(found["request"])
    if not scheduler.abort(job, RequestCancelled(f"request {request_id} was cancelled")):
        raise Conflict(f"request {request_id!r} has already finished ({job.state.value})", code="already_finished")
    try:
        async with asyncio.timeout(_CANCEL_SETTLE_SECONDS):
            await job.wait_finished()
    except TimeoutError:
        pass  # reported as still processing; it will end as cancelled once the backend lets go
    return request_status(scheduler, job)
