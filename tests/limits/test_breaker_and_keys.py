"""The circuit breaker and per-key policy, on a fake clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.errors import KeyRateLimited
from app.limits.breaker import BreakerState, CircuitBreaker
from app.limits.keys import KeyAccount, KeyEntry, KeysFileError, load_keys_file
from app.types import Priority
from testkit.clock import FakeClock


def test_breaker_opens_after_consecutive_failures_and_a_probe_closes_it() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=3, cooldown=10.0, clock=clock)
    changes: list[BreakerState] = []
    breaker.on_change = changes.append
    breaker.failure()
    breaker.failure()
    breaker.success()  # not consecutive any more
    breaker.failure()
    breaker.failure()
    assert breaker.state is BreakerState.CLOSED and breaker.delay() == 0.0
    breaker.failure()
    assert breaker.state is BreakerState.OPEN and changes == [BreakerState.OPEN]
    assert breaker.retry_after() == 10.0 and breaker.delay() == 10.0 and breaker.gauge == 2
    clock.advance(10.0)
    assert breaker.state is BreakerState.HALF_OPEN and breaker.delay() == 0.0
    breaker.dispatched("probe")
    breaker.dispatched("second")  # only one probe
    assert breaker.probe == "probe" and breaker.delay() == float("inf")
    breaker.success()
    assert breaker.state is BreakerState.CLOSED and changes[-1] is BreakerState.CLOSED and breaker.failures == 0


def test_failed_probe_reopens_and_a_cancelled_probe_lets_another_go() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=1, cooldown=5.0, clock=clock)
    breaker.failure()
    clock.advance(5.0)
    breaker.dispatched("probe")
    breaker.failure()
    assert breaker.state is BreakerState.OPEN and breaker.retry_after() == 5.0
    clock.advance(5.0)
    breaker.dispatched("probe-2")
    changes: list[BreakerState] = []
    breaker.on_change = changes.append
    breaker.settled("someone-else")
    assert breaker.probe == "probe-2"
    breaker.settled("probe-2")  # cancelled before the upstream answered: no verdict
    assert breaker.probe is None and breaker.delay() == 0.0 and changes == [BreakerState.HALF_OPEN]


def test_a_5xx_counts_once_per_request_content_while_connection_failures_count_each_time() -> None:
    breaker = CircuitBreaker(threshold=3, cooldown=10.0, clock=FakeClock())
    for _ in range(10):
        breaker.failure(cause="the same body")  # sent again and again, retried: that body's problem
    assert breaker.state is BreakerState.CLOSED and breaker.failures == 1
    breaker.failure(cause="another body")
    assert breaker.state is BreakerState.CLOSED
    breaker.failure()  # a connection error: the upstream itself
    assert breaker.state is BreakerState.OPEN
    fresh = CircuitBreaker(threshold=2, cooldown=10.0, clock=FakeClock())
    fresh.failure(cause="x")
    fresh.success()  # an answer in between: the run starts again, the same body counts again
    fresh.failure(cause="x")
    fresh.failure(cause="y")
    assert fresh.state is BreakerState.OPEN


def test_keys_file_yaml_and_json(tmp_path: Path) -> None:
    yaml_file = tmp_path / "keys.yaml"
    yaml_file.write_text(
        "keys:\n"
        "  - {key: sk-a, name: team-a, max_priority: normal, rpm: 60, tpm: 1000, max_queued: 5}\n"
        "  - {key: sk-b, name: team-b}\n"
    )
    entries = load_keys_file(str(yaml_file))
    assert [(e.name, e.max_priority, e.rpm, e.max_queued) for e in entries] == [
        ("team-a", Priority.NORMAL, 60, 5),
        ("team-b", Priority.HIGH, None, None),
    ]
    json_file = tmp_path / "keys.json"
    json_file.write_text('[{"key": "sk-c", "name": "team-c", "max_priority": "low"}]')
    assert load_keys_file(str(json_file))[0].max_priority is Priority.LOW


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("keys: [{key: a, name: x}, {key: a, name: y}]", "key of 'y' appears more than once"),
        ("keys: [{key: a, name: x}, {key: b, name: x}]", "name of 'x' appears more than once"),
        ("keys: [{key: a, name: x, max_priority: urgent}]", "keys.0.max_priority"),
        ("keys: [{key: a, name: x, rpm: 0}]", "keys.0.rpm"),
        ("keys: [{key: a, name: x, colour: red}]", "keys.0.colour"),
        ("keys: [{name: x}]", "keys.0.key"),
        ("keys: [unclosed", "while parsing"),
    ],
)
def test_bad_keys_files_say_what_is_wrong(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(content)
    with pytest.raises(KeysFileError, match="keys.yaml: .*" + message.replace(".", r"\.")):
        load_keys_file(str(path))


def account(clock: FakeClock, **policy: object) -> KeyAccount:
    return KeyAccount.build(KeyEntry(key="k", name="team", **policy), clock)  # type: ignore[arg-type]


def test_priority_is_lowered_to_the_keys_highest() -> None:
    t = account(FakeClock(), max_priority="normal")
    assert t.allowed_priority(Priority.HIGH) is Priority.NORMAL
    assert t.allowed_priority(Priority.NORMAL) is Priority.NORMAL
    assert t.allowed_priority(Priority.LOW) is Priority.LOW


def test_key_rate_limits_answer_429_with_openai_headers_and_refill() -> None:
    clock = FakeClock()
    t = account(clock, rpm=2, tpm=1000)
    t.spend(100)
    t.spend(100)
    with pytest.raises(KeyRateLimited) as refused:
        t.spend(100)
    error = refused.value
    assert error.status_code == 429 and error.code == "rate_limit_exceeded"
    assert error.headers["Retry-After"] == "30" and error.headers["x-ratelimit-remaining-requests"] == "0"
    assert error.headers["x-ratelimit-limit-tokens"] == "1000"
    assert error.headers["x-ratelimit-remaining-tokens"] == "800"
    clock.advance(30)
    t.spend(900)  # one request refilled; 800 + 500 tokens refilled, capped at 1000
    with pytest.raises(KeyRateLimited, match="tokens per minute"):
        clock.advance(30)
        t.spend(900)
    t.settle(900, 50)  # the answer was short: the tokens come back
    t.spend(900)


def test_key_queue_limit() -> None:
    t = account(FakeClock(), max_queued=2)
    t.waiting = 1
    assert not t.queue_full()
    t.waiting = 2
    assert t.queue_full()
    assert not account(FakeClock()).queue_full()  # no max_queued: never full
