"""Preemption: which running request gives its slot up for a high-priority one, and the state it moves through.

Only members that can pause their requests take part (the local model, with PREEMPTION on: parking > 0), and
only requests whose backend has lent them a turn it can take back. The scheduler decides when (a high request
waits and every slot is busy) and where a parked request waits (the head of its level).
"""

from __future__ import annotations

from app.queue.job import Job
from app.queue.member import Member
from app.queue.pool import Pool


def victim(pool: Pool, preempt_max: int) -> Job | None:
    """The running request of `pool` to park: the lowest level, then the most recently started; None if no
    member has room to park, or every candidate runs at high level or has been parked `preempt_max` times."""
    chosen: Job | None = None
    for member in pool.members:
        if member.parked >= member.parking:
            continue
        for slot in member.slots.slots:
            job = slot.job
            if job is None or not job.rank or job.preemptions >= preempt_max or job.turn is None:
                continue
            if not job.turn.can_park:
                continue
            if chosen is None or (job.rank, job.slot_taken or 0.0) > (chosen.rank, chosen.slot_taken or 0.0):
                chosen = job
    return chosen


def park(job: Job, now: float) -> None:
    """Take `job` off its slot (its backend pauses it at the next step) and mark it waiting to resume there."""
    member, slot = job.member, job.slot
    assert member is not None and slot is not None and job.turn is not None
    job.turn.park()
    member.slots.vacate(slot)
    member.parked += 1
    job.slot = None
    job.parked = True
    job.parked_since = now
    job.preemptions += 1
    job.mark_requeued()


def resume(job: Job, member: Member, now: float) -> None:
    """A parked request takes a slot of its member again and goes on where it stopped."""
    job.slot = member.slots.take(job)
    unpark(job, member)
    job.parked_for += now - job.parked_since
    job.slot_taken = now
    job.mark_dispatched()
    assert job.turn is not None
    job.turn.resume()


def unpark(job: Job, member: Member) -> None:
    """`job` no longer waits parked at `member` (resumed, or ended while parked)."""
    job.parked = False
    member.parked -= 1
