"""Refusing completions for a full queue at the connection, before any ASGI work: cheap under a flood.

While the queue is full (and QUEUE_FULL_BEHAVIOR=reject), every new completion is refused 503 `queue_full`
whatever it holds. Taking it through the whole ASGI stack first (a task, the middlewares, a Request, the body
parsed, the backend's prepare, two socket writes) cost about 300 µs a request here: at 100x overload that was
the whole event loop, and the requests being served waited behind the refusals (served throughput fell to a
quarter of capacity). `QueueFullShedder` lets the connection protocol answer such a request itself, from its
headers, in one write. It refuses exactly what the queue would: the same error and Retry-After, counted the
same way, with the same access line; a request it cannot judge from its headers (a wrong key, a key with an
RPM or TPM budget of its own, a malformed X-Request-ID or X-Priority, `Expect: 100-continue`) goes the normal
way and gets its own answer.

A kept-alive connection refused this way is then not read again until the Retry-After it was given has passed:
a client that comes back at once (wrk, a retry loop that ignores the header) waits as it was told, with its
next request in the socket, instead of costing a refusal every millisecond. One that honours Retry-After (the
openai SDK does) never notices.
"""

from __future__ import annotations

import time

import httptools
import orjson

from app.api.deps import key_account
from app.api.errors import raw_error_response
from app.api.middleware import RequestIds, access_logger, write_access_line
from app.errors import GatewayError
from app.limits.keys import KeyAccount
from app.queue.scheduler import Scheduler
from app.schemas import SERVICE_TIERS
from app.types import INTERACTIVE, Priority

_PRIORITIES = {p.value: p for p in INTERACTIVE}


class Shed:
    """A completion being refused: what its answer needs once its body is in."""

    __slots__ = ("body", "keep_alive", "key", "path", "priority", "request_id", "started")

    def __init__(
        self, path: str, request_id: bytes, key: KeyAccount | None, priority: Priority | None, keep_alive: bool
    ):
        self.path = path
        self.request_id = request_id
        self.key = key
        self.priority = priority  # from X-Priority; None: the body's `priority`, else the default
        self.keep_alive = keep_alive
        self.body = bytearray()
        self.started = time.monotonic()


class QueueFullShedder:
    """Judges a completion from its headers while the queue is full, and answers it as the queue would."""

    def __init__(
        self,
        scheduler: Scheduler,
        keys: tuple[tuple[bytes, KeyAccount], ...],
        ids: RequestIds,
        paths: frozenset[str],
        default_priority: Priority,
    ):
        self._scheduler = scheduler
        self._keys = keys
        self._ids = ids
        self._paths = frozenset(path.encode() for path in paths)
        self._default = default_priority

    def active(self) -> bool:
        """Whether the queue refuses new requests now (asked first, for every request)."""
        return self._scheduler.sheds()

    def begin(self, method: bytes, url: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> Shed | None:
        """A Shed if this request, met while `active()`, is to be refused; None to serve it the normal way."""
        if method != b"POST":
            return None
        path = httptools.parse_url(url).path
        if path not in self._paths:
            return None
        authorization = given_id = asked = None
        for name, value in headers:
            if name == b"authorization":
                authorization = value
            elif name == b"x-request-id":
                given_id = value
            elif name == b"x-priority":
                asked = value
            elif name == b"expect":
                return None  # the client waits for a 100 before its body: the normal path handles that
        if given_id is not None and not self._ids.valid(given_id):
            return None
        priority = None
        if asked is not None:
            priority = _PRIORITIES.get(asked.decode("latin-1").strip().lower())
            if priority is None:
                return None
        key = None
        if self._keys:
            try:
                key = key_account(self._keys, (authorization or b"").decode("latin-1"))
            except GatewayError:
                return None
            if key.requests is not None or key.tokens is not None:
                return None  # its own budget speaks first (a 429 of its own), and only the normal path knows it
        return Shed(path.decode(), given_id or self._ids.new(), key, priority, keep_alive)

    def answer(self, shed: Shed) -> tuple[bytes, float]:
        """Count the refusal; its response, and its Retry-After in seconds (the body is in `shed.body`)."""
        priority = shed.priority or _body_priority(shed.body) or self._default
        if shed.key is not None:
            priority = shed.key.allowed_priority(priority)
        error = self._scheduler.admission.full_refusal(priority)
        log = access_logger(shed.path)
        if log is not None:
            write_access_line(
                log,
                {
                    "request_id": shed.request_id.decode(),
                    "method": "POST",
                    "path": shed.path,
                    "key": None if shed.key is None else shed.key.name,
                    "priority": None,
                    "outcome": "rejected",
                    "status": error.status_code,
                    "queue_wait_ms": None,
                    "duration_ms": round((time.monotonic() - shed.started) * 1000, 1),
                },
            )
        raw = raw_error_response(error, ((b"x-request-id", shed.request_id),), close=not shed.keep_alive)
        return raw, error.retry_after


def _body_priority(body: bytearray) -> Priority | None:
    """The body's `priority`, else its `service_tier`'s, if it is a JSON object naming a valid one (a malformed
    body is refused anyway)."""
    if b'"priority"' not in body and b'"service_tier"' not in body:
        return None
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(payload, dict):
        return None
    value, tier = payload.get("priority"), payload.get("service_tier")
    if isinstance(value, str) and value.strip().lower() in _PRIORITIES:
        return _PRIORITIES[value.strip().lower()]
    return SERVICE_TIERS.get(tier) if isinstance(tier, str) else None
