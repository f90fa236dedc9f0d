"""Webhooks: events posted to the key's URL, signed per the Standard Webhooks spec, retried until they land.

The URL and its secret come from the key's entry of API_KEYS_FILE (or WEBHOOK_URL / WEBHOOK_SECRET), never
from a request: a client cannot make the gateway post anywhere it chooses. Each event is stored before it is
sent, so a restart resumes its delivery; a failed attempt is tried again after WEBHOOK_RETRY_SECONDS, doubling
each time up to an hour, for RETRY_FOR seconds after the event.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable

import aiohttp
import orjson

from app.batches.store import Delivery, Store
from app.metrics import Metrics
from app.settings import webhook_key

log = logging.getLogger("app.webhooks")

RETRY_FOR = 86_400.0  # a day of retries, as the spec suggests
_MAX_DELAY = 3600.0
_TIMEOUT = aiohttp.ClientTimeout(total=15)
_AT_ONCE = 16  # deliveries in flight at once

Target = tuple[str, str]  # (url, secret)


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header: `v1,` and the base64 HMAC-SHA256 of `id.timestamp.body`."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(webhook_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class Webhooks:
    """Stores events and delivers them; `target(owner)` says where an owner's events go (None: nowhere)."""

    def __init__(
        self,
        store: Store,
        target: Callable[[str], Target | None],
        retry_seconds: float,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ):
        self._store = store
        self._target = target
        self._retry_seconds = retry_seconds
        self._metrics = metrics
        self._clock = clock
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.counts: dict[str, int] = {}  # deliveries by state, as stored (pending, delivered, failed)

    async def start(self) -> None:
        self.counts = await self._store.delivery_counts()
        self._session = aiohttp.ClientSession(timeout=_TIMEOUT)
        self._task = asyncio.create_task(self._deliver())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

    async def emit(self, owner: str, event: str, data: dict[str, object]) -> None:
        """Store an event for the owner's webhook (if it has one) and have it sent."""
        if self._target(owner) is None:
            return
        now = self._clock()
        event_id = "evt_" + secrets.token_hex(12)
        payload = orjson.dumps({"id": event_id, "object": "event", "created_at": int(now), "type": event, "data": data})
        await self._store.add_delivery(Delivery(event_id, owner, event, payload, now, 0), now)
        self._count("pending", 1)
        self._wake.set()

    def _count(self, state: str, change: int) -> None:
        self.counts[state] = self.counts.get(state, 0) + change

    async def _deliver(self) -> None:
        while True:
            self._wake.clear()  # before looking: an event stored from here on wakes the wait below
            try:
                due = await self._store.due_deliveries(self._clock(), _AT_ONCE)
                if due:
                    await asyncio.gather(*(self._attempt(delivery) for delivery in due))
                    continue
                following = await self._store.next_delivery_at()
            except Exception:  # the database or a bug: logged, and tried again shortly rather than given up
                log.exception("webhook deliveries failed; trying again in 5s")
                following = self._clock() + 5
            timeout = None if following is None else max(0.0, following - self._clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _attempt(self, delivery: Delivery) -> None:
        target = self._target(delivery.owner)
        now = self._clock()
        error = "the key has no webhook any more" if target is None else await self._post(target, delivery, now)
        if error is None:
            state, next_at = "delivered", now
            self._metrics.webhook_delivery("delivered")
        elif target is not None and now - delivery.created_at < RETRY_FOR:
            state = "pending"
            next_at = now + min(_MAX_DELAY, self._retry_seconds * 2**delivery.attempts)
            self._metrics.webhook_delivery("retried")
            log.info("webhook %s to %s failed (%s); next try in %.1fs", delivery.id, target[0], error, next_at - now)
        else:
            state, next_at = "failed", now
            self._metrics.webhook_delivery("failed")
            log.warning("webhook %s (%s) given up: %s", delivery.id, delivery.type, error)
        await self._store.delivery_tried(delivery.id, state, next_at, error)
        if state != "pending":
            self._count("pending", -1)
            self._count(state, 1)

    async def _post(self, target: Target, delivery: Delivery, now: float) -> str | None:
        """One attempt: None when the receiver answered 2xx, else what went wrong."""
        url, secret = target
        timestamp = int(now)
        headers = {
            "content-type": "application/json",
            "webhook-id": delivery.id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, delivery.id, timestamp, delivery.payload),
        }
        assert self._session is not None
        try:
            async with self._session.post(url, data=delivery.payload, headers=headers) as response:
                if 200 <= response.status < 300:
                    return None
                return f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return type(exc).__name__ + (f": {exc}" if str(exc) else "")
