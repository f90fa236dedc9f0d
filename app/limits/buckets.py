"""A budget of units per period, refilled continuously: the model OpenAI and Groq use for RPM and TPM."""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class TokenBucket:
    """Holds up to `limit` units and refills `limit` per `period` seconds, a little at every instant.

    take() may drive the level below zero: a request larger than the whole budget still runs once the
    bucket is full, and the debt then holds back what follows, so the average rate is kept.

    >>> rpm = TokenBucket(60)            # 60 requests a minute, one a second once the burst is spent
    >>> rpm.wait(1)                      # seconds until one unit is there
    0.0
    >>> rpm.take(1)
    """

    __slots__ = ("_clock", "_level", "_updated", "limit", "period", "rate")

    def __init__(self, limit: float, period: float = 60.0, clock: Callable[[], float] = time.monotonic):
        if limit <= 0 or period <= 0:
            raise ValueError("a bucket needs a positive limit and period")
        self.limit = float(limit)
        self.period = period
        self.rate = self.limit / period
        self._clock = clock
        self._level = self.limit
        self._updated = clock()

    def level(self) -> float:
        """Units available now (negative while in debt)."""
        now = self._clock()
        if now > self._updated:
            self._level = min(self.limit, self._level + (now - self._updated) * self.rate)
            self._updated = now
        return self._level

    def wait(self, amount: float) -> float:
        """Seconds until `amount` units (at most the whole budget) are available; 0 if they are now."""
        missing = min(amount, self.limit) - self.level()
        return 0.0 if missing <= 0 else missing / self.rate

    def take(self, amount: float) -> None:
        """Spend `amount` units, going into debt if need be."""
        self._level = self.level() - amount

    def give(self, amount: float) -> None:
        """Return units spent on an estimate that proved too high."""
        self._level = min(self.limit, self.level() + amount)

    def settle(self, charged: float, used: float) -> None:
        """Square a charge made on an estimate with the real amount: give back the excess, or take the rest."""
        if used < charged:
            self.give(charged - used)
        elif used > charged:
            self.take(used - charged)

    def set_level(self, level: float) -> None:
        """Make the level what an authority (the upstream's headers) says it is now."""
        self.level()
        self._level = min(self.limit, level)

    def cap(self, remaining: float) -> None:
        """Lower the level to what an authority (the upstream's headers) says is left."""
        self._level = min(self.level(), remaining)

    def reset_in(self) -> float:
        """Seconds until the bucket is full again."""
        return max(0.0, (self.limit - self.level()) / self.rate)

    def remaining(self) -> int:
        """Whole units available now, never below zero."""
        return max(0, math.floor(self.level()))


class LearnedBudget:
    """One of the upstream's budgets as its x-ratelimit-* headers describe it: what is left now, and how it comes
    back.

    OpenAI and Groq refill continuously, and `reset` is the time until the budget is full again: so it refills
    (limit - remaining) / reset units a second. With the limit known, the budget is a TokenBucket at that
    rate, and one unit goes as each one refills; without it, what is left holds until the reset, all at once.

    Answers can come back in another order than the upstream wrote them, and one written earlier says more is
    left than one written later. When the budget will be full again (receipt + reset) only moves later as the
    upstream spends: an answer that says it is full sooner than an answer already read, by half a unit or more,
    tells of an older state, and may lower what is left but never raise it.
    """

    __slots__ = ("_clock", "_full_at", "_remaining", "_reset_at", "bucket")

    def __init__(self, clock: Callable[[], float]):
        self._clock = clock
        self.bucket: TokenBucket | None = None
        self._remaining = 0.0
        self._reset_at = 0.0
        self._full_at = 0.0  # the latest "full again" an answer told of, with the bucket's limit and rate

    def learn(self, remaining: float, reset: float | None, limit: int | None) -> None:
        """The upstream says `remaining` is left, full again in `reset` seconds, of `limit` (each may be None)."""
        now = self._clock()
        self._remaining, self._reset_at = remaining, now + (reset or 0.0)
        if limit is None or limit <= 0:
            self.bucket = None
            return
        rate = None
        if reset and limit > remaining:
            rate = (limit - remaining) / reset
        elif self.bucket is not None and self.bucket.limit == limit:
            rate = self.bucket.rate  # full again: the rate learned before still holds
        if rate is None:
            rate = limit / 60.0  # full, and nothing said yet of its pace: per minute, as RPM and TPM are
        full_at = self._reset_at
        if self.bucket is None or self.bucket.limit != limit or abs(self.bucket.rate - rate) > rate * 0.05:
            self.bucket = TokenBucket(limit, limit / rate, self._clock)
            self._full_at = full_at
        if full_at < self._full_at - 0.5 / rate:
            self.bucket.cap(remaining)  # an older state than one already read
        else:
            self.bucket.set_level(remaining)
            self._full_at = max(self._full_at, full_at)

    def wait(self, amount: float) -> float:
        """Seconds until `amount` units are there (0: now)."""
        if self.bucket is not None:
            return self.bucket.wait(amount)
        now = self._clock()
        if now >= self._reset_at or self._remaining >= amount:
            return 0.0
        return self._reset_at - now

    def take(self, amount: float) -> None:
        """`amount` units went out."""
        if self.bucket is not None:
            self.bucket.take(amount)
        elif self._clock() < self._reset_at:
            self._remaining -= amount

    def active(self) -> bool:
        """Whether it could hold a request back now (spent in part, and not yet full again)."""
        if self.bucket is not None:
            return self.bucket.level() < self.bucket.limit
        return self._clock() < self._reset_at

    def status(self) -> dict[str, float] | None:
        """For /v1/queue/status: what is left and when it is full; None once nothing holds."""
        if not self.active():
            return None
        if self.bucket is not None:
            return {
                "remaining": self.bucket.remaining(),
                "reset_seconds": round(self.bucket.reset_in(), 3),
                "limit": int(self.bucket.limit),
                "refill_per_second": round(self.bucket.rate, 4),
            }
        return {"remaining": int(self._remaining), "reset_seconds": round(self._reset_at - self._clock(), 3)}
