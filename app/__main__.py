"""`python -m app` and `llm-queue-gateway`: read the settings and serve."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys

import uvicorn
from fastapi import FastAPI

from app.heap import freeze_startup_heap
from app.limits.keys import KeysFileError
from app.logs import configure_logging
from app.main import create_app
from app.queue.scheduler import Scheduler
from app.settings import SettingsError, load_settings, unknown_variables

log = logging.getLogger("app.settings")


class GatewayServer(uvicorn.Server):
    """uvicorn, with the queue drained first when a shutdown begins and what still runs answered at its end.

    Waiting requests get their 503 at once instead of holding connections open through the grace period;
    running ones get DRAIN_TIMEOUT to finish. Those still running then are stopped by the gateway itself and
    answered 503 `shutting_down` (a stream: its error event and [DONE]); uvicorn's own grace period is a
    little longer, so it never has to cancel a request (which its client would see as a bare 500).
    """

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler, drain_timeout: float):
        super().__init__(config)
        self._scheduler = scheduler
        self._drain_timeout = drain_timeout

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        freeze_startup_heap()  # the app and the backend are loaded: what is alive now stays

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._scheduler.drain()
        deadline = asyncio.get_running_loop().call_later(self._drain_timeout, self._scheduler.close)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()


# How long stopped requests get to send their 503 or their last event before uvicorn would cancel them.
_ANSWER_GRACE_SECONDS = 2.0


def serve(app: FastAPI) -> None:
    """Run the app until SIGINT or SIGTERM."""
    settings = app.state.settings
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,  # the gateway writes its own access line, with the queue's view of the request
        log_config=None,  # keep configure_logging()'s handler and format
        log_level=settings.log_level,
        timeout_graceful_shutdown=settings.drain_timeout + _ANSWER_GRACE_SECONDS,
        backlog=4096,
        proxy_headers=False,  # the gateway never reads the client's address: one layer less per request
    )
    GatewayServer(config, app.state.scheduler, settings.drain_timeout).run()


def run(**overrides: object) -> None:
    """Read the settings (flags in `overrides` win over the environment) and serve; a bad one exits 2."""
    try:
        settings = load_settings(**overrides)
        app = create_app(settings)
    except (SettingsError, KeysFileError) as exc:
        print(f"llm-queue-gateway: bad setting: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    for name, meant in unknown_variables():
        log.warning(".env sets %s, which no setting reads: did you mean %s?", name, meant)
    serve(app)


def main() -> None:
    """Entry point of `python -m app`: serve with the settings of the environment."""
    run()


if __name__ == "__main__":
    main()
