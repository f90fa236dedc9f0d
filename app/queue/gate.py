"""The dispatch gate: the backend's rate budgets and circuit breaker, asked before a request leaves the queue.

When the gate holds the queue's head back, it arms one timer for exactly when the budget allows, and calls
the scheduler's dispatch again then: nothing polls.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from app.errors import BreakerOpen
from app.limits.breaker import BreakerState, CircuitBreaker
from app.limits.limiter import UpstreamLimiter
from app.metrics import Metrics
from app.queue.job import Job


class DispatchGate:
    """Says whether the head of the queue may go now; remembers why it waits, and wakes dispatch when it may."""

    __slots__ = ("_clock", "_held_since", "_metrics", "_timer", "_until", "breaker", "held_by", "limiter")

    def __init__(
        self,
        limiter: UpstreamLimiter | None,
        breaker: CircuitBreaker | None,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.limiter = limiter
        self.breaker = breaker
        self._metrics = metrics
        self._clock = clock
        self.held_by: str | None = None  # why the head waits although a slot is free, while it does
        self._held_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._until = 0.0

    def idle(self) -> bool:
        """Whether nothing could hold a dispatch back now (no budget in force, the breaker closed)."""
        return (self.limiter is None or self.limiter.idle()) and (
            self.breaker is None or self.breaker.state is BreakerState.CLOSED
        )

    def refusal(self) -> BreakerOpen | None:
        """The error a new request meets while the breaker is open, else None."""
        breaker = self.breaker
        if breaker is None or breaker.state is not BreakerState.OPEN:
            return None
        retry_after = breaker.retry_after()
        return BreakerOpen(
            f"the upstream failed {breaker.failures} times in a row; requests are refused for "
            f"{retry_after:.1f}s more, then one probe is let through",
            retry_after=retry_after,
        )

    def admits(self, job: Job, now: float, wake: Callable[[], object]) -> bool:
        """Whether `job`, the queue's head, may be dispatched now; if not, `wake` is called once it may."""
        wait, reason = self._delay(job)
        if wait > 0:
            self._hold(wait, reason, now, wake)
            return False
        self.release(now)
        return True

    def release(self, now: float) -> None:
        """Nothing is held back any more (dispatched, or nothing waits): record how long the hold lasted."""
        if self._held_since is not None:
            self._metrics.rate_limit_wait(now - self._held_since)
            self._held_since = None
            self.close()
        self.held_by = None

    def dispatched(self, job: Job) -> None:
        """`job` went to the backend: charge its budgets; while half open, it is the breaker's probe."""
        if self.limiter is not None:
            self.limiter.charge(job.cost)
        if self.breaker is not None:
            self.breaker.dispatched(job)

    def ended(self, job: Job, used_tokens: int | None) -> None:
        """`job` ended; settle its budgets with what it really used, if it was dispatched."""
        if self.limiter is not None and job.started is not None:
            self.limiter.done(job.cost, used_tokens)
        if self.breaker is not None:
            self.breaker.settled(job)

    @property
    def hold_until(self) -> float | None:
        """When the hold timer will dispatch again (monotonic), or None if none is armed."""
        return self._until if self._timer is not None else None

    def close(self) -> None:
        """Disarm the hold timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _delay(self, job: Job) -> tuple[float, str | None]:
        if self.breaker is not None:
            wait = self.breaker.delay()
            if wait > 0:
                return wait, f"circuit_breaker_{self.breaker.state.value}"
        if self.limiter is not None:
            return self.limiter.delay(job.cost)
        return 0.0, None

    def _hold(self, wait: float, reason: str | None, now: float, wake: Callable[[], object]) -> None:
        self.held_by = reason
        if self._held_since is None:
            self._held_since = now
        if wait == float("inf"):
            return  # the breaker's probe is out; its verdict dispatches again
        due = now + wait
        if self._timer is not None:
            if self._until <= due:
                return
            self._timer.cancel()
        self._until = due

        def fire() -> None:
            self._timer = None
            wake()

        self._timer = asyncio.get_running_loop().call_later(wait, fire)
