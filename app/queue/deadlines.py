"""Request deadlines on one timer, instead of an asyncio timer per request."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.queue.job import Job

_COMPACT_MIN_DEAD = 256


class Deadlines:
    """Calls `on_expire(job)` once a job's deadline passes, unless it was discarded first.

    Every request gets the same REQUEST_TIMEOUT from its arrival on a monotonic clock, so deadlines arrive
    in order: a deque holds them sorted for free, and one timer, armed for the head, serves them all.
    Discarded jobs stay in the deque and are skipped; once they outnumber the live ones the deque is
    rebuilt, so memory follows the live jobs and each operation is amortised O(1). Deadlines are compared
    with `clock`, so a fake clock in tests decides what has expired.
    """

    __slots__ = ("_clock", "_dead", "_jobs", "_on_expire", "_timer")

    def __init__(self, clock: Callable[[], float], on_expire: Callable[[Job], object]):
        self._clock = clock
        self._on_expire = on_expire
        self._jobs: deque[Job] = deque()
        self._dead = 0
        self._timer: asyncio.TimerHandle | None = None  # armed for the head's deadline, or None

    def __len__(self) -> int:
        return len(self._jobs) - self._dead

    def add(self, job: Job) -> None:
        """Watch `job.deadline`, which must not be earlier than any deadline added before."""
        job.watched = True
        self._jobs.append(job)
        if self._timer is None:
            self._arm(job.deadline)

    def discard(self, job: Job) -> None:
        """Stop watching `job`."""
        if not job.watched:
            return
        job.watched = False
        self._dead += 1
        if self._dead > _COMPACT_MIN_DEAD and self._dead * 2 > len(self._jobs):
            self._jobs = deque(j for j in self._jobs if j.watched)
            self._dead = 0

    def _arm(self, deadline: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(max(deadline - self._clock(), 0.0), self._fire)

    def _fire(self) -> None:
        self._timer = None
        jobs = self._jobs
        now = self._clock()
        while jobs:
            job = jobs[0]
            if job.watched and job.deadline > now:
                self._arm(job.deadline)
                return
            jobs.popleft()
            if job.watched:
                job.watched = False
                self._on_expire(job)  # ends the job, or starts the abort of a running one
            else:
                self._dead -= 1

    def close(self) -> None:
        """Stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
