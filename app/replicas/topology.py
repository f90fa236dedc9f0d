"""What the shared queue's scripts read of a replica, as pure functions of its state: the shared pools and
their members (the fleet), the replica's own description at each heartbeat, and the requests it has to share
when it joins."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable

from app.queue.job import Job
from app.queue.member import Member
from app.queue.roster import Roster
from app.types import Priority


def shareable(members: list[Member]) -> bool:
    """Whether a pool is shared: an in-process model is its replica's own, so only pools of upstream servers are."""
    return bool(members) and all(member.kind == "proxy" for member in members)


def fleet(
    roster: Roster,
    limits: Callable[[Member], tuple[int, int]],
    aging_seconds: float,
    ttl: float,
    history: int,
    history_ttl: float,
) -> str:
    """The shared pools and their members (slots, reserved high slots, rpm, tpm as `limits` gives them), with
    the queue's rules (aging, levels, lease and history times in milliseconds), as JSON."""
    pools: dict[str, list[str]] = {}
    members: dict[str, list[int]] = {}
    for model, pool in roster.pools.items():
        if not shareable(pool.members):
            continue
        pools[model] = [member.name for member in pool.members]
        for member in pool.members:
            rpm, tpm = limits(member)
            members[member.name] = [member.max_concurrent, member.reserved_high, rpm, tpm]
    described = {
        "pools": pools,
        "members": members,
        "aging": round(aging_seconds * 1000),
        "levels": len(Priority),
        "ttl": round(ttl * 1000),
        "history": history,
        "history_ttl": round(history_ttl * 1000),
    }
    return json.dumps(described, separators=(",", ":"))


def description(replica: str, started: float, waiting: int, running: int, mode: str) -> str:
    """The replica as the others see it (`mode`: shared, local or unavailable), as JSON."""
    return json.dumps(
        {
            "id": replica,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": round(started, 3),
            "heartbeat": round(time.time(), 3),
            "waiting": waiting,
            "running": running,
            "mode": mode,
        },
        separators=(",", ":"),
    )


def shared_jobs(roster: Roster) -> list[Job]:
    """The requests of shared pools that wait here, and those that run here at upstream servers."""
    jobs = [job for pool in roster.pools.values() for job in pool.queue.items() if shareable(pool.members)]
    for member in roster.members.values():
        if member.kind == "proxy":
            jobs += [slot.job for slot in member.slots.slots if slot.job is not None]
    return jobs
