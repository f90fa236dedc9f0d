"""Appointments for refused requests: one place apart, bounded under a flood."""

from __future__ import annotations

from app.queue import eta
from app.queue.service_time import LONGEST_APPOINTMENT_SECONDS, ServiceTime


def test_refused_requests_get_successive_places() -> None:
    times = ServiceTime(slots=2)
    place = eta.place(2, 4.0)  # one place frees every 2 s
    waits = [times.appointment(100.0, place) for _ in range(3)]
    for n, wait in enumerate(waits, 1):
        assert 2.0 * n <= wait <= 2.0 * n + 1.0
    assert 2.0 <= times.appointment(200.0, place) <= 3.0  # the appointments have passed: the first place again


def test_a_sustained_flood_is_never_told_more_than_a_minute() -> None:
    times = ServiceTime(slots=1)
    place = eta.place(1, 0.02)  # one place every 20 ms
    now = 0.0
    longest = 0.0
    for _ in range(100_000):  # 100 refusals a millisecond for a second: 2,000 s of places
        now += 0.00001
        longest = max(longest, times.appointment(now, place))
    assert LONGEST_APPOINTMENT_SECONDS <= longest <= LONGEST_APPOINTMENT_SECONDS + 0.01
