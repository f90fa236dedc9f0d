"""What the gateway enforces on client connections itself: header size, header and body time, connection count.

uvicorn (httptools) bounds none of these: a 1 MiB header is parsed, an unterminated one is buffered without
end, a client sending a byte a second keeps its connection for as long as it likes, and idle connections pile
up until file descriptors run out. `GuardedHttpProtocol` is uvicorn's httptools protocol with those bounds;
`ConnectionGuard` holds the limits, the counts and the one timer that expires slow connections.

At MAX_CONNECTIONS, a new connection first takes the place of the oldest idle one (one that has sent nothing
yet, or waits between requests), as nginx reuses idle keep-alive connections: a flood of idle sockets then
costs nothing but churn. Past it with none idle, a connection is still read (briefly) so that /health, /ready
and /metrics keep answering while the request path is saturated; anything else on it is answered 503
`too_many_connections`. Past a small reserve beyond that, a connection is answered 503 and closed unread.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from typing import Any, ClassVar

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.api.errors import raw_error_response
from app.api.shedding import QueueFullShedder, Shed
from app.errors import ClientTooSlow, GatewayError, HeadersTooLarge, TooManyConnections
from app.metrics import Metrics

log = logging.getLogger("app.connections")

# Paths an over-the-limit connection may still ask for: probes and scrapes must see a saturated gateway.
_OPS_PATHS = frozenset((b"/health", b"/ready", b"/metrics"))
# How long a connection past MAX_CONNECTIONS gets to send its headers (it holds a descriptor of the reserve).
_OVERFLOW_HEADER_SECONDS = 1.0
# Past BODY_TIMEOUT, each byte of a body buys this much more time: a 200 MB upload at 64 KiB/s or better is never
# cut off, while a byte-a-second body is, at BODY_TIMEOUT and a few microseconds.
_BODY_BYTES_PER_SECOND = 64 * 1024
# A limit that bites is logged at most once per this many seconds, with the count since the last line.
_LOG_EVERY_SECONDS = 10.0


def reserve_for(max_connections: int) -> int:
    """Connections past the limit that are still read, for an ops path; beyond these, refused unread."""
    return max(16, max_connections // 32)


class _Phase(enum.Enum):
    HEADERS = "headers"  # reading a request's headers: HEADER_TIMEOUT and MAX_HEADER_BYTES apply
    BODY = "body"  # reading its body: BODY_TIMEOUT applies
    APP = "app"  # the request is read; the gateway answers (its own timeouts apply)
    IDLE = "idle"  # between requests on a kept-alive connection (uvicorn's keep-alive timeout applies)


class ConnectionGuard:
    """The limits on client connections, their counts, and the sweep that closes the slow ones.

    >>> guard = ConnectionGuard(
    ...     max_connections=2048, max_header_bytes=32768, max_body_bytes=4 << 20, header_timeout=10, body_timeout=30
    ... )
    >>> config = uvicorn.Config(app, http=guard.protocol())  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        max_connections: int,
        max_header_bytes: int,
        max_body_bytes: int,
        header_timeout: float,
        body_timeout: float,
        metrics: Metrics | None = None,
    ):
        self.max_connections = max_connections
        self.reserve = reserve_for(max_connections)
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.metrics = metrics
        # Refuses completions from their headers while the queue is full (create_app sets it).
        self.shedder: QueueFullShedder | None = None
        self.connections: set[GuardedHttpProtocol] = set()
        # Connections within the limit that wait for a request, oldest first (a dict keeps insertion order).
        self.idle: dict[GuardedHttpProtocol, None] = {}
        self.overflow = 0
        self._sweep_every = max(0.05, min(1.0, header_timeout / 4, body_timeout / 4))
        self._sweep: asyncio.TimerHandle | None = None
        self._unlogged: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}

    def limit_to(self, max_connections: int) -> None:
        """Lower the limit (to what the open-files limit allows)."""
        self.max_connections = max_connections
        self.reserve = reserve_for(max_connections)

    def protocol(self) -> type[GuardedHttpProtocol]:
        """The protocol class to give uvicorn.Config(http=...), bound to this guard."""
        return type("GatewayHttpProtocol", (GuardedHttpProtocol,), {"guard": self})

    @property
    def normal(self) -> int:
        """Open connections within MAX_CONNECTIONS."""
        return len(self.connections) - self.overflow

    def admit(self, connection: GuardedHttpProtocol) -> bool | None:
        """Count a new connection: True within the limit, False in the reserve past it, None refused."""
        if self.normal >= self.max_connections and self.idle:
            oldest = next(iter(self.idle))
            self.release(oldest)
            oldest.transport.close()
            self.bit("idle_evicted", f"MAX_CONNECTIONS={self.max_connections}: closed the oldest idle connection")
        if self.normal < self.max_connections:
            self.connections.add(connection)
            self._arm()
            return True
        if self.overflow < self.reserve:
            self.connections.add(connection)
            self.overflow += 1
            self._arm()
            return False
        return None

    def release(self, connection: GuardedHttpProtocol) -> None:
        self.idle.pop(connection, None)
        if connection in self.connections:
            self.connections.discard(connection)
            if connection.over_limit:
                self.overflow -= 1

    def bit(self, reason: str, detail: str) -> None:
        """A limit refused a connection or a request: count it, and log it at most every few seconds."""
        if self.metrics is not None:
            self.metrics.connection_closed(reason)
        self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._logged_at.get(reason, -math.inf) >= _LOG_EVERY_SECONDS:
            count = self._unlogged.pop(reason)
            self._logged_at[reason] = now
            log.warning("connection limit: %s (%d in the last %gs)", detail, count, _LOG_EVERY_SECONDS)

    def _arm(self) -> None:
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(self._sweep_every, self._expire)

    def _expire(self) -> None:
        """Close every connection whose headers or body took longer than allowed; rearm while any is open."""
        self._sweep = None
        now = time.monotonic()
        late = [c for c in self.connections if c.deadline < now]
        for connection in late:
            connection.expired()
        if self.connections:
            self._arm()


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the guard's limits on headers, bodies and connection count."""

    guard: ClassVar[ConnectionGuard]

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.phase = _Phase.HEADERS
        self.deadline = math.inf
        self.over_limit = False
        self._header_bytes = 0
        self._shed: Shed | None = None  # a completion being refused for a full queue, its body still coming

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        admitted = self.guard.admit(self)
        if admitted is None:
            limit = self.guard.max_connections
            self.guard.bit("too_many_connections", f"MAX_CONNECTIONS={limit} connections are open")
            self._refuse(TooManyConnections(limit))
            return
        self.over_limit = not admitted
        timeout = _OVERFLOW_HEADER_SECONDS if self.over_limit else self.guard.header_timeout
        self.deadline = time.monotonic() + timeout
        if admitted:
            self.guard.idle[self] = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.release(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.phase is _Phase.BODY:
            super().data_received(data)
            return
        if self._header_bytes == 0:
            self.guard.idle.pop(self, None)  # a request begins: no longer the place of a newcomer
        if self.phase is _Phase.IDLE:  # the next request on a kept-alive connection begins
            self.phase = _Phase.HEADERS
            self.deadline = time.monotonic() + self.guard.header_timeout
        # Counted before parsing: httptools buffers a header line whole before it calls back, however long.
        self._header_bytes += len(data)
        super().data_received(data)
        if self.phase is _Phase.HEADERS and self._header_bytes > self.guard.max_header_bytes:
            limit = self.guard.max_header_bytes
            self.guard.bit("headers_too_large", f"request headers over MAX_HEADER_BYTES={limit}")
            self._refuse(HeadersTooLarge(limit))

    def on_headers_complete(self) -> None:
        self.phase = _Phase.BODY
        self.deadline = time.monotonic() + self.guard.body_timeout
        refusal: GatewayError | None = None
        limit = self.guard.max_header_bytes
        # Headers that came whole in one read are measured here (counting only when the read itself was large).
        if self._header_bytes > limit and len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers) > limit:
            refusal = HeadersTooLarge(limit)
            self.guard.bit("headers_too_large", f"request headers over MAX_HEADER_BYTES={limit}")
        elif self.over_limit and httptools.parse_url(self.url).path not in _OPS_PATHS:
            refusal = TooManyConnections(self.guard.max_connections)
            self.guard.bit("too_many_connections", f"MAX_CONNECTIONS={self.guard.max_connections} connections are open")
        self._header_bytes = 0
        if refusal is not None:
            self.app = _refusal_app(refusal)
        elif self._begin_shed():
            return  # answered by on_message_complete, without an ASGI task
        super().on_headers_complete()
        if (self.over_limit or refusal is not None) and self.cycle is not None:
            self.cycle.keep_alive = False  # one answer, then the connection (and its descriptor) goes

    def on_body(self, body: bytes) -> None:
        shed = self._shed
        # A large body still arriving at a fair rate (an upload to /v1/files) gets time for its size; a trickle
        # does not: a byte a second earns nothing worth having.
        self.deadline += len(body) / _BODY_BYTES_PER_SECOND
        if shed is None:
            super().on_body(body)
        elif len(shed.body) + len(body) <= self.guard.max_body_bytes:
            shed.body += body  # only for its `priority`; a body past the limit is refused all the same

    def on_message_complete(self) -> None:
        self.phase = _Phase.APP
        self.deadline = math.inf
        shed = self._shed
        if shed is None:
            super().on_message_complete()
            return
        self._shed = None
        assert self.guard.shedder is not None
        raw, retry_after = self.guard.shedder.answer(shed)
        self.transport.write(raw)
        if not shed.keep_alive:
            self.transport.close()
            return
        self.on_response_complete()
        # Not read again before the Retry-After it was just given (see app/api/shedding.py); the keep-alive
        # timeout waits too, or it would close the connection on a request that is there, unread.
        self.transport.pause_reading()
        self._unset_keepalive_if_required()
        self.loop.call_later(retry_after, self._resume_reading)

    def _resume_reading(self) -> None:
        if self.transport.is_closing():
            return
        self.transport.resume_reading()
        if self.phase is _Phase.IDLE and self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def _begin_shed(self) -> bool:
        """Whether this request is refused for a full queue from its headers (only with no answer pending)."""
        shedder = self.guard.shedder
        if shedder is None or not shedder.active() or self.over_limit:
            return False  # the common case, a queue with room, costs one comparison
        if not (self.cycle is None or self.cycle.response_complete):
            return False  # an answer is still due on this connection: answers go out in order
        keep_alive = self.parser.get_http_version() == "1.1" and self.parser.should_keep_alive()
        self._shed = shedder.begin(self.parser.get_method(), self.url, self.headers, keep_alive)
        return self._shed is not None

    def on_response_complete(self) -> None:
        if self.phase is _Phase.APP:
            self.phase = _Phase.IDLE
            if not self.over_limit and self in self.guard.connections:
                self.guard.idle[self] = None
        super().on_response_complete()

    def expired(self) -> None:
        """The sweep found this connection past its deadline: answer 408 if nothing was answered yet, close."""
        self.deadline = math.inf
        if self.transport.is_closing():
            return
        if self.phase is _Phase.HEADERS:
            timeout = _OVERFLOW_HEADER_SECONDS if self.over_limit else self.guard.header_timeout
            self.guard.bit("header_timeout", f"request headers not received within HEADER_TIMEOUT={timeout:g}s")
            self._refuse(ClientTooSlow(f"the request's headers did not arrive within {timeout:g} seconds"))
        elif self.phase is _Phase.BODY:
            timeout = self.guard.body_timeout
            self.guard.bit("body_timeout", f"request body not received within BODY_TIMEOUT={timeout:g}s")
            cycle = self.cycle
            if self._shed is not None:
                self._shed = None
                self._refuse(ClientTooSlow(f"the request's body did not arrive within {timeout:g} seconds"))
            elif cycle is not None and not cycle.response_started:
                # The handler still waits for the body: it sees a disconnect, and the client gets the 408.
                cycle.disconnected = True
                cycle.message_event.set()
                self._refuse(ClientTooSlow(f"the request's body did not arrive within {timeout:g} seconds"))
            else:
                self.transport.close()

    def _refuse(self, error: GatewayError) -> None:
        """Answer `error` straight on the socket and close: no request is running on this connection."""
        self.phase = _Phase.APP
        self.deadline = math.inf
        if not self.transport.is_closing():
            self.transport.write(raw_error_response(error))
            self.transport.close()


def _refusal_app(error: GatewayError) -> Any:
    """An ASGI app that answers every request with `error` (read from a connection past MAX_CONNECTIONS)."""
    body = orjson.dumps(error.body())
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"connection", b"close"),
    ]
    headers += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in error.headers.items()]

    async def refuse(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return refuse
