"""The refusals a new request may meet before it waits: each check returns the error that refuses it, or None.

Admission runs them when the scheduler submits a request (app.queue.scheduler), and counts each refusal it
raises; the replicas' shared queue (app.replicas) builds the same errors from the verdict of its script, so a
client reads one message whichever replica refused it.
"""

from __future__ import annotations

from collections.abc import Callable

from app.errors import BreakerOpen, Conflict, DeadlineUnreachable, InvalidRequest, KeyQueueLimit, QueueFull
from app.limits.keys import KeyAccount
from app.metrics import Metrics
from app.queue import eta
from app.queue.job import Totals
from app.queue.pool import Pool
from app.queue.registry import Registry
from app.queue.service_time import ServiceTime
from app.queue.waiting import WaitingRoom
from app.settings import QueueFullBehavior
from app.types import Priority


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


class Admission:
    """Whether a new request may wait, and how long it is told it will: the checks above, in their order, each
    refusal counted (metrics.REJECTION_REASONS)."""

    __slots__ = (
        "_clock",
        "_metrics",
        "_registry",
        "_room",
        "_service",
        "_totals",
        "deadline_admission",
        "full_behavior",
    )

    def __init__(
        self,
        room: WaitingRoom,
        registry: Registry,
        service: ServiceTime,
        totals: Totals,
        metrics: Metrics,
        *,
        full_behavior: QueueFullBehavior,
        deadline_admission: bool,
        clock: Callable[[], float],
    ):
        self._room = room
        self._registry = registry
        self._service = service
        self._totals = totals
        self._metrics = metrics
        self.full_behavior = full_behavior
        # Refuse at once (503 deadline_unreachable) a request whose estimated wait exceeds its deadline.
        self.deadline_admission = deadline_admission
        self._clock = clock

    def check(
        self, pool: Pool, request_id: str, priority: Priority, key: KeyAccount | None, choices: int, has_room: bool
    ) -> bool:
        """Raise the error that refuses a new request for `pool`; else whether it finds the queue full (and is to
        wait for space, QUEUE_FULL_BEHAVIOR=wait). `has_room`: a member has a slot for it now (Pool.has_room)."""
        if choices > 1:
            refusal = too_wide(pool, priority.rank, choices)
            if refusal is not None:
                raise refusal
        breaker = None if has_room else breaker_refusal(pool)  # a member with room has an idle gate: none is open
        if breaker is not None:
            self.count(priority, "breaker_open")
            raise breaker
        if self._registry.is_live(key.name if key is not None else None, request_id):
            raise duplicate_id(request_id)
        # A batch line waits behind every interactive request, for as long as its batch's window allows. (The
        # size compared first: full() counts the lines only when that says full, not on every request.)
        room = self._room
        full = priority is not Priority.BATCH and room.in_queue >= room.capacity and room.full()
        if full and (self.full_behavior is QueueFullBehavior.REJECT or pool.shared):
            raise self.full_refusal(priority)
        return full

    def expected_wait(
        self, pool: Pool, priority: Priority, key: KeyAccount | None, lifetime: float, full: bool, now: float
    ) -> float:
        """The wait of a request that is to queue: raise if its key has too many waiting, or if it would wait
        past its deadline (DEADLINE_ADMISSION)."""
        rank = priority.rank
        average = self._service.average
        if key is not None and key.queue_full():
            self.count(priority, "key_queue_limit")
            raise key_queue_limit(key, eta.pool_wait(pool, 0, rank, now, average))
        ahead = self._room.ahead_of_new(pool, rank, key.name if key is not None else None, full)
        expected = eta.pool_wait(pool, ahead, rank, now, average)
        unreachable = deadline_unreachable(pool, expected, lifetime, average) if self.deadline_admission else None
        if unreachable is not None:
            self.count(priority, "deadline_unreachable")
            raise unreachable
        return expected

    def sheds(self) -> bool:
        """Whether a new request would now be refused for a full queue, and for nothing that comes first.

        The HTTP layer asks this before it does any work for a completion: under a flood of requests past
        capacity, refusing each must cost little, or the flood starves the requests being served.
        """
        room = self._room
        return (
            room.in_queue >= room.capacity
            and room.full()
            and self.full_behavior is QueueFullBehavior.REJECT
            and all(breaker_refusal(pool) is None for pool in room.pools)
        )

    def full_refusal(self, priority: Priority) -> QueueFull:
        """Count a request refused for a full queue, and the error that tells it when to come back."""
        self.count(priority, "queue_full")
        service = self._service
        retry_after = service.appointment(self._clock(), eta.place(service.slots, service.average))
        return queue_full(f"{self._room.in_queue} requests waiting", retry_after)

    def count(self, priority: Priority, reason: str) -> None:
        """A request was refused before queueing, for one of metrics.REJECTION_REASONS."""
        self._totals.rejected += 1
        self._metrics.finished(priority, "rejected", None)
        self._metrics.rejected(reason)
