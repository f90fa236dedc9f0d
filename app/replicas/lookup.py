"""Requests held by other replicas: a status read or a cancel asks the replica that holds one, and answers theirs.

A question goes to the holder's inbox (`q` for a status, `c` for a cancel) with a reply key of the asker's;
the holder pushes its answer there. A request that ended anywhere is read from the final records in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis

from app.errors import RequestCancelled
from app.limits.keys import KeyAccount
from app.queue.job import Job
from app.queue.scheduler import Scheduler
from app.replicas.store import Store
from app.replicas.writer import UNREACHABLE, Writer

ASK_SECONDS = 8.0  # how long a lookup or cancel waits for the replica that holds the request
_SETTLE_SECONDS = 4.0  # how long a cancel from another replica waits for the request to wind down
_REPLY_TTL = 30  # seconds an answer nobody popped stays in Redis


class Lookup:
    """Finds a request on the replica that holds it (`find`) and answers the others' questions (`answer`).

    `redis` sends, `blocking` waits for replies (its socket waits longer than ASK_SECONDS); `describe(job)` is a
    request's status as the API shows it, in JSON; `available()` says whether Redis answered last time.
    """

    def __init__(
        self,
        redis: Redis,
        blocking: Redis,
        store: Store,
        writer: Writer,
        replica: str,
        scheduler: Scheduler,
        describe: Callable[[Job], str],
        available: Callable[[], bool],
    ):
        self._redis = redis
        self._blocking = blocking
        self._store = store
        self._writer = writer
        self._replica = replica
        self._scheduler = scheduler
        self._describe = describe
        self._available = available
        self._replies = itertools.count()

    async def find(self, request_id: str, viewer: KeyAccount | None, cancel: bool) -> dict[str, Any] | None:
        """A request of `viewer`'s (any key's for an admin) held by another replica, or finished on one:
        {"request": status} or, for a cancel that came too late, {"finished": status}; None if unknown."""
        if not self._available():
            return None
        own = "" if viewer is None else viewer.name
        try:
            owners: dict[str, str] = await self._redis.hgetall(self._store.key("id", request_id))  # type: ignore[assignment]
            candidates = list(owners.items()) if viewer is not None and viewer.admin else [(own, owners.get(own))]
            for key, owner in candidates:
                if owner is None or owner == self._replica:
                    continue
                answer = await self._ask(owner, "c" if cancel else "q", key, request_id)
                if answer is not None:
                    return answer
            records: dict[str, str] = await self._redis.hgetall(self._store.key("h", request_id))  # type: ignore[assignment]
        except UNREACHABLE:
            return None
        record = records.get(own)
        if record is None and viewer is not None and viewer.admin:
            record = next(iter(records.values()), None)
        if record is None:
            return None
        return {"finished": json.loads(record)} if cancel else {"request": json.loads(record)}

    async def _ask(self, owner: str, verb: str, key: str, request_id: str) -> dict[str, Any] | None:
        reply = self._store.key("reply", self._replica, str(next(self._replies)))
        await self._redis.rpush(self._store.key("in", owner), f"{verb}|{reply}|{key}|{request_id}")
        popped = await self._blocking.blpop([reply], timeout=ASK_SECONDS)
        if popped is None:
            return None
        answer: dict[str, Any] | None = json.loads(popped[1])
        return answer

    async def answer(self, verb: str, reply: str, key: str, request_id: str) -> None:
        """Answer another replica's question about a request held here: its status (`q`), or cancel it (`c`)
        and then its status once it has wound down."""
        job = self._scheduler.registry.lookup(request_id, key or None)
        if job is None:
            answer = "null"
        elif verb == "q":
            answer = f'{{"request":{self._describe(job)}}}'
        elif not self._scheduler.abort(job, RequestCancelled(f"request {request_id} was cancelled")):
            answer = f'{{"finished":{self._describe(job)}}}'
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_SETTLE_SECONDS):
                    await job.wait_finished()
            answer = f'{{"request":{self._describe(job)}}}'
        self._writer.queue(("RPUSH", reply, answer))
        self._writer.queue(("EXPIRE", reply, _REPLY_TTL))
