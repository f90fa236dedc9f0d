"""What the dashboard and `status --watch` show, as one JSON snapshot of the queue for one viewer.

With keys on, a key sees its own requests (ids, key names) and counts of everyone else's; an admin key, and
everyone when keys are off, sees all. At most LISTED requests are listed per level (and counted past that),
so a snapshot stays small with ten thousand waiting.
"""

from __future__ import annotations

import time
from typing import Any

from app.limits.keys import KeyAccount
from app.metrics import Metrics
from app.queue import eta
from app.queue.job import Job
from app.queue.member import Member
from app.queue.scheduler import Scheduler
from app.types import Priority

LISTED = 200


def snapshot(scheduler: Scheduler, metrics: Metrics, viewer: KeyAccount | None) -> dict[str, Any]:
    """The queue now, as `viewer` may see it."""
    now = scheduler.clock()
    wall = time.time()
    totals = scheduler.totals
    requests_per_s, tokens_per_s = scheduler.timeline.rates()
    return {
        "at": round(wall, 3),
        "running": not scheduler.draining,
        "viewer": None if viewer is None else {"name": viewer.name, "admin": viewer.admin},
        "queue": {
            "waiting": scheduler.waiting,
            "by_priority": scheduler.waiting_room.sizes(),
            "max_queue_size": scheduler.waiting_room.capacity,
            "in_flight": scheduler.in_flight,
            "max_concurrent": scheduler.roster.max_concurrent,
        },
        "totals": {
            "queued": totals.queued,
            "completed": totals.completed,
            "failed": totals.failed,
            "rejected": totals.rejected,
            "timed_out": totals.timeout,
            "cancelled": totals.cancelled,
        },
        "rates": {"requests_per_s": round(requests_per_s, 2), "tokens_per_s": round(tokens_per_s, 1)},
        "rejections": dict(metrics.rejections),
        "upstream_errors": dict(metrics.upstream_errors),
        "backends": [
            _backend(member, viewer, now) for member in [*scheduler.roster.members.values(), *scheduler.roster.retiring]
        ],
        "waiting": _waiting(scheduler, viewer, now),
        "history": _history(scheduler),
    }


def _sees(viewer: KeyAccount | None, job: Job) -> bool:
    return viewer is None or viewer.admin or job.key_name == viewer.name


def _backend(member: Member, viewer: KeyAccount | None, now: float) -> dict[str, Any]:
    gate = member.gate
    breaker = gate.breaker if gate is not None else None
    slots: list[dict[str, Any]] = []
    for number, slot in enumerate(member.slots.slots):
        job = slot.job
        if job is None:
            slots.append({"id": number, "busy": False})
            continue
        elapsed = now - (job.slot_taken or now)
        shown = _sees(viewer, job)
        tokens = job.turn.generated() if job.turn is not None else None
        slots.append(
            {
                "id": number,
                "busy": True,
                "request_id": job.id if shown else None,
                "key": job.key_name if shown else None,
                "priority": job.priority.value,
                "elapsed_s": round(elapsed, 2),
                "tokens_per_s": round(tokens / elapsed, 1) if tokens is not None and elapsed > 0 else None,
            }
        )
    return {
        "name": member.name,
        "type": member.kind,
        "healthy": not member.down,
        "breaker": breaker.state.value if breaker is not None else None,
        "in_flight": member.in_flight,
        "max_concurrent": member.max_concurrent,
        "parked": member.parked,
        "latency_s": round(member.latency, 3) if member.latency is not None else None,
        "rate_limits": gate.limiter.status() if gate is not None and gate.limiter is not None else None,
        "slots": slots,
    }


def _waiting(scheduler: Scheduler, viewer: KeyAccount | None, now: float) -> dict[str, Any]:
    """Per level: how many wait, and the first LISTED the viewer may see, in the order they will go."""
    levels: dict[str, Any] = {
        p.value: {"count": n, "requests": []}
        for p, n in zip(Priority, scheduler.waiting_room.sizes().values(), strict=True)
    }
    for pool in scheduler.roster.pools.values():
        ahead = 0
        for priority in Priority:
            rank = priority.rank
            listed = levels[priority.value]["requests"]
            if not pool.queue.count(rank):
                continue
            outlook = eta.Outlook(pool, rank, now, scheduler.service.average)
            # A key's own requests may stand far back: the level is read until LISTED of them are found.
            for place, job in enumerate(pool.queue.ordered(rank), start=ahead):
                if len(listed) >= LISTED:
                    break
                if _sees(viewer, job):
                    listed.append(
                        {
                            "id": job.id,
                            "key": job.key_name,
                            "model": pool.model,
                            "position": place + 1,
                            "waited_s": round(now - job.arrived, 2),
                            "eta_s": round(outlook.wait(place), 2),
                            "parked": job.parked,
                        }
                    )
            ahead += pool.queue.count(rank)
    return levels


def _history(scheduler: Scheduler) -> dict[str, list[Any]]:
    samples = scheduler.timeline.samples
    return {
        "at": [round(s.at, 1) for s in samples],
        **{p.value: [s.waiting[p.rank] for s in samples] for p in Priority},
        "wait_p50": [None if s.wait_p50 is None else round(s.wait_p50, 3) for s in samples],
        "wait_p95": [None if s.wait_p95 is None else round(s.wait_p95, 3) for s in samples],
    }
