"""The refusals a new request may meet before it waits: each check returns the error that refuses it, or None.

The scheduler runs them at submit (app.queue.scheduler) and counts each refusal it raises; the replicas'
shared queue (app.replicas) builds the same errors from the verdict of its script, so a client reads one
message whichever replica refused it.
"""

from __future__ import annotations

from app.errors import BreakerOpen, Conflict, DeadlineUnreachable, InvalidRequest, KeyQueueLimit, QueueFull
from app.limits.keys import KeyAccount
from app.queue import eta
from app.queue.pool import Pool


def too_wide(pool: Pool, rank: int, choices: int) -> InvalidRequest | None:
    """A request of `choices` (its n) that no member of `pool` could ever hold at once, at this level."""
    if choices <= 1 or any(member.could_take(rank, choices) for member in pool.members):
        return None
    most = max(member.max_concurrent - (member.reserved_high if rank else 0) for member in pool.members)
    return InvalidRequest(
        f"the answer has {choices} choices, and the model decodes each in a slot of its own: at most "
        f"{most} slots are there for this priority",
        param="n",
    )


def breaker_refusal(pool: Pool) -> BreakerOpen | None:
    """The 503 a new request for `pool` meets while every member is down (the soonest back), else None."""
    members = pool.members
    if len(members) == 1:
        gate = members[0].gate
        return gate.refusal() if gate is not None else None
    refusals = []
    for member in members:
        refusal = member.gate.refusal() if member.gate is not None else None
        if refusal is None:
            return None
        refusals.append(refusal)
    return min(refusals, key=lambda r: r.retry_after) if refusals else None


def duplicate_id(request_id: str) -> Conflict:
    """The 409 for a request id the same key already has running (X-Request-ID)."""
    return Conflict(
        f"request id {request_id!r} belongs to a request that is still running",
        code="duplicate_request_id",
        param="X-Request-ID",
    )


def key_queue_limit(key: KeyAccount, retry_after: float) -> KeyQueueLimit:
    """The 429 for a key that already has its max_queued requests waiting; a place frees in `retry_after`."""
    return KeyQueueLimit(
        f"key {key.name!r} already has {key.max_queued} requests waiting, the most it may have; "
        f"a place frees in about {retry_after:.1f}s",
        retry_after=retry_after,
    )


def queue_full(waiting: str, retry_after: float) -> QueueFull:
    """The 503 for a full queue, `waiting` saying how many wait (and where)."""
    return QueueFull(f"the queue is full ({waiting}); retry in {retry_after:.1f}s", retry_after=retry_after)


def deadline_unreachable(
    pool: Pool, expected: float, lifetime: float, average: float | None
) -> DeadlineUnreachable | None:
    """The 503 for a request expected to wait `expected` seconds with `lifetime` to live, once the pool's
    service time is measured (an estimate from nothing refuses nothing)."""
    if expected <= lifetime or pool.service.mean is None:
        return None
    return DeadlineUnreachable(expected, lifetime, retry_after=max(expected - lifetime, eta.pool_place(pool, average)))


def lifetime(request_timeout: float, timeout: float | None, batch: bool) -> float:
    """How long a request may take, waiting included: the client's own timeout when shorter than
    REQUEST_TIMEOUT; a batch line's is its batch's window, whatever REQUEST_TIMEOUT says."""
    if batch and timeout is not None:
        return timeout
    return request_timeout if timeout is None else min(timeout, request_timeout)
