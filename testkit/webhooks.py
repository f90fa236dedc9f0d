"""A webhook receiver on loopback: records every delivery, and answers 503 while it is `down`."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

from aiohttp import web

from testkit.gateway import free_port


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    accepted: bool


@dataclass
class WebhookReceiver:
    down: bool = False
    deliveries: list[Delivery] = field(default_factory=list)
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    @property
    def accepted(self) -> list[Delivery]:
        return [delivery for delivery in self.deliveries if delivery.accepted]

    async def _receive(self, request: web.Request) -> web.Response:
        accepted = not self.down
        self.deliveries.append(Delivery(dict(request.headers), await request.read(), accepted))
        return web.Response(status=204 if accepted else 503)

    def start(self) -> WebhookReceiver:
        self.port = free_port()
        started = threading.Event()

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            app = web.Application()
            app.router.add_post("/hooks", self._receive)
            self._runner = web.AppRunner(app)
            loop.run_until_complete(self._runner.setup())
            loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
            started.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        started.wait(10)
        return self

    def stop(self) -> None:
        assert self._loop is not None and self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
