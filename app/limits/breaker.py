"""A circuit breaker in front of the upstream: stop sending work to a server that keeps failing."""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum


class BreakerState(StrEnum):
    """closed: traffic flows; open: refuse until the cooldown ends; half_open: one probe decides."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_GAUGE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class CircuitBreaker:
    """Opens after `threshold` consecutive failures, for `cooldown` seconds; then lets one probe through.

    The probe's first upstream answer closes the breaker (any answer that is not a failure) or opens it for
    another cooldown. Failures are connection errors and timeouts, counted per attempt, and 5xx answers, counted
    once per distinct request content (`cause`) in a run: a body the upstream fails on, sent again and again
    or retried, is that body's problem and must not shut every key out.
    `on_change(state)` is called whenever the state changes, so the queue can refuse what waits or resume.

    >>> breaker = CircuitBreaker(threshold=3, cooldown=30)
    >>> for _ in range(3): breaker.failure()  # doctest: +SKIP
    >>> breaker.state  # doctest: +SKIP
    <BreakerState.OPEN: 'open'>
    """

    __slots__ = ("_causes", "_clock", "_opened_at", "_state", "cooldown", "failures", "on_change", "probe", "threshold")

    def __init__(self, threshold: int, cooldown: float, clock: Callable[[], float] = time.monotonic):
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self.failures = 0
        self._causes: set[object] = set()  # the request contents whose 5xx this run of failures has counted
        self.probe: object | None = None  # the request let through to test the upstream, while half open
        self.on_change: Callable[[BreakerState], object] = lambda _: None

    @property
    def state(self) -> BreakerState:
        """The state now: an open breaker turns half open by itself once its cooldown is over."""
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.cooldown:
            self._state = BreakerState.HALF_OPEN
            self.probe = None
        return self._state

    @property
    def gauge(self) -> int:
        """0 closed, 1 half open, 2 open: for a Prometheus gauge."""
        return _GAUGE[self.state]

    def retry_after(self) -> float:
        """Seconds until an open breaker lets a probe through; 0 unless open."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.cooldown - self._clock())

    def delay(self) -> float:
        """Seconds before the next request may be dispatched: inf while a probe is out, deciding."""
        state = self.state
        if state is BreakerState.CLOSED:
            return 0.0
        if state is BreakerState.OPEN:
            return self.retry_after()
        return 0.0 if self.probe is None else float("inf")

    def dispatched(self, request: object) -> None:
        """A request went to the upstream; while half open, it is the probe."""
        if self.probe is None and self.state is BreakerState.HALF_OPEN:
            self.probe = request

    def settled(self, request: object) -> None:
        """A request ended; if it was the probe and gave no verdict (cancelled), let another probe go."""
        if self.probe is request:
            self.probe = None
            if self._state is BreakerState.HALF_OPEN:
                self.on_change(BreakerState.HALF_OPEN)

    def success(self) -> None:
        """The upstream answered: close, and forget earlier failures."""
        self.failures = 0
        self._causes.clear()
        if self._state is not BreakerState.CLOSED:
            self._state = BreakerState.CLOSED
            self.probe = None
            self.on_change(BreakerState.CLOSED)

    def trip(self) -> None:
        """Open now, whatever the count: the server is unreachable (a member of a fleet, whose work can go
        to the others)."""
        self.failures += 1
        if self.state is not BreakerState.OPEN:
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()
            self.probe = None
            self.on_change(BreakerState.OPEN)

    def answered(self) -> None:
        """A background probe got an answer while open: let one real request through now (half open)
        instead of waiting out the cooldown."""
        if self.state is BreakerState.OPEN:
            self._state = BreakerState.HALF_OPEN
            self.probe = None
            self.on_change(BreakerState.HALF_OPEN)

    def failure(self, cause: object = None) -> None:
        """The upstream failed once: open when the threshold is reached, or at once when a probe fails.

        `cause` names the request content of a 5xx (None for a connection error or a timeout): a content
        already counted in this run of failures is not counted again.
        """
        state = self.state
        if cause is not None and state is BreakerState.CLOSED:
            if cause in self._causes:
                return
            self._causes.add(cause)
        self.failures += 1
        if state is BreakerState.OPEN:
            return
        if state is BreakerState.HALF_OPEN or self.failures >= self.threshold:
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()
            self.probe = None
            self.on_change(BreakerState.OPEN)
