"""Request deadlines on one timer, instead of an asyncio timer per request."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.queue.job import Job

_COMPACT_MIN_DEAD = 256


class Deadlines:
    """Calls `on_expire(job)` once a job's deadline passes, unless it was discarded first.

    Most requests get the same REQUEST_TIMEOUT from their arrival on a monotonic clock, so their deadlines
    arrive in order: a deque holds them sorted for free (O(1)). A request with a deadline of its own that is
    earlier than the last one queued (a client's X-Request-Timeout-Ms) goes into a heap instead (O(log n)).
    One timer, armed for the earliest of both heads, serves them all. Discarded jobs stay where they are and
    are skipped; once they outnumber the live ones both are rebuilt, so memory follows the live jobs.
    Deadlines are compared with `clock`, so a fake clock in tests decides what has expired.
    """

    __slots__ = ("_armed_for", "_clock", "_dead", "_early", "_jobs", "_on_expire", "_order", "_timer")

    def __init__(self, clock: Callable[[], float], on_expire: Callable[[Job], object]):
        self._clock = clock
        self._on_expire = on_expire
        self._jobs: deque[Job] = deque()  # deadlines in order of arrival, and so of deadline
        self._early: list[tuple[float, int, Job]] = []  # the others: a heap by deadline
        self._order = itertools.count()  # ties in the heap go by arrival, never by comparing jobs
        self._dead = 0
        self._timer: asyncio.TimerHandle | None = None  # armed for the earliest deadline, or None
        self._armed_for = 0.0

    def __len__(self) -> int:
        return len(self._jobs) + len(self._early) - self._dead

    def add(self, job: Job) -> None:
        """Watch `job.deadline`."""
        job.watched = True
        jobs = self._jobs
        if not jobs or jobs[-1].deadline <= job.deadline:
            jobs.append(job)
        else:
            heapq.heappush(self._early, (job.deadline, next(self._order), job))
        if self._timer is None or job.deadline < self._armed_for:
            self._arm(job.deadline)

    def discard(self, job: Job) -> None:
        """Stop watching `job`."""
        if not job.watched:
            return
        job.watched = False
        self._dead += 1
        if self._dead > _COMPACT_MIN_DEAD and self._dead * 2 > len(self._jobs) + len(self._early):
            self._jobs = deque(j for j in self._jobs if j.watched)
            self._early = [entry for entry in self._early if entry[2].watched]
            heapq.heapify(self._early)
            self._dead = 0

    def _arm(self, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_for = deadline
        self._timer = asyncio.get_running_loop().call_later(max(deadline - self._clock(), 0.0), self._fire)

    def _fire(self) -> None:
        self._timer = None
        jobs, early = self._jobs, self._early
        now = self._clock()
        while True:
            # The earliest of the two heads, dead entries dropped as they come up.
            if jobs and not jobs[0].watched:
                jobs.popleft()
                self._dead -= 1
                continue
            if early and not early[0][2].watched:
                heapq.heappop(early)
                self._dead -= 1
                continue
            head = jobs[0] if jobs else None
            if early and (head is None or early[0][0] < head.deadline):
                head = early[0][2]
            if head is None:
                return
            if head.deadline > now:
                self._arm(head.deadline)
                return
            if jobs and jobs[0] is head:
                jobs.popleft()
            else:
                heapq.heappop(early)
            head.watched = False
            self._on_expire(head)  # ends the job, or starts the abort of a running one

    def close(self) -> None:
        """Stop the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
