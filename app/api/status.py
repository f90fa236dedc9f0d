"""The wire format of the queue's status routes, built from what the scheduler reports."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from app.limits.keys import KeyAccount
from app.queue.job import Job
from app.queue.member import Member
from app.queue.scheduler import Scheduler
from app.replicas.coordinator import Coordinator
from app.types import CompletionKind, JobState, Priority


class WorkerStatus(BaseModel):
    """One concurrency slot at the backend: its health."""

    id: int
    busy: bool
    current_request_id: str | None
    processed: int
    errors: int


class BackendStatus(BaseModel):
    """One member of the fleet."""

    name: str
    type: str
    base_url: str | None = Field(description="A proxy's base URL, without credentials.")
    models: list[str] | None = Field(description="The models it serves; None: any model name.")
    healthy: bool = Field(description="False while its circuit breaker is open.")
    breaker_state: str | None = Field(description="'closed', 'open' or 'half_open'; None without a breaker.")
    in_flight: int
    max_concurrent: int
    latency_seconds: float | None = Field(description="Moving average of its completed requests' time.")
    retiring: bool = Field(description="Removed by a reload: it finishes what it runs and takes nothing new.")
    rate_limits: dict[str, Any] | None = Field(description="Its budgets and what its upstream reported left.")


class PoolStatus(BaseModel):
    """The requests waiting for one model, and the backends that serve it."""

    model: str = Field(description="The model name; '*' for a backend that serves any name.")
    waiting: int
    waiting_by_priority: dict[str, int]
    members: list[str]


class ReplicaStatus(BaseModel):
    """One gateway replica sharing the queue, as its last heartbeat described it."""

    id: str
    host: str
    pid: int
    started: float = Field(description="Seconds since the epoch.")
    heartbeat: float = Field(description="Its last heartbeat, seconds since the epoch.")
    waiting: int = Field(description="Requests waiting on it (their bodies and connections are there).")
    running: int
    mode: str = Field(description="'shared', 'local' or 'unavailable', as for `coordination`.")


class QueueStatus(BaseModel):
    """GET /v1/queue/status: the queue contract's fields first, then the gateway's own."""

    queue_size: int
    processing_count: int
    max_concurrent: int
    max_queue_size: int
    total_processed: int
    total_failed: int
    total_queued: int
    active_requests: int
    is_running: bool
    queue_size_by_priority: dict[str, int]
    waiting_for_admission: int = Field(description="Requests held back by a full queue (QUEUE_FULL_BEHAVIOR=wait).")
    total_rejected: int
    total_timed_out: int
    total_cancelled: int
    queue_full_behavior: str
    estimated_service_seconds: float | None = Field(
        description="Moving average of how long a request holds a backend slot; None before the first."
    )
    aging_seconds: float | None = Field(description="QUEUE_AGING_SECONDS; None for strict priority.")
    dispatch_held_by: str | None = Field(
        description="Why the head of the queue is not dispatched although a slot is free: 'rate_limit_requests', "
        "'rate_limit_tokens', 'upstream_requests', 'upstream_tokens', 'upstream_retry_after', "
        "'circuit_breaker_open' or 'circuit_breaker_half_open'; None when nothing holds it."
    )
    rate_limits: dict[str, Any] | None = Field(
        description="The backend's budgets (RATE_LIMIT_RPM/TPM), what the upstream reported left, and any pause."
    )
    circuit_breaker: dict[str, Any] | None = Field(description="The upstream circuit breaker (proxy backend).")
    workers: list[WorkerStatus]
    backends: list[BackendStatus]
    pools: list[PoolStatus]
    replica_id: str | None = Field(default=None, description="With REDIS_URL: the replica that answered.")
    coordination: str | None = Field(
        default=None,
        description="With REDIS_URL: 'shared' (the sizes above are all replicas'), 'local' (serving alone, "
        "REDIS_FAILURE_MODE=local) or 'unavailable' (Redis cannot be reached; the sizes are this replica's).",
    )
    replicas: list[ReplicaStatus] | None = Field(default=None, description="With REDIS_URL: the live replicas.")
    batches: list[dict[str, Any]] = Field(
        default_factory=list,
        description="The caller's batches being worked on now (an admin key's: every key's): id, status, counts.",
    )
    webhooks: dict[str, int] = Field(
        default_factory=dict, description="Webhook events by delivery state: pending, delivered, failed."
    )


class RequestStatus(BaseModel):
    """GET /v1/queue/request/{id}: the queue contract's fields first, then the gateway's own."""

    id: str
    status: JobState
    completion_type: CompletionKind
    timestamp: float = Field(description="Arrival, seconds since the epoch.")
    error: str | None
    priority: Priority
    position: int | None = Field(description="1-based place in the queue while waiting, else None.")
    waiting_for: str | None = Field(
        description="While waiting: 'backend_slot', 'queue_space', or the budget that holds dispatch back "
        "(as dispatch_held_by in the queue status)."
    )
    level: Priority = Field(description="The level it waits or ran at: its priority, or higher after aging.")
    eta_seconds: float | None = Field(
        description="While waiting: the estimated seconds until it is dispatched, from its place now; else None."
    )
    eta_at_arrival_seconds: float | None = Field(
        description="The wait estimated when it arrived (None if it was dispatched at once)."
    )
    preemptions: int = Field(description="Times it gave its slot up to a high-priority request (PREEMPTION).")
    queued_at: float
    started_at: float | None
    finished_at: float | None
    model: str | None = Field(description="The model asked for, after aliases.")
    backend: str | None = Field(description="The backend it was dispatched to, once it was.")


def queue_status(scheduler: Scheduler, viewer: KeyAccount | None = None) -> QueueStatus:
    """The whole queue: sizes, totals by outcome, what holds dispatch back, and each slot.

    With keys on, a slot's request id is shown only to the key that sent it (and to admin keys): others see
    that the slot is busy, not whose request it holds.
    """
    gate = scheduler.roster.gate
    limiter = gate.limiter if gate is not None else None
    breaker = gate.breaker if gate is not None else None
    totals = scheduler.totals
    return QueueStatus(
        queue_size=scheduler.waiting,
        processing_count=scheduler.roster.processing,
        max_concurrent=scheduler.roster.max_concurrent,
        max_queue_size=scheduler.waiting_room.capacity,
        total_processed=totals.completed,
        total_failed=totals.failed,
        total_queued=totals.queued,
        active_requests=scheduler.waiting + scheduler.roster.processing,
        is_running=not scheduler.draining,
        queue_size_by_priority=scheduler.waiting_room.sizes(),
        waiting_for_admission=scheduler.waiting_room.for_space,
        total_rejected=totals.rejected,
        total_timed_out=totals.timeout,
        total_cancelled=totals.cancelled,
        queue_full_behavior=scheduler.admission.full_behavior.value,
        aging_seconds=scheduler.waiting_room.aging.period if scheduler.waiting_room.aging is not None else None,
        dispatch_held_by=gate.held_by if gate is not None else None,
        rate_limits=limiter.status() if limiter is not None else None,
        circuit_breaker=None
        if breaker is None
        else {
            "state": breaker.state.value,
            "consecutive_failures": breaker.failures,
            "threshold": breaker.threshold,
            "retry_after_seconds": round(breaker.retry_after(), 3),
        },
        estimated_service_seconds=scheduler.service.average,
        backends=[
            _backend_status(member) for member in [*scheduler.roster.members.values(), *scheduler.roster.retiring]
        ],
        pools=[
            PoolStatus(
                model=pool.model,
                waiting=sum(sizes.values()),
                waiting_by_priority=sizes,
                members=[member.name for member in pool.members],
            )
            for pool in scheduler.roster.pools.values()
            for sizes in (scheduler.waiting_room.pool_sizes(pool),)
        ],
        workers=[
            WorkerStatus(
                id=number,
                busy=slot.job is not None,
                current_request_id=slot.job.id if slot.job is not None and _sees(viewer, slot.job) else None,
                processed=slot.processed,
                errors=slot.errors,
            )
            for number, slot in enumerate(scheduler.roster.slots)
        ],
    )


def shared_status(status: QueueStatus, coordinator: Coordinator, view: dict[str, Any] | None) -> QueueStatus:
    """`status` of one replica, with the shared pools' sizes and slots as all replicas see them (`view`)."""
    if view is None:
        mode = "local" if coordinator.mode == "local" else "unavailable"
        return status.model_copy(update={"replica_id": coordinator.replica, "coordination": mode})
    waiting: dict[str, list[int]] = view["waiting"]
    running: dict[str, int] = view["running"]
    by_priority = dict(status.queue_size_by_priority)
    pools = []
    for pool in status.pools:
        counts = waiting.get(pool.model)
        if counts is None:
            pools.append(pool)
            continue
        sizes = {p.value: counts[p.rank] for p in Priority}
        for level, count in pool.waiting_by_priority.items():
            by_priority[level] += sizes[level] - count
        pools.append(pool.model_copy(update={"waiting": sum(sizes.values()), "waiting_by_priority": sizes}))
    backends = [
        b.model_copy(update={"in_flight": running[b.name]}) if b.name in running else b for b in status.backends
    ]
    processing = status.processing_count + sum(
        running[b.name] - local.in_flight
        for b, local in zip(backends, status.backends, strict=True)
        if b.name in running
    )
    queue_size = sum(by_priority.values()) + status.waiting_for_admission
    return status.model_copy(
        update={
            "queue_size": queue_size,
            "queue_size_by_priority": by_priority,
            "processing_count": processing,
            "active_requests": queue_size + processing,
            "pools": pools,
            "backends": backends,
            "replica_id": coordinator.replica,
            "coordination": "shared",
            "replicas": [ReplicaStatus.model_validate_json(r) for r in view["replicas"]],
        }
    )


def _backend_status(member: Member) -> BackendStatus:
    gate = member.gate
    breaker = gate.breaker if gate is not None else None
    return BackendStatus(
        name=member.name,
        type=member.kind,
        base_url=member.base_url,
        models=list(member.models) if member.models is not None else None,
        healthy=not member.down,
        breaker_state=breaker.state.value if breaker is not None else None,
        in_flight=member.in_flight,
        max_concurrent=member.max_concurrent,
        latency_seconds=round(member.latency, 4) if member.latency is not None else None,
        retiring=member.retiring,
        rate_limits=gate.limiter.status() if gate is not None and gate.limiter is not None else None,
    )


def request_status(scheduler: Scheduler, job: Job) -> RequestStatus:
    """One request, live or finished: its state, its place while it waits, and its times."""
    return RequestStatus(
        id=job.id,
        status=job.state,
        completion_type=job.kind,
        timestamp=job.arrived_wall,
        error=job.error.message if job.error is not None else job.error_message,
        priority=job.priority,
        position=scheduler.waiting_room.position(job),
        waiting_for=scheduler.waiting_room.waiting_for(job),
        level=Priority.at(job.rank),
        eta_seconds=_rounded(scheduler.eta(job)),
        eta_at_arrival_seconds=_rounded(job.eta),
        preemptions=job.preemptions,
        queued_at=job.arrived_wall,
        started_at=job.wall_time(job.started),
        finished_at=job.wall_time(job.finished),
        model=job.model,
        backend=job.member.name if job.member is not None else None,
    )


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def _sees(viewer: KeyAccount | None, job: Job) -> bool:
    """Whether the caller may see this request's id."""
    return viewer is None or viewer.admin or job.key_name == viewer.name
