"""The bounded priority queue in front of the backend: admission, order, dispatch, and each request's end.

The event loop is the one owner of this state: every method runs to completion without awaiting, so no
lock is needed and nothing polls. Dispatch happens the moment a slot frees or a request arrives.
A request ends in one place, retire(), which the completion service calls once per request it admitted.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from app.backends.base import Usage
from app.errors import BreakerOpen, Conflict, GatewayError, QueueFull, RequestTimeout, ShuttingDown
from app.limits.breaker import BreakerState
from app.limits.keys import KeyAccount
from app.metrics import Metrics
from app.queue.aging import Aging
from app.queue.deadlines import Deadlines
from app.queue.gate import DispatchGate
from app.queue.job import Job, Totals, terminal_state
from app.queue.priority_queue import PriorityQueue
from app.queue.service_time import ServiceTime
from app.queue.slots import Slot, SlotPool
from app.settings import QueueFullBehavior
from app.types import CompletionKind, JobState, Priority

log = logging.getLogger("app.queue")


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
        gate: DispatchGate | None = None,
        dispatch_margin: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.max_concurrent = max_concurrent
        self.max_queue_size = max_queue_size
        self.request_timeout = request_timeout
        self.full_behavior = full_behavior
        self.gate = gate
        # A waiting request whose remaining time is under this many average service times is answered 408
        # instead of dispatched: it would most likely be cut off at its timeout, its upstream work wasted.
        self.dispatch_margin = dispatch_margin
        self.aging = Aging(aging_seconds, len(Priority)) if aging_seconds else None
        self.totals = Totals()
        self.draining = False
        self.service = ServiceTime(max_concurrent)  # how long a request holds a slot, and the waits it implies
        self._history_size = history_size
        self._metrics = metrics
        self._clock = clock
        self._wall_clock = wall_clock
        self._queue: PriorityQueue[Job] = PriorityQueue(levels=len(Priority))
        # QUEUE_FULL_BEHAVIOR=wait: requests that found the queue full, in the same order, waiting for a place.
        self._overflow: PriorityQueue[Job] = PriorityQueue(levels=len(Priority))
        self._slots = SlotPool(max_concurrent)
        # By (key name, request id): ids are the client's own, so each key has its own: another key's use of an
        # id is neither refused nor seen, and never touches this key's record.
        self._live: dict[tuple[str | None, str], Job] = {}
        self._history: OrderedDict[tuple[str | None, str], Job] = OrderedDict()
        self._deadlines = Deadlines(clock, self._expire)

    # Admission and dispatch -----------------------------------------------------------------------------

    def submit(
        self, request_id: str, kind: CompletionKind, priority: Priority, key: KeyAccount | None, cost: int = 0
    ) -> Job:
        """Accept a request: dispatch it now if a slot is free, else queue it; raise if it cannot wait.

        `cost` is what the request is charged in tokens when it is dispatched; `key` is its client key's
        account, whose waiting count it joins while it waits.
        """
        if self.draining:
            self.count_rejection(priority, "shutting_down")
            raise ShuttingDown()
        refusal = self.gate.refusal() if self.gate is not None else None
        if refusal is not None:
            self.count_rejection(priority, "breaker_open")
            raise refusal
        if (key.name if key is not None else None, request_id) in self._live:
            raise Conflict(
                f"request id {request_id!r} belongs to a request that is still running",
                code="duplicate_request_id",
                param="X-Request-ID",
            )
        waiting = self._queue.size
        full = waiting >= self.max_queue_size
        if full and self.full_behavior is QueueFullBehavior.REJECT:
            raise self.refuse_full(priority)
        at_once = self._slots.idle and not waiting and (self.gate is None or self.gate.idle())
        if key is not None and not at_once:
            try:
                key.check_queue()
            except GatewayError:
                self.count_rejection(priority, "key_queue_limit")
                raise

        now = self._clock()
        job = Job(request_id, kind, priority, key, now, self._wall_clock(), now + self.request_timeout, cost)
        self._live[job.key_name, request_id] = job
        self.totals.queued += 1
        self._deadlines.add(job)
        if at_once:
            self._start(job, now)
            return job
        if key is not None:
            key.joined()
        if full:
            self._overflow.push(job, job.rank, job.key_name)
        else:
            self._enqueue(job, now)
            if self._slots.idle:
                self._dispatch(now)  # only the gate holds a request back from a free slot: it arms its timer
        return job

    def sheds(self) -> bool:
        """Whether a new request would now be refused for a full queue, and for nothing that comes first.

        The HTTP layer asks this before it does any work for a completion: under a flood of requests past
        capacity, refusing each must cost little, or the flood starves the requests being served.
        """
        return (
            self._queue.size >= self.max_queue_size
            and self.full_behavior is QueueFullBehavior.REJECT
            and not self.draining
            and (self.gate is None or self.gate.refusal() is None)
        )

    def refuse_full(self, priority: Priority) -> QueueFull:
        """Count a request refused for a full queue, and the error that tells it when to come back."""
        self.count_rejection(priority, "queue_full")
        retry_after = self.service.appointment(self._clock())
        return QueueFull(
            f"the queue is full ({self._queue.size} requests waiting); retry in {retry_after:.1f}s",
            retry_after=retry_after,
        )

    def count_rejection(self, priority: Priority, reason: str) -> None:
        """A request was refused before queueing, for one of metrics.REJECTION_REASONS."""
        self.totals.rejected += 1
        self._metrics.finished(priority, "rejected", None)
        self._metrics.rejected(reason)

    def _enqueue(self, job: Job, now: float) -> None:
        if self.aging is not None:
            self._promote(now)  # those who earned a level go ahead of this newcomer
            job.rank = self.aging.level_for(job, now)
        self._queue.push(job, job.rank, job.key_name)
        if self.aging is not None:
            self.aging.track(job)

    def _promote(self, now: float) -> None:
        """Move every job whose wait has earned it a level up that level (QUEUE_AGING_SECONDS)."""
        assert self.aging is not None
        for job in self.aging.due(now, self._queue):
            self._queue.remove(job, job.rank)
            job.rank -= 1
            self._queue.push(job, job.rank, job.key_name)
            self.aging.track(job)

    def _start(self, job: Job, now: float) -> None:
        job.slot = self._slots.take(job)
        job.started = now
        job.mark_dispatched()
        self._metrics.dispatched(job.priority, now - job.arrived)
        if self.gate is not None:
            self.gate.dispatched(job)

    def dispatch(self) -> None:
        """Dispatch what the slots and the gate allow now (the gate's hold timer calls this)."""
        self._dispatch(self._clock())

    def _dispatch(self, now: float) -> None:
        """Fill idle slots from the queue as far as the gate allows, refilling the queue from the overflow."""
        if self.aging is not None:
            self._promote(now)
        queue, overflow, gate = self._queue, self._overflow, self.gate
        while True:
            while self._slots.idle:
                job = queue.peek()
                if job is None:
                    if gate is not None:
                        gate.release(now)
                    break
                if self._too_late(job, now):
                    continue
                if gate is not None and not gate.admits(job, now, self.dispatch):
                    break
                queue.pop()
                if job.key is not None:
                    job.key.left()
                self._start(job, now)
            moved = False
            while overflow.size and queue.size < self.max_queue_size:
                job = overflow.pop()
                assert job is not None
                self._enqueue(job, now)
                moved = True
            if not moved or not self._slots.idle or (gate is not None and gate.held_by is not None):
                return

    def _too_late(self, job: Job, now: float) -> bool:
        """Answer 408 now, and True, if the job's remaining time is too short for a likely service time."""
        expected = self.service.average
        if not self.dispatch_margin or expected is None:
            return False
        left = job.deadline - now
        if left >= self.dispatch_margin * expected:
            return False
        self._metrics.timed_out_before_dispatch()
        self.abort(
            job,
            RequestTimeout(
                f"request timed out after {self.request_timeout:g}s (in the queue): {max(left, 0):.2f}s were left, "
                f"and a request takes about {expected:.2f}s at the backend"
            ),
        )
        return True

    def breaker_changed(self, state: BreakerState) -> None:
        """The breaker opened (answer what waits 503 now) or let traffic go again (dispatch)."""
        if state is BreakerState.OPEN:
            # Nothing that waits can run before the cooldown ends: tell it now rather than at its timeout.
            assert self.gate is not None and self.gate.breaker is not None
            retry_after = self.gate.breaker.retry_after()
            waiting = self._queue.items() + self._overflow.items()
            for job in waiting:
                self.abort(
                    job, BreakerOpen(f"the upstream is failing; retry in {retry_after:.1f}s", retry_after=retry_after)
                )
            if waiting:
                log.warning("circuit breaker open: %d waiting requests answered 503", len(waiting))
        else:
            self.dispatch()

    # Ending -----------------------------------------------------------------------------------------------

    def abort(self, job: Job, error: GatewayError) -> bool:
        """Stop a request for `error`, wherever it is; False if it had already ended.

        A waiting request leaves the queue at once; its handler wakes with `error` and retires it. A running
        one is interrupted inside its abort scope, and retired when its handler lets go.
        """
        if job.is_terminal:
            return False
        job.interrupt(error)
        self._unqueue(job)
        return True

    def _unqueue(self, job: Job) -> None:
        if job.waiting_in is None:
            return
        self._queue.remove(job, job.rank) or self._overflow.remove(job, job.rank)
        if job.key is not None:
            job.key.left()

    def retire(self, job: Job, error: GatewayError | None, usage: Usage | None) -> None:
        """End a request: record how it ended, free what it held, settle its budgets, dispatch the next.

        Called exactly once per submitted request, by the code that serves it.
        """
        assert not job.is_terminal, f"request {job.id} retired twice"
        now = self._clock()
        state = terminal_state(error)
        if job.watched:
            self._deadlines.discard(job)
        self._unqueue(job)
        used = None if usage is None else usage.total_tokens
        if job.key is not None and job.cost:
            spent = 0 if job.started is None else used
            if spent is not None:  # else the backend did not say, and the estimate stands
                job.key.settle(job.cost, spent)
        if self.gate is not None:
            self.gate.ended(job, used)
        if usage is not None:
            self._metrics.tokens(usage.prompt_tokens, usage.completion_tokens)
        slot = job.slot
        if slot is not None:
            self._slots.give(slot, state is JobState.COMPLETED)
            job.slot = None
            assert job.started is not None
            self.service.observe(now - job.started)
        if error is not None and job.error is None:
            job.error = error
        job.mark_finished(state, now)
        self.totals.ended(state)
        self._metrics.finished(job.priority, state.value, now - job.arrived)
        self._remember(job)
        self._dispatch(now)

    def _remember(self, job: Job) -> None:
        name = job.key_name, job.id
        if self._live.get(name) is job:
            del self._live[name]
        if self._history_size:
            self._history.pop(name, None)  # a reused id moves to the newest end
            self._history[name] = job  # a small record by now: see Job.mark_finished
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
        if self.gate is not None:
            self.gate.close()

    # Reading ----------------------------------------------------------------------------------------------

    def lookup(self, request_id: str, key_name: str | None) -> Job | None:
        """A live or remembered request of this key (None: authentication off)."""
        name = key_name, request_id
        return self._live.get(name) or self._history.get(name)

    def lookup_any(self, request_id: str) -> Job | None:
        """A live or remembered request of any key, the live first (for admin keys; it scans)."""
        for jobs in (self._live, self._history):
            for (_, known), job in reversed(jobs.items()):
                if known == request_id:
                    return job
        return None

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
        if self.aging is not None:
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

    @property
    def waiting_for_space(self) -> int:
        """Requests that found the queue full and wait for a place in it (QUEUE_FULL_BEHAVIOR=wait)."""
        return len(self._overflow)

    @property
    def slots(self) -> list[Slot]:
        """The backend's slots, busy or not."""
        return self._slots.slots

    def estimate_wait(self, places: int) -> float:
        """Seconds until `places` more requests could be taken, those waiting for queue space first."""
        return self.service.wait(places + len(self._overflow))

    def waiting_for(self, job: Job) -> str | None:
        """What a waiting request waits for: a place in the queue, a budget, or a backend slot."""
        if job.state is not JobState.QUEUED:
            return None
        if job.waiting_in is self._overflow:
            return "queue_space"
        held_by = self.gate.held_by if self.gate is not None else None
        return held_by or "backend_slot"
