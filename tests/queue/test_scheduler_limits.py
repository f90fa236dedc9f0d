"""The scheduler with budgets, a breaker, per-key limits and aging, on a fake clock. No sleeping."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from app.backends.base import Usage
from app.errors import BreakerOpen, KeyQueueLimit
from app.limits.breaker import BreakerState, CircuitBreaker
from app.limits.keys import KeyAccount, KeyEntry
from app.limits.limiter import JITTER_GUARD_SECONDS, UpstreamLimiter
from app.metrics import Metrics
from app.queue.gate import DispatchGate
from app.queue.scheduler import Scheduler
from app.settings import QueueFullBehavior
from app.types import JobState, Priority
from testkit.clock import FakeClock

pytestmark = pytest.mark.anyio


def make(
    concurrency: int = 4,
    limiter: UpstreamLimiter | None = None,
    breaker: CircuitBreaker | None = None,
    aging: float | None = None,
    clock: FakeClock | None = None,
) -> tuple[Scheduler, FakeClock, CollectorRegistry]:
    clock = clock or FakeClock()
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    gate = DispatchGate(limiter, breaker, metrics, clock) if limiter is not None or breaker is not None else None
    scheduler = Scheduler(
        max_concurrent=concurrency,
        max_queue_size=100,
        request_timeout=3600,
        full_behavior=QueueFullBehavior.REJECT,
        history_size=100,
        metrics=metrics,
        aging_seconds=aging,
        gate=gate,
        clock=clock,
    )
    if breaker is not None:
        breaker.on_change = scheduler.breaker_changed  # as create_app wires it
    return scheduler, clock, registry


def held_by(s: Scheduler) -> str | None:
    assert s.roster.gate is not None
    return s.roster.gate.held_by


async def test_requests_budget_holds_dispatch_and_wakes_exactly_when_it_refills() -> None:
    clock = FakeClock()
    s, _, registry = make(limiter=UpstreamLimiter(rpm=2, tpm=None, clock=clock), clock=clock)
    a = s.submit("a", "chat", Priority.NORMAL, None)
    b = s.submit("b", "chat", Priority.NORMAL, None)
    c = s.submit("c", "chat", Priority.HIGH, None)
    assert a.state is b.state is JobState.PROCESSING
    assert c.state is JobState.QUEUED  # slots are free, the budget is not
    assert held_by(s) == "rate_limit_requests" and s.waiting_room.waiting_for(c) == "rate_limit_requests"
    # One request refills in 60 s / 2, and the jitter guard gives it a little to spare.
    assert s.roster.gate is not None and s.roster.gate.hold_until == pytest.approx(
        clock.now + 30.0 + JITTER_GUARD_SECONDS
    )
    clock.advance(30.0 + JITTER_GUARD_SECONDS)
    s.dispatch()  # what the hold timer does at that instant
    assert c.state is JobState.PROCESSING and held_by(s) is None and s.roster.gate.hold_until is None
    assert registry.get_sample_value("gateway_rate_limit_wait_seconds_sum") == pytest.approx(30.05)
    assert s.roster.gate.limiter is not None and s.roster.gate.limiter.status()["requests_per_minute"]["remaining"] == 0


async def test_tokens_budget_keeps_priority_order_and_settles_real_usage() -> None:
    clock = FakeClock()
    limiter = UpstreamLimiter(rpm=None, tpm=1000, clock=clock)
    s, _, _ = make(limiter=limiter, clock=clock)
    big = s.submit("big", "chat", Priority.NORMAL, None, cost=900)
    high = s.submit("high", "chat", Priority.HIGH, None, cost=300)
    low = s.submit("low", "chat", Priority.LOW, None, cost=50)
    # The high request is next; it waits for its tokens and the cheap low one does not jump ahead of it.
    assert big.state is JobState.PROCESSING
    assert low.state is high.state is JobState.QUEUED and held_by(s) == "rate_limit_tokens"
    s.retire(big, None, Usage(100, 20))  # 780 tokens come back: the high one and then the low one fit
    assert high.state is low.state is JobState.PROCESSING


async def test_breaker_open_refuses_new_and_waiting_requests_then_a_probe_closes_it() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=2, cooldown=10.0, clock=clock)
    s, _, registry = make(concurrency=1, breaker=breaker, clock=clock)
    running = s.submit("running", "chat", Priority.NORMAL, None)
    waiting = s.submit("waiting", "chat", Priority.NORMAL, None)
    breaker.failure()
    breaker.failure()
    assert isinstance(waiting.error, BreakerOpen) and s.waiting == 0  # out of the queue, its handler woken
    s.retire(waiting, waiting.error, None)
    assert waiting.state is JobState.FAILED
    with pytest.raises(BreakerOpen) as refused:
        s.submit("new", "chat", Priority.HIGH, None)
    assert refused.value.headers["Retry-After"] == "10"
    assert registry.get_sample_value("gateway_rejections_total", {"reason": "breaker_open"}) == 1
    s.retire(running, None, None)
    clock.advance(10.0)
    probe = s.submit("probe", "chat", Priority.NORMAL, None)
    behind = s.submit("behind", "chat", Priority.NORMAL, None)
    assert probe.state is JobState.PROCESSING and breaker.probe is probe
    assert behind.state is JobState.QUEUED
    breaker.success()  # the upstream answered the probe
    s.retire(probe, None, None)
    assert breaker.state is BreakerState.CLOSED and behind.state is JobState.PROCESSING


async def test_a_probe_cancelled_before_its_verdict_lets_the_next_request_probe() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=1, cooldown=10.0, clock=clock)
    s, _, _ = make(concurrency=2, breaker=breaker, clock=clock)
    breaker.failure()
    clock.advance(10.0)
    probe = s.submit("probe", "chat", Priority.NORMAL, None)
    behind = s.submit("behind", "chat", Priority.NORMAL, None)
    assert behind.state is JobState.QUEUED and held_by(s) == "circuit_breaker_half_open"  # a slot is free
    s.retire(probe, None, None)  # no answer from the upstream either way
    assert behind.state is JobState.PROCESSING and breaker.probe is behind


async def test_a_key_may_not_fill_the_queue_and_its_count_follows_its_requests() -> None:
    s, _, registry = make(concurrency=1)
    noisy = KeyAccount.build(KeyEntry(key="k", name="noisy", max_queued=2))
    running = s.submit("r", "chat", Priority.NORMAL, noisy)  # runs: does not count
    first = s.submit("1", "chat", Priority.NORMAL, noisy)
    s.submit("2", "chat", Priority.NORMAL, noisy)
    with pytest.raises(KeyQueueLimit):
        s.submit("3", "chat", Priority.NORMAL, noisy)
    assert registry.get_sample_value("gateway_rejections_total", {"reason": "key_queue_limit"}) == 1
    s.submit("other", "chat", Priority.NORMAL, KeyAccount.unlimited("quiet"))  # another key is not affected
    s.retire(running, None, None)  # "1" starts: one place for the key again
    assert first.state is JobState.PROCESSING and noisy.waiting == 1
    s.submit("3", "chat", Priority.NORMAL, noisy)
    assert noisy.waiting == 2


async def test_aging_raises_a_waiting_request_one_level_per_period() -> None:
    s, clock, _ = make(concurrency=1, aging=10.0)
    running = s.submit("running", "chat", Priority.NORMAL, None)
    low = s.submit("low", "chat", Priority.LOW, None)
    clock.advance(10.0)
    normal = s.submit("normal", "chat", Priority.NORMAL, None)
    assert s.waiting_room.sizes() == {
        "high": 0,
        "normal": 2,
        "low": 0,
        "batch": 0,
    }  # low waited a period: now at normal
    assert s.waiting_room.position(low) == 1  # and it was there first
    clock.advance(10.0)
    high = s.submit("high", "chat", Priority.HIGH, None)
    assert s.waiting_room.sizes() == {
        "high": 3,
        "normal": 0,
        "low": 0,
        "batch": 0,
    }  # everyone waited long enough to climb
    assert [s.waiting_room.position(j) for j in (low, normal, high)] == [1, 2, 3]
    s.retire(running, None, None)
    assert low.state is JobState.PROCESSING and low.rank == 0 and low.priority is Priority.LOW


async def test_aging_climbs_two_levels_at_once_after_a_long_quiet_spell() -> None:
    s, clock, _ = make(concurrency=1, aging=5.0)
    running = s.submit("running", "chat", Priority.NORMAL, None)
    s.submit("high", "chat", Priority.HIGH, None)
    low = s.submit("low", "chat", Priority.LOW, None)
    clock.advance(60.0)
    s.retire(running, None, None)  # "high" arrived first and ranks first among equals
    assert s.waiting_room.position(low) is None or s.waiting_room.sizes()["high"] == 1
    assert low.rank == 0
