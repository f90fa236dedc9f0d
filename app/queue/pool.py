"""A pool: the requests waiting for one model, and the members that serve it; which member takes the next.

Routing is least-loaded (in flight ÷ max_concurrent, ties by latency) with conversation affinity: a request
of a conversation the pool has seen prefers the member that served it last, so that member's prompt cache
is reused, unless that member is full or, by the bounded-load rule of consistent hashing with bounded loads,
already carries more than AFFINITY_LOAD_FACTOR times its share. Affinity never makes a request wait while
another member is free.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from enum import StrEnum

from app.queue.eta import ArrivalRate, ServiceSamples
from app.queue.job import Job
from app.queue.member import Member
from app.queue.priority_queue import PriorityQueue

AFFINITY_LOAD_FACTOR = 1.25
_AFFINITY_MEMORY = 65_536  # conversations remembered per pool, the least recent forgotten first


class Routing(StrEnum):
    """How a pool picks among its free members (ROUTING)."""

    AFFINITY = "affinity"
    LEAST_LOADED = "least_loaded"
    ROUND_ROBIN = "round_robin"


class Pool:
    """One model's queue and members. `model` is '*' for the pool of a member that serves any model."""

    __slots__ = ("_affinity", "_turn", "arrivals", "members", "model", "queue", "routing", "service", "shared")

    def __init__(self, model: str, levels: int, routing: Routing = Routing.AFFINITY):
        self.model = model
        self.queue: PriorityQueue[Job] = PriorityQueue(levels=levels)
        self.members: list[Member] = []
        self.routing = routing
        self._affinity: OrderedDict[int, Member] = OrderedDict()
        self._turn = 0
        self.service = ServiceSamples()  # how long its requests hold a slot (app.queue.eta)
        self.arrivals = tuple(ArrivalRate() for _ in range(levels))  # its arrivals per second, by level
        self.shared = False  # dispatched by the replicas' shared queue (app.queue.shared), not from here

    def has_room(self, rank: int, choices: int = 1) -> bool:
        """Whether a member has the slots a request of level `rank` and `choices` choices may take, and nothing
        could hold it back."""
        for member in self.members:
            if member.takes(rank, member.slots_for(choices)) and (member.gate is None or member.gate.idle()):
                return True
        return False

    @property
    def preemptive(self) -> bool:
        """Whether a member can park running requests for a high-priority one."""
        return any(member.parking for member in self.members)

    def has_free_slot(self) -> bool:
        """Whether a member has a free slot (a gate may still hold a request back from it)."""
        for member in self.members:  # noqa: SIM110 (a loop: cheaper than any() on every request)
            if len(member.slots.idle) > member.withheld:
                return True
        return False

    def all_down(self) -> bool:
        """Whether every member is down (none when the pool has no member left)."""
        return all(member.down for member in self.members)

    def choose(self, job: Job, now: float, wake: Callable[[], object]) -> Member | None:
        """The member `job` goes to now, or None: it waits (a gate that holds it arms a timer to `wake`)."""
        members = self.members
        rank = job.rank
        if job.parked:  # it resumes where its cells are, its budgets already paid
            parked_at = job.member
            return parked_at if parked_at is not None and parked_at.takes(rank) else None
        if len(members) == 1:  # a fleet of one: the hot path
            member = members[0]
            if not member.takes(rank, member.slots_for(job.choices)):
                return None
            if member.gate is not None and not member.gate.admits(job, now, wake):
                return None
            return member
        avoid = job.avoid
        choices = job.choices
        free = [m for m in members if m.takes(rank, m.slots_for(choices)) and m is not avoid]
        if not free:
            if avoid is None or not avoid.takes(rank, avoid.slots_for(choices)):
                return None
            if any(m is not avoid and not m.down for m in members):
                return None
            free = [avoid]  # it failed there, but every other member is down now
        for member in self._order(job, free):
            if member.gate is None or member.gate.admits(job, now, wake):
                if job.affinity is not None:
                    self._remember(job.affinity, member)
                return member
        return None

    def _order(self, job: Job, free: list[Member]) -> list[Member]:
        if self.routing is Routing.ROUND_ROBIN:
            self._turn += 1
            start = self._turn % len(free)
            return free[start:] + free[:start]
        ordered = sorted(free, key=_least_loaded)
        if self.routing is Routing.AFFINITY and job.affinity is not None:
            last = self._affinity.get(job.affinity)
            if last is not None and last in free and self._within_bound(last):
                ordered.remove(last)
                ordered.insert(0, last)
        return ordered

    def _within_bound(self, member: Member) -> bool:
        """Whether one more request leaves `member` within AFFINITY_LOAD_FACTOR times its share of the load."""
        busy = sum(m.slots.busy for m in self.members)
        capacity = sum(m.max_concurrent for m in self.members)
        share = math.ceil(AFFINITY_LOAD_FACTOR * (busy + 1) * member.max_concurrent / capacity)
        return member.slots.busy + 1 <= share

    def _remember(self, conversation: int, member: Member) -> None:
        memory = self._affinity
        memory[conversation] = member
        memory.move_to_end(conversation)
        if len(memory) > _AFFINITY_MEMORY:
            memory.popitem(last=False)

    def forget(self, member: Member) -> None:
        """`member` left the pool: its conversations find a new home."""
        for conversation in [c for c, m in self._affinity.items() if m is member]:
            del self._affinity[conversation]


def _least_loaded(member: Member) -> tuple[float, float]:
    return member.load, member.latency or 0.0
