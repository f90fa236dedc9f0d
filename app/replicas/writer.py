"""A replica's commands to Redis, sent in pipelines: a burst costs one round trip, a lone command none more.

Commands need no order between them (app.replicas.coordinator says why), so a few pipelines go out at once,
each on a connection of its own, and a command waits at most for those already out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.errors import CoordinationUnavailable

log = logging.getLogger("app.replicas")

Arg = str | int | float  # what a command takes
Command = tuple[Arg, ...]  # a Redis command and its arguments
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)
PIPELINES = 4  # pipelines out at once


class Writer:
    """Sends commands and hands back their results.

    `reachable()` says whether to try at all; `lost(error)` is told when Redis could not be reached (or
    restarted and forgot the scripts); `settled()` runs whenever the last pipeline out has come back.
    """

    def __init__(
        self,
        redis: Redis,
        reachable: Callable[[], bool],
        lost: Callable[[BaseException], object],
        settled: Callable[[], object],
    ):
        self._redis = redis
        self._reachable = reachable
        self._lost = lost
        self._settled = settled
        self.out = 0  # pipelines out now
        self._pending: list[tuple[Command, _Sink]] = []
        self._armed = False
        self._tasks: set[asyncio.Task[None]] = set()

    def queue(self, command: Command, then: Callable[[Any], object] | None = None) -> None:
        """Send `command` soon (with whatever else is queued by then); `then` gets its result."""
        self._pending.append((command, then))
        if not self._armed:
            self._armed = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def call(self, command: Command, then: Callable[[Any], object] | None = None) -> Any:
        """Send `command` now (unless every pipeline is out) and return its result; CoordinationUnavailable
        if Redis cannot be reached. `then` sees the result first, the moment it arrives (before anything
        read from Redis meanwhile is looked at)."""
        reply = _Reply(asyncio.get_running_loop().create_future(), then)
        self._pending.append((command, reply))
        if self.out < PIPELINES:
            batch, self._pending = self._pending, []
            self.out += 1
            await self._send(batch)  # in the caller's task: no hop through another
        return await reply.future

    def cancel(self) -> None:
        """Stop the pipelines out (shutdown): their callers are told Redis could not be reached."""
        for task in list(self._tasks):
            task.cancel()

    def _flush(self) -> None:
        self._armed = False
        while self._pending and self.out < PIPELINES:
            batch, self._pending = self._pending, []
            self.out += 1
            task = asyncio.ensure_future(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[Command, _Sink]]) -> None:
        results: list[Any] | None = None
        try:
            if self._reachable():
                try:
                    results = await self._execute([command for command, _ in batch])
                except UNREACHABLE as exc:
                    self._lost(exc)
                if results is not None and any(isinstance(result, NoScriptError) for result in results):
                    results = None
                    self._lost(RedisConnectionError("Redis restarted and forgot the shared state"))
        finally:
            self.out -= 1
            _settle(batch, results)
            if self._pending:
                self._flush()
        if not self.out:
            self._settled()

    async def _execute(self, commands: list[Command]) -> list[Any]:
        """Each command's result, or the error it met; one alone skips the pipeline's cost."""
        if len(commands) == 1:
            try:
                return [await self._redis.execute_command(*commands[0])]  # type: ignore[no-untyped-call]
            except ResponseError as exc:  # NoScriptError among them
                return [exc]
        pipe = self._redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        return results


class _Reply:
    """Someone awaits a command's result; `then` handles it first, synchronously, as it arrives."""

    __slots__ = ("future", "then")

    def __init__(self, future: asyncio.Future[Any], then: Callable[[Any], object] | None):
        self.future = future
        self.then = then


_Sink = _Reply | Callable[[Any], object] | None  # who gets a command's result


def _settle(batch: list[tuple[Command, _Sink]], results: list[Any] | None) -> None:
    """Hand each command's result to its sink; None: Redis could not be reached, every caller is told."""
    for index, (_, sink) in enumerate(batch):
        result = CoordinationUnavailable() if results is None else results[index]
        if isinstance(result, ResponseError):
            log.error("a shared-queue command failed: %s", result)
            result = CoordinationUnavailable(f"the shared queue failed: {result}")
        if isinstance(sink, _Reply):
            if sink.future.done():
                continue
            if isinstance(result, Exception):
                sink.future.set_exception(result)
                continue
            if sink.then is not None:
                try:
                    sink.then(result)
                except Exception:
                    log.exception("handling a shared-queue result failed")
            sink.future.set_result(result)
        elif sink is not None and not isinstance(result, Exception):
            try:
                sink(result)
            except Exception:
                log.exception("handling a shared-queue result failed")
