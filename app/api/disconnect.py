"""The watcher that notices a client hanging up while its request waits or runs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.types import Receive

# A request still running after this long gets a watcher task; one that finishes sooner never needs one.
# A disconnect is then noticed within this delay plus a loop turn, inside the 100 ms the queue promises.
WATCH_AFTER_SECONDS = 0.05


class DisconnectWatcher:
    """Calls `on_disconnect` soon after the client hangs up, whatever the request is doing then.

    The server would otherwise notice only at its next write, which for a queued request or a slow
    upstream may be minutes away. Watching costs a task per request, so it starts only once the request
    has lived WATCH_AFTER_SECONDS: most proxied requests are answered before that, and pay one timer.
    """

    __slots__ = ("_on_disconnect", "_receive", "_task", "_timer")

    def __init__(self, receive: Receive, on_disconnect: Callable[[], object]):
        self._receive = receive
        self._on_disconnect = on_disconnect
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            WATCH_AFTER_SECONDS, self._start
        )

    def _start(self) -> None:
        self._timer = None
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._on_disconnect()
                return

    def stop(self) -> None:
        """The response is done: stop watching."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()
            self._task = None
