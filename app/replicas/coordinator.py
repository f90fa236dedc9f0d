"""A replica's side of the shared queue: tickets out, grants in, leases renewed, and life without Redis.

Commands go out through the writer (app.replicas.writer) and need no order between them: a request's
withdrawal or release is only sent once its ticket's reply is in, and a grant read from the inbox before the
reply that names its ticket waits for that reply. Grants for this replica come back with the script that made
them; grants for another are pushed to its inbox, which it reads with a blocking pop: dispatch is driven by
events (a request arriving, a slot freed, a lease expired at a heartbeat, a budget's refill time), never by
polling.
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
from app.queue import admission, eta
from app.queue.job import Job
from app.queue.member import Member
from app.queue.scheduler import Scheduler
from app.replicas import topology
from app.replicas.budgets import SharedBudgets
from app.replicas.inbox import INBOX_SECONDS, Inbox
from app.replicas.lookup import ASK_SECONDS, Lookup
from app.replicas.store import Store
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
        self._max_queue_size = settings.max_queue_size
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
        self._tickets: dict[str, Job] = {}  # this replica's tickets: waiting or running
        # Grants that came through the inbox before the reply that names their ticket (it is in the pipeline
        # out now): settled once that reply is in.
        self._early: dict[str, str] = {}
        self._writer = Writer(self._redis, lambda: self.available, self._lost, self._settle_early)
        self._joined = asyncio.Event()  # set while the shared state is ours to use
        self._tasks: list[asyncio.Task[None]] = []
        self._kick_timer: asyncio.TimerHandle | None = None
        self._kick_at = 0.0
        self._local_ids = itertools.count()
        self._topology = "{}"
        self.budgets = SharedBudgets(
            accounts, settings.replicas_expected, self.mode == "local", self._writer, self._run, lambda: self.available
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
            lambda ticket, member: self._granted([ticket, member]),
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
        if self._kick_timer is not None:
            self._kick_timer.cancel()
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
                if job.ticket is None:
                    job.ticket = f"r{next(self._local_ids)}|{self.replica}"
                    self._tickets[job.ticket] = job
                job.lease = job.member.name
                running += [job.ticket, job.lease, job.key_name or "", job.id]
            elif job.state is JobState.QUEUED and job.waiting_in is not None:
                waiting.append(job)
        pipe = self._redis.pipeline(transaction=False)
        pipe.evalsha(self._shas["rejoin"], 0, *self._args(self._description(), *running))
        for job in waiting:
            pipe.evalsha(self._shas["enqueue"], 0, *self._args(*self._enqueue_args(job, "2")))
        results = await pipe.execute()
        self.available = True
        self._joined.set()
        if results[0]:
            log.info("replica %s: %d tickets of its own from before were dropped", self.replica, results[0])
        for job, result in zip(waiting, results[1:], strict=True):
            self._admitted(job, result)

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

    def _settle_early(self) -> None:
        """Every reply is in: a grant whose ticket is still unknown is for a request that ended."""
        early, self._early = self._early, {}
        for ticket, member in early.items():
            self._granted([ticket, member])

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
        key = job.key
        max_queued = key.max_queued if key is not None and key.max_queued is not None else 0
        try:
            result = await self._writer.call(
                self._run("enqueue", *self._enqueue_args(job, "0", max_queued)),
                lambda result: self._admitted(job, result) if result[0] == "ok" else None,
            )
        except CoordinationUnavailable as error:
            if job.pool is not None and not job.pool.shared:
                return  # Redis was lost meanwhile (REDIS_FAILURE_MODE=local): the local queue serves it now
            self.scheduler.refused(job, error, "coordination_unavailable")
            raise
        status = result[0]
        if status == "ok":
            return  # queued, and granted if a slot was free (see _admitted)
        refusal: GatewayError
        if status == "conflict":
            refusal, reason = admission.duplicate_id(job.id), "duplicate_request_id"
        elif status == "key_queue_limit":
            assert key is not None
            refusal, reason = admission.key_queue_limit(key, _place_seconds(self.scheduler, job)), "key_queue_limit"
        else:
            waiting = f"{self._max_queue_size} requests waiting across the replicas"
            refusal, reason = admission.queue_full(waiting, _place_seconds(self.scheduler, job)), "queue_full"
        self.scheduler.refused(job, refusal, reason)
        raise refusal

    def _enqueue_args(self, job: Job, mode: str, max_queued: int = 0) -> list[Arg]:
        pool = job.pool
        assert pool is not None
        return [
            pool.model,
            job.rank,
            job.priority.rank,
            job.key_name or "",
            job.cost,
            job.id,
            "" if job.affinity is None else str(job.affinity),
            self._max_queue_size,
            max_queued,
            mode,
            job.avoid.name if job.avoid is not None else "",
            next(self._local_ids),
        ]

    def _admitted(self, job: Job, result: list[Any]) -> None:
        ticket = result[1]
        log.debug("request %s queued as %s (granted at once: %s)", job.id, ticket, result[3:])
        job.ticket = ticket
        self._tickets[ticket] = job
        self._granted(result[3:])
        self._hold(result[2])
        if job.is_terminal:  # it ended while its ticket was on its way
            self._finished(job, None)

    async def spend(self, key: KeyAccount, cost: int) -> None:
        await self.budgets.spend(key, cost)

    def refund(self, key: KeyAccount, cost: int) -> None:
        self.budgets.refund(key, cost)

    # Dispatch -------------------------------------------------------------------------------------------------

    def _granted(self, flat: list[Any]) -> None:
        for ticket, member in zip(flat[::2], flat[1::2], strict=True):
            job = self._tickets.get(ticket)
            if job is None and self._writer.out:
                self._early[ticket] = member
                continue
            log.debug("ticket %s granted %s (request %s)", ticket, member, job.id if job is not None else None)
            if job is not None and self.scheduler.granted(job, member):
                job.lease = member
            else:  # it ended meanwhile: the slot goes on to the next
                self._writer.queue(self._run("release", ticket, member, "", "", "0", "", 0, -1), self._released)

    def _hold(self, milliseconds: int) -> None:
        """A budget or pause holds the next grant back this long: ask again then (one timer, the earliest)."""
        if milliseconds <= 0:
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + milliseconds / 1000
        if self._kick_timer is not None:
            if self._kick_at <= due:
                return
            self._kick_timer.cancel()
        self._kick_at = due
        self._kick_timer = loop.call_at(due, self._kick)

    def _kick(self) -> None:
        self._kick_timer = None
        self._heartbeat()

    def finished(self, job: Job, used_tokens: int | None) -> None:
        # Once the answer is on its way: its record and the lease's release are no part of its latency.
        asyncio.get_running_loop().call_soon(self._finished, job, used_tokens)

    def _finished(self, job: Job, used_tokens: int | None) -> None:
        ticket = job.ticket
        if ticket is None:
            return
        self._tickets.pop(ticket, None)
        if not self.available:
            return  # Redis forgets it by itself: its lease expires, its ticket goes when this replica rejoins
        record = self._describe(job)
        key = job.key_name or ""
        if job.lease is not None:
            used = -1 if used_tokens is None else used_tokens
            self._writer.queue(
                self._run("release", ticket, job.lease, key, job.id, "1", record, job.cost, used), self._released
            )
            job.lease = None
        else:
            self._writer.queue(self._run("withdraw", ticket, key, job.id, record))
        if job.key is not None and used_tokens is not None and job.started is not None:
            self.budgets.settle(job.key, job.cost, used_tokens)

    def requeue(self, job: Job, avoid: Member) -> None:
        ticket, lease = job.ticket, job.lease
        if ticket is None or not self.available:
            return
        self._tickets.pop(ticket, None)
        job.lease = None
        if lease is not None:
            self._writer.queue(self._run("release", ticket, lease, "", "", "0", "", job.cost, -1), self._released)
        self._writer.queue(
            self._run("enqueue", *self._enqueue_args(job, "1")), lambda result: self._admitted(job, result)
        )

    def _released(self, result: list[Any]) -> None:
        self._granted(result[1:])
        self._hold(result[0])

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
        leases: list[Arg] = []
        for ticket, job in self._tickets.items():
            if job.lease is not None:
                leases += [ticket, job.lease]
        self._writer.queue(self._run("heartbeat", self._description(), *leases), self._beaten)
        self._writer.queue(self._run("view"), self._viewed)

    def _beaten(self, result: list[Any]) -> None:
        if result[0]:
            log.warning("replica %s: %d of its leases had expired (was it paused?)", self.replica, result[0])
        self._granted(result[2:])
        self._hold(result[1])

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


def _place_seconds(scheduler: Scheduler, job: Job) -> float:
    pool = job.pool
    assert pool is not None
    return eta.pool_wait(pool, 0, job.rank, scheduler.clock(), scheduler.service.average)
