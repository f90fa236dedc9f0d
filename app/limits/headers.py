"""The rate-limit headers of OpenAI-compatible APIs: `x-ratelimit-*` and `Retry-After`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

# Durations as OpenAI and Groq write them: "1m30.5s", "250ms", "6s", "2h0m0s", "0.5", "17.2s".
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(value: str) -> float | None:
    """Seconds in a duration such as '1m30.5s', '250ms' or a bare number of seconds; None if unreadable."""
    text = value.strip().lower()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if seconds >= 0 else None
    total = 0.0
    position = 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            return None
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    return total if position == len(text) else None


def parse_retry_after(headers: Mapping[str, str], now_wall: float) -> float | None:
    """Seconds a refusal asks us to wait: retry-after-ms, then Retry-After (seconds or an HTTP date)."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        seconds = parse_duration(millis)
        if seconds is not None:
            return seconds / 1000
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = parse_duration(value)
    if seconds is not None:
        return seconds
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now_wall)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(float(value.strip()))
    except ValueError:
        return None


def _seconds(value: str | None) -> float | None:
    return None if value is None else parse_duration(value)


@dataclass(slots=True, frozen=True)
class UpstreamBudget:
    """What the upstream said of its budgets: what is left, in how many seconds each is full again, and the
    limits themselves (which tell how fast they refill)."""

    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests: float | None = None
    reset_tokens: float | None = None
    limit_requests: int | None = None
    limit_tokens: int | None = None

    @property
    def empty(self) -> bool:
        """No header was there to read."""
        return self.remaining_requests is None and self.remaining_tokens is None


def parse_budget(headers: Mapping[str, str]) -> UpstreamBudget:
    """The x-ratelimit-remaining-*, -reset-* and -limit-* headers; missing or unreadable ones are None."""
    return UpstreamBudget(
        remaining_requests=_int(headers.get("x-ratelimit-remaining-requests")),
        remaining_tokens=_int(headers.get("x-ratelimit-remaining-tokens")),
        reset_requests=_seconds(headers.get("x-ratelimit-reset-requests")),
        reset_tokens=_seconds(headers.get("x-ratelimit-reset-tokens")),
        limit_requests=_int(headers.get("x-ratelimit-limit-requests")),
        limit_tokens=_int(headers.get("x-ratelimit-limit-tokens")),
    )
