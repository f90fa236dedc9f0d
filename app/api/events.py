"""The live view: GET /v1/queue/events (a JSON snapshot as SSE, on change and at least every second) and the
dashboard page that reads it, GET /dashboard, served from the package (no CDN, no build step)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from importlib import resources

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from app.api.deps import Caller, SchedulerDep
from app.api.snapshot import snapshot
from app.errors import NotFound
from app.limits.keys import KeyAccount
from app.metrics import Metrics
from app.queue.scheduler import Scheduler

router = APIRouter(tags=["dashboard"])

CHECK_SECONDS = 0.25  # how often a change is looked for
EVERY_SECONDS = 1.0  # a snapshot at least this often, changed or not
_ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}


@router.get("/v1/queue/events")
async def events(request: Request, caller: Caller, scheduler: SchedulerDep) -> StreamingResponse:
    """Server-sent events: `data: {snapshot}` when the queue changes, and at least every second."""
    metrics: Metrics = request.app.state.metrics
    return StreamingResponse(
        _snapshots(request, scheduler, metrics, caller),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _snapshots(
    request: Request, scheduler: Scheduler, metrics: Metrics, viewer: KeyAccount | None
) -> AsyncIterator[bytes]:
    last: tuple[object, ...] | None = None
    sent = 0.0
    while not await request.is_disconnected():
        totals = scheduler.totals
        state = (
            totals.queued,
            totals.completed,
            totals.failed,
            totals.rejected,
            totals.timeout,
            totals.cancelled,
            scheduler.waiting,
            scheduler.in_flight,
            scheduler.draining,
        )
        now = time.monotonic()
        if state != last or now - sent >= EVERY_SECONDS:
            yield b"data: " + orjson.dumps(snapshot(scheduler, metrics, viewer)) + b"\n\n"
            last, sent = state, now
        if scheduler.draining and not scheduler.in_flight:
            return  # the last snapshot said so: a stream left open would hold the shutdown up
        await asyncio.sleep(CHECK_SECONDS)


@router.get("/dashboard", include_in_schema=False)
async def dashboard(request: Request) -> Response:
    """The page; with keys on it asks for one before it reads the events (kept in sessionStorage)."""
    keys = "on" if request.app.state.api_keys else "off"
    page = _asset("dashboard.html").replace(b'data-keys="off"', f'data-keys="{keys}"'.encode())
    return Response(page, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})


@router.get("/dashboard/{name}", include_in_schema=False)
async def dashboard_asset(name: str) -> Response:
    """The page's script and style sheet."""
    if name not in _ASSETS:
        raise NotFound(f"no dashboard file {name!r}")
    return Response(_asset(name), media_type=_ASSETS[name] + "; charset=utf-8", headers={"Cache-Control": "no-cache"})


def _asset(name: str) -> bytes:
    return resources.files("app").joinpath("static", name).read_bytes()
