"""A client's own deadline, from its headers: the earliest of X-Request-Timeout-Ms (relative), X-Request-Deadline
(absolute, Unix seconds) and Envoy's x-envoy-expected-rq-timeout-ms. REQUEST_TIMEOUT still bounds it."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

from app.errors import InvalidRequest, RequestTimeout

_RELATIVE_MS = ("x-request-timeout-ms", "x-envoy-expected-rq-timeout-ms")
_ABSOLUTE = "x-request-deadline"
DEADLINE_HEADERS = (*_RELATIVE_MS, _ABSOLUTE)  # the names client_timeout reads


def client_timeout(headers: Mapping[str, str]) -> float | None:
    """Seconds the client gives the request, None if it names no deadline; 400 for an unreadable one, 408 for
    one that had passed on arrival."""
    found: list[float] = []
    for name in _RELATIVE_MS:
        value = headers.get(name)
        if value is not None:
            found.append(_number(value, name) / 1000)
    value = headers.get(_ABSOLUTE)
    if value is not None:
        found.append(_number(value, _ABSOLUTE) - time.time())
    if not found:
        return None
    timeout = min(found)
    if timeout <= 0:
        raise RequestTimeout("the request's deadline had passed when it arrived")
    return timeout


def _number(value: str, name: str) -> float:
    try:
        number = float(value.strip())
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise InvalidRequest(f"{name} must be a non-negative number, not {value!r}", param=name)
    return number
