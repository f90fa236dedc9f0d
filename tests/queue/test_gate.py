"""The dispatch gate alone, on a fake clock: what it lets through, why it holds, when it wakes dispatch."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from app.errors import BreakerOpen
from app.limits.breaker import CircuitBreaker
from app.limits.limiter import JITTER_GUARD_SECONDS, UpstreamLimiter
from app.metrics import Metrics
from app.queue.gate import DispatchGate
from app.queue.job import Job
from app.types import Priority
from testkit.clock import FakeClock

pytestmark = pytest.mark.anyio


def job(name: str, cost: int = 0) -> Job:
    return Job(name, "chat", Priority.NORMAL, None, 0.0, 0.0, 3600.0, cost)


def make(limiter: UpstreamLimiter | None, breaker: CircuitBreaker | None, clock: FakeClock) -> DispatchGate:
    return DispatchGate(limiter, breaker, Metrics(CollectorRegistry()), clock)


async def test_a_spent_budget_holds_the_head_and_wakes_dispatch_once_it_refills() -> None:
    clock = FakeClock()
    gate = make(UpstreamLimiter(rpm=2, tpm=None, clock=clock), None, clock)
    woken: list[float] = []
    wake = lambda: woken.append(clock.now)  # noqa: E731
    for name in ("a", "b"):
        first = job(name)
        assert gate.admits(first, clock.now, wake)
        gate.dispatched(first)
    third = job("c")
    assert not gate.admits(third, clock.now, wake)
    assert gate.held_by == "rate_limit_requests" and not gate.idle()
    assert gate.hold_until == pytest.approx(clock.now + 30 + JITTER_GUARD_SECONDS)  # 60 s / 2 requests
    # A second ask does not arm a second timer for a later moment.
    assert not gate.admits(third, clock.now + 1, wake)
    assert gate.hold_until == pytest.approx(clock.now + 30 + JITTER_GUARD_SECONDS)
    clock.advance(30 + JITTER_GUARD_SECONDS)
    assert gate.admits(third, clock.now, wake)  # what the woken dispatch finds
    assert gate.held_by is None and gate.hold_until is None  # released: no timer left behind


async def test_a_hold_released_before_its_timer_disarms_it() -> None:
    clock = FakeClock()
    limiter = UpstreamLimiter(rpm=None, tpm=None, clock=clock)
    limiter.pause(0.05)
    gate = make(limiter, None, clock)
    woken: list[str] = []
    assert not gate.admits(job("a"), clock.now, lambda: woken.append("a"))
    clock.advance(1.0)  # the pause is over by the fake clock, before the loop's timer fires
    assert gate.admits(job("a"), clock.now, lambda: woken.append("again"))
    await asyncio.sleep(0.1)
    assert woken == []  # released with the hold: no late wake-up


async def test_the_timer_calls_wake_when_the_budget_allows() -> None:
    clock = FakeClock()
    limiter = UpstreamLimiter(rpm=None, tpm=None, clock=clock)
    limiter.pause(0.02)  # as after an upstream 429 with Retry-After: 0.02
    gate = make(limiter, None, clock)
    woken = asyncio.Event()
    assert not gate.admits(job("a"), clock.now, woken.set)
    assert gate.held_by == "upstream_retry_after"
    await asyncio.wait_for(woken.wait(), 2)


async def test_an_open_breaker_refuses_new_requests_and_a_probe_goes_alone() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=1, cooldown=10.0, clock=clock)
    gate = make(None, breaker, clock)
    assert gate.refusal() is None and gate.idle()
    breaker.failure()
    refusal = gate.refusal()
    assert isinstance(refusal, BreakerOpen) and refusal.headers["Retry-After"] == "10"
    assert not gate.admits(job("early"), clock.now, lambda: None) and gate.held_by == "circuit_breaker_open"
    clock.advance(10.0)
    probe, behind = job("probe"), job("behind")
    assert gate.refusal() is None and gate.admits(probe, clock.now, lambda: None)
    gate.dispatched(probe)
    assert breaker.probe is probe
    assert not gate.admits(behind, clock.now, lambda: None) and gate.held_by == "circuit_breaker_half_open"
    assert gate.hold_until is None  # no timer: the probe's verdict dispatches again
    gate.ended(probe, None)  # it ended without a verdict (cancelled): the next may probe
    assert breaker.probe is None and gate.admits(behind, clock.now, lambda: None)


async def test_usage_settles_the_token_budget_only_for_dispatched_requests() -> None:
    clock = FakeClock()
    limiter = UpstreamLimiter(rpm=None, tpm=1000, clock=clock)
    gate = make(limiter, None, clock)
    big = job("big", cost=900)
    assert gate.admits(big, clock.now, lambda: None)
    big.started = clock.now
    gate.dispatched(big)
    assert limiter.remaining()["tokens"] == 100
    gate.ended(big, 150)  # it really used 150: 750 come back
    assert limiter.remaining()["tokens"] == 850
    never = job("never", cost=500)
    gate.ended(never, None)  # never dispatched: nothing was charged, nothing comes back
    assert limiter.remaining()["tokens"] == 850
