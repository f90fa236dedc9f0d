"""Dependencies of the routers: the services on app.state, the caller's identity, the request body.

Every dependency is `async def`: FastAPI runs a plain `def` dependency in a worker thread, a thread
round trip per dependency per request (measured: it cut proxy throughput by two thirds).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from starlette.types import Receive

from app.errors import BodyTooLarge, ClientDisconnected, Unauthorized
from app.fleet.fleet import Fleet
from app.limits.keys import KeyAccount
from app.queue.scheduler import Scheduler
from app.replicas.coordinator import Coordinator


async def get_scheduler(request: Request) -> Scheduler:
    scheduler: Scheduler = request.app.state.scheduler
    return scheduler


async def get_fleet(request: Request) -> Fleet:
    fleet: Fleet = request.app.state.fleet
    return fleet


async def get_coordinator(request: Request) -> Coordinator | None:
    coordinator: Coordinator | None = request.app.state.coordinator
    return coordinator


async def authenticate(request: Request) -> KeyAccount | None:
    """The caller's key account, None with authentication off; 401 for a missing or wrong key."""
    state = request.scope.setdefault("state", {})
    return caller(request.app.state.api_keys, request.headers.get("authorization"), state)


def caller(
    keys: tuple[tuple[bytes, KeyAccount], ...], authorization: str | None, state: dict[str, object]
) -> KeyAccount | None:
    """The account of the key an Authorization header carries, None with authentication off (no `keys`); 401
    for a missing or wrong key. Its name goes into the request's `state`, for the access line.

    Every configured key is compared, in constant time, so timing tells nothing of which one nearly matched.
    """
    if not keys:
        return None
    matched = key_account(keys, authorization or "")
    state["key"] = matched.name
    return matched


def key_account(keys: tuple[tuple[bytes, KeyAccount], ...], authorization: str) -> KeyAccount:
    """The account whose key an Authorization header carries; 401 for a missing or wrong key."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    given = token.strip().encode()
    matched = None
    for secret, account in keys:
        if hmac.compare_digest(given, secret):
            matched = account
    if matched is None:
        raise Unauthorized("the API key is not valid")
    return matched


async def read_body(receive: Receive, limit: int, declared: str | None) -> bytes:
    """The whole body, refusing with 413 past `limit` bytes whether or not Content-Length (`declared`) says so.

    Read from the ASGI messages themselves: Starlette's Request.body() reads them through an async generator,
    whose end costs an exception per request on the completion path.
    """
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"the request body is {declared} bytes; the most accepted is {limit}")
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("the client went away while sending its request")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"the request body is over {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def owner(caller: KeyAccount | None) -> str:
    """Who a new file, batch or background request belongs to: the key's name ('' with authentication off)."""
    return caller.name if caller is not None else ""


def viewer(caller: KeyAccount | None) -> str | None:
    """Whose files, batches and background requests the caller sees: its own, or every key's (None) for an
    admin key."""
    return None if caller is not None and caller.admin else owner(caller)


SchedulerDep = Annotated[Scheduler, Depends(get_scheduler)]
FleetDep = Annotated[Fleet, Depends(get_fleet)]
CoordinatorDep = Annotated[Coordinator | None, Depends(get_coordinator)]
# The caller's key account ('key-N' for API_KEYS, the keys file's name otherwise); None with auth off.
Caller = Annotated[KeyAccount | None, Depends(authenticate)]
