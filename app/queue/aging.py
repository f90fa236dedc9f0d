"""QUEUE_AGING_SECONDS: a waiting request rises one level per period waited, so low priority is never starved."""

from __future__ import annotations

from collections import deque
from collections.abc import Container, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from app.queue.job import Job


class Aging:
    """Finds the waiting jobs due for promotion, in O(1) per promotion.

    A job that asked for level p and now waits at level r is next promoted at arrived + (p - r + 1) * period.
    Jobs are grouped by (p, r): within a group they arrived in order, so each group's head is its next due,
    and only heads are ever looked at. Entries of jobs that left the queue or moved are skipped lazily.
    """

    __slots__ = ("_groups", "levels", "period")

    def __init__(self, period: float, levels: int):
        self.period = period
        self.levels = levels  # the levels that age: a job asking for a level past them stays where it is
        self._groups: dict[tuple[int, int], deque[Job]] = {
            (asked, level): deque() for asked in range(1, levels) for level in range(1, asked + 1)
        }

    def level_for(self, job: Job, now: float) -> int:
        """The level a job that asked for its priority has earned by waiting until `now`."""
        asked = job.priority.rank
        if asked >= self.levels:
            return asked
        return max(0, asked - int((now - job.arrived) // self.period))

    def track(self, job: Job) -> None:
        """Watch a job just queued at level job.rank (a job waits at each level once: it only moves up)."""
        if 0 < job.rank < self.levels:
            self._groups[job.priority.rank, job.rank].append(job)

    def due(self, now: float, queues: Container[object]) -> Iterator[Job]:
        """Jobs waiting in one of `queues` whose next promotion time has come, earliest first (ties: first arrived).

        The caller moves each up one level and tracks it again before asking for the next, so a job due
        twice over climbs both steps in one pass, after those that earned their step before it.
        """
        while True:
            best: tuple[float, float, deque[Job]] | None = None
            for (asked, level), entries in self._groups.items():
                while entries:
                    job = entries[0]
                    if job.waiting_in in queues and job.rank == level:
                        break
                    entries.popleft()
                else:
                    continue
                at = job.arrived + (asked - level + 1) * self.period
                if best is None or (at, job.arrived) < best[:2]:
                    best = (at, job.arrived, entries)
            if best is None or best[0] > now:
                return
            yield best[2].popleft()
