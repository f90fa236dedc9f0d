"""Pure ASGI middleware (never BaseHTTPMiddleware, which costs a task and a copy per request)."""

from __future__ import annotations

import itertools
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import as_gateway_error, error_response
from app.errors import InvalidRequest
from app.schemas import COMPLETION_ROUTES

_VALID_ID = re.compile(rb"[A-Za-z0-9._-]{1,128}")
_ACCESS = {path: logging.getLogger(f"app.access.{kind}") for path, kind in COMPLETION_ROUTES.items()}
_OTHER_ACCESS = logging.getLogger("app.access")


class RequestIds:
    """Request ids: a random UUID prefix for this process and a counter in the last 12 hex digits.

    Unique and UUID-shaped, without a system call for randomness on every request.
    """

    __slots__ = ("_counter", "_prefix")

    def __init__(self) -> None:
        self._prefix = str(uuid.uuid4())[:24]
        self._counter = itertools.count(1)

    def new(self) -> bytes:
        return f"{self._prefix}{next(self._counter):012x}".encode()

    @staticmethod
    def valid(given: bytes) -> bool:
        """Whether a client's X-Request-ID may be used as it is."""
        return _VALID_ID.fullmatch(given) is not None


class RequestIdMiddleware:
    """Gives every request an id (the client's X-Request-ID if well formed) and echoes it on the response.

    The id is put at scope["state"]["request_id"], where Request.state.request_id finds it.
    """

    def __init__(self, app: ASGIApp, ids: RequestIds):
        self.app = app
        self._ids = ids

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                given = value
                break
        if given is None:
            raw_id = self._ids.new()
        elif self._ids.valid(given):
            raw_id = given
        else:
            response = error_response(
                InvalidRequest(
                    "X-Request-ID must be 1 to 128 letters, digits, '-', '_' or '.'",
                    param="X-Request-ID",
                    code="invalid_request_id",
                )
            )
            await response(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["request_id"] = raw_id.decode()
        header = (b"x-request-id", raw_id)
        path: str = scope["path"]
        access = access_logger(path)
        started = time.monotonic()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if state.pop("answered_error", None) is exc:
                return  # answered, and logged, by the app's error handler
            if status:
                raise  # the response has begun: nothing more can be said to this client
            # A bug of ours: answered here, inside the id's reach, in the OpenAI shape; the traceback is logged.
            error = as_gateway_error(exc, scope["method"], path)
            await error_response(error)(scope, receive, send_with_id)
        finally:
            if access is not None:
                _log_access(access, scope, state, status, time.monotonic() - started)


def _log_access(log: logging.Logger, scope: Scope, state: dict[str, Any], status: int, duration: float) -> None:
    """One line per API request: who, at what priority, how it ended, how long it waited and took."""
    job = state.get("job")
    if job is not None:
        outcome = job.state.value
        priority = job.priority.value
        wait = None if job.started is None else job.started - job.arrived
    else:
        outcome = "rejected" if status in (429, 503) else "error" if status >= 400 or not status else "ok"
        priority = None
        wait = None
    write_access_line(
        log,
        {
            "request_id": state["request_id"],
            "method": scope["method"],
            "path": scope["path"],
            "key": state.get("key"),
            "priority": priority,
            "outcome": outcome,
            "status": status or 499,  # no response started: the client left first
            "queue_wait_ms": None if wait is None else round(wait * 1000, 1),
            "duration_ms": round(duration * 1000, 1),
        },
    )


def access_logger(path: str) -> logging.Logger | None:
    """The logger of a path's access lines, None if it writes none (or they are silenced)."""
    access = _ACCESS.get(path) or (_OTHER_ACCESS if path.startswith("/v1/") else None)
    return access if access is not None and access.isEnabledFor(logging.INFO) else None


def write_access_line(log: logging.Logger, fields: dict[str, Any]) -> None:
    """The access line of one request, in text and in the JSON log's fields."""
    priority = fields["priority"]
    log.info(
        "%s %s %s id=%s key=%s priority=%s outcome=%s wait_ms=%s duration_ms=%s",
        fields["method"],
        fields["path"],
        fields["status"],
        fields["request_id"],
        fields["key"] or "-",
        priority or "-",
        fields["outcome"],
        "-" if fields["queue_wait_ms"] is None else fields["queue_wait_ms"],
        fields["duration_ms"],
        extra=fields,
    )
