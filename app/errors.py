"""The gateway's one error family: each error knows its HTTP status and its OpenAI error body.

Core code raises these; the API layer renders them in one place (as JSON, or as an SSE error event once a
stream has begun). Nothing here imports a web framework.
"""

from __future__ import annotations

import math
from typing import Any


class GatewayError(Exception):
    """Base of every error a client may be answered with."""

    status_code = 500
    error_type = "internal_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers: dict[str, str] = headers or {}

    def body(self) -> dict[str, Any]:
        """The OpenAI error shape."""
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


class InvalidRequest(GatewayError):
    """Malformed body, a field of the wrong type or range, an unknown priority or request id format."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message, param=param)
        if code is not None:
            self.code = code


class Unauthorized(GatewayError):
    """Missing or wrong API key."""

    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"

    def __init__(self, message: str):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class NotFound(GatewayError):
    """Unknown route or request id."""

    status_code = 404
    error_type = "not_found_error"
    code = "not_found"


class ModelNotFound(GatewayError):
    """No backend of the fleet serves the model asked for (OpenAI's own answer to an unknown model)."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str):
        # Only the name asked for: the models other keys use are not this caller's business (/v1/models lists them).
        super().__init__(f"The model {model!r} does not exist or you do not have access to it.", param="model")


class Conflict(GatewayError):
    """The request id is already live, or the request has already finished."""

    status_code = 409
    error_type = "conflict_error"
    code = "conflict"

    def __init__(self, message: str, *, code: str = "conflict", param: str | None = None):
        super().__init__(message, param=param)
        self.code = code


class BodyTooLarge(GatewayError):
    """The request body is over MAX_BODY_BYTES."""

    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class HeadersTooLarge(GatewayError):
    """The request's headers are over MAX_HEADER_BYTES."""

    status_code = 431
    error_type = "invalid_request_error"
    code = "request_headers_too_large"

    def __init__(self, limit: int):
        super().__init__(f"the request's headers are over {limit} bytes (MAX_HEADER_BYTES)")


class ClientTooSlow(GatewayError):
    """The client sent its headers or body slower than HEADER_TIMEOUT or BODY_TIMEOUT allow."""

    status_code = 408
    error_type = "timeout_error"
    code = "client_timeout"


class MethodNotAllowed(GatewayError):
    """The route exists but not for this method; `Allow` says which methods it takes."""

    status_code = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message, headers=headers)


class HTTPStatusError(GatewayError):
    """Any other HTTP error the web framework raises (a status of its own, no code of ours)."""

    code = None

    def __init__(self, message: str, *, status: int):
        super().__init__(message)
        self.status_code = status
        self.error_type = "invalid_request_error" if status < 500 else "server_error"


def retry_after_headers(seconds: float) -> dict[str, str]:
    """Retry-After in whole seconds (at least 1) and retry-after-ms, both of which the openai SDK honours."""
    seconds = max(seconds, 0.001)
    return {"Retry-After": str(max(1, math.ceil(seconds))), "retry-after-ms": str(max(1, round(seconds * 1000)))}


class RetryLater(GatewayError):
    """A refusal that says when to come back: Retry-After and retry-after-ms, plus any headers of its own."""

    def __init__(self, message: str, *, retry_after: float, headers: dict[str, str] | None = None):
        super().__init__(message, headers={**retry_after_headers(retry_after), **(headers or {})})
        self.retry_after = retry_after


class QueueFull(RetryLater):
    """MAX_QUEUE_SIZE requests already wait."""

    status_code = 503
    error_type = "server_error"
    code = "queue_full"


class DeadlineUnreachable(RetryLater):
    """The estimated wait already exceeds the request's deadline: refused at once rather than timed out later."""

    status_code = 503
    error_type = "server_error"
    code = "deadline_unreachable"

    def __init__(self, expected: float, lifetime: float, *, retry_after: float):
        super().__init__(
            f"the queue's estimated wait ({expected:.1f}s) exceeds the request's deadline ({lifetime:.1f}s)",
            retry_after=retry_after,
            headers={"x-queue-eta-ms": str(round(expected * 1000))},
        )


class CoordinationUnavailable(RetryLater):
    """REDIS_URL is set and Redis cannot be reached (REDIS_FAILURE_MODE=closed): the replicas cannot share."""

    status_code = 503
    error_type = "server_error"
    code = "coordination_unavailable"

    def __init__(self, message: str = "the replicas' shared queue (Redis) cannot be reached", retry_after: float = 2.0):
        super().__init__(message, retry_after=retry_after)


class KeyRateLimited(RetryLater):
    """The key spent its own requests- or tokens-per-minute budget (API_KEYS_FILE)."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class KeyQueueLimit(RetryLater):
    """The key already has as many requests waiting as its policy allows."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "too_many_queued_requests"


class UpstreamUnavailable(RetryLater):
    """No backend is up to serve the request's model."""

    status_code = 503
    error_type = "server_error"
    code = "upstream_unavailable"


class BreakerOpen(UpstreamUnavailable):
    """The upstream (every member of the model's pool) failed too often in a row; requests fail fast until a
    probe gets through."""


class ShuttingDown(GatewayError):
    """The gateway is draining and takes no new work."""

    status_code = 503
    error_type = "server_error"
    code = "shutting_down"

    def __init__(self, message: str = "the gateway is shutting down; retry on another instance"):
        super().__init__(message, headers=retry_after_headers(5.0))


class TooManyConnections(RetryLater):
    """MAX_CONNECTIONS client connections are already open."""

    status_code = 503
    error_type = "server_error"
    code = "too_many_connections"

    def __init__(self, limit: int):
        super().__init__(f"the gateway already holds {limit} connections (MAX_CONNECTIONS)", retry_after=1.0)


class StorageUnavailable(GatewayError):
    """DATA_DIR's database could not take a write (a full or read-only disk): nothing was accepted."""

    status_code = 503
    error_type = "server_error"
    code = "storage_unavailable"


class BackendNotReady(GatewayError):
    """The backend does not answer yet."""

    status_code = 503
    error_type = "server_error"
    code = "backend_not_ready"


class RequestTimeout(GatewayError):
    """The request outlived REQUEST_TIMEOUT, counted from its arrival."""

    status_code = 408
    error_type = "timeout_error"
    code = "request_timeout"


class RequestCancelled(GatewayError):
    """The request was cancelled through DELETE /v1/queue/request/{id}.

    499 (client closed request) is outside the set the openai SDK retries (408, 409, 429, 5xx), so a
    cancelled request is not silently sent again.
    """

    status_code = 499
    error_type = "cancelled_error"
    code = "request_cancelled"


class ClientDisconnected(GatewayError):
    """The client hung up; nobody reads this error, it only records why the request ended."""

    status_code = 499
    error_type = "cancelled_error"
    code = "client_disconnected"


class UpstreamError(GatewayError):
    """The upstream is unreachable, broke the connection or answered 5xx."""

    status_code = 502
    error_type = "upstream_error"
    code = "upstream_error"

    def __init__(self, message: str, *, kind: str):
        super().__init__(message)
        self.kind = kind


class BadUpstreamResponse(UpstreamError):
    """The upstream answered 2xx with something the gateway cannot pass on: not JSON, or too large."""

    code = "bad_upstream_response"

    def __init__(self, message: str):
        super().__init__(message, kind="protocol")


class ModelError(GatewayError):
    """The in-process model failed while generating."""

    status_code = 500
    error_type = "server_error"
    code = "model_error"


class UpstreamHTTPError(GatewayError):
    """The upstream answered 4xx: passed through to the client with its own status and body."""

    error_type = "upstream_error"
    code = "upstream_client_error"

    def __init__(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None):
        super().__init__(f"upstream answered {status}", headers=headers)
        self.status_code = status
        self.raw_body = body
        self.content_type = content_type
