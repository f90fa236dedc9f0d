"""The admission checks on plain pools and members: too many choices, open breakers, deadlines, lifetimes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from app.errors import BreakerOpen, DeadlineUnreachable, InvalidRequest, KeyQueueLimit
from app.limits.breaker import CircuitBreaker
from app.limits.keys import KeyAccount
from app.metrics import Metrics
from app.queue import admission
from app.queue.gate import DispatchGate
from app.queue.member import Member
from app.queue.pool import Pool
from app.types import Priority
from testkit.clock import FakeClock


def pool_of(*members: Member) -> Pool:
    pool = Pool("m", 3)
    pool.members = list(members)
    return pool


def breaker_member(name: str, cooldown: float, clock: FakeClock) -> tuple[Member, CircuitBreaker]:
    breaker = CircuitBreaker(threshold=1, cooldown=cooldown, clock=clock)
    gate = DispatchGate(None, breaker, Metrics(CollectorRegistry()), clock)
    return Member(name, 2, gate=gate), breaker


def test_choices_past_every_members_slots_are_a_400_that_names_the_most_there_are() -> None:
    local = Member("local", 4, kind="local", reserved_high=1)
    pool = pool_of(local)
    assert admission.too_wide(pool, rank=1, choices=3) is None
    error = admission.too_wide(pool, rank=1, choices=4)  # one of the four is kept for high priority
    assert isinstance(error, InvalidRequest) and error.param == "n" and "at most 3 slots" in error.message
    assert admission.too_wide(pool, rank=0, choices=4) is None  # high priority may use them all
    assert admission.too_wide(pool_of(Member("proxy", 1)), rank=1, choices=8) is None  # one request upstream


def test_a_pool_is_refused_only_while_every_member_is_down_and_says_when_the_soonest_is_back() -> None:
    clock = FakeClock()
    a, breaker_a = breaker_member("a", 10.0, clock)
    b, breaker_b = breaker_member("b", 30.0, clock)
    pool = pool_of(a, b)
    assert admission.breaker_refusal(pool) is None
    breaker_b.failure()
    assert admission.breaker_refusal(pool) is None  # a still serves
    breaker_a.failure()
    refusal = admission.breaker_refusal(pool)
    assert isinstance(refusal, BreakerOpen) and refusal.retry_after == 10.0
    assert admission.breaker_refusal(pool_of(Member("bare", 1))) is None  # no gate, no breaker


def test_a_wait_past_the_lifetime_is_refused_once_the_service_time_is_measured() -> None:
    pool = pool_of(Member("a", 1))
    assert admission.deadline_unreachable(pool, 90.0, 60.0, None) is None  # nothing measured: no refusal
    pool.service.observe(30.0)
    assert admission.deadline_unreachable(pool, 50.0, 60.0, 30.0) is None
    error = admission.deadline_unreachable(pool, 90.0, 60.0, 30.0)
    assert isinstance(error, DeadlineUnreachable) and error.retry_after == 30.0  # the wait it is over by


def test_messages_name_the_key_and_the_wait_and_lifetimes_take_the_shorter_timeout() -> None:
    key = KeyAccount(name="team", max_priority=Priority.HIGH, max_queued=2, requests=None, tokens=None)
    limit = admission.key_queue_limit(key, 2.5)
    assert isinstance(limit, KeyQueueLimit) and "'team' already has 2 requests" in limit.message
    assert limit.retry_after == 2.5
    full = admission.queue_full("4 requests waiting", 1.25)
    assert full.message == "the queue is full (4 requests waiting); retry in 1.2s" and full.retry_after == 1.25
    assert admission.duplicate_id("abc").param == "X-Request-ID"
    assert admission.lifetime(600.0, None, batch=False) == 600.0
    assert admission.lifetime(600.0, 30.0, batch=False) == 30.0
    assert admission.lifetime(600.0, 3600.0, batch=False) == 600.0  # REQUEST_TIMEOUT bounds a client's own
    assert admission.lifetime(600.0, 86400.0, batch=True) == 86400.0  # a batch line lives its batch's window
