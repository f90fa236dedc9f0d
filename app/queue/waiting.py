"""Where requests wait: the priority queue of each model's pool, and the overflow of those that found the queue
full (QUEUE_FULL_BEHAVIOR=wait), which enter the queue in their order as places free.

A waiting request is in exactly one of these queues (job.waiting_in says which), at the level it waits at:
its priority, or higher once QUEUE_AGING_SECONDS has raised it.
"""

from __future__ import annotations

from collections.abc import Callable

from app.queue.aging import Aging
from app.queue.job import Job
from app.queue.pool import Pool
from app.queue.priority_queue import PriorityQueue
from app.types import JobState, Priority


class WaitingRoom:
    """The pools' queues (MAX_QUEUE_SIZE requests at most, batch lines aside) and the overflow behind them."""

    __slots__ = ("_clock", "_queues", "aging", "capacity", "overflow", "pools")

    def __init__(self, capacity: int, aging: Aging | None, clock: Callable[[], float]):
        self.capacity = capacity  # MAX_QUEUE_SIZE
        self.aging = aging
        self.overflow: PriorityQueue[Job] = PriorityQueue(levels=len(Priority))
        self.pools: tuple[Pool, ...] = ()
        self._queues: frozenset[PriorityQueue[Job]] = frozenset({self.overflow})
        self._clock = clock

    def serve(self, pools: tuple[Pool, ...]) -> None:
        """Wait in these pools from now on (a reload changed them)."""
        self.pools = pools
        self._queues = frozenset(pool.queue for pool in pools) | {self.overflow}

    # Coming and going -------------------------------------------------------------------------------------

    def enqueue(self, job: Job, now: float, first: bool = False) -> None:
        """Queue `job` in its pool at the level it has earned; `first`: ahead of what waits at that level."""
        aging = self.aging
        if aging is not None:
            self.promote(now)  # those who earned a level go ahead of this newcomer
            job.rank = aging.level_for(job, now)
        assert job.pool is not None
        if first:
            job.pool.queue.push_first(job, job.rank, job.key_name)
        else:
            job.pool.queue.push(job, job.rank, job.key_name)
        if aging is not None:
            aging.track(job)

    def wait_for_space(self, job: Job) -> None:
        """Put `job` in the overflow: it found the queue full."""
        self.overflow.push(job, job.rank, job.key_name)

    def admit_overflow(self, now: float) -> bool:
        """Move requests from the overflow into the queue while it has places; whether any moved."""
        overflow = self.overflow
        moved = False
        while overflow.size and not self.full():
            job = overflow.pop()
            assert job is not None
            self.enqueue(job, now)
            moved = True
        return moved

    def remove(self, job: Job) -> bool:
        """Take `job` out of wherever it waits; False if it was not waiting."""
        if job.waiting_in is None:
            return False
        if job.pool is None or not job.pool.queue.remove(job, job.rank):
            self.overflow.remove(job, job.rank)
        return True

    def promote(self, now: float) -> None:
        """Move every job whose wait has earned it a level up that level (QUEUE_AGING_SECONDS)."""
        aging = self.aging
        if aging is None:
            return
        for job in aging.due(now, self._queues):
            queue = job.waiting_in
            assert isinstance(queue, PriorityQueue)
            queue.remove(job, job.rank)
            job.rank -= 1
            queue.push(job, job.rank, job.key_name)
            aging.track(job)

    # Reading ----------------------------------------------------------------------------------------------

    @property
    def in_queue(self) -> int:
        """Requests in the queue proper (what MAX_QUEUE_SIZE bounds)."""
        pools = self.pools
        if len(pools) == 1:
            return pools[0].queue.size
        return sum(pool.queue.size for pool in pools)

    @property
    def for_space(self) -> int:
        """Requests in the overflow, waiting for a place in the queue."""
        return len(self.overflow)

    def full(self) -> bool:
        """Whether MAX_QUEUE_SIZE interactive requests wait (batch lines take no place of theirs)."""
        waiting = self.in_queue
        if waiting < self.capacity:
            return False
        rank = Priority.BATCH.rank
        return waiting - sum(pool.queue.count(rank) for pool in self.pools) >= self.capacity

    def ahead_of_new(self, pool: Pool, rank: int, key_name: str | None, full: bool) -> int:
        """Requests a newcomer for `pool` at level `rank` would wait behind (in the overflow, if `full`)."""
        if full:
            return pool.queue.size + self.overflow.ahead_of_new(rank, key_name)
        return pool.queue.ahead_of_new(rank, key_name)

    def jobs(self, pool: Pool | None = None) -> list[Job]:
        """Every waiting request (those of `pool` only, if given), queue first, overflow after."""
        if pool is not None:
            return [*pool.queue.items(), *(job for job in self.overflow.items() if job.pool is pool)]
        return [job for pool in self.pools for job in pool.queue.items()] + self.overflow.items()

    def position(self, job: Job) -> int | None:
        """1-based place of a waiting request in its pool, counting the overflow after the queue proper."""
        rank = job.rank
        pool = job.pool
        if pool is None:
            return None
        place = pool.queue.position(job, rank)
        if place is not None:
            return place
        place = self.overflow.position(job, rank)
        return None if place is None else len(pool.queue) + place

    def sizes(self) -> dict[str, int]:
        """Waiting requests by the level they wait at (aging may have raised them), overflow included."""
        self.promote(self._clock())
        return {
            p.value: sum(pool.queue.count(p.rank) for pool in self.pools) + self.overflow.count(p.rank)
            for p in Priority
        }

    def pool_sizes(self, pool: Pool) -> dict[str, int]:
        """Requests waiting for `pool`'s model by level, those waiting for queue space included."""
        sizes = {p.value: pool.queue.count(p.rank) for p in Priority}
        if self.overflow.size:
            for job in self.overflow.items():
                if job.pool is pool:
                    sizes[Priority.at(job.rank).value] += 1
        return sizes

    def sizes_by_model(self) -> dict[tuple[str, str], int]:
        """Waiting requests by (model pool, level), for the metrics."""
        self.promote(self._clock())
        return {(pool.model, p): n for pool in self.pools for p, n in self.pool_sizes(pool).items()}

    def waiting_for(self, job: Job) -> str | None:
        """What a waiting request waits for: a place in the queue, a budget, or a backend slot (None: it does
        not wait)."""
        if job.state is not JobState.QUEUED:
            return None
        if job.waiting_in is self.overflow:
            return "queue_space"
        for member in job.pool.members if job.pool is not None else ():
            if member.gate is not None and member.gate.held_by is not None:
                return member.gate.held_by
        return "backend_slot"
