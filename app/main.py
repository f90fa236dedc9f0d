"""create_app(): builds every part from the settings and hangs it on app.state. Nothing runs at import."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from app import __version__
from app.api import openai, ops
from app.api import queue as queue_routes
from app.api.errors import install_error_handlers
from app.api.middleware import RequestIdMiddleware
from app.backends import Backend, build_backend
from app.metrics import Metrics
from app.queue.scheduler import Scheduler
from app.queue.service import CompletionService
from app.settings import Settings

log = logging.getLogger("app")


def create_app(
    settings: Settings, backend: Backend | None = None, registry: CollectorRegistry | None = None
) -> FastAPI:
    """The gateway as an ASGI app; pass a backend or a registry to replace the configured ones (tests)."""
    metrics = Metrics(registry if registry is not None else CollectorRegistry())
    backend = backend if backend is not None else build_backend(settings, metrics)
    scheduler = Scheduler(
        max_concurrent=settings.max_concurrent_requests,
        max_queue_size=settings.max_queue_size,
        request_timeout=settings.request_timeout,
        full_behavior=settings.queue_full_behavior,
        history_size=settings.request_history_size,
        metrics=metrics,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await backend.start()
        log.info(
            "[RequestQueue] ready: backend=%s max_concurrent=%d max_queue_size=%d request_timeout=%gs",
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
        version=__version__,
        summary="OpenAI-compatible gateway with a bounded priority queue",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.backend = backend
    app.state.scheduler = scheduler
    app.state.service = CompletionService(scheduler, backend)
    app.state.api_keys = tuple(key.encode() for key in settings.api_keys)
    install_error_handlers(app)
    app.include_router(openai.router)
    app.include_router(queue_routes.router)
    app.include_router(ops.router)
    app.add_middleware(RequestIdMiddleware)
    return app
