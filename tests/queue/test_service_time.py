"""The service-time estimate behind Retry-After: appointments one place apart, bounded under a flood."""

from __future__ import annotations

from app.queue.service_time import LONGEST_APPOINTMENT_SECONDS, ServiceTime


def test_refused_requests_get_successive_places() -> None:
    times = ServiceTime(slots=2)
    times.observe(4.0)  # one place frees every 2 s
    waits = [times.appointment(now=100.0) for _ in range(3)]
    for n, wait in enumerate(waits, 1):
        assert 2.0 * n <= wait <= 2.0 * n + 1.0
    assert 2.0 <= times.appointment(now=200.0) <= 3.0  # the appointments have passed: the first place again


def test_a_sustained_flood_is_never_told_more_than_a_minute() -> None:
    times = ServiceTime(slots=1)
    times.observe(0.02)  # one place every 20 ms
    now = 0.0
    longest = 0.0
    for _ in range(100_000):  # 100 refusals a millisecond for a second: 2,000 s of places
        now += 0.00001
        longest = max(longest, times.appointment(now))
    assert LONGEST_APPOINTMENT_SECONDS <= longest <= LONGEST_APPOINTMENT_SECONDS + 0.01
