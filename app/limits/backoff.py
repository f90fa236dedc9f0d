"""Exponential backoff with full jitter (AWS architecture blog), honouring a server's Retry-After."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """delay(attempt) is uniform in [0, min(cap, base * 2**attempt)], but never shorter than Retry-After.

    Full jitter spreads retries of many clients that failed together, so they do not return together.

    >>> Backoff(base=0.5, cap=8.0, rng=lambda: 1.0).delay(3)
    4.0
    """

    __slots__ = ("_rng", "base", "cap")

    def __init__(self, base: float, cap: float, rng: Callable[[], float] = random.random):
        self.base = base
        self.cap = cap
        self._rng = rng

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `attempt` (0 for the first retry)."""
        ceiling = min(self.cap, self.base * (2.0 ** min(attempt, 62)))
        jittered = self._rng() * ceiling
        return jittered if retry_after is None else max(jittered, retry_after)
