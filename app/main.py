"""create_app(): builds every part from the settings and hangs it on app.state. Nothing runs at import."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from prometheus_client import CollectorRegistry

from app import __version__
from app.api import openai, ops
from app.api import queue as queue_routes
from app.api.connections import ConnectionGuard
from app.api.errors import install_error_handlers
from app.api.middleware import RequestIdMiddleware, RequestIds
from app.api.shedding import QueueFullShedder
from app.backends import Backend, build_backend
from app.limits.breaker import CircuitBreaker
from app.limits.keys import KeyAccount, KeysFileError, load_keys_file
from app.limits.limiter import UpstreamLimiter
from app.metrics import Metrics
from app.queue.gate import DispatchGate
from app.queue.scheduler import Scheduler
from app.queue.service import CompletionService
from app.settings import Settings

log = logging.getLogger("app.queue")


def create_app(
    settings: Settings, backend: Backend[Any] | None = None, registry: CollectorRegistry | None = None
) -> FastAPI:
    """The gateway as an ASGI app; pass a backend or a registry to replace the configured ones (tests)."""
    metrics = Metrics(registry if registry is not None else CollectorRegistry())
    proxy = settings.backend == "proxy"
    # A proxy always learns the upstream's budgets from its headers; a local model only has the ones set here.
    limiter = (
        UpstreamLimiter(settings.rate_limit_rpm, settings.rate_limit_tpm)
        if proxy or settings.rate_limit_rpm or settings.rate_limit_tpm
        else None
    )
    breaker = (
        CircuitBreaker(settings.breaker_failure_threshold, settings.breaker_cooldown)
        if proxy and settings.breaker_failure_threshold
        else None
    )
    backend = backend if backend is not None else build_backend(settings, metrics, limiter, breaker)
    scheduler = Scheduler(
        max_concurrent=settings.max_concurrent_requests,
        max_queue_size=settings.max_queue_size,
        request_timeout=settings.request_timeout,
        full_behavior=settings.queue_full_behavior,
        history_size=settings.request_history_size,
        metrics=metrics,
        aging_seconds=settings.queue_aging_seconds,
        dispatch_margin=settings.dispatch_margin,
        gate=DispatchGate(limiter, breaker, metrics) if limiter is not None or breaker is not None else None,
    )
    if breaker is not None:
        breaker.on_change = scheduler.breaker_changed
    metrics.watch_queue(scheduler.queue_sizes, lambda: scheduler.in_flight)
    metrics.watch_limits(
        limiter.remaining if limiter is not None else dict, (lambda: breaker.gauge) if breaker is not None else None
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await backend.start()
        log.info(
            "ready: backend=%s max_concurrent=%d max_queue_size=%d request_timeout=%gs",
            settings.backend,
            settings.max_concurrent_requests,
            settings.max_queue_size,
            settings.request_timeout,
        )
        try:
            yield
        finally:
            scheduler.close()
            await backend.aclose()

    app = FastAPI(
        title="llm-queue-gateway",
        # /v1/queue/status/ answers 404 rather than a redirect built from the client's own Host header.
        redirect_slashes=False,
        version=__version__,
        summary="OpenAI-compatible gateway with a bounded priority queue",
        lifespan=lifespan,
        # The gateway exports its own Prometheus metrics; FastAPI's native OpenTelemetry hooks would
        # otherwise ask the global OTel providers on every request whether anyone listens (~2% measured).
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.backend = backend
    app.state.scheduler = scheduler
    app.state.breaker = breaker
    app.state.connections = ConnectionGuard(
        max_connections=settings.max_connections,
        max_header_bytes=settings.max_header_bytes,
        max_body_bytes=settings.max_body_bytes,
        header_timeout=settings.header_timeout,
        body_timeout=settings.body_timeout,
        metrics=metrics,
    )
    metrics.watch_connections(lambda: len(app.state.connections.connections))
    ids = RequestIds()
    app.state.service = CompletionService(
        scheduler,
        backend,
        counts_tokens=limiter is not None and limiter.counts_tokens,
        default_max_tokens=settings.rate_limit_default_max_tokens,
    )
    app.state.api_keys = _key_accounts(settings)
    app.state.connections.shedder = QueueFullShedder(
        scheduler,
        app.state.api_keys,
        ids,
        frozenset(openai.COMPLETION_ROUTES),
        settings.default_priority,
    )
    install_error_handlers(app)
    app.include_router(openai.router)
    app.include_router(queue_routes.router)
    app.include_router(ops.router)
    app.add_middleware(openai.CompletionRoutes)  # the completion routes, ahead of FastAPI's stack
    app.add_middleware(RequestIdMiddleware, ids=ids)  # added last: outermost, so every response carries its id

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            schema["paths"] = {**openai.completion_openapi(), **schema.get("paths", {})}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _key_accounts(settings: Settings) -> tuple[tuple[bytes, KeyAccount], ...]:
    """Every accepted key with its account: API_KEYS as 'key-N' without limits, then API_KEYS_FILE's."""
    accounts = [(key.encode(), KeyAccount.unlimited(f"key-{n}")) for n, key in enumerate(settings.api_keys, 1)]
    if settings.api_keys_file:
        accounts += [(entry.key.encode(), KeyAccount.build(entry)) for entry in load_keys_file(settings.api_keys_file)]
    seen: set[bytes] = set()
    for secret, account in accounts:
        if secret in seen:
            raise KeysFileError(f"the key of {account.name!r} is also in API_KEYS or listed twice")
        seen.add(secret)
    return tuple(accounts)
