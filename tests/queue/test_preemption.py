"""Preemption and reserved slots in the scheduler, on a fake clock, with a turn that records what it is asked."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from app.backends.base import Turn
from app.errors import InvalidRequest, RequestCancelled
from app.metrics import Metrics
from app.queue.job import Job
from app.queue.member import Member
from app.queue.scheduler import Scheduler
from app.settings import QueueFullBehavior
from app.types import JobState, Priority
from testkit.clock import FakeClock

pytestmark = pytest.mark.anyio


def make(member: Member, preempt_max: int = 2) -> tuple[Scheduler, FakeClock, CollectorRegistry]:
    clock = FakeClock()
    registry = CollectorRegistry()
    scheduler = Scheduler(
        max_queue_size=50,
        request_timeout=600,
        full_behavior=QueueFullBehavior.REJECT,
        history_size=10,
        metrics=Metrics(registry),
        members=[member],
        preempt_max=preempt_max,
        clock=clock,
    )
    return scheduler, clock, registry


def running(scheduler: Scheduler, name: str, priority: Priority, log: list[str]) -> Job:
    """A request that runs at once, its backend (the local model) having lent it a turn."""
    job = scheduler.submit(name, "chat", priority, None)
    assert job.state is JobState.PROCESSING
    job.turn = Turn()
    job.turn.pausable(lambda: log.append(f"park {name}"), lambda: log.append(f"resume {name}"), lambda: 0)
    return job


async def test_a_high_request_parks_the_latest_lowest_and_it_resumes_first_in_its_level() -> None:
    s, clock, registry = make(Member("local", 3, kind="local", parking=2))
    log: list[str] = []
    normal = running(s, "normal", Priority.NORMAL, log)
    clock.advance(1)
    first_low = running(s, "low-1", Priority.LOW, log)
    clock.advance(1)
    last_low = running(s, "low-2", Priority.LOW, log)
    waiting_low = s.submit("low-3", "chat", Priority.LOW, None)
    high = s.submit("high", "chat", Priority.HIGH, None)
    assert high.state is JobState.PROCESSING and log == ["park low-2"]  # the lowest, most recently started
    assert last_low.state is JobState.QUEUED and last_low.parked and last_low.slot is None
    assert s.waiting_room.position(last_low) == 1 and s.waiting_room.position(waiting_low) == 2  # the head of its level
    assert registry.get_sample_value("gateway_preemptions_total", {"priority": "low"}) == 1
    clock.advance(1)
    s.retire(high, None, None)
    assert last_low.state is JobState.PROCESSING and log[-1] == "resume low-2"  # back before low-3
    assert waiting_low.state is JobState.QUEUED
    # A request that has not yet reached its backend (no turn) cannot be parked, nor can high work.
    s.retire(first_low, None, None)
    assert waiting_low.state is JobState.PROCESSING and waiting_low.turn is None
    h0 = s.submit("h0", "chat", Priority.HIGH, None)
    assert log[-1] == "park low-2" and last_low.preemptions == 2 and h0.state is JobState.PROCESSING
    h1 = s.submit("h1", "chat", Priority.HIGH, None)
    assert log[-1] == "park normal" and h1.state is JobState.PROCESSING  # the lowest left with a turn
    h2 = s.submit("h2", "chat", Priority.HIGH, None)
    assert h2.state is JobState.QUEUED and len(log) == 4  # high work and low-3 (no turn) stay
    s.retire(h0, None, None)
    assert h2.state is JobState.PROCESSING  # high first
    s.retire(h1, None, None)
    assert normal.state is JobState.PROCESSING and log[-1] == "resume normal"  # then the parked, by level
    s.retire(h2, None, None)
    assert last_low.state is JobState.PROCESSING and log[-1] == "resume low-2"
    for job in (normal, last_low, waiting_low):
        s.retire(job, None, None)
    assert s.in_flight == 0 and s.roster.members["local"].parked == 0 and s.totals.completed == 8


async def test_a_request_is_parked_at_most_preempt_max_times_and_parking_room_is_bounded() -> None:
    s, clock, _ = make(Member("local", 2, kind="local", parking=1), preempt_max=1)
    log: list[str] = []
    first = running(s, "low-1", Priority.LOW, log)
    clock.advance(1)
    second = running(s, "low-2", Priority.LOW, log)
    high = s.submit("high", "chat", Priority.HIGH, None)
    assert log == ["park low-2"] and high.state is JobState.PROCESSING
    another = s.submit("high-2", "chat", Priority.HIGH, None)
    assert another.state is JobState.QUEUED and log == ["park low-2"]  # no room to park low-1 too
    s.retire(high, None, None)
    assert another.state is JobState.PROCESSING  # the high one first, the parked one after
    s.retire(another, None, None)
    assert second.state is JobState.PROCESSING and log[-1] == "resume low-2"
    third = s.submit("high-3", "chat", Priority.HIGH, None)
    assert log[-1] == "park low-1" and third.state is JobState.PROCESSING  # low-2 has been parked its once
    fourth = s.submit("high-4", "chat", Priority.HIGH, None)
    assert fourth.state is JobState.QUEUED and second.preemptions == 1
    # A parked request that is cancelled leaves its parking room.
    assert first.parked
    s.abort(first, RequestCancelled("gone"))
    s.retire(first, RequestCancelled("gone"), None)
    assert s.roster.members["local"].parked == 0 and first.state is JobState.CANCELLED


async def test_preemption_off_or_at_a_proxy_leaves_the_high_request_waiting() -> None:
    for member, preempt_max in ((Member("local", 1, kind="local", parking=1), 0), (Member("proxy", 1), 2)):
        s, _, _ = make(member, preempt_max)
        log: list[str] = []
        low = running(s, "low", Priority.LOW, log)
        high = s.submit("high", "chat", Priority.HIGH, None)
        assert high.state is JobState.QUEUED and log == [] and low.state is JobState.PROCESSING


async def test_reserved_slots_take_high_requests_only() -> None:
    s, _, _ = make(Member("proxy", 3, reserved_high=1))
    normal = s.submit("n1", "chat", Priority.NORMAL, None)
    low = s.submit("l1", "chat", Priority.LOW, None)
    waiting = s.submit("n2", "chat", Priority.NORMAL, None)
    assert normal.state is low.state is JobState.PROCESSING and waiting.state is JobState.QUEUED
    high = s.submit("h1", "chat", Priority.HIGH, None)
    assert high.state is JobState.PROCESSING  # the reserved slot
    assert s.eta(waiting) is not None
    s.retire(high, None, None)
    assert waiting.state is JobState.QUEUED  # the freed slot is the reserved one again
    s.retire(low, None, None)
    assert waiting.state is JobState.PROCESSING


async def test_a_request_of_n_choices_takes_n_slots_at_the_local_model_and_one_at_a_proxy() -> None:
    s, _, _ = make(Member("local", 4, kind="local"))
    three = s.submit("three", "chat", Priority.NORMAL, None, choices=3)
    assert three.state is JobState.PROCESSING and len(three.extra_slots) == 2
    assert s.in_flight == 3 and s.roster.processing == 1
    # Two choices do not fit in the one slot left; a single one behind them waits its turn rather than pass.
    pair = s.submit("pair", "chat", Priority.NORMAL, None, choices=2)
    single = s.submit("single", "chat", Priority.NORMAL, None)
    assert pair.state is JobState.QUEUED and single.state is JobState.QUEUED
    s.retire(three, None, None)
    assert pair.state is JobState.PROCESSING and single.state is JobState.PROCESSING
    assert s.in_flight == 3 and s.roster.processing == 2
    s.retire(pair, None, None)
    s.retire(single, None, None)
    assert s.in_flight == 0 and sum(slot.processed for slot in s.roster.slots) == 6  # a slot for each choice
    # More choices than the model has slots (for this level: one is reserved for high) can never run.
    reserved, _, _ = make(Member("local", 4, kind="local", reserved_high=1))
    with pytest.raises(InvalidRequest) as refused:
        reserved.submit("too-wide", "chat", Priority.NORMAL, None, choices=4)
    assert refused.value.param == "n"
    assert reserved.submit("high-wide", "chat", Priority.HIGH, None, choices=4).state is JobState.PROCESSING
    proxy, _, _ = make(Member("proxy", 1))
    assert proxy.submit("many", "chat", Priority.NORMAL, None, choices=8).state is JobState.PROCESSING


async def test_a_high_request_of_n_choices_parks_as_many_as_it_needs() -> None:
    s, clock, _ = make(Member("local", 3, kind="local", parking=2))
    log: list[str] = []
    lows = []
    for i in range(3):
        lows.append(running(s, f"low-{i}", Priority.LOW, log))
        clock.advance(1)
    high = s.submit("high", "chat", Priority.HIGH, None, choices=2)
    assert high.state is JobState.PROCESSING and log == ["park low-2", "park low-1"]
    assert [job.parked for job in lows] == [False, True, True]
