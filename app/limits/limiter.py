"""The backend's own budgets (RATE_LIMIT_RPM, RATE_LIMIT_TPM) and the pauses the upstream asks for."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from app.limits.buckets import LearnedBudget, TokenBucket
from app.limits.headers import UpstreamBudget

# Requests reach the upstream a little later than they leave, and not all equally late: one that was held
# for its budget waits this much longer, so it arrives with a little to spare. At saturation the spacing
# between dispatches stays exactly 1/rate; only the first held request pays the guard, once.
JITTER_GUARD_SECONDS = 0.05


class UpstreamLimiter:
    """Says how long the next dispatch must wait so that the upstream never has to refuse it.

    Three sources, the strictest wins: our configured buckets; the remaining budget the upstream reported in
    its x-ratelimit-* headers, trusted until the reset it gave; and a pause after a 429 for its Retry-After.
    All of it is read on the event loop; nothing here sleeps or polls, the scheduler arms one timer.
    """

    __slots__ = (
        "_clock",
        "_in_flight",
        "_paused_until",
        "_upstream_requests",
        "_upstream_tokens",
        "on_pause",
        "requests",
        "tokens",
    )

    def __init__(self, rpm: int | None, tpm: int | None, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self.requests = TokenBucket(rpm, 60.0, clock) if rpm else None
        self.tokens = TokenBucket(tpm, 60.0, clock) if tpm else None
        self._paused_until = 0.0
        self._in_flight = 0
        self._upstream_requests = LearnedBudget(clock)  # what the upstream's headers say of its budgets
        self._upstream_tokens = LearnedBudget(clock)
        # Told of every pause the upstream asks for, in seconds: a 429, or a request budget it says is spent.
        self.on_pause: Callable[[float], object] = lambda _: None

    @property
    def counts_tokens(self) -> bool:
        """Whether requests need a token estimate (a TPM budget is set)."""
        return self.tokens is not None

    def delay(self, cost: int) -> tuple[float, str | None]:
        """Seconds until a request of `cost` tokens may go, and which budget holds it back (None: go now)."""
        now = self._clock()
        wait = 0.0
        reason = None
        if now < self._paused_until:
            wait, reason = self._paused_until - now, "upstream_retry_after"
        # What the upstream said is left, refilling at the pace its limit and reset imply (see LearnedBudget).
        needed = self._upstream_requests.wait(1)
        if needed > wait:
            wait, reason = needed, "upstream_requests"
        needed = self._upstream_tokens.wait(cost)
        if needed > wait:
            wait, reason = needed, "upstream_tokens"
        if self.requests is not None:
            needed = self.requests.wait(1)
            if needed > wait:
                wait, reason = needed, "rate_limit_requests"
        if self.tokens is not None:
            needed = self.tokens.wait(cost)
            if needed > wait:
                wait, reason = needed, "rate_limit_tokens"
        return (wait + JITTER_GUARD_SECONDS if wait > 0 else 0.0), reason

    def charge(self, cost: int) -> None:
        """A request of `cost` tokens was dispatched."""
        self._in_flight += 1
        if self.requests is not None:
            self.requests.take(1)
        if self.tokens is not None:
            self.tokens.take(cost)
        self._upstream_requests.take(1)
        self._upstream_tokens.take(cost)

    def done(self, charged: int, used: int | None) -> None:
        """A dispatched request ended; with its real usage known, return what the estimate over-charged."""
        self._in_flight -= 1
        if used is not None and self.tokens is not None:
            self.tokens.settle(charged, used)

    def learn(self, budget: UpstreamBudget) -> None:
        """Trust what the upstream says is left, refilling as its limit and reset say (see LearnedBudget).

        Requests still in flight may not have been counted when the upstream wrote its answer: they are
        taken off what it says is left, so the estimate errs on the side of waiting.
        """
        others = max(0, self._in_flight - 1)
        if budget.remaining_requests is not None:
            remaining = budget.remaining_requests - others
            self._upstream_requests.learn(remaining, budget.reset_requests, budget.limit_requests)
            if self.requests is not None:
                self.requests.cap(remaining)
            if remaining < 1:
                self.on_pause(self._upstream_requests.wait(1))
        if budget.remaining_tokens is not None:
            self._upstream_tokens.learn(budget.remaining_tokens, budget.reset_tokens, budget.limit_tokens)
            if self.tokens is not None:
                self.tokens.cap(budget.remaining_tokens)

    def pause(self, seconds: float) -> None:
        """The upstream refused with 429: send nothing for `seconds`."""
        self._paused_until = max(self._paused_until, self._clock() + seconds)
        self.on_pause(seconds)

    def idle(self) -> bool:
        """Nothing can hold dispatch back now: no budget set, no pause or learned budget in force."""
        if self.requests is not None or self.tokens is not None:
            return False
        return (
            self._clock() >= self._paused_until
            and not self._upstream_requests.active()
            and not self._upstream_tokens.active()
        )

    def remaining(self) -> dict[str, float]:
        """What is left of the configured budgets, by name ('requests', 'tokens'), for the metrics."""
        budgets = {"requests": self.requests, "tokens": self.tokens}
        return {name: float(bucket.remaining()) for name, bucket in budgets.items() if bucket is not None}

    def status(self) -> dict[str, Any]:
        """The limiter's state for /v1/queue/status (`rate_limits`)."""
        now = self._clock()

        def bucket(b: TokenBucket | None) -> dict[str, Any] | None:
            if b is None:
                return None
            return {"limit": int(b.limit), "remaining": b.remaining(), "reset_seconds": round(b.reset_in(), 3)}

        return {
            "requests_per_minute": bucket(self.requests),
            "tokens_per_minute": bucket(self.tokens),
            "upstream_requests": self._upstream_requests.status(),
            "upstream_tokens": self._upstream_tokens.status(),
            "paused_seconds": round(max(0.0, self._paused_until - now), 3),
        }
