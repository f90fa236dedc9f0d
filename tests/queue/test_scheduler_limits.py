"""The scheduler with budgets, a breaker, per-key limits and aging, on a fake clock. No sleeping."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from app.errors import BreakerOpen, KeyQueueLimit
from app.limits.breaker import BreakerState, CircuitBreaker
from app.limits.keys import KeyEntry, Tenant
from app.limits.limiter import JITTER_GUARD_SECONDS, UpstreamLimiter
from app.metrics import Metrics
from app.queue.scheduler import Scheduler
from app.schemas import JobState
from app.settings import Priority, QueueFullBehavior
from tests.limits.clock import FakeClock

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
    scheduler = Scheduler(
        max_concurrent=concurrency,
        max_queue_size=100,
        request_timeout=3600,
        full_behavior=QueueFullBehavior.REJECT,
        history_size=100,
        metrics=Metrics(registry),
        aging_seconds=aging,
        limiter=limiter,
        breaker=breaker,
        clock=clock,
    )
    return scheduler, clock, registry


async def test_requests_budget_holds_dispatch_and_wakes_exactly_when_it_refills() -> None:
    clock = FakeClock()
    s, _, registry = make(limiter=UpstreamLimiter(rpm=2, tpm=None, clock=clock), clock=clock)
    a = s.submit("a", "chat", Priority.NORMAL, None)
    b = s.submit("b", "chat", Priority.NORMAL, None)
    c = s.submit("c", "chat", Priority.HIGH, None)
    assert a.state is b.state is JobState.PROCESSING
    assert c.state is JobState.QUEUED  # slots are free, the budget is not
    assert s.held_by == "rate_limit_requests" and s.waiting_for(c) == "rate_limit_requests"
    # One request refills in 60 s / 2, and the jitter guard gives it a little to spare.
    assert s.hold_until == pytest.approx(clock.now + 30.0 + JITTER_GUARD_SECONDS)
    clock.advance(30.0 + JITTER_GUARD_SECONDS)
    s.resume()  # what the hold timer does at that instant
    assert c.state is JobState.PROCESSING and s.held_by is None and s.hold_until is None
    assert registry.get_sample_value("gateway_rate_limit_wait_seconds_sum") == pytest.approx(30.05)
    status = s.status().rate_limits
    assert status is not None and status["requests_per_minute"]["remaining"] == 0


async def test_tokens_budget_keeps_priority_order_and_settles_real_usage() -> None:
    clock = FakeClock()
    limiter = UpstreamLimiter(rpm=None, tpm=1000, clock=clock)
    s, _, _ = make(limiter=limiter, clock=clock)
    big = s.submit("big", "chat", Priority.NORMAL, None, cost=900)
    high = s.submit("high", "chat", Priority.HIGH, None, cost=300)
    low = s.submit("low", "chat", Priority.LOW, None, cost=50)
    # The high request is next; it waits for its tokens and the cheap low one does not jump ahead of it.
    assert big.state is JobState.PROCESSING
    assert low.state is high.state is JobState.QUEUED and s.held_by == "rate_limit_tokens"
    big.used_tokens = 120
    s.finish(big, None)  # 780 tokens come back: the high one and then the low one fit
    assert high.state is low.state is JobState.PROCESSING


async def test_breaker_open_refuses_new_and_waiting_requests_then_a_probe_closes_it() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=2, cooldown=10.0, clock=clock)
    s, _, registry = make(concurrency=1, breaker=breaker, clock=clock)
    running = s.submit("running", "chat", Priority.NORMAL, None)
    waiting = s.submit("waiting", "chat", Priority.NORMAL, None)
    breaker.failure()
    breaker.failure()
    assert waiting.state is JobState.CANCELLED or waiting.state is JobState.FAILED
    assert isinstance(waiting.error, BreakerOpen)
    with pytest.raises(BreakerOpen) as refused:
        s.submit("new", "chat", Priority.HIGH, None)
    assert refused.value.headers["Retry-After"] == "10"
    assert registry.get_sample_value("gateway_rejections_total", {"reason": "breaker_open"}) == 1
    s.finish(running, None)
    clock.advance(10.0)
    probe = s.submit("probe", "chat", Priority.NORMAL, None)
    behind = s.submit("behind", "chat", Priority.NORMAL, None)
    assert probe.state is JobState.PROCESSING and breaker.probe is probe
    assert behind.state is JobState.QUEUED
    breaker.success()  # the upstream answered the probe
    s.finish(probe, None)
    assert breaker.state is BreakerState.CLOSED and behind.state is JobState.PROCESSING


async def test_a_probe_cancelled_before_its_verdict_lets_the_next_request_probe() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=1, cooldown=10.0, clock=clock)
    s, _, _ = make(concurrency=2, breaker=breaker, clock=clock)
    breaker.failure()
    clock.advance(10.0)
    probe = s.submit("probe", "chat", Priority.NORMAL, None)
    behind = s.submit("behind", "chat", Priority.NORMAL, None)
    assert behind.state is JobState.QUEUED and s.held_by == "circuit_breaker_half_open"  # a slot is free
    s.finish(probe, None)  # no answer from the upstream either way
    assert behind.state is JobState.PROCESSING and breaker.probe is behind


async def test_a_key_may_not_fill_the_queue_and_its_count_follows_its_requests() -> None:
    s, _, registry = make(concurrency=1)
    tenant = Tenant.build(KeyEntry(key="k", name="noisy", max_queued=2))
    running = s.submit("r", "chat", Priority.NORMAL, "noisy", tenant=tenant)  # runs: does not count
    first = s.submit("1", "chat", Priority.NORMAL, "noisy", tenant=tenant)
    s.submit("2", "chat", Priority.NORMAL, "noisy", tenant=tenant)
    with pytest.raises(KeyQueueLimit):
        s.submit("3", "chat", Priority.NORMAL, "noisy", tenant=tenant)
    assert registry.get_sample_value("gateway_rejections_total", {"reason": "key_queue_limit"}) == 1
    s.submit("other", "chat", Priority.NORMAL, "quiet")  # another key is not affected
    s.finish(running, None)  # "1" starts: one place for the key again
    assert first.state is JobState.PROCESSING and tenant.waiting == 1
    s.submit("3", "chat", Priority.NORMAL, "noisy", tenant=tenant)
    assert tenant.waiting == 2


async def test_aging_raises_a_waiting_request_one_level_per_period() -> None:
    s, clock, _ = make(concurrency=1, aging=10.0)
    running = s.submit("running", "chat", Priority.NORMAL, None)
    low = s.submit("low", "chat", Priority.LOW, None)
    clock.advance(10.0)
    normal = s.submit("normal", "chat", Priority.NORMAL, None)
    assert s.queue_sizes() == {"high": 0, "normal": 2, "low": 0}  # low waited a period: now at normal
    assert s.position(low) == 1  # and it was there first
    clock.advance(10.0)
    high = s.submit("high", "chat", Priority.HIGH, None)
    assert s.queue_sizes() == {"high": 3, "normal": 0, "low": 0}  # everyone waited long enough to climb
    assert [s.position(j) for j in (low, normal, high)] == [1, 2, 3]
    s.finish(running, None)
    assert low.state is JobState.PROCESSING and low.rank == 0 and low.priority is Priority.LOW


async def test_aging_climbs_two_levels_at_once_after_a_long_quiet_spell() -> None:
    s, clock, _ = make(concurrency=1, aging=5.0)
    running = s.submit("running", "chat", Priority.NORMAL, None)
    s.submit("high", "chat", Priority.HIGH, None)
    low = s.submit("low", "chat", Priority.LOW, None)
    clock.advance(60.0)
    s.finish(running, None)  # "high" arrived first and ranks first among equals
    assert s.position(low) is None or s.queue_sizes()["high"] == 1
    assert low.rank == 0
