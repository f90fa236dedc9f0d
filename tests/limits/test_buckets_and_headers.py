"""Token buckets, rate-limit header parsing and backoff, on a fake clock: no sleeping."""

from __future__ import annotations

import pytest

from app.limits.backoff import Backoff
from app.limits.buckets import TokenBucket
from app.limits.headers import parse_budget, parse_duration, parse_retry_after
from app.limits.limiter import JITTER_GUARD_SECONDS as GUARD
from app.limits.limiter import UpstreamLimiter
from testkit.clock import FakeClock


def test_bucket_refills_continuously_and_says_how_long_to_wait() -> None:
    clock = FakeClock()
    bucket = TokenBucket(60, 60.0, clock)  # one a second
    assert bucket.wait(60) == 0.0
    bucket.take(60)
    assert bucket.wait(1) == pytest.approx(1.0)
    clock.advance(0.5)
    assert bucket.wait(1) == pytest.approx(0.5) and bucket.remaining() == 0
    clock.advance(0.5)
    assert bucket.wait(1) == 0.0 and bucket.remaining() == 1
    clock.advance(3600)
    assert bucket.level() == 60  # never above the limit


def test_bucket_lets_an_oversized_request_through_when_full_and_carries_the_debt() -> None:
    clock = FakeClock()
    bucket = TokenBucket(100, 60.0, clock)
    assert bucket.wait(250) == 0.0  # more than the whole budget: waits only for a full bucket
    bucket.take(250)
    assert bucket.level() == -150
    assert bucket.wait(1) == pytest.approx(151 * 0.6)  # the debt is paid off before anything else goes
    bucket.give(300)
    assert bucket.level() == 100


def test_bucket_cap_follows_the_upstream_and_reset_in() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10, 1.0, clock)
    bucket.cap(4)
    assert bucket.remaining() == 4 and bucket.reset_in() == pytest.approx(0.6)
    bucket.cap(8)  # never raised by a cap
    assert bucket.remaining() == 4


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1m30.5s", 90.5),
        ("250ms", 0.25),
        ("6s", 6.0),
        ("2h0m0s", 7200.0),
        ("1h2m3s", 3723.0),
        ("0.5", 0.5),
        ("17", 17.0),
        ("7.66s", 7.66),
        (" 20ms ", 0.02),
        ("", None),
        ("soon", None),
        ("5 s", None),
        ("-3", None),
        ("1m-2s", None),
    ],
)
def test_durations_in_openai_and_groq_formats(text: str, seconds: float | None) -> None:
    result = parse_duration(text)
    assert result == (None if seconds is None else pytest.approx(seconds))


def test_retry_after_in_ms_seconds_or_http_date() -> None:
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}, 0) == 1.5
    assert parse_retry_after({"retry-after": "3"}, 0) == 3.0
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:30 GMT"}, 1445412500.0) == 10.0
    assert parse_retry_after({"retry-after": "whenever"}, 0) is None
    assert parse_retry_after({}, 0) is None


def test_budget_headers() -> None:
    budget = parse_budget(
        {
            "x-ratelimit-remaining-requests": "59",
            "x-ratelimit-remaining-tokens": "149984",
            "x-ratelimit-reset-requests": "1s",
            "x-ratelimit-reset-tokens": "6m0s",
        }
    )
    assert (budget.remaining_requests, budget.remaining_tokens) == (59, 149984)
    assert (budget.reset_requests, budget.reset_tokens) == (1.0, 360.0)
    assert parse_budget({}).empty and parse_budget({"x-ratelimit-remaining-requests": "lots"}).empty


def test_backoff_is_full_jitter_capped_and_honours_retry_after() -> None:
    top = Backoff(base=0.5, cap=8.0, rng=lambda: 1.0)
    assert [top.delay(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert Backoff(base=0.5, cap=8.0, rng=lambda: 0.25).delay(2) == 0.5
    assert Backoff(base=0.5, cap=8.0, rng=lambda: 0.0).delay(0) == 0.0
    assert top.delay(0, retry_after=3.0) == 3.0  # never sooner than the server asked
    assert top.delay(4, retry_after=3.0) == 8.0
    assert top.delay(10_000) == 8.0  # no overflow on absurd attempt counts


def test_limiter_waits_for_the_strictest_budget_and_settles_usage() -> None:
    clock = FakeClock()
    limiter = UpstreamLimiter(rpm=60, tpm=600, clock=clock)
    assert limiter.delay(500) == (0.0, None)
    limiter.charge(500)
    wait, reason = limiter.delay(500)
    assert reason == "rate_limit_tokens" and wait == pytest.approx(40.0 + GUARD)  # 400 missing at 10 tokens/s
    limiter.done(500, 100)  # the answer was short: 400 tokens come back
    assert limiter.delay(500) == (0.0, None)
    assert limiter.status()["tokens_per_minute"] == {"limit": 600, "remaining": 500, "reset_seconds": 10.0}


def test_limiter_learns_spent_upstream_budgets_and_429_pauses() -> None:
    clock = FakeClock()
    limiter = UpstreamLimiter(rpm=None, tpm=None, clock=clock)
    assert limiter.idle()
    limiter.charge(0)
    limiter.learn(parse_budget({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1m30s"}))
    assert not limiter.idle()
    assert limiter.delay(1) == (90.0 + GUARD, "upstream_requests")
    clock.advance(90)
    assert limiter.delay(1) == (0.0, None) and limiter.idle()
    limiter.learn(parse_budget({"x-ratelimit-remaining-tokens": "100", "x-ratelimit-reset-tokens": "250ms"}))
    assert limiter.delay(50) == (0.0, None)
    assert limiter.delay(150) == (pytest.approx(0.25 + GUARD), "upstream_tokens")
    limiter.pause(2.0)
    assert limiter.delay(1) == (2.0 + GUARD, "upstream_retry_after")
    assert limiter.status()["paused_seconds"] == 2.0


def test_learned_budget_discounts_requests_still_in_flight() -> None:
    clock = FakeClock()
    limiter = UpstreamLimiter(rpm=None, tpm=None, clock=clock)
    for _ in range(3):
        limiter.charge(0)
    # The upstream says 2 left, but two other requests of ours may not have reached it yet.
    limiter.learn(parse_budget({"x-ratelimit-remaining-requests": "2", "x-ratelimit-reset-requests": "1s"}))
    assert limiter.delay(1) == (1.0 + GUARD, "upstream_requests")


def test_a_learned_budget_with_its_limit_refills_continuously() -> None:
    clock = FakeClock()
    limiter = UpstreamLimiter(rpm=None, tpm=None, clock=clock)
    headers = {"x-ratelimit-limit-requests": "30", "x-ratelimit-remaining-requests": "0"}
    limiter.charge(0)
    # Spent, full again in 60 s: 30 back in a minute, one every 2 s, not all 30 at the end of the minute.
    limiter.learn(parse_budget({**headers, "x-ratelimit-reset-requests": "1m"}))
    assert limiter.delay(1) == (pytest.approx(2.0 + GUARD), "upstream_requests")
    clock.advance(2.0)
    assert limiter.delay(1) == (0.0, None)
    limiter.charge(0)
    assert limiter.delay(1) == (pytest.approx(2.0 + GUARD), "upstream_requests")
    assert not limiter.idle()
    status = limiter.status()["upstream_requests"]
    assert status["limit"] == 30 and status["refill_per_second"] == pytest.approx(0.5)
    clock.advance(60)
    assert limiter.idle() and limiter.status()["upstream_requests"] is None  # full again: nothing holds
    # Tokens the same way, from their own headers.
    limiter.learn(
        parse_budget(
            {
                "x-ratelimit-limit-tokens": "6000",
                "x-ratelimit-remaining-tokens": "100",
                "x-ratelimit-reset-tokens": "59s",
            }
        )
    )
    assert limiter.delay(200) == (pytest.approx(1.0 + GUARD), "upstream_tokens")  # 100 a second come back


def test_an_answer_that_comes_back_after_a_later_one_cannot_raise_what_is_left() -> None:
    clock = FakeClock()
    limiter = UpstreamLimiter(rpm=None, tpm=None, clock=clock)
    for _ in range(2):
        limiter.charge(0)

    def answer(remaining: int) -> None:  # 30 a minute, refilled continuously: full again in (30 - left) * 2 s
        limiter.learn(
            parse_budget(
                {
                    "x-ratelimit-limit-requests": "30",
                    "x-ratelimit-remaining-requests": str(remaining),
                    "x-ratelimit-reset-requests": f"{(30 - remaining) * 2}s",
                }
            )
        )
        limiter.done(0, None)

    answer(0)  # written second, read first: spent (the other one in flight is discounted too)
    answer(1)  # written first, read second: it tells of the state before the other's request
    assert limiter.delay(1)[0] >= 2.0  # still spent: one comes back in 2 s at the earliest, not now
    limiter.charge(0)
    clock.advance(8.0)
    answer(3)  # a later state, read in order: it may raise what is left again
    assert limiter.delay(1) == (0.0, None)


def test_parse_budget_reads_the_limits() -> None:
    budget = parse_budget({"x-ratelimit-limit-requests": "500", "x-ratelimit-limit-tokens": "30000"})
    assert budget.limit_requests == 500 and budget.limit_tokens == 30000 and budget.empty
