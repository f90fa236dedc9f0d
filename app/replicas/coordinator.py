"""A replica's part in the shared queue: joining it, the heartbeat that renews its leases, and life without Redis.

Its requests' tickets and grants are app.replicas.tickets. Commands go out through the writer
(app.replicas.writer) and need no order between them: a request's withdrawal or release is only sent once its
ticket's reply is in. Grants for another replica are pushed to its inbox, which it reads with a blocking pop:
dispatch is driven by events (a request arriving, a slot freed, a lease expired at a heartbeat, a budget's
refill time), never by polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.errors import CoordinationUnavailable, GatewayError
from app.limits.keys import KeyAccount
from app.metrics import SharedGauges
from app.queue.job import Job
from app.queue.member import Member
from app.queue.scheduler import Scheduler
from app.replicas import topology
from app.replicas.budgets import SharedBudgets
from app.replicas.inbox import INBOX_SECONDS, Inbox
from app.replicas.lookup import ASK_SECONDS, Lookup
from app.replicas.store import Store
from app.replicas.tickets import Tickets
from app.replicas.writer import UNREACHABLE, Arg, Command, Writer
from app.settings import Settings
from app.types import JobState

log = logging.getLogger("app.replicas")


_RECONNECT_SECONDS = (0.2, 0.5, 1.0, 2.0)  # between attempts to reach Redis again, the last repeated
_JOIN_SECONDS = 8.0  # how long an admission waits for a join under way


class Coordinator:
    """Shares this replica's requests of upstream pools with the others through Redis (app.queue.shared).

    `describe(job)` is a request's status as the API shows it, in JSON (kept in Redis once it ends); `accounts` are
    the client keys, whose rpm/tpm become shared budgets (their local buckets keep 1/REPLICAS_EXPECTED of
    the limits, for REDIS_FAILURE_MODE=local).
    """

    def __init__(
        self,
        settings: Settings,
        scheduler: Scheduler,
        describe: Callable[[Job], str],
        accounts: tuple[KeyAccount, ...] = (),
    ):
        assert settings.redis_url is not None
        self.replica = settings.replica_id or f"{socket.gethostname()}-{os.getpid()}"
        self.scheduler = scheduler
        self.ttl = settings.lease_ttl
        self.mode = settings.redis_failure_mode
        self.replicas_expected = settings.replicas_expected
        self._history = settings.request_history_size
        self._history_ttl = settings.request_history_ttl
        self._describe = describe
        self._redis = Redis.from_url(
            settings.redis_url, decode_responses=True, socket_timeout=2.0, socket_connect_timeout=2.0
        )
        # Blocking pops (the inbox, answers from other replicas): their socket waits longer than they block.
        self._blocking = Redis.from_url(
            settings.redis_url,
            decode_responses=True,
            socket_timeout=max(INBOX_SECONDS, ASK_SECONDS) + 5.0,
            socket_connect_timeout=2.0,
        )
        self.store = Store(settings.redis_prefix)
        self._shas = {name: hashlib.sha1(text.encode()).hexdigest() for name, text in self.store.scripts.items()}
        self.available = False  # Redis answered the last time we asked
        self._joining = False  # a join is under way: admissions wait for it
        self._reconnecting = False
        self.started = time.time()
        self.view: dict[str, Any] | None = None  # the shared state as the last heartbeat saw it
        self.losses = 0  # times this replica lost Redis
        self._writer = Writer(self._redis, lambda: self.available, self._lost, self._replies_in)
        self._joined = asyncio.Event()  # set while the shared state is ours to use
        self._tasks: list[asyncio.Task[None]] = []
        self._topology = "{}"
        self.budgets = SharedBudgets(
            accounts, settings.replicas_expected, self.mode == "local", self._writer, self._run, lambda: self.available
        )
        self.tickets = Tickets(
            scheduler,
            self._writer,
            self._run,
            lambda: self.available,
            describe,
            self.budgets,
            self.replica,
            settings.max_queue_size,
            self._heartbeat,
        )
        self.lookup = Lookup(
            self._redis,
            self._blocking,
            self.store,
            self._writer,
            self.replica,
            scheduler,
            describe,
            lambda: self.available,
        )
        self.inbox = Inbox(
            self._blocking,
            self.store.key("in", self.replica),
            self._joined,
            lambda ticket, member: self.tickets.granted([ticket, member]),
            lambda verb, reply, key, request_id: self._spawn(self.lookup.answer(verb, reply, key, request_id)),
            self._lost,
        )

    # Life -------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Join the shared state, then listen; without Redis at start, serve as the failure mode says until
        it can be reached."""
        self.scheduler.share(self, active=self.mode == "closed", replicas=self.replicas_expected)
        self._tasks = [
            asyncio.create_task(self.inbox.listen(), name="replicas-inbox"),
            asyncio.create_task(self._beat(), name="replicas-heartbeat"),
        ]
        try:
            await self._join()
        except UNREACHABLE as exc:
            self._lost(exc)
        else:
            log.info("replica %s shares the queue through Redis (failure mode %s)", self.replica, self.mode)

    async def aclose(self) -> None:
        """Send what is still to be sent (the ends of the last requests), then stop; whatever this replica
        still holds expires in Redis within LEASE_TTL."""
        await asyncio.sleep(0)  # the ends of requests that were just stopped are queued
        if self.available:
            with contextlib.suppress(CoordinationUnavailable, TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._writer.call(("PING",))
        self._writer.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.tickets.close()
        if self.available:
            with contextlib.suppress(RedisError, OSError):
                await self._redis.delete(self.store.key("rep", self.replica))
        await self._redis.aclose()
        await self._blocking.aclose()

    async def _join(self) -> None:
        """Take part in the shared state from now: what Redis holds of this replica from before goes, the
        requests it runs take their slots again, and those it has waiting queue again, in their order."""
        self._joining = True
        try:
            await self._rejoin()
        except BaseException:
            if self.mode == "local":  # still alone: the local queue serves on
                self.scheduler.share(self, active=False, replicas=self.replicas_expected)
            raise
        finally:
            self._joining = False

    async def _rejoin(self) -> None:
        self._topology = self._fleet()
        for name, text in self.store.scripts.items():
            self._shas[name] = await self._redis.script_load(text)
        # From here the pools are shared again: nothing more is dispatched from the local queue.
        self.scheduler.share(self)
        running: list[Arg] = []
        waiting: list[Job] = []
        for job in topology.shared_jobs(self.scheduler.roster):
            if job.state is JobState.PROCESSING and job.member is not None:
                running += self.tickets.lease_again(job)
            elif job.state is JobState.QUEUED and job.waiting_in is not None:
                waiting.append(job)
        pipe = self._redis.pipeline(transaction=False)
        pipe.evalsha(self._shas["rejoin"], 0, *self._args(self._description(), *running))
        for job in waiting:
            pipe.evalsha(self._shas["enqueue"], 0, *self._args(*self.tickets.enqueue_args(job, "2")))
        results = await pipe.execute()
        self.available = True
        self._joined.set()
        if results[0]:
            log.info("replica %s: %d tickets of its own from before were dropped", self.replica, results[0])
        for job, result in zip(waiting, results[1:], strict=True):
            self.tickets.admitted(job, result)

    def _lost(self, exc: BaseException) -> None:
        """Redis cannot be reached: serve alone (local) or refuse (closed) until it can again."""
        if self._reconnecting:
            return
        self._reconnecting = True
        self.available = False
        self._joined.clear()
        log.warning("replica %s cannot reach Redis (%s): %s failure mode", self.replica, exc, self.mode)
        self.losses += 1
        if self.mode == "local":
            self.scheduler.share(self, active=False, replicas=self.replicas_expected)
        else:
            error = CoordinationUnavailable()
            answered = self.scheduler.abort_shared(error)
            if answered:
                log.warning("%d waiting requests answered 503 coordination_unavailable", answered)
        self._spawn(self._reconnect())

    async def _reconnect(self) -> None:
        try:
            await self._reconnect_once()
        finally:
            self._reconnecting = False

    async def _reconnect_once(self) -> None:
        for attempt in itertools.count():
            await asyncio.sleep(_RECONNECT_SECONDS[min(attempt, len(_RECONNECT_SECONDS) - 1)])
            try:
                await self._join()
            except UNREACHABLE:
                continue
            except (RedisError, GatewayError):
                log.exception("replica %s could not rejoin the shared state", self.replica)
                continue
            log.info("replica %s reaches Redis again: the queue is shared once more", self.replica)
            return

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    def _replies_in(self) -> None:
        self.tickets.settle_early()

    def _args(self, *rest: Arg) -> list[Arg]:
        return [self.store.prefix, self._topology, self.replica, *rest]

    def _run(self, name: str, *rest: Arg) -> Command:
        return ("EVALSHA", self._shas[name], 0, *self._args(*rest))

    def _fleet(self) -> str:
        aging = self.scheduler.waiting_room.aging
        return topology.fleet(
            self.scheduler.roster,
            self.budgets.member_limits,
            aging.period if aging is not None else 0.0,
            self.ttl,
            self._history,
            self._history_ttl,
        )

    def _description(self) -> str:
        mode = "shared" if self.available else ("local" if self.mode == "local" else "unavailable")
        return topology.description(self.replica, self.started, self.scheduler.waiting, self.scheduler.in_flight, mode)

    def fleet_changed(self) -> None:
        """The backends file was reloaded: the scripts see the new pools and members from now."""
        self._topology = self._fleet()

    # Admission ----------------------------------------------------------------------------------------------

    async def admit(self, job: Job) -> None:
        if not self.available and self._joining:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_JOIN_SECONDS):
                    await self._joined.wait()
            if job.ticket is not None:
                return  # the join queued it with the others that waited here
        if not self.available:
            if job.pool is not None and not job.pool.shared:
                return  # served from the local queue now (REDIS_FAILURE_MODE=local)
            error = CoordinationUnavailable()
            self.scheduler.refused(job, error, "coordination_unavailable")
            raise error
        await self.tickets.take(job)

    async def spend(self, key: KeyAccount, cost: int) -> None:
        await self.budgets.spend(key, cost)

    def refund(self, key: KeyAccount, cost: int) -> None:
        self.budgets.refund(key, cost)

    # Ends ------------------------------------------------------------------------------------------------------

    def finished(self, job: Job, used_tokens: int | None) -> None:
        self.tickets.finished(job, used_tokens)

    def requeue(self, job: Job, avoid: Member) -> None:
        self.tickets.requeue(job, avoid)

    def pause(self, member: Member, seconds: float) -> None:
        if not self.available or seconds <= 0:
            return
        milliseconds = max(1, round(seconds * 1000))
        key = self.store.key("pause", member.name)

        self._writer.queue(("SET", key, "1", "PX", milliseconds, "NX"))
        self._writer.queue(("PEXPIRE", key, milliseconds, "GT"))  # a longer pause than one already set wins

    # Heartbeat and inbox ------------------------------------------------------------------------------------

    def _heartbeat(self) -> None:
        if not self.available:
            return
        self._writer.queue(self._run("heartbeat", self._description(), *self.tickets.leases()), self._beaten)
        self._writer.queue(self._run("view"), self._viewed)

    def _beaten(self, result: list[Any]) -> None:
        if result[0]:
            log.warning("replica %s: %d of its leases had expired (was it paused?)", self.replica, result[0])
        self.tickets.granted(result[2:])
        self.tickets.hold(result[1])

    def _viewed(self, result: str) -> None:
        self.view = json.loads(result)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                self._heartbeat()
            except Exception:
                log.exception("the heartbeat failed")

    def gauges(self) -> SharedGauges:
        """The metrics' view of the shared queue, as the last heartbeat saw it."""
        view = self.view if self.available else None
        return SharedGauges(
            up=self.available,
            local=not self.available and self.mode == "local",
            losses=self.losses,
            waiting=view["waiting"] if view is not None else None,
            running=view["running"] if view is not None else None,
            replicas=len(view["replicas"]) if view is not None else None,
        )

    async def shared_view(self) -> dict[str, Any] | None:
        """The shared state now (None while Redis is out of reach)."""
        if not self.available:
            return None
        try:
            self.view = json.loads(await self._writer.call(self._run("view")))
        except CoordinationUnavailable:
            return None
        return self.view
