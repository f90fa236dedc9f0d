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

    def cap(self, remaining: float) -> None:
        """Lower the level to what an authority (the upstream's headers) says is left."""
        self._level = min(self.level(), remaining)

    def reset_in(self) -> float:
        """Seconds until the bucket is full again."""
        return max(0.0, (self.limit - self.level()) / self.rate)

    def remaining(self) -> int:
        """Whole units available now, never below zero."""
        return max(0, math.floor(self.level()))
