"""The OpenAI routes: completions through the queue, and the backend's model list.

COMPLETION_ROUTES is the one table of completion paths: the router mounts them from it, the access log
names its loggers from it, and the OpenAPI description lists them from it.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from app.api.deps import BackendDep, KeyName, authenticate, read_body, request_id
from app.api.disconnect import DisconnectWatcher
from app.api.errors import sse_error_event
from app.backends.base import BackendResponse
from app.errors import ClientDisconnected, GatewayError
from app.limits.keys import KeyAccount
from app.queue.job import Job
from app.queue.service import CompletionService
from app.schemas import CompletionRequest, parse_completion_request, parse_priority
from app.settings import Settings
from app.types import CompletionKind, Priority

COMPLETION_ROUTES: dict[str, CompletionKind] = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
_SUMMARIES = {"chat": "OpenAI chat completions, queued by priority", "completion": "OpenAI text completions, queued"}

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx and friends: do not buffer a live stream
]

router = APIRouter(prefix="/v1", tags=["openai"])


class CompletionEndpoint:
    """One completion route, as a raw ASGI endpoint inside the app's router and its exception handlers.

    FastAPI's endpoint machinery (request model, dependencies, response serialisation) cost more per request
    than the whole queue on the proxy path (measured), and these routes need none of it: they read the
    services from app.state and forward bytes. Errors raised before a response starts are rendered by the
    app's exception handlers; after a stream has started, they become its last SSE event.
    """

    __slots__ = ("kind",)

    def __init__(self, kind: CompletionKind):
        self.kind = kind

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        state = request.app.state
        service: CompletionService = state.service
        settings: Settings = state.settings
        key = await authenticate(request)
        if key is not None:
            request.state.key = key.name  # for the access log line
        body = await read_body(request, settings.max_body_bytes)
        completion = parse_completion_request(body, self.kind, settings.max_tokens_limit)
        priority = _priority(request, completion, settings.default_priority, key)
        admitted = await service.accept(completion, request_id(request), priority, key)
        job = admitted.job
        request.state.job = job
        watcher = DisconnectWatcher(receive, lambda: service.abort(job, ClientDisconnected("client left")))
        try:
            await _answer(service, admitted, priority, send)
        finally:
            watcher.stop()


async def _answer(service: CompletionService, admitted: Any, priority: Priority, send: Send) -> None:
    """Send the backend's answer: a whole response, or a stream relayed chunk by chunk."""
    job: Job = admitted.job
    started = False
    whole: BackendResponse | None = None
    try:
        async with service.run(admitted) as answer:
            # Dispatched, and the backend accepted it: only now do headers go out, so a full queue, a timeout
            # in the queue or an upstream refusal reach the client as their real status codes.
            headers = {"x-priority": priority.value, "x-queue-wait-ms": _waited_ms(job)}
            if isinstance(answer, BackendResponse):
                whole = answer
            else:
                raw = [*SSE_HEADERS, *((name.encode(), value.encode()) for name, value in headers.items())]
                await send({"type": "http.response.start", "status": 200, "headers": raw})
                started = True
                async for chunk in answer:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except GatewayError as exc:
        if not started:
            raise  # the app's exception handler answers with the error's status
        await send({"type": "http.response.body", "body": sse_error_event(exc), "more_body": True})
    except OSError:
        if started:
            return  # the client is gone mid-stream; the request is retired as cancelled
        raise
    if whole is None:
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    raw = [
        (b"content-type", whole.content_type.encode()),
        (b"content-length", str(len(whole.body)).encode()),
        *((name.encode(), value.encode()) for name, value in headers.items()),
    ]
    await send({"type": "http.response.start", "status": whole.status, "headers": raw})
    await send({"type": "http.response.body", "body": whole.body})


def _priority(request: Request, completion: CompletionRequest, default: Priority, key: KeyAccount | None) -> Priority:
    """X-Priority, else the body's `priority`, else DEFAULT_PRIORITY; lowered to what the key allows."""
    header = request.headers.get("x-priority")
    asked = parse_priority(header, "X-Priority") if header is not None else completion.body_priority or default
    return asked if key is None else key.allowed_priority(asked)


def _waited_ms(job: Job) -> str:
    """How long the request waited in the queue, for the X-Queue-Wait-Ms response header."""
    return f"{((job.started or job.arrived) - job.arrived) * 1000:.1f}"


def completion_routes() -> list[Route]:
    """The completion routes, for the front of the app's router (they are matched first)."""
    return [Route(path, CompletionEndpoint(kind), methods=["POST"]) for path, kind in COMPLETION_ROUTES.items()]


def completion_openapi() -> dict[str, Any]:
    """The OpenAPI path items of the completion routes (raw ASGI routes are not described by FastAPI)."""
    return {
        path: {
            "post": {
                "tags": ["openai"],
                "summary": _SUMMARIES[kind],
                "operationId": f"{kind}_completions",
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
async def models(_: KeyName, backend: BackendDep) -> Response:
    """The backend's models."""
    result = await backend.models()
    return Response(result.body, result.status, media_type=result.content_type)
