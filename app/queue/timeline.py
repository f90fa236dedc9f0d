"""The last 15 minutes of the queue, one sample a second, kept in memory for the dashboard's charts and rates."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from app.types import Priority

SAMPLE_SECONDS = 1.0
SPAN_SECONDS = 15 * 60
RATE_SECONDS = 5  # rates are read over this many of the last samples
_WAITS_KEPT = 4096  # queue waits kept between two samples (the newest: the quantiles stay honest, memory bounded)


@dataclass(frozen=True, slots=True)
class Sample:
    """The queue at one moment, and what happened in the second before it."""

    at: float  # seconds since the epoch
    waiting: tuple[int, ...]  # by level, high first
    wait_p50: float | None  # of the requests dispatched in that second
    wait_p95: float | None
    completed: int  # totals since start: rates are their differences
    tokens: int


class Timeline:
    """A ring of Samples; `waits` collects the queue waits of requests dispatched since the last sample."""

    __slots__ = ("samples", "waits")

    def __init__(self) -> None:
        self.samples: deque[Sample] = deque(maxlen=int(SPAN_SECONDS / SAMPLE_SECONDS))
        self.waits: deque[float] = deque(maxlen=_WAITS_KEPT)

    def sample(self, at: float, waiting: dict[str, int], completed: int, tokens: int) -> None:
        """Record the queue now (`waiting` by priority name) with the waits collected since the last call."""
        waits = sorted(self.waits)
        self.waits.clear()
        self.samples.append(
            Sample(
                at,
                tuple(waiting.get(p.value, 0) for p in Priority),
                _quantile(waits, 0.5),
                _quantile(waits, 0.95),
                completed,
                tokens,
            )
        )

    def rates(self) -> tuple[float, float]:
        """Requests completed and tokens answered per second, over the last RATE_SECONDS samples."""
        samples = self.samples
        if len(samples) < 2:
            return 0.0, 0.0
        first, last = samples[max(0, len(samples) - 1 - RATE_SECONDS)], samples[-1]
        span = max(last.at - first.at, 1e-9)
        return (last.completed - first.completed) / span, (last.tokens - first.tokens) / span


def _quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
