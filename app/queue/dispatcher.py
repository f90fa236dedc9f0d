"""Dispatch: moving admitted requests between the pools' queues and the members' slots.

The scheduler (app.queue.scheduler) admits a request and ends it; in between, this moves it: from its pool's
queue onto a free slot (the best head among the pools a member serves), off its slot for a high-priority one
(preemption), back to the head of its level when its member failed it before its client saw a byte (failover),
or out of the queue with its answer (its deadline too close to be worth a slot, a pool nothing can serve).
Like the scheduler, it runs on the event loop and never awaits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from app.errors import BreakerOpen, GatewayError, RequestTimeout, UpstreamUnavailable
from app.metrics import Metrics
from app.queue import preemption
from app.queue.admission import breaker_refusal
from app.queue.job import Job
from app.queue.member import Member
from app.queue.pool import Pool
from app.queue.roster import Roster
from app.queue.service_time import ServiceTime
from app.queue.timeline import Timeline
from app.queue.waiting import WaitingRoom
from app.types import JobState

log = logging.getLogger("app.queue")


class Dispatcher:
    """Fills free slots from the waiting room as far as the members' gates allow; see the module docstring."""

    __slots__ = (
        "_metrics",
        "clock",
        "dispatch_margin",
        "preempt_max",
        "roster",
        "service",
        "timeline",
        "waiting_room",
    )

    def __init__(
        self,
        roster: Roster,
        waiting_room: WaitingRoom,
        service: ServiceTime,
        timeline: Timeline,
        metrics: Metrics,
        *,
        dispatch_margin: float,
        preempt_max: int,
        clock: Callable[[], float],
    ):
        self.roster = roster
        self.waiting_room = waiting_room
        self.service = service
        self.timeline = timeline
        self._metrics = metrics
        # A waiting request whose remaining time is under this many average service times is answered 408
        # instead of dispatched: it would most likely be cut off at its timeout, its upstream work wasted.
        self.dispatch_margin = dispatch_margin
        # A running request may be parked this many times for high-priority ones (members with parking room).
        self.preempt_max = preempt_max
        self.clock = clock

    def dispatch(self) -> None:
        """Dispatch what the slots and the gates allow now (a gate's hold timer calls this)."""
        self.run(self.clock())

    def run(self, now: float) -> None:
        """Fill idle slots from the pools as far as the gates allow, refilling the queue from the overflow."""
        room = self.waiting_room
        if not room.in_queue and not room.overflow.size:
            # Nothing waits (the common case as a request ends): no gate has a reason to hold dispatch back.
            for member in self.roster.members.values():
                if member.gate is not None and member.gate.held_by is not None:
                    member.gate.release(now)
            return
        room.promote(now)
        while True:
            self._fill(now)
            if not room.admit_overflow(now):
                return

    def _fill(self, now: float) -> None:
        pools = self.roster.pool_list
        if len(pools) == 1:
            pool = pools[0]
            if pool.shared:
                return
            members = pool.members
            if len(members) == 1:  # a fleet of one: the hot path, which asks no more once its slots are taken
                member = members[0]
                idle = member.slots.idle
                while (idle or member.parking) and self._dispatch_head(pool, now):
                    pass
            else:
                while self._dispatch_head(pool, now):
                    pass
            if not pool.queue.size:
                for member in pool.members:
                    if member.gate is not None:
                        member.gate.release(now)
            return
        # Pools that share a member compete for its slots: the best head of all goes first, as in one queue.
        waiting = [pool for pool in pools if pool.queue.size and not pool.shared]
        while waiting:
            pool = min(waiting, key=_head_order)
            if not self._dispatch_head(pool, now) or not pool.queue.size:
                waiting.remove(pool)
        for member, served in self.roster.member_pools.items():
            if member.gate is not None and member.gate.held_by is not None and not any(p.queue.size for p in served):
                member.gate.release(now)

    def _dispatch_head(self, pool: Pool, now: float) -> bool:
        """Dispatch (or answer 408) the head of `pool`; False if it stays where it is."""
        job = pool.queue.peek()
        if job is None:
            return False
        if self.too_late(job, now):
            return True
        member = pool.choose(job, now, self.dispatch)
        if member is None:
            if job.rank or job.parked or not self.preempt_max:
                return False
            while member is None and self._preempt(pool, now):  # a request of n choices may need several
                member = pool.choose(job, now, self.dispatch)
            if member is None:
                return False
        pool.queue.pop()
        if job.key is not None:
            job.key.left()
        if job.parked:
            preemption.resume(job, member, now)
        else:
            self.start(job, member, now)
        return True

    def start(self, job: Job, member: Member, now: float) -> None:
        """Give `job` its slots at `member` (one per choice at the local model): it runs from now."""
        job.slot = member.slots.take(job)
        if job.choices > 1:
            extra = member.slots_for(job.choices) - 1
            job.extra_slots = tuple(member.slots.take(job) for _ in range(extra))
        job.member = member
        job.started = job.slot_taken = now
        job.mark_dispatched()
        member.series.dispatched += 1
        assert job.pool is not None
        self._metrics.dispatched(job.pool.model, job.priority, now - job.arrived)
        self.timeline.waits.append(now - job.arrived)
        if member.gate is not None:
            member.gate.dispatched(job)

    def granted(self, job: Job, member_name: str, now: float) -> bool:
        """The shared queue gave `job` a slot at the member of that name: start it there; False if it no
        longer waits for one (it ended meanwhile, or its deadline is too close), and the slot goes back."""
        member = self.roster.members.get(member_name)
        if job.state is not JobState.QUEUED or job.error is not None or job.waiting_in is None or member is None:
            return False
        if not member.slots.idle:
            log.warning("request %s was granted a slot at %s, which has none free here", job.id, member_name)
            return False
        if self.too_late(job, now):
            return False  # answered 408 (DISPATCH_MARGIN): the slot goes to the next
        self.unqueue(job)
        self.start(job, member, now)
        return True

    def give_back(self, job: Job, member: Member, ok: bool) -> None:
        """Return the slots a request held at `member` (counted as processed if `ok`, as errors if not)."""
        assert job.slot is not None
        member.slots.give(job.slot, ok)
        for slot in job.extra_slots:
            member.slots.give(slot, ok)
        job.slot, job.extra_slots = None, ()

    def ended(self, job: Job, member: Member, state: JobState, now: float) -> None:
        """A request that held a slot at `member` ended in `state`: its slots go back, and the time it held
        them joins the service times its pool and member are estimated by (failures count as errors)."""
        assert job.started is not None
        completed = state is JobState.COMPLETED
        self.give_back(job, member, completed)
        held = now - job.started - job.parked_for
        self.service.observe(held)
        if job.pool is not None:
            job.pool.service.observe(held, job.size)
        if completed:
            member.observe(held)
            member.series.latency.observe(held)
        elif state is JobState.FAILED:
            member.series.errors += 1
        if member.retiring:
            self.roster.check_retired(member)

    def requeue(self, job: Job, member: Member, now: float) -> None:
        """`member` failed `job` before its client saw a byte: it waits again, first at its level, and never
        goes back to that member."""
        self.give_back(job, member, False)
        if member.gate is not None:
            member.gate.ended(job, None)
        job.avoid = member
        job.member = None
        job.started = None
        job.mark_requeued()
        if job.key is not None:
            job.key.joined()
        self.waiting_room.enqueue(job, now, first=True)

    def reroute(self, job: Job, error: GatewayError, retry: bool, now: float) -> bool:
        """A request failed at its member before its client saw a byte: send it back to wait for another.

        In a pool of several, the member learns of the failure (a server that cannot be reached is marked
        down at once). False, and the request stays where it is, when `retry` is False or no other member of
        its pool is up to take it: the failure is then its answer. Otherwise it goes first in its pool, and
        never to the same member next.
        """
        member, pool = job.member, job.pool
        if job.is_terminal or member is None or pool is None or job.slot is None or len(pool.members) < 2:
            return False
        member.failed(error)
        if not retry or not any(other is not member and not other.down for other in pool.members):
            return False
        member.series.errors += 1
        member.series.failovers += 1
        self.requeue(job, member, now)
        self.roster.check_retired(member)
        self.run(now)
        return True

    def _preempt(self, pool: Pool, now: float) -> bool:
        """Park a running request for the high-priority head of `pool` (app.queue.preemption); False if none
        may give its slot up."""
        victim = preemption.victim(pool, self.preempt_max)
        if victim is None:
            return False
        preemption.park(victim, now)
        if victim.key is not None:
            victim.key.joined()
        self.waiting_room.enqueue(victim, now, first=True)  # the head of its level: it resumes before what waited there
        self._metrics.preempted(victim.priority)
        assert victim.member is not None
        log.info(
            "request %s parked at %s for a high-priority request (%d)",
            victim.id,
            victim.member.name,
            victim.preemptions,
        )
        return True

    def too_late(self, job: Job, now: float) -> bool:
        """Answer 408 now, and True, if the job's remaining time is too short for a likely service time."""
        expected = self.service.average
        if not self.dispatch_margin or expected is None or job.parked:
            return False
        left = job.deadline - now
        if left >= self.dispatch_margin * expected:
            return False
        self._metrics.timed_out_before_dispatch()
        lifetime = job.deadline - job.arrived
        self.abort(
            job,
            RequestTimeout(
                f"request timed out after {lifetime:g}s (in the queue): {max(left, 0):.2f}s were left, "
                f"and a request takes about {expected:.2f}s at the backend"
            ),
        )
        return True

    def abort(self, job: Job, error: GatewayError) -> bool:
        """Stop a request for `error`, wherever it is; False if it had already ended.

        A waiting request leaves the queue at once; its handler wakes with `error` and retires it. A running
        one is interrupted inside its abort scope, and retired when its handler lets go.
        """
        if job.is_terminal:
            return False
        job.interrupt(error)
        self.unqueue(job)
        return True

    def close_pool(self, pool: Pool) -> None:
        """No member serves `pool` any more (a reload): answer what waits there 503."""
        waiting = self.waiting_room.jobs(pool)
        for job in waiting:
            self.abort(job, UpstreamUnavailable(f"no backend serves {pool.model!r} any more", retry_after=5.0))
        if waiting:
            log.warning("no backend serves %r any more: %d waiting requests answered 503", pool.model, len(waiting))

    def member_down(self, member: Member) -> None:
        """`member`'s breaker opened: what waits for a pool it leaves with no member up is answered 503 now."""
        for pool in self.roster.member_pools.get(member, ()):
            if not pool.all_down():
                continue
            # Nothing that waits can run before a cooldown ends: tell it now rather than at its timeout.
            refusal = breaker_refusal(pool)
            retry_after = refusal.retry_after if refusal is not None else 1.0
            waiting = self.waiting_room.jobs(pool)
            for job in waiting:
                self.abort(
                    job,
                    BreakerOpen(f"the upstream is failing; retry in {retry_after:.1f}s", retry_after=retry_after),
                )
            if waiting:
                log.warning("circuit breaker open: %d waiting requests answered 503", len(waiting))

    def unqueue(self, job: Job) -> None:
        """Take `job` out of the waiting room, if it waits there."""
        if self.waiting_room.remove(job) and job.key is not None:
            job.key.left()


def _head_order(pool: Pool) -> tuple[int, float]:
    head = pool.queue.peek()
    assert head is not None
    return head.rank, head.arrived
