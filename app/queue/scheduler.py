"""The bounded priority queue in front of the backend, and the bookkeeping of every request's life.

The event loop is the one owner of this state: every method runs to completion without awaiting, so no
lock is needed and nothing polls. Dispatch happens the moment a slot frees or a request arrives.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from app.errors import BreakerOpen, Conflict, GatewayError, QueueFull, RequestTimeout, ShuttingDown
from app.limits.breaker import BreakerState, CircuitBreaker
from app.limits.keys import Tenant
from app.limits.limiter import UpstreamLimiter
from app.metrics import Metrics
from app.queue.aging import Aging
from app.queue.deadlines import Deadlines
from app.queue.job import Job, terminal_state
from app.queue.priority_queue import PriorityQueue
from app.queue.slots import SlotPool
from app.schemas import CompletionKind, JobState, QueueStatus, WorkerStatus
from app.settings import Priority, QueueFullBehavior

log = logging.getLogger("app.queue")

_OUTCOME = {
    JobState.COMPLETED: "completed",
    JobState.FAILED: "failed",
    JobState.CANCELLED: "cancelled",
    JobState.TIMEOUT: "timeout",
}
_SERVICE_EWMA_WEIGHT = 0.2  # how fast the service-time estimate follows change: about the last 5 requests


class Scheduler:
    """Admits, orders, dispatches and retires requests; see the module docstring."""

    def __init__(
        self,
        *,
        max_concurrent: int,
        max_queue_size: int,
        request_timeout: float,
        full_behavior: QueueFullBehavior,
        history_size: int,
        metrics: Metrics,
        aging_seconds: float | None = None,
        limiter: UpstreamLimiter | None = None,
        breaker: CircuitBreaker | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.max_concurrent = max_concurrent
        self.max_queue_size = max_queue_size
        self.request_timeout = request_timeout
        self.full_behavior = full_behavior
        self._history_size = history_size
        self._metrics = metrics
        self._clock = clock
        self._wall_clock = wall_clock

        self._queue: PriorityQueue[Job] = PriorityQueue(levels=len(Priority))
        # QUEUE_FULL_BEHAVIOR=wait: requests that found the queue full, in the same order, waiting for a place.
        self._overflow: PriorityQueue[Job] = PriorityQueue(levels=len(Priority))
        self._slots = SlotPool(max_concurrent)
        self._live: dict[str, Job] = {}
        self._history: OrderedDict[str, Job] = OrderedDict()
        self._service_time: float | None = None
        self._deadlines = Deadlines(clock, self._expire)
        self._aging = Aging(aging_seconds, len(Priority)) if aging_seconds else None
        self._limiter = limiter
        self._breaker = breaker
        # Whether dispatch must ever ask a limiter or a breaker: without them the scheduler's paths stay lean.
        self._gates = limiter is not None or breaker is not None
        if breaker is not None:
            breaker.on_change = self._breaker_changed
        # While the limiter or the breaker holds the queue's head back: why, since when, and the timer that
        # dispatches again the moment the budget allows.
        self.held_by: str | None = None
        self._held_since: float | None = None
        self._hold_timer: asyncio.TimerHandle | None = None
        self._hold_until = 0.0
        self.draining = False

        self.total_queued = 0
        self.total_processed = 0
        self.total_failed = 0
        self.total_rejected = 0
        self.total_timed_out = 0
        self.total_cancelled = 0
        metrics.watch_queue(self.queue_sizes, lambda: self._slots.busy)

    # Admission and dispatch -----------------------------------------------------------------------------

    def submit(
        self,
        request_id: str,
        kind: CompletionKind,
        priority: Priority,
        owner: str | None,
        *,
        cost: int = 0,
        tenant: Tenant | None = None,
    ) -> Job:
        """Accept a request: dispatch it now if a slot is free, else queue it; raise if it cannot wait.

        `cost` is what the request is charged in tokens when it is dispatched; `tenant` is its key's policy,
        whose waiting count it joins while it waits.
        """
        if self.draining:
            self.count_rejection(priority, "shutting_down")
            raise ShuttingDown()
        if self._breaker is not None and self._breaker.state is BreakerState.OPEN:
            self.count_rejection(priority, "breaker_open")
            retry_after = self._breaker.retry_after()
            raise BreakerOpen(
                f"the upstream failed {self._breaker.failures} times in a row; requests are refused for "
                f"{retry_after:.1f}s more, then one probe is let through",
                retry_after=retry_after,
            )
        if request_id in self._live:
            raise Conflict(
                f"request id {request_id!r} belongs to a request that is still running",
                code="duplicate_request_id",
                param="X-Request-ID",
            )
        waiting = self._queue.size
        if waiting >= self.max_queue_size and self.full_behavior is QueueFullBehavior.REJECT:
            self.count_rejection(priority, "queue_full")
            retry_after = self.estimate_wait(1)
            raise QueueFull(
                f"the queue is full ({waiting} requests waiting); retry in {retry_after:.1f}s",
                retry_after=retry_after,
            )
        now_free = self._slots.idle and not waiting and not (self._gates and self._gated())
        if tenant is not None and not now_free:
            try:
                tenant.check_queue()
            except GatewayError:
                self.count_rejection(priority, "key_queue_limit")
                raise

        now = self._clock()
        job = Job(request_id, kind, priority, owner, now, self._wall_clock(), now + self.request_timeout)
        if cost:
            job.cost = cost
        if tenant is not None:
            job.tenant = tenant
        self._live[request_id] = job
        self.total_queued += 1
        self._deadlines.add(job)
        if now_free:
            self._start(job, now)
            return job
        if tenant is not None:
            tenant.waiting += 1
        if waiting < self.max_queue_size:
            if self._aging is None:
                self._queue.push(job, job.rank, owner)
            else:
                self._enqueue(job)
            if self._gates and self._slots.idle:
                self._dispatch(now)  # only a gate holds a request back from a free slot: arm its timer
        else:
            self._overflow.push(job, job.rank, owner)
        return job

    def count_rejection(self, priority: Priority, reason: str) -> None:
        """A request was refused before queueing, for one of metrics.REJECTION_REASONS."""
        self.total_rejected += 1
        self._metrics.finished(priority, "rejected", None)
        self._metrics.rejected(reason)

    def _enqueue(self, job: Job) -> None:
        if self._aging is None:
            self._queue.push(job, job.rank, job.owner)
            return
        now = self._clock()
        self._promote(now)  # those who earned a level go ahead of this newcomer
        job.rank = self._aging.level_for(job, now)
        self._queue.push(job, job.rank, job.owner)
        self._aging.track(job)

    def _promote(self, now: float) -> None:
        """Move every job whose wait has earned it a level up that level (QUEUE_AGING_SECONDS)."""
        assert self._aging is not None
        for job in self._aging.due(now, self._queue):
            self._queue.remove(job, job.rank)
            job.rank -= 1
            self._queue.push(job, job.rank, job.owner)
            self._aging.track(job)

    def _gated(self) -> bool:
        """Whether the limiter or the breaker might hold a dispatch back now (else: no need to ask)."""
        return (self._limiter is not None and not self._limiter.idle()) or (
            self._breaker is not None and self._breaker.state is not BreakerState.CLOSED
        )

    def _gate_delay(self, job: Job) -> tuple[float, str | None]:
        if self._breaker is not None:
            wait = self._breaker.delay()
            if wait > 0:
                return wait, f"circuit_breaker_{self._breaker.state.value}"
        if self._limiter is not None:
            return self._limiter.delay(job.cost)
        return 0.0, None

    def _hold(self, wait: float, reason: str | None, now: float) -> None:
        """The head must wait `wait` seconds for its budget: remember why, and wake up exactly then."""
        self.held_by = reason
        if self._held_since is None:
            self._held_since = now
        if wait == float("inf"):
            return  # the breaker's probe is out; its verdict dispatches again
        due = now + wait
        if self._hold_timer is not None:
            if self._hold_until <= due:
                return
            self._hold_timer.cancel()
        self._hold_until = due
        self._hold_timer = asyncio.get_running_loop().call_later(wait, self.resume)

    @property
    def hold_until(self) -> float | None:
        """When the hold timer will dispatch again (monotonic), or None if none is armed."""
        return self._hold_until if self._hold_timer is not None else None

    def _unhold(self) -> None:
        self.held_by = None
        self._held_since = None

    def resume(self) -> None:
        """Dispatch what the budgets allow now (the hold timer calls this when they refill)."""
        self._hold_timer = None
        self._dispatch()

    def _start(self, job: Job, now: float) -> None:
        job.slot = self._slots.take(job)
        job.started = now
        job.mark_dispatched()
        self._metrics.dispatched(job.priority, now - job.arrived)
        if self._gates:
            if self._limiter is not None:
                self._limiter.charge(job.cost)
            if self._breaker is not None:
                self._breaker.dispatched(job)

    def _dispatch(self, now: float | None = None) -> None:
        """Fill idle slots from the queue as far as the budgets allow, refilling the queue from the overflow."""
        if now is None:
            now = self._clock()
        if self._aging is not None:
            self._promote(now)
        idle, queue, overflow = self._slots.idle, self._queue, self._overflow
        while True:
            while idle:
                if self._gates and self._gated():
                    job = queue.peek()
                    if job is None:
                        self._unhold()
                        break
                    wait, reason = self._gate_delay(job)
                    if wait > 0:
                        self._hold(wait, reason, now)
                        break
                    queue.pop()
                else:
                    job = queue.pop()
                    if job is None:
                        self._unhold()
                        break
                if self._held_since is not None:
                    self._metrics.rate_limit_wait(now - self._held_since)
                    self._unhold()
                if job.tenant is not None:
                    job.tenant.waiting -= 1
                self._start(job, now)
            if not overflow.size:
                return
            moved = False
            while overflow.size and queue.size < self.max_queue_size:
                job = overflow.pop()
                if job is None:
                    break
                self._enqueue(job)
                moved = True
            if not moved or not idle or self.held_by is not None:
                return

    def _breaker_changed(self, state: BreakerState) -> None:
        if state is BreakerState.OPEN:
            # Nothing that waits can run before the cooldown ends: tell it now rather than at its timeout.
            assert self._breaker is not None
            retry_after = self._breaker.retry_after()
            waiting = self._queue.items() + self._overflow.items()
            for job in waiting:
                self.abort(
                    job,
                    BreakerOpen(f"the upstream is failing; retry in {retry_after:.1f}s", retry_after=retry_after),
                )
            if waiting:
                log.warning("circuit breaker open: %d waiting requests answered 503", len(waiting))
        else:
            self._dispatch()

    # Ending -----------------------------------------------------------------------------------------------

    def abort(self, job: Job, error: GatewayError) -> bool:
        """Stop a request for `error`, wherever it is; False if it had already ended."""
        if job.is_terminal:
            return False
        job.interrupt(error)
        if job.state is JobState.QUEUED:
            self.finish(job, error)
        # A running job ends when its handler leaves the abort scope and calls finish().
        return True

    def finish(self, job: Job, error: GatewayError | None) -> None:
        """Retire a request exactly once, free what it held, and dispatch the next."""
        if job.finished is not None:  # already terminal
            return
        now = self._clock()
        state = JobState.COMPLETED if error is None else terminal_state(error)
        if job.watched:
            self._deadlines.discard(job)
        tenant = job.tenant
        if job.queue_owner is not None:
            self._queue.remove(job, job.rank) or self._overflow.remove(job, job.rank)
            if tenant is not None:
                tenant.waiting -= 1
        if tenant is not None and job.cost:
            self._settle_tenant(job)
        if self._gates:
            if self._limiter is not None and job.started is not None:
                self._limiter.done(job.cost, job.used_tokens)
            if self._breaker is not None:
                self._breaker.settled(job)
        slot = job.slot
        if slot is not None:
            self._slots.give(slot, state is JobState.COMPLETED)
            job.slot = None
            assert job.started is not None
            held = now - job.started
            previous = self._service_time
            self._service_time = held if previous is None else previous + _SERVICE_EWMA_WEIGHT * (held - previous)
        if error is not None and job.error is None:
            job.error = error
        job.mark_finished(state, now)
        if state is JobState.COMPLETED:
            self.total_processed += 1
        elif state is JobState.FAILED:
            self.total_failed += 1
        elif state is JobState.TIMEOUT:
            self.total_timed_out += 1
        else:
            self.total_cancelled += 1
        self._metrics.finished(job.priority, _OUTCOME[state], now - job.arrived)
        self._retire(job)
        self._dispatch(now)

    def _settle_tenant(self, job: Job) -> None:
        """Square the key's token budget with what the request really used (nothing, if it never ran)."""
        assert job.tenant is not None
        used = 0 if job.started is None else job.used_tokens
        if used is not None:  # else the backend did not say, and the estimate stands
            job.tenant.settle(job.cost, used)

    def _retire(self, job: Job) -> None:
        if self._live.get(job.id) is job:
            del self._live[job.id]
        if self._history_size:
            self._history.pop(job.id, None)  # a reused id moves to the newest end
            self._history[job.id] = job
            if len(self._history) > self._history_size:
                self._history.popitem(last=False)

    def _expire(self, job: Job) -> None:
        where = "in the queue" if job.state is JobState.QUEUED else "at the backend"
        self.abort(job, RequestTimeout(f"request timed out after {self.request_timeout:g}s ({where})"))

    def drain(self) -> None:
        """Stop taking work and answer every waiting request 503; running ones go on to the end."""
        if self.draining:
            return
        self.draining = True
        waiting = self._queue.items() + self._overflow.items()
        for job in waiting:
            self.abort(job, ShuttingDown())
        log.info("draining: %d waiting requests answered 503, %d running", len(waiting), self._slots.busy)

    def close(self) -> None:
        """Stop everything still running (the drain grace period is over)."""
        self.drain()
        for job in list(self._live.values()):
            self.abort(job, ShuttingDown("the gateway stopped before this request finished"))
        self._deadlines.close()
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None

    # Reading ----------------------------------------------------------------------------------------------

    def lookup(self, request_id: str) -> Job | None:
        """A live or remembered request."""
        return self._live.get(request_id) or self._history.get(request_id)

    def position(self, job: Job) -> int | None:
        """1-based place of a waiting request, counting the overflow after the queue proper."""
        rank = job.rank
        place = self._queue.position(job, rank)
        if place is not None:
            return place
        place = self._overflow.position(job, rank)
        return None if place is None else len(self._queue) + place

    def queue_sizes(self) -> dict[str, int]:
        """Waiting requests by the level they wait at (aging may have raised them), overflow included."""
        if self._aging is not None:
            self._promote(self._clock())
        return {p.value: self._queue.count(p.rank) + self._overflow.count(p.rank) for p in Priority}

    @property
    def in_flight(self) -> int:
        """Requests at the backend now."""
        return self._slots.busy

    @property
    def waiting(self) -> int:
        """Requests waiting, overflow included."""
        return len(self._queue) + len(self._overflow)

    def estimate_wait(self, places: int) -> float:
        """Seconds until `places` more requests could be taken, from the measured service time.

        With every slot busy, a place frees about every service_time / max_concurrent seconds. Before the
        first request has finished there is no measure yet, and one second is the honest floor.
        """
        places += len(self._overflow)
        if self._service_time is None:
            return 1.0
        return max(places * self._service_time / self.max_concurrent, 0.001)

    def waiting_for(self, job: Job) -> str | None:
        """What a waiting request waits for: a place in the queue, a budget, or a backend slot."""
        if job.state is not JobState.QUEUED:
            return None
        if job.queue_owner is self._overflow:
            return "queue_space"
        return self.held_by or "backend_slot"

    def budget_remaining(self) -> dict[str, float]:
        """What is left of the backend's rate budgets, for the metrics."""
        return {} if self._limiter is None else self._limiter.remaining()

    def _breaker_status(self) -> dict[str, Any] | None:
        breaker = self._breaker
        if breaker is None:
            return None
        return {
            "state": breaker.state.value,
            "consecutive_failures": breaker.failures,
            "threshold": breaker.threshold,
            "retry_after_seconds": round(breaker.retry_after(), 3),
        }

    def status(self) -> QueueStatus:
        """Seed 003's queue status plus priorities, totals and per-worker health."""
        return QueueStatus(
            queue_size=self.waiting,
            processing_count=self._slots.busy,
            max_concurrent=self.max_concurrent,
            max_queue_size=self.max_queue_size,
            total_processed=self.total_processed,
            total_failed=self.total_failed,
            total_queued=self.total_queued,
            active_requests=self.waiting + self._slots.busy,
            is_running=not self.draining,
            queue_size_by_priority=self.queue_sizes(),
            waiting_for_admission=len(self._overflow),
            total_rejected=self.total_rejected,
            total_timed_out=self.total_timed_out,
            total_cancelled=self.total_cancelled,
            queue_full_behavior=self.full_behavior.value,
            aging_seconds=self._aging.period if self._aging is not None else None,
            dispatch_held_by=self.held_by,
            rate_limits=self._limiter.status() if self._limiter is not None else None,
            circuit_breaker=self._breaker_status(),
            estimated_service_seconds=self._service_time,
            workers=[
                WorkerStatus(
                    id=slot.id,
                    busy=slot.job is not None,
                    current_request_id=slot.job.id if slot.job is not None else None,
                    processed=slot.processed,
                    errors=slot.errors,
                )
                for slot in self._slots.slots
            ],
        )
