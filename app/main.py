"""create_app(): builds every part from the settings and hangs it on app.state. Nothing runs at import."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp

from app import __version__
from app.api import batches as batch_routes
from app.api import events, openai, ops
from app.api import queue as queue_routes
from app.api.connections import ConnectionGuard
from app.api.errors import install_error_handlers
from app.api.middleware import RequestIdMiddleware, RequestIds
from app.api.shedding import QueueFullShedder
from app.api.status import request_status
from app.backends import Backend
from app.batches import Persisted
from app.fleet.config import fleet_of_one, load_backends_file
from app.fleet.fleet import Fleet
from app.limits.keys import KeyAccount, KeysFileError, load_keys_file
from app.metrics import Metrics
from app.queue.pool import Routing
from app.queue.scheduler import Scheduler
from app.queue.service import CompletionService
from app.queue.timeline import SAMPLE_SECONDS
from app.replicas.coordinator import Coordinator
from app.schemas import COMPLETION_ROUTES
from app.settings import Settings

log = logging.getLogger("app.queue")


class GatewayApp(FastAPI):
    """FastAPI with `front`, middleware in front of FastAPI's whole stack.

    FastAPI puts its own middleware (server errors, telemetry, a body limit) outside every one added with
    add_middleware, and each wraps receive and send for every request: with the completion routes behind
    them, the proxy path served 0.80x the requests per second of a bare FastAPI pass-through at 32
    connections (bench.proxy_bench). The completion routes need none of it: they read their services from
    app.state, limit the body themselves and answer errors through the app's one mapping.
    """

    front: Callable[[ASGIApp], ASGIApp] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        return stack if self.front is None else self.front(stack)


def create_app(
    settings: Settings,
    backend: Backend[Any] | None = None,
    registry: CollectorRegistry | None = None,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The gateway as an ASGI app; pass a backend or a registry to replace the configured ones, or the wall
    clock that batch windows and stored results are timed by (tests).

    Raises BackendsFileError or KeysFileError for a bad BACKENDS_FILE or API_KEYS_FILE.
    """
    metrics = Metrics(registry if registry is not None else CollectorRegistry())
    config = load_backends_file(settings.backends_file) if settings.backends_file else fleet_of_one(settings)
    fleet = Fleet(config, settings, metrics, backend)
    scheduler = Scheduler(
        max_queue_size=settings.max_queue_size,
        request_timeout=settings.request_timeout,
        full_behavior=settings.queue_full_behavior,
        history_size=settings.request_history_size,
        metrics=metrics,
        members=[],  # the fleet's, once attached
        routing=Routing(settings.routing),
        aging_seconds=settings.queue_aging_seconds,
        dispatch_margin=settings.dispatch_margin,
        deadline_admission=settings.deadline_admission,
        preempt_max=settings.preempt_max,
    )
    fleet.attach(scheduler)
    _watch(metrics, scheduler, fleet)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await fleet.start()
        if coordinator is not None:
            await coordinator.start()
        await persisted.start()
        log.info(
            "ready: backends=%s max_concurrent=%d max_queue_size=%d request_timeout=%gs",
            ",".join(f"{m.name}({m.kind})" for m in fleet.members),
            scheduler.roster.max_concurrent,
            settings.max_queue_size,
            settings.request_timeout,
        )
        sampler = asyncio.create_task(_sample_timeline(scheduler, metrics))
        try:
            yield
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            scheduler.close()
            await persisted.aclose()  # what did not end is left in the database for the next start
            if coordinator is not None:
                await coordinator.aclose()
            await fleet.aclose()

    app = GatewayApp(
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
    app.state.fleet = fleet
    app.state.scheduler = scheduler
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
        default_max_tokens=settings.rate_limit_default_max_tokens,
        # A fleet of one retries on its own upstream (inside the proxy); a pool of several on another member.
        failovers=settings.upstream_max_retries,
        retry_on_timeout=settings.upstream_retry_on_timeout,
    )
    app.state.api_keys = _key_accounts(settings)
    app.state.coordinator = coordinator = _coordinator(settings, scheduler, metrics, app.state.api_keys)
    accounts = {account.name: account for _, account in app.state.api_keys}
    app.state.persisted = persisted = Persisted(settings, app.state.service, accounts, metrics, clock)
    app.state.connections.shedder = QueueFullShedder(
        scheduler,
        app.state.api_keys,
        ids,
        frozenset(COMPLETION_ROUTES),
        settings.default_priority,
    )
    install_error_handlers(app)
    for module in (openai, queue_routes, ops, events, batch_routes):
        app.include_router(module.router)
    # Outermost the ids, so that every response carries its id; then the completion routes.
    app.front = lambda stack: RequestIdMiddleware(openai.CompletionRoutes(stack), ids=ids)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            schema["paths"] = {**openai.completion_openapi(), **schema.get("paths", {})}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


async def _sample_timeline(scheduler: Scheduler, metrics: Metrics) -> None:
    """The dashboard's charts: the queue once a second."""
    tokens = metrics.token_counts
    while True:
        await asyncio.sleep(SAMPLE_SECONDS)
        totals = scheduler.totals
        scheduler.timeline.sample(time.time(), scheduler.waiting_room.sizes(), totals.completed, sum(tokens.values()))


def _watch(metrics: Metrics, scheduler: Scheduler, fleet: Fleet) -> None:
    """Point the metrics at what they read at each scrape."""
    metrics.watch_queue(
        scheduler.waiting_room.sizes_by_model, lambda: scheduler.roster.processing, scheduler.roster.backends_in_flight
    )
    metrics.watch_prompt_tokens(
        lambda: {
            m.name: m.backend.prompt_tokens_by_source() for m in scheduler.roster.members.values() if m.kind == "local"
        }
    )
    single = fleet.single
    gate = single.gate if single is not None else None
    limiter = gate.limiter if gate is not None else None
    breaker = gate.breaker if gate is not None else None
    metrics.watch_limits(
        limiter.remaining if limiter is not None else dict, (lambda: breaker.gauge) if breaker is not None else None
    )


def _coordinator(
    settings: Settings, scheduler: Scheduler, metrics: Metrics, api_keys: tuple[tuple[bytes, KeyAccount], ...]
) -> Coordinator | None:
    """With REDIS_URL, this replica's side of the shared queue."""
    if not settings.redis_url:
        return None
    coordinator = Coordinator(
        settings,
        scheduler,
        describe=lambda job: request_status(scheduler, job).model_dump_json(),
        accounts=tuple(account for _, account in api_keys),
    )
    metrics.watch_replicas(coordinator.gauges)
    return coordinator


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
