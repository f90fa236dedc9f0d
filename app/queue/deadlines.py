"""Request deadlines on one timer: a heap of (deadline, seq, job), instead of an asyncio timer per request."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.queue.job import Job

_COMPACT_MIN_DEAD = 256


class Deadlines:
    """Calls `on_expire(job)` once a job's deadline passes, unless the job has ended by then.

    Discarded jobs are left in the heap and skipped; once they outnumber the live
    ones, the heap is rebuilt, so memory follows the live jobs and every operation stays amortised O(log n).
    Deadlines are compared with `clock`, so a fake clock in tests decides what has expired.

    >>> deadlines = Deadlines(clock=time.monotonic, on_expire=scheduler_abort)  # doctest: +SKIP
    >>> deadlines.add(job)  # job.deadline is in clock's seconds
    """

    __slots__ = ("_armed_at", "_clock", "_dead", "_heap", "_on_expire", "_seq", "_timer")

    def __init__(self, clock: Callable[[], float], on_expire: Callable[[Job], object]):
        self._clock = clock
        self._on_expire = on_expire
        self._heap: list[tuple[float, int, Job]] = []
        self._seq = itertools.count()
        self._dead = 0
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at: float | None = None

    def __len__(self) -> int:
        return len(self._heap) - self._dead

    def add(self, job: Job) -> None:
        """Watch `job.deadline`."""
        job.watched = True
        heapq.heappush(self._heap, (job.deadline, next(self._seq), job))
        if self._armed_at is None or job.deadline < self._armed_at:
            self._arm(job.deadline)

    def discard(self, job: Job) -> None:
        """Stop watching `job` (it stays in the heap until skipped or compacted)."""
        if not job.watched:
            return
        job.watched = False
        self._dead += 1
        heap = self._heap
        if self._dead > _COMPACT_MIN_DEAD and self._dead * 2 > len(heap):
            self._heap = [entry for entry in heap if entry[2].watched]
            heapq.heapify(self._heap)
            self._dead = 0

    def _arm(self, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_at = deadline
        delay = max(deadline - self._clock(), 0.0)
        self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._armed_at = None
        heap = self._heap
        now = self._clock()
        while heap:
            deadline, _, job = heap[0]
            if job.watched and deadline > now:
                self._arm(deadline)
                return
            heapq.heappop(heap)
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
            self._armed_at = None
