"""Pure ASGI middleware (never BaseHTTPMiddleware, which costs a task and a copy per request)."""

from __future__ import annotations

import itertools
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_response
from app.errors import InvalidRequest

_VALID_ID = re.compile(rb"[A-Za-z0-9._-]{1,128}")


class RequestIdMiddleware:
    """Gives every request an id (the client's X-Request-ID if well formed) and echoes it on the response.

    The id is put at scope["state"]["request_id"], where Request.state.request_id finds it.
    """

    def __init__(self, app: ASGIApp):
        self.app = app
        # Ids are a random UUID prefix for this process and a counter in the last 12 hex digits: unique and
        # UUID-shaped, without a system call for randomness on every request.
        self._prefix = str(uuid.uuid4())[:24]
        self._counter = itertools.count(1)

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
            raw_id = f"{self._prefix}{next(self._counter):012x}".encode()
        elif _VALID_ID.fullmatch(given):
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
        scope.setdefault("state", {})["request_id"] = raw_id.decode()
        header = (b"x-request-id", raw_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        await self.app(scope, receive, send_with_id)
