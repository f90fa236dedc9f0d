"""Deadlines: REQUEST_TIMEOUT's in order on a deque, clients' own earlier ones on a heap, one timer for all."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from app.queue.deadlines import Deadlines

pytestmark = pytest.mark.anyio


class Stub:
    """What Deadlines reads of a job."""

    def __init__(self, name: str, deadline: float):
        self.name = name
        self.deadline = deadline
        self.watched = False


async def test_mixed_deadlines_expire_in_deadline_order_and_discarded_ones_never() -> None:
    expired: list[str] = []
    deadlines = Deadlines(time.monotonic, lambda job: expired.append(job.name))
    now = time.monotonic()
    jobs = {
        name: Stub(name, now + delay)
        for name, delay in [("common-1", 0.30), ("common-2", 0.32), ("own-a", 0.05), ("own-b", 0.15), ("own-c", 0.10)]
    }
    for job in jobs.values():
        deadlines.add(job)  # type: ignore[arg-type]
    assert len(deadlines) == 5
    deadlines.discard(jobs["own-b"])  # type: ignore[arg-type]
    late: Any = Stub("common-3", now + 0.34)
    deadlines.add(late)
    await asyncio.sleep(0.5)
    assert expired == ["own-a", "own-c", "common-1", "common-2", "common-3"]
    assert len(deadlines) == 0
    deadlines.close()


async def test_an_earlier_deadline_added_later_rearms_the_timer() -> None:
    expired: list[str] = []
    deadlines = Deadlines(time.monotonic, lambda job: expired.append(job.name))
    now = time.monotonic()
    deadlines.add(Stub("long", now + 5.0))  # type: ignore[arg-type]
    deadlines.add(Stub("short", now + 0.05))  # type: ignore[arg-type]
    await asyncio.sleep(0.2)
    assert expired == ["short"]  # not held back until the long one's timer
    deadlines.close()


async def test_many_discarded_entries_are_compacted_on_both_sides() -> None:
    deadlines = Deadlines(time.monotonic, lambda job: None)
    now = time.monotonic()
    stubs: list[Any] = [Stub(f"c{i}", now + 60 + i) for i in range(400)]
    stubs += [Stub(f"e{i}", now + 30 - i * 0.01) for i in range(400)]  # each earlier than the last: the heap
    for stub in stubs:
        deadlines.add(stub)
    for stub in stubs[:-10]:
        deadlines.discard(stub)
    assert len(deadlines) == 10
    assert len(deadlines._jobs) + len(deadlines._early) < 400  # rebuilt: memory follows the live ones
    deadlines.close()
