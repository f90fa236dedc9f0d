"""How long a waiting request will wait: the one estimator behind eta_seconds, admission by deadline, the
queue-position comments of a stream and every Retry-After the queue gives.

A request waits for releases of its pool's slots: one per request ahead of it, then its own. A busy slot frees
once its request has run its expected service time (one past it is expected to end within a tenth of it): the
pool's mean, or, where the recent times grow with the requests' sizes (the tokens they may generate), the
time its size implies (ServiceSamples.fit). When every slot is busy, the first release is the earliest of
their ends, sooner than the soonest expected one: each slot is taken to free uniformly within the spread the
recent times show about the fit (ServiceSamples.spread), and the first release is the median of the earliest
(against the soonest expected end, bench.eta_sim's median error 44 -> 42 % plain and 30.5 -> 29.4 % sized,
its p90 180 -> 183 % and 125 -> 114 %). After that each slot frees once per mean service time. Requests of
a higher level that arrive meanwhile go ahead too: with `load` = λ * service / slots the share of the slots
their measured arrival rate λ takes, they stretch the wait by 1 / sqrt(1 - load). The whole series of the
arrivals during the wait and those during theirs, 1 / (1 - load), is the mean wait, which the long tail of
busy periods pulls well above the typical one; no stretch at all is the wait of a request that no higher one
overtakes. Their geometric mean came closest to the real waits: against 1 + load + load² (used before), its
p90 error was lower at every load from 70 to 95 %, whether the sizes explain the latencies or not, and its
median error lower or level in all but one case (a model of the queue on a fake clock, then bench.eta_sim,
the scheduler itself on one, and bench.eta_bench).

Left out, and so a source of error: budgets that hold dispatch back (the estimate counts slots only), aging
(a request that rises a level waits less than estimated), and later arrivals of its own level from keys
whose turn comes before its own. Two refinements were measured and dropped (bench.eta_bench, and a simulation
of the scheduler on a fake clock): each slot's mean residual service time from the recent times, and every
k-th release as an order statistic (as the first is; in bench.eta_sim, plain median 42 -> 39 % but its p90
183 -> 188 %, sized level, for a cost of O(slots * k) per release).

Much of the error is chance, not the estimator's: bench.eta_sim also prints the best any estimator can do
from the state at arrival (at load 0.85, a median error of at least 36 % plain and 21 % sized, a p90 of at
least 83 % and 65 %), a wait of one release being a race between the slots' ends.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.queue.pool import Pool

_SAMPLES = 128  # service times averaged per pool
_ARRIVAL_WINDOW_SECONDS = 20.0  # arrival rates follow about this much recent history
_FIRST_SPAN = 5.0  # seconds a rate is read over at least: a first arrival or two is no rate yet
_MAX_LOAD = 0.95  # higher work past this share of the slots: the wait has no useful bound
_OVERLOADED_FACTOR = 1 / (1 - _MAX_LOAD)
_OVERDUE_SHARE = 0.1  # a request past its expected time is expected to end within this share of it
_FLOOR_SHARE = 0.05  # the least a request is expected to hold its slot, as a share of the mean
_FIRST_CANDIDATES = 64  # the first release is reckoned from the slots expected to free first, this many at most
_BISECTIONS = 16  # steps that find it: within 1/65536 of the earliest slot's latest end
UNMEASURED_SECONDS = 1.0  # a slot's service time before any request has ended: the honest floor


class ServiceSamples:
    """A pool's recent service times (seconds a request held a slot), their mean, and how they grow with a
    request's size (the tokens it may generate): held ≈ base + per_token * size, by least squares over the
    window. An LLM's time at a slot is mostly its output; when the sizes do not tell the times apart (all
    alike, or no relation), per_token is 0 and every request is expected to take the mean."""

    __slots__ = ("_recent", "_sx", "_sxx", "_sxy", "_sy", "_syy")

    def __init__(self) -> None:
        self._recent: deque[tuple[int, float]] = deque(maxlen=_SAMPLES)
        self._sx = self._sxx = self._sxy = self._sy = self._syy = 0.0

    def observe(self, held: float, size: int = 0) -> None:
        """A request of `size` tokens held its slot for `held` seconds."""
        recent = self._recent
        if len(recent) == _SAMPLES:
            old_size, old_held = recent[0]
            self._add(old_size, old_held, -1.0)
        recent.append((size, held))
        self._add(size, held, 1.0)

    def _add(self, size: int, held: float, sign: float) -> None:
        self._sx += sign * size
        self._sy += sign * held
        self._sxx += sign * size * size
        self._sxy += sign * size * held
        self._syy += sign * held * held

    @property
    def mean(self) -> float | None:
        """The mean of the last _SAMPLES service times; None before the first request ended."""
        recent = self._recent
        return max(self._sy / len(recent), 0.0) if recent else None

    def fit(self) -> tuple[float, float]:
        """(base, per_token): a request of `size` tokens is expected to hold its slot base + per_token * size
        seconds. (0, 0) before the first request ended."""
        n = len(self._recent)
        if not n:
            return 0.0, 0.0
        mean_size, mean_held = self._sx / n, self._sy / n
        spread = self._sxx / n - mean_size * mean_size
        # Sizes within a token of each other, or times that do not grow with them: the mean for every request.
        per_token = (self._sxy / n - mean_size * mean_held) / spread if spread > 1.0 else 0.0
        if per_token <= 0.0:
            return max(mean_held, 0.0), 0.0
        return mean_held - per_token * mean_size, per_token

    def spread(self, per_token: float) -> float:
        """How far a request's time strays from what the fit expects, as a share of it: the half-width of a
        uniform spread with the residuals' deviation (0 before two requests ended)."""
        n = len(self._recent)
        if n < 2 or self._sy <= 0.0:
            return 0.0
        mean_size, mean_held = self._sx / n, self._sy / n
        variance = self._syy / n - mean_held * mean_held
        if per_token > 0.0:
            variance -= per_token * per_token * (self._sxx / n - mean_size * mean_size)
        return min(math.sqrt(3.0 * max(variance, 0.0)) / mean_held, 1.0)


class ArrivalRate:
    """Arrivals per second, counted with exponential decay over about _ARRIVAL_WINDOW_SECONDS.

    Until a whole window has passed since the first arrival, the count is read against the time there was.
    """

    __slots__ = ("_count", "_first", "_last")

    def __init__(self) -> None:
        self._count = 0.0
        self._first: float | None = None
        self._last = 0.0

    def arrived(self, now: float) -> None:
        if self._first is None:
            self._first = now
        self._count = self._decayed(now) + 1.0
        self._last = now

    def rate(self, now: float) -> float:
        if self._first is None:
            return 0.0
        # The decayed count of a steady rate r after t seconds is r * window * (1 - exp(-t / window)).
        span = _ARRIVAL_WINDOW_SECONDS * -math.expm1(-max(now - self._first, _FIRST_SPAN) / _ARRIVAL_WINDOW_SECONDS)
        return self._decayed(now) / span

    def _decayed(self, now: float) -> float:
        if not self._count:
            return 0.0
        return self._count * math.exp(-max(now - self._last, 0.0) / _ARRIVAL_WINDOW_SECONDS)


def pool_wait(pool: Pool, ahead: int, rank: int, now: float, fallback: float | None) -> float:
    """Seconds until a request of level `rank` with `ahead` requests before it in `pool` gets a slot.

    `fallback` is the service time to assume before the pool has measured its own (the gateway's average).
    """
    return Outlook(pool, rank, now, fallback).wait(ahead)


class Outlook:
    """The releases a pool's slots are expected to make, as a request of one level sees them now: the wait of
    any number of requests at that level, each in O(1) (the dashboard lists hundreds at once).

    A member that is down counts no slots; for a level below high, each member's reserved slots free for
    high requests first.
    """

    __slots__ = ("_factor", "_left", "_mean")

    def __init__(self, pool: Pool, rank: int, now: float, fallback: float | None):
        service = pool.service
        mean = self._mean = service.mean or fallback or UNMEASURED_SECONDS
        base, per_token = service.fit() if service.mean is not None else (mean, 0.0)
        floor = _FLOOR_SHARE * mean
        spread = service.spread(per_token) if service.mean is not None else 0.0
        left: list[tuple[float, float, float]] = []  # per slot, the seconds until it frees: expected, least, most
        for member in pool.members:
            if member.down:
                continue
            frees = []
            for slot in member.slots.slots:
                job = slot.job
                if job is None or job.slot_taken is None:
                    frees.append((0.0, 0.0, 0.0))
                    continue
                expected = max(base + per_token * job.size, floor)  # its whole time at the slot
                held = now - job.slot_taken
                # Past its latest end, it is expected to end within twice the overdue share, as likely early as late.
                most = max(expected * (1 + spread) - held, 2 * _OVERDUE_SHARE * expected)
                least = min(max(expected * (1 - spread) - held, 0.0), most)
                frees.append((max(expected - held, _OVERDUE_SHARE * expected), least, most))
            if rank and member.reserved_high:
                frees.sort()
                del frees[: member.reserved_high]  # the first to free go to high requests
            left += frees
        left.sort()
        self._left = [expected for expected, _, _ in left]
        if spread and left and left[0][0] > 0.0:  # every slot busy, with times that vary: which frees first
            self._left[0] = _first_release(left[:_FIRST_CANDIDATES])
        higher = 0.0
        for level in range(rank):
            higher += pool.arrivals[level].rate(now)
        load = higher * mean / len(left) if left else 0.0
        self._factor = _OVERLOADED_FACTOR if load >= _MAX_LOAD else 1 / math.sqrt(1 - load)

    def wait(self, ahead: int) -> float:
        """Seconds until a request with `ahead` requests before it gets a slot."""
        left, mean = self._left, self._mean
        slots = len(left)
        if not slots:
            return (ahead + 1) * mean
        return (left[ahead % slots] + (ahead // slots) * mean) * self._factor


def _first_release(left: list[tuple[float, float, float]]) -> float:
    """The median of the first release of busy slots, each (expected, least, most) freeing uniformly between
    its least and most seconds from now: the time by which one of them has freed with even odds."""
    low, high = 0.0, min(most for _, _, most in left)
    bounds = [(least, most) for _, least, most in left if least < high]  # those that may free first
    for _ in range(_BISECTIONS):
        t = (low + high) / 2
        none = 1.0  # the odds that no slot has freed by t
        for least, most in bounds:
            if t > least:
                none *= (most - t) / (most - least) if t < most else 0.0
        if none > 0.5:
            low = t
        else:
            high = t
    return (low + high) / 2


def pool_place(pool: Pool, fallback: float | None) -> float:
    """Seconds between two of `pool`'s dispatches while it is busy: the shortest useful Retry-After."""
    return place(sum(member.max_concurrent for member in pool.members), pool.service.mean or fallback)


def place(slots: int, mean: float | None) -> float:
    """Seconds between two releases of `slots` busy slots: how soon a refused request may find a place."""
    return (UNMEASURED_SECONDS if mean is None else mean) / max(slots, 1)
