"""How long a request holds a backend slot (a moving average), and the appointments given to refused requests."""

from __future__ import annotations

import random

_EWMA_WEIGHT = 0.2  # how fast the estimate follows change: about the last 5 requests
LONGEST_APPOINTMENT_SECONDS = 60.0  # the longest Retry-After given (the openai SDK honours up to 60 s)


class ServiceTime:
    """A moving average of slot hold times, and appointments for refused requests."""

    __slots__ = ("_next_appointment", "average", "slots")

    def __init__(self, slots: int):
        self.slots = slots  # how many requests run at once (the fleet's slots: a reload changes it)
        self.average: float | None = None  # seconds a request holds a slot; None before the first has ended
        self._next_appointment = 0.0  # when the last refused request was told to come back (monotonic)

    def observe(self, held: float) -> None:
        """A request held its slot for `held` seconds."""
        average = self.average
        self.average = held if average is None else average + _EWMA_WEIGHT * (held - average)

    def appointment(self, now: float, place: float) -> float:
        """Seconds until a refused request should come back: when a place frees for it, `place` seconds apart
        (app.queue.eta.place).

        Refused requests get successive appointments, one place apart, plus up to half a place of jitter:
        told the same Retry-After, they would all come back at once and all but one be refused again. Under a
        sustained flood the appointments would grow for as long as it lasts; they stop at a minute, past which
        the openai SDK ignores Retry-After anyway.
        """
        self._next_appointment = min(max(self._next_appointment, now) + place, now + LONGEST_APPOINTMENT_SECONDS)
        return self._next_appointment - now + random.uniform(0.0, place / 2)
