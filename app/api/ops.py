"""Operations routes: liveness, readiness and Prometheus metrics, open without an API key."""

from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from app.api.deps import BackendDep, SchedulerDep
from app.errors import BreakerOpen, ShuttingDown
from app.limits.breaker import BreakerState, CircuitBreaker

router = APIRouter(tags=["operations"])


@router.get("/health")
@router.head("/health", include_in_schema=False)
async def health() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/ready")
@router.head("/ready", include_in_schema=False)
async def ready(request: Request, backend: BackendDep, scheduler: SchedulerDep) -> dict[str, str]:
    """Readiness: 503 while draining or until the backend answers."""
    if scheduler.draining:
        raise ShuttingDown()
    breaker: CircuitBreaker | None = request.app.state.breaker
    if breaker is not None and breaker.state is BreakerState.OPEN:
        raise BreakerOpen(
            f"the circuit breaker is open after {breaker.failures} upstream failures in a row",
            retry_after=breaker.retry_after(),
        )
    await backend.health()  # raises BackendNotReady, answered 503
    return {"status": "ready"}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of the app's own registry."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
