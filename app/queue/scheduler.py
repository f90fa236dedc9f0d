"""The bounded priority queue in front of the backend, and the bookkeeping of every request's life.

The event loop is the one owner of this state: every method runs to completion without awaiting, so no
lock is needed and nothing polls. Dispatch happens the moment a slot frees or a request arrives.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from app.errors import Conflict, GatewayError, QueueFull, RequestTimeout, ShuttingDown
from app.metrics import Metrics
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
        self.draining = False

        self.total_queued = 0
        self.total_processed = 0
        self.total_failed = 0
        self.total_rejected = 0
        self.total_timed_out = 0
        self.total_cancelled = 0
        metrics.watch_queue(self.queue_sizes, lambda: self._slots.busy)

    # Admission and dispatch -----------------------------------------------------------------------------

    def submit(self, request_id: str, kind: CompletionKind, priority: Priority, owner: str | None) -> Job:
        """Accept a request: dispatch it now if a slot is free, else queue it; raise if it cannot wait."""
        if self.draining:
            self.total_rejected += 1
            self._metrics.finished(priority, "rejected", None)
            raise ShuttingDown()
        if request_id in self._live:
            raise Conflict(
                f"request id {request_id!r} belongs to a request that is still running",
                code="duplicate_request_id",
                param="X-Request-ID",
            )
        waiting = len(self._queue)
        if waiting >= self.max_queue_size and self.full_behavior is QueueFullBehavior.REJECT:
            self.total_rejected += 1
            self._metrics.finished(priority, "rejected", None)
            retry_after = self.estimate_wait(1)
            raise QueueFull(
                f"the queue is full ({waiting} requests waiting); retry in {retry_after:.1f}s",
                retry_after=retry_after,
            )

        now = self._clock()
        job = Job(request_id, kind, priority, owner, now, self._wall_clock(), now + self.request_timeout)
        self._live[request_id] = job
        self.total_queued += 1
        self._deadlines.add(job)
        if self._slots.free and not waiting:
            self._start(job, now)
        elif waiting < self.max_queue_size:
            self._queue.push(job, priority.rank)
        else:
            self._overflow.push(job, priority.rank)
        return job

    def _start(self, job: Job, now: float) -> None:
        job.slot = self._slots.take(job)
        job.started = now
        job.mark_dispatched()
        self._metrics.dispatched(job.priority, now - job.arrived)

    def _dispatch(self) -> None:
        """Fill free slots from the queue, then refill the queue from the overflow."""
        now = self._clock()
        while self._slots.free:
            job = self._queue.pop()
            if job is None:
                break
            self._start(job, now)
        while self._overflow and len(self._queue) < self.max_queue_size:
            job = self._overflow.pop()
            if job is None:
                break
            self._queue.push(job, job.priority.rank)

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
        if job.is_terminal:
            return
        now = self._clock()
        state = terminal_state(error)
        self._deadlines.discard(job)
        if job.queue_owner is not None:
            self._queue.remove(job, job.priority.rank) or self._overflow.remove(job, job.priority.rank)
        if job.slot is not None:
            self._slots.give(job.slot, ok=state is JobState.COMPLETED)
            job.slot = None
            assert job.started is not None
            held = now - job.started
            previous = self._service_time
            self._service_time = held if previous is None else previous + _SERVICE_EWMA_WEIGHT * (held - previous)
        if error is not None and job.error is None:
            job.error = error
        job.mark_finished(state, now)
        self._count(state)
        self._metrics.finished(job.priority, _OUTCOME[state], now - job.arrived)
        self._retire(job)
        self._dispatch()

    def _count(self, state: JobState) -> None:
        if state is JobState.COMPLETED:
            self.total_processed += 1
        elif state is JobState.FAILED:
            self.total_failed += 1
        elif state is JobState.TIMEOUT:
            self.total_timed_out += 1
        else:
            self.total_cancelled += 1

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
        log.info(
            "[RequestQueue] draining: %d waiting requests answered 503, %d running", len(waiting), self._slots.busy
        )

    def close(self) -> None:
        """Stop everything still running (the drain grace period is over)."""
        self.drain()
        for job in list(self._live.values()):
            self.abort(job, ShuttingDown("the gateway stopped before this request finished"))
        self._deadlines.close()

    # Reading ----------------------------------------------------------------------------------------------

    def lookup(self, request_id: str) -> Job | None:
        """A live or remembered request."""
        return self._live.get(request_id) or self._history.get(request_id)

    def position(self, job: Job) -> int | None:
        """1-based place of a waiting request, counting the overflow after the queue proper."""
        rank = job.priority.rank
        place = self._queue.position(job, rank)
        if place is not None:
            return place
        place = self._overflow.position(job, rank)
        return None if place is None else len(self._queue) + place

    def queue_sizes(self) -> dict[str, int]:
        """Waiting requests by priority, overflow included."""
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
