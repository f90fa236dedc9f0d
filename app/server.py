"""The HTTP server around the app: uvicorn as the gateway configures it, its drain at shutdown, and SIGHUP."""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import socket
import threading
from types import FrameType

import uvicorn
from fastapi import FastAPI

from app.api.connections import ConnectionGuard, reserve_for
from app.fleet.config import BackendsFileError, load_backends_file
from app.fleet.fleet import Fleet
from app.heap import freeze_startup_heap
from app.queue.scheduler import Scheduler

log = logging.getLogger("app.connections")
log_fleet = logging.getLogger("app.fleet")

# How long stopped requests get to send their 503 or their last event before uvicorn would cancel them.
_ANSWER_GRACE_SECONDS = 2.0
# Descriptors kept free for what is not a client connection: upstream connections, the model, logs, sockets.
_SPARE_DESCRIPTORS = 128


class GatewayServer(uvicorn.Server):
    """uvicorn, with the queue drained first when a shutdown begins and what still runs answered at its end.

    Waiting requests get their 503 at once instead of holding connections open through the grace period;
    running ones get DRAIN_TIMEOUT to finish. Those still running then are stopped by the gateway itself and
    answered 503 `shutting_down` (a stream: its error event and [DONE]); uvicorn's own grace period is a
    little longer, so it never has to cancel a request (which its client would see as a bare 500).
    """

    def __init__(self, app: FastAPI, *, freeze_heap: bool = True):
        super().__init__(server_config(app))
        self._scheduler: Scheduler = app.state.scheduler
        self._drain_timeout: float = app.state.settings.drain_timeout
        self._freeze_heap = freeze_heap
        self._fleet: Fleet = app.state.fleet
        self._backends_file: str | None = app.state.settings.backends_file
        self._reloads: set[asyncio.Task[list[str]]] = set()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self._freeze_heap:
            freeze_startup_heap()  # the app and the backend are loaded: what is alive now stays
        if self._backends_file is not None and threading.current_thread() is threading.main_thread():
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._reload)

    def _reload(self) -> None:
        """SIGHUP: read BACKENDS_FILE again and apply it; a bad file changes nothing (and says why)."""
        assert self._backends_file is not None
        try:
            config = load_backends_file(self._backends_file)
        except BackendsFileError as exc:
            log_fleet.error("SIGHUP: not reloaded, the fleet stays as it was: %s", exc)
            return
        task = asyncio.get_running_loop().create_task(self._fleet.reload(config))
        self._reloads.add(task)
        task.add_done_callback(self._reloaded)

    def _reloaded(self, task: asyncio.Task[list[str]]) -> None:
        self._reloads.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log_fleet.error("SIGHUP: reload failed: %s", error, exc_info=error)
            return
        changes = task.result()
        log_fleet.info("SIGHUP: %s reloaded: %s", self._backends_file, "; ".join(changes) or "nothing changed")

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:
            # uvicorn re-raises the signals it caught once it has stopped, so the process dies by SIGTERM after
            # a clean drain (`make serve` then prints "Terminated"). A drain is how the gateway is meant to
            # stop: it exits 0. Ctrl-C still ends as an interrupt does, for the shell.
            self._captured_signals.remove(sig)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._scheduler.drain()
        deadline = asyncio.get_running_loop().call_later(self._drain_timeout, self._scheduler.close)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()


def server_config(app: FastAPI) -> uvicorn.Config:
    """uvicorn's configuration for the app: uvloop, httptools behind the connection guard, no access log."""
    settings = app.state.settings
    guard: ConnectionGuard = app.state.connections
    fit_open_files(guard, app.state.scheduler.roster.max_concurrent)
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=guard.protocol(),
        lifespan="on",
        access_log=False,  # the gateway writes its own access line, with the queue's view of the request
        log_config=None,  # keep configure_logging()'s handler and format
        log_level=settings.log_level,
        timeout_graceful_shutdown=settings.drain_timeout + _ANSWER_GRACE_SECONDS,
        backlog=4096,
        proxy_headers=False,  # the gateway never reads the client's address: one layer less per request
    )


def fit_open_files(guard: ConnectionGuard, upstream_connections: int) -> None:
    """Raise the open-files limit as far as allowed, and lower MAX_CONNECTIONS to what it leaves room for.

    A gateway out of descriptors cannot accept even a health probe; one that stops at its own limit still can.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return
    room = soft - _SPARE_DESCRIPTORS - upstream_connections
    fits = guard.max_connections
    while fits > 1 and fits + reserve_for(fits) > room:  # the reserve past the limit needs descriptors too
        fits = max(1, min(fits - 1, room - reserve_for(fits)))
    if fits < guard.max_connections:
        log.warning(
            "MAX_CONNECTIONS=%d lowered to %d: the open-files limit is %d (raise it with ulimit -n)",
            guard.max_connections,
            fits,
            soft,
        )
        guard.limit_to(fits)
