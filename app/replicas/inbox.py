"""This replica's inbox in Redis, read with a blocking pop while it takes part in the shared state: the grants
other replicas' scripts made for its tickets (`g|ticket|member`), and other replicas' questions about the
requests it holds (`q|reply|key|id`, a status read; `c|...`, a cancel)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from redis.asyncio import Redis

from app.replicas.writer import UNREACHABLE

log = logging.getLogger("app.replicas")

INBOX_SECONDS = 5  # a blocking pop of the inbox returns empty after this long, and is sent again
_BATCH = 255  # messages taken at once after the first


class Inbox:
    """Reads `key` on `blocking` (a client whose socket waits longer than INBOX_SECONDS) while `joined` is set.

    Grants go to `granted(ticket, member)`, questions to `asked(verb, reply, key, request_id)`; a Redis that
    cannot be reached to `lost(error)`, after which reading waits for the next join.
    """

    def __init__(
        self,
        blocking: Redis,
        key: str,
        joined: asyncio.Event,
        granted: Callable[[str, str], None],
        asked: Callable[[str, str, str, str], None],
        lost: Callable[[BaseException], None],
    ):
        self._blocking = blocking
        self._key = key
        self._joined = joined
        self._granted = granted
        self._asked = asked
        self._lost = lost

    async def listen(self) -> None:
        """Read and hand on messages until cancelled."""
        while True:
            await self._joined.wait()
            try:
                popped = await self._blocking.blpop([self._key], timeout=INBOX_SECONDS)
                if popped is None:
                    continue
                messages = [str(popped[1])]
                more = await self._blocking.lpop(self._key, _BATCH)
                if isinstance(more, list):
                    messages += [str(message) for message in more]
            except UNREACHABLE as exc:
                self._lost(exc)
                continue
            for message in messages:
                try:
                    self.handle(message)
                except Exception:
                    log.exception("handling the inbox message %r failed", message)

    def handle(self, message: str) -> None:
        """Hand on one message; one of an unknown kind is dropped."""
        verb, _, rest = message.partition("|")
        if verb == "g":
            ticket, _, member = rest.rpartition("|")
            self._granted(ticket, member)
        elif verb in ("q", "c"):
            reply, _, named = rest.partition("|")
            key, _, request_id = named.rpartition("|")  # a key's name may hold a bar; ids never do
            self._asked(verb, reply, key, request_id)
        else:
            log.warning("the inbox held a message of no known kind: %r", message)
