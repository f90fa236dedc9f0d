"""The OpenAI routes: completions through the queue, and the backend's model list."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.deps import BackendDep, Owner, authenticate, read_body, request_id
from app.api.errors import error_response
from app.api.streaming import DisconnectWatcher, QueuedStreamResponse
from app.errors import ClientDisconnected, GatewayError
from app.queue.job import Job
from app.queue.service import CompletionService
from app.schemas import CompletionKind, parse_completion_request, parse_priority
from app.settings import Settings

router = APIRouter(prefix="/v1", tags=["openai"])


async def _serve(request: Request, kind: CompletionKind) -> Response:
    # The completion routes take no FastAPI dependencies: resolving them cost more per request than the
    # whole queue (measured on the proxy path), so they read app.state directly.
    state = request.app.state
    service: CompletionService = state.service
    settings: Settings = state.settings
    tenant = await authenticate(request)
    if tenant is not None:
        request.state.key = tenant.name  # for the access log line
    completion = parse_completion_request(await read_body(request, settings.max_body_bytes), kind)
    header = request.headers.get("x-priority")
    if header is not None:
        asked = parse_priority(header, "X-Priority")
    else:
        asked = completion.body_priority or settings.default_priority
    job, priority = await service.admit(completion, request_id(request), asked, tenant)
    request.state.job = job
    watcher = DisconnectWatcher(request.receive, lambda: service.abort(job, ClientDisconnected("client left")))
    if not completion.stream:
        try:
            result = await service.complete(job, completion)
        finally:
            watcher.stop()
        headers = {"x-priority": priority.value, "x-queue-wait-ms": _waited_ms(job)}
        return Response(result.body, result.status, headers, result.content_type)
    try:
        chunks = await service.open_stream(job, completion)
    except BaseException:
        watcher.stop()
        raise
    # Headers go out only now that the request is dispatched and the backend accepted it, so a full queue,
    # a timeout in the queue or an upstream refusal still reach the client as their real status codes.
    raw_headers = [(b"x-priority", priority.value.encode()), (b"x-queue-wait-ms", _waited_ms(job).encode())]
    return QueuedStreamResponse(service, job, completion, chunks, watcher, raw_headers)


def _waited_ms(job: Job) -> str:
    """How long the request waited in the queue, for the X-Queue-Wait-Ms response header."""
    return f"{((job.started or job.arrived) - job.arrived) * 1000:.1f}"


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    """OpenAI chat completions, queued by priority."""
    return await _serve(request, "chat")


@router.post("/completions")
async def completions(request: Request) -> Response:
    """OpenAI text completions, queued by priority."""
    return await _serve(request, "completion")


@router.get("/models")
async def models(_: Owner, backend: BackendDep) -> Response:
    """The backend's models."""
    result = await backend.models()
    return Response(result.body, result.status, media_type=result.content_type)


_KINDS: dict[str, CompletionKind] = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}


class CompletionFastPath:
    """POST /v1/chat/completions and /v1/completions served straight from ASGI, ahead of FastAPI's router.

    Routing, the exception middleware and FastAPI's endpoint machinery cost more per request than the whole
    queue on the proxy path (measured); these two routes need none of it. Every other route and method goes
    on to FastAPI, and the routes above stay registered there for the OpenAPI schema. Unexpected exceptions
    still reach the app's outermost error handler.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = _KINDS.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if kind is None:
            await self.app(scope, receive, send)
            return
        try:
            response = await _serve(Request(scope, receive), kind)
        except GatewayError as exc:
            response = error_response(exc)
        except ClientDisconnect:
            response = error_response(ClientDisconnected("the client went away while sending its request"))
        await response(scope, receive, send)
