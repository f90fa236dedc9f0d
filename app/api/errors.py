"""The one place GatewayErrors become HTTP: a JSON response, or an SSE error event once a stream has begun."""

from __future__ import annotations

import logging
from http import HTTPStatus

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from app.errors import (
    ClientDisconnected,
    GatewayError,
    HTTPStatusError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    UpstreamHTTPError,
)

log = logging.getLogger("app.api")

SSE_DONE = b"data: [DONE]\n\n"


def error_response(exc: GatewayError) -> Response:
    """The error as an HTTP response; an upstream 4xx goes back exactly as the upstream said it."""
    if isinstance(exc, UpstreamHTTPError):
        return Response(exc.raw_body, exc.status_code, headers=exc.headers, media_type=exc.content_type)
    return Response(orjson.dumps(exc.body()), exc.status_code, headers=exc.headers, media_type="application/json")


def raw_error_response(
    exc: GatewayError, extra_headers: tuple[tuple[bytes, bytes], ...] = (), *, close: bool = True
) -> bytes:
    """The error as the bytes of a whole HTTP/1.1 response, for answers written straight to a connection."""
    body = orjson.dumps(exc.body())
    head = [b"HTTP/1.1 %d %s\r\n" % (exc.status_code, HTTPStatus(exc.status_code).phrase.encode())]
    head += [f"{name}: {value}\r\n".encode("latin-1") for name, value in exc.headers.items()]
    head += [name + b": " + value + b"\r\n" for name, value in extra_headers]
    head.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body))
    head.append(b"connection: close\r\n\r\n" if close else b"\r\n")
    return b"".join(head) + body


def sse_error_event(exc: GatewayError) -> bytes:
    """The error as the last events of a stream that has already sent its headers."""
    if isinstance(exc, UpstreamHTTPError):
        body = GatewayError(f"the upstream answered {exc.status_code}").body()
    else:
        body = exc.body()
    return b"data: " + orjson.dumps(body) + b"\n\n" + SSE_DONE


def _validation_message(exc: RequestValidationError) -> InvalidRequest:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    return InvalidRequest(f"{param or 'request'}: {first.get('msg', 'invalid request')}", param=param)


def as_gateway_error(exc: Exception, method: str, path: str) -> GatewayError:
    """The one mapping from whatever was raised while serving a request to the error its client is told."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, ClientDisconnect):
        # The client hung up while sending its body: nobody will read this answer, and it is no fault of ours.
        return ClientDisconnected("the client went away while sending its request")
    if isinstance(exc, RequestValidationError):
        return _validation_message(exc)
    if isinstance(exc, StarletteHTTPException):
        if exc.status_code == 404:
            return NotFound(f"no route {method} {path}")
        if exc.status_code == 405:
            return MethodNotAllowed(f"{method} is not allowed on {path}", headers=dict(exc.headers or {}))
        return HTTPStatusError(str(exc.detail), status=exc.status_code)
    log.error("unhandled error", exc_info=exc)
    return GatewayError("internal error; the gateway's log has the details")


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app can meet answers in the OpenAI error shape; tracebacks go to the log only."""

    async def handler(request: Request, exc: Exception) -> Response:
        # Starlette's ServerErrorMiddleware raises the error again once this has answered it, for the server to
        # log; it has been logged here, so RequestIdMiddleware, in front of it, lets this one go (and drops it).
        request.state.answered_error = exc
        return error_response(as_gateway_error(exc, request.method, request.url.path))

    for family in (GatewayError, RequestValidationError, StarletteHTTPException, ClientDisconnect, Exception):
        app.add_exception_handler(family, handler)
