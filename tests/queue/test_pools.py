"""The scheduler with several members and pools, on a fake clock: routing, shared members, reroute, reloads."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from app.errors import InvalidRequest, ModelNotFound, UpstreamError, UpstreamUnavailable
from app.limits.breaker import CircuitBreaker
from app.metrics import Metrics
from app.queue.gate import DispatchGate
from app.queue.member import Member
from app.queue.pool import Routing
from app.queue.scheduler import Scheduler
from app.settings import QueueFullBehavior
from app.types import JobState, Priority
from testkit.clock import FakeClock

pytestmark = pytest.mark.anyio


def make(
    members: list[Member], routing: Routing = Routing.AFFINITY, queue: int = 100
) -> tuple[Scheduler, FakeClock, Metrics]:
    clock = FakeClock()
    metrics = Metrics(CollectorRegistry())
    scheduler = Scheduler(
        max_queue_size=queue,
        request_timeout=60,
        full_behavior=QueueFullBehavior.REJECT,
        history_size=100,
        metrics=metrics,
        members=members,
        aliases={"public": "a"},
        routing=routing,
        clock=clock,
    )
    return scheduler, clock, metrics


def with_breaker(name: str, slots: int, models: tuple[str, ...] = ("a",)) -> Member:
    metrics = Metrics(CollectorRegistry())
    return Member(name, slots, models=models, gate=DispatchGate(None, CircuitBreaker(3, 30), metrics))


async def test_requests_go_to_their_models_pool_and_unknown_models_answer_404() -> None:
    s, _, _ = make([Member("x", 1, models=("a",)), Member("y", 1, models=("b",))])
    assert s.submit("1", "chat", Priority.NORMAL, None, model="a").member is s.roster.members["x"]
    assert s.submit("2", "chat", Priority.NORMAL, None, model="b").member is s.roster.members["y"]
    assert s.submit("3", "chat", Priority.NORMAL, None, model="public").pool is s.roster.pools["a"]  # an alias
    with pytest.raises(ModelNotFound):
        s.submit("4", "chat", Priority.NORMAL, None, model="c")
    with pytest.raises(InvalidRequest):
        s.submit("5", "chat", Priority.NORMAL, None, model=None)  # several models: it must say which
    assert s.waiting_room.pool_sizes(s.roster.pools["a"]) == {"high": 0, "normal": 1, "low": 0, "batch": 0}
    assert s.waiting_room.pool_sizes(s.roster.pools["b"]) == {"high": 0, "normal": 0, "low": 0, "batch": 0}


async def test_least_loaded_member_first_and_ties_by_latency() -> None:
    fast, slow = Member("fast", 2, models=("a",)), Member("slow", 2, models=("a",))
    fast.latency, slow.latency = 0.1, 0.5
    s, _, _ = make([slow, fast], routing=Routing.LEAST_LOADED)
    members = [s.submit(str(i), "chat", Priority.NORMAL, None, model="a").member for i in range(4)]
    assert [m.name for m in members if m is not None] == ["fast", "slow", "fast", "slow"]


async def test_a_member_shared_by_two_pools_takes_the_best_head_of_both() -> None:
    shared = Member("shared", 1, models=("a", "b"))
    s, _, _ = make([shared])
    running = s.submit("r", "chat", Priority.LOW, None, model="a")
    low_a = s.submit("low-a", "chat", Priority.LOW, None, model="a")
    high_b = s.submit("high-b", "chat", Priority.HIGH, None, model="b")
    s.retire(running, None, None)
    assert high_b.state is JobState.PROCESSING and low_a.state is JobState.QUEUED


async def test_affinity_sends_a_conversation_home_unless_its_member_is_full() -> None:
    s, _, _ = make([Member(n, 2, models=("a",)) for n in ("x", "y", "z")])
    first = s.submit("1", "chat", Priority.NORMAL, None, model="a", affinity=42)
    home = first.member
    s.retire(first, None, None)
    again = s.submit("2", "chat", Priority.NORMAL, None, model="a", affinity=42)
    assert again.member is home
    # A second request at once would give home 2 of the pool's 2 in flight, past 1.25 times its share: the
    # bounded-load rule sends it to the least loaded member instead (it never waits for home either).
    third = s.submit("3", "chat", Priority.NORMAL, None, model="a", affinity=42)
    assert third.member is not home and third.state is JobState.PROCESSING
    s.retire(again, None, None)
    s.retire(third, None, None)
    assert s.submit("4", "chat", Priority.NORMAL, None, model="a", affinity=42).member is third.member  # served last


async def test_reroute_puts_the_request_first_and_never_on_the_same_member_next() -> None:
    a, b = with_breaker("a", 1), with_breaker("b", 1)
    s, _, _ = make([a, b], routing=Routing.ROUND_ROBIN)
    job = s.submit("1", "chat", Priority.NORMAL, None, model="a")
    failed_at = job.member
    other = b if failed_at is a else a
    blocker = s.submit("2", "chat", Priority.NORMAL, None, model="a")
    assert blocker.member is other
    waiting = s.submit("3", "chat", Priority.NORMAL, None, model="a")
    assert s.reroute(job, UpstreamError("refused", kind="connect"))
    assert (
        job.state is JobState.QUEUED and s.waiting_room.position(job) == 1
    )  # first of its level: it was first already
    assert failed_at is not None and failed_at.down  # a connection refused marks the member down at once
    assert failed_at.series.failovers == 1 and failed_at.series.errors == 1
    s.retire(blocker, None, None)
    assert job.member is other and waiting.state is JobState.QUEUED


async def test_reroute_refuses_when_no_other_member_is_up() -> None:
    a, b = with_breaker("a", 1), with_breaker("b", 1)
    s, _, _ = make([a, b])
    assert b.gate is not None and b.gate.breaker is not None
    b.gate.breaker.trip()
    job = s.submit("1", "chat", Priority.NORMAL, None, model="a")
    assert job.member is a
    assert not s.reroute(job, UpstreamError("refused", kind="connect"))
    assert job.member is a and a.down  # it learned, but the failure is the answer
    with pytest.raises(UpstreamUnavailable):
        s.submit("2", "chat", Priority.NORMAL, None, model="a")  # every member down: 503 at once


async def test_every_member_down_answers_what_waits_503_at_once() -> None:
    a, b = with_breaker("a", 1), with_breaker("b", 1)
    s, _, _ = make([a, b])
    for member in (a, b):
        assert member.gate is not None and member.gate.breaker is not None
        member.gate.breaker.on_change = lambda state, m=member: s.member_changed(m, state)
    running = [s.submit(str(i), "chat", Priority.NORMAL, None, model="a") for i in range(2)]
    waiting = s.submit("w", "chat", Priority.NORMAL, None, model="a")
    a.gate.breaker.trip()  # type: ignore[union-attr]
    assert waiting.error is None  # b is still up
    b.gate.breaker.trip()  # type: ignore[union-attr]
    assert isinstance(waiting.error, UpstreamUnavailable)
    assert all(job.error is None for job in running)


async def test_a_reload_keeps_waiting_requests_and_retires_removed_members_when_idle() -> None:
    old, kept = Member("old", 1, models=("a",)), Member("kept", 1, models=("a", "b"))
    s, _, _ = make([old, kept])
    retired: list[str] = []
    s.roster.on_retired = lambda member: retired.append(member.name)
    on_old = s.submit("1", "chat", Priority.NORMAL, None, model="a")
    on_kept = s.submit("2", "chat", Priority.NORMAL, None, model="a")
    waiting_a = s.submit("3", "chat", Priority.NORMAL, None, model="a")
    waiting_b = s.submit("4", "chat", Priority.NORMAL, None, model="b")
    new = Member("new", 2, models=("a",))
    s.set_members([kept, new])
    assert old.retiring and retired == [] and s.roster.retiring == [old]
    assert waiting_a.member is new  # the newcomer takes what waited
    assert {m.name: m.models for m in s.roster.members.values()} == {"kept": ("a", "b"), "new": ("a",)}
    s.retire(on_old, None, None)
    assert retired == ["old"] and s.roster.retiring == []
    s.set_members([new])  # nobody serves b any more
    assert isinstance(waiting_b.error, UpstreamUnavailable)
    s.retire(on_kept, None, None)
    assert retired == ["old", "kept"]
