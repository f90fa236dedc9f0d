"""Operations routes: liveness, readiness and Prometheus metrics, open without an API key."""

from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from app.api.deps import CoordinatorDep, FleetDep, SchedulerDep
from app.errors import CoordinationUnavailable, ShuttingDown

router = APIRouter(tags=["operations"])


@router.get("/health")
@router.head("/health", include_in_schema=False)
async def health() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/ready")
@router.head("/ready", include_in_schema=False)
async def ready(fleet: FleetDep, scheduler: SchedulerDep, coordinator: CoordinatorDep) -> dict[str, str]:
    """Readiness: 503 while draining, while the breaker is open, until a backend answers, or (REDIS_URL,
    REDIS_FAILURE_MODE=closed) while Redis cannot be reached."""
    if scheduler.draining:
        raise ShuttingDown()
    if coordinator is not None and not coordinator.available and coordinator.mode == "closed":
        raise CoordinationUnavailable()
    await fleet.health()  # raises BreakerOpen or BackendNotReady, answered 503
    return {"status": "ready"}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of the app's own registry."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
