"""The OpenAI routes: completions through the queue, and the backend's model list.

CompletionRoutes answers the paths of COMPLETION_ROUTES (app.schemas), the one table of them; no other handler
exists for them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.deadline import DEADLINE_HEADERS, client_timeout
from app.api.deps import Caller, FleetDep, caller, read_body
from app.api.disconnect import DisconnectWatcher
from app.api.errors import as_gateway_error, error_response, sse_error_event
from app.api.queue_updates import QueueUpdates, wanted
from app.api.status import request_status
from app.backends.base import BackendResponse
from app.errors import ClientDisconnected, MethodNotAllowed
from app.limits.keys import KeyAccount
from app.queue.job import Job
from app.queue.service import Admitted, CompletionService
from app.schemas import (
    COMPLETION_ROUTES,
    SERVICE_TIERS,
    parse_completion_request,
    parse_priority,
)
from app.settings import Settings
from app.types import CompletionKind, JobState, Priority

_SUMMARIES = {
    "chat": "OpenAI chat completions, queued by priority",
    "completion": "OpenAI text completions, queued",
    "embedding": "OpenAI embeddings, queued",
}

SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"
SSE_HEADERS = [
    (b"content-type", SSE_CONTENT_TYPE.encode()),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx and friends: do not buffer a live stream
]

router = APIRouter(prefix="/v1", tags=["openai"])
# The request headers a completion route reads (a name missing here reads as absent).
_READ = frozenset(
    name.encode()
    for name in (
        "authorization",
        "content-length",
        "prefer",
        "x-priority",
        "x-queue-updates",
        "x-session-id",
        *DEADLINE_HEADERS,
    )
)


class CompletionRoutes:
    """The routes of COMPLETION_ROUTES, answered in front of FastAPI's own stack; every other request goes on.

    FastAPI's router, its middlewares (exceptions, body limit, exit stack) and its endpoint machinery cost
    more per request than the whole queue on the proxy path (measured: the gateway at 0.81x a bare FastAPI
    pass-through with these routes mounted in the router, against 1.0x here), and these routes need none of
    it: they read the services from app.state and forward bytes. What they raise before a response starts is
    answered through the app's one error mapping (as_gateway_error); after a stream has started, an error
    becomes the stream's last SSE event.
    """

    def __init__(self, app: ASGIApp):
        self.app = app
        self._endpoints = {path: CompletionEndpoint(kind) for path, kind in COMPLETION_ROUTES.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self._endpoints.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        try:
            if method != "POST":
                raise MethodNotAllowed(f"{method} is not allowed on {scope['path']}", headers={"Allow": "POST"})
            await endpoint(scope, receive, send)
        except Exception as exc:  # the endpoint raises only before its response has started
            await error_response(as_gateway_error(exc, method, scope["path"]))(scope, receive, send)


class CompletionEndpoint:
    """One completion route as a raw ASGI endpoint; it raises only before its response has started."""

    __slots__ = ("kind",)

    def __init__(self, kind: CompletionKind):
        self.kind = kind

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app_state = scope["app"].state
        service: CompletionService = app_state.service
        settings: Settings = app_state.settings
        state = scope["state"]  # the request's own (RequestIdMiddleware made it)
        # The headers it reads, read once into a dict (the first of a repeated name wins, as in Starlette's
        # Headers): each Headers.get scans them all, and raises and catches a KeyError for each one absent.
        headers = {
            name.decode(): value.decode("latin-1") for name, value in reversed(scope["headers"]) if name in _READ
        }
        key = caller(app_state.api_keys, headers.get("authorization"), state)
        body = await read_body(receive, settings.max_body_bytes, headers.get("content-length"))
        completion = parse_completion_request(
            body,
            self.kind,
            settings.max_tokens_limit,
            settings.forward_service_tier,
            lambda asked, tier: _priority(headers, asked, tier, settings.default_priority, key),
        )
        priority = completion.priority
        assert priority is not None  # priority_of decided it
        timeout = client_timeout(headers)
        rid: str = state["request_id"]
        prefer = headers.get("prefer")
        if prefer is not None and _respond_async(prefer):
            job = await app_state.persisted.background.submit(
                completion, rid, priority, key, headers.get("x-session-id"), timeout
            )
            state["job"] = job
            await _accepted(send, service, job, rid)
            return
        admitted = await service.accept(completion, rid, priority, key, headers.get("x-session-id"), timeout)
        job = admitted.job
        state["job"] = job
        watcher = DisconnectWatcher(receive, lambda: service.abort(job, ClientDisconnected("client left")))
        try:
            # HTTP/1.0 has no chunked encoding: its streams are sent whole, with a Content-Length, once done.
            whole_streams = scope.get("http_version") == "1.0"
            updates = None
            if (
                admitted.stream
                and not whole_streams
                and job.state is JobState.QUEUED
                and wanted(headers.get("x-queue-updates"))
            ):
                updates = QueueUpdates(
                    service.scheduler, send, [*SSE_HEADERS, (b"x-priority", priority.value.encode())]
                )
            await _answer(service, admitted, priority, send, whole_streams, updates)
        finally:
            watcher.stop()


async def _answer(
    service: CompletionService,
    admitted: Admitted,
    priority: Priority,
    send: Send,
    whole_streams: bool,
    updates: QueueUpdates | None = None,
) -> None:
    """Send the backend's answer: a whole response, or a stream relayed chunk by chunk (or whole, if asked).

    With `updates`, the stream's response has started while the request waited (X-Queue-Updates).
    """
    job = admitted.job
    started = False
    whole: BackendResponse | None = None
    collected: list[bytes] | None = [] if whole_streams else None
    try:
        async with service.run(admitted, updates) as answer:
            # Dispatched, and the backend accepted it: only now do headers go out, so a full queue, a timeout
            # in the queue or an upstream refusal reach the client as their real status codes.
            headers = [(b"x-priority", priority.value.encode()), (b"x-queue-wait-ms", _waited_ms(job))]
            if job.eta is not None:  # it waited: what the queue told itself at its arrival, to compare
                headers.append((b"x-queue-eta-ms", b"%.1f" % (job.eta * 1000)))
            if isinstance(answer, BackendResponse):
                whole = answer
            elif collected is not None:
                started = True  # the stream is accepted: what follows is its own, an error its last event
                async for chunk in answer:
                    collected.append(chunk)
            else:
                if updates is None:
                    await send({"type": "http.response.start", "status": 200, "headers": [*SSE_HEADERS, *headers]})
                started = True
                async for chunk in answer:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except OSError:
        if started or (updates is not None and updates.started):
            return  # the client is gone mid-stream; the request is retired as cancelled
        raise
    except Exception as exc:
        if not started and (updates is None or not updates.started):
            raise  # answered with the error's own status
        error = as_gateway_error(exc, "POST", "")
        if collected is None:
            await send({"type": "http.response.body", "body": sse_error_event(error), "more_body": True})
        else:
            collected.append(sse_error_event(error))
    if collected is not None and whole is None:
        whole = BackendResponse(200, b"".join(collected), SSE_CONTENT_TYPE)
    if whole is None:
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    raw = [
        (b"content-type", whole.content_type.encode()),
        (b"content-length", b"%d" % len(whole.body)),
        *headers,
    ]
    await send({"type": "http.response.start", "status": whole.status, "headers": raw})
    await send({"type": "http.response.body", "body": whole.body})


def _respond_async(prefer: str) -> bool:
    """Whether a Prefer header (RFC 7240) asks for respond-async."""
    return any(part.split(";", 1)[0].strip().lower() == "respond-async" for part in prefer.split(","))


async def _accepted(send: Send, service: CompletionService, job: Job, rid: str) -> None:
    """202 for a background request: its record, and where its result will be."""
    body = request_status(service.scheduler, job).model_dump_json().encode()
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"location", f"/v1/queue/request/{rid}".encode()),
        (b"preference-applied", b"respond-async"),
    ]
    await send({"type": "http.response.start", "status": 202, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _priority(
    headers: Mapping[str, str],
    body_priority: Priority | None,
    service_tier: str | None,
    default: Priority,
    key: KeyAccount | None,
) -> Priority:
    """X-Priority, else the body's `priority`, else its `service_tier`, else DEFAULT_PRIORITY; lowered to what the
    key allows."""
    header = headers.get("x-priority")
    if header is not None:
        asked = parse_priority(header, "X-Priority")
    else:
        tier = SERVICE_TIERS[service_tier] if service_tier is not None else None
        asked = body_priority or tier or default
    return asked if key is None else key.allowed_priority(asked)


def _waited_ms(job: Job) -> bytes:
    """How long the request waited in the queue, for the X-Queue-Wait-Ms response header."""
    return b"%.1f" % (((job.started or job.arrived) - job.arrived) * 1000)


def completion_openapi() -> dict[str, Any]:
    """The OpenAPI path items of the completion routes (raw ASGI routes are not described by FastAPI)."""
    return {
        path: {
            "post": {
                "tags": ["openai"],
                "summary": _SUMMARIES[kind],
                "operationId": path.removeprefix("/v1/").replace("/", "_"),
                "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
                "responses": {
                    "200": {
                        "description": "The completion, or its SSE stream when `stream` is true.",
                        "content": {"application/json": {}, "text/event-stream": {}},
                    }
                },
            }
        }
        for path, kind in COMPLETION_ROUTES.items()
    }


@router.get("/models")
async def models(_: Caller, fleet: FleetDep) -> Response:
    """The fleet's models (a fleet of one: its backend's own list)."""
    result = await fleet.models()
    return Response(result.body, result.status, media_type=result.content_type)
