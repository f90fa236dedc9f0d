"""This replica's tickets in the shared queue: a request's ticket out, its grant in, its lease given back at its end.

A grant may come back with the script that queued or freed something (for this replica), or through the inbox
(app.replicas.inbox) before the reply that names its ticket is in: it waits for that reply (`settle_early`).
A budget or pause that holds the next grant back arms one timer, the earliest, which asks again then.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from typing import Any

from app.errors import CoordinationUnavailable, GatewayError
from app.queue import admission, eta
from app.queue.job import Job
from app.queue.member import Member
from app.queue.scheduler import Scheduler
from app.replicas.budgets import SharedBudgets
from app.replicas.writer import Arg, Command, Writer

log = logging.getLogger("app.replicas")


class Tickets:
    """The tickets of this replica's requests in shared pools, by ticket: waiting, or running on a lease.

    `run(script, *args)` is the command that runs one of the shared queue's scripts; `available()` whether
    Redis answered last; `describe(job)` a request's final record; `ask()` asks the shared queue for what it
    may grant now (a heartbeat).
    """

    def __init__(
        self,
        scheduler: Scheduler,
        writer: Writer,
        run: Callable[..., Command],
        available: Callable[[], bool],
        describe: Callable[[Job], str],
        budgets: SharedBudgets,
        replica: str,
        max_queue_size: int,
        ask: Callable[[], None],
    ):
        self.scheduler = scheduler
        self._writer = writer
        self._run = run
        self._available = available
        self._describe = describe
        self._budgets = budgets
        self._replica = replica
        self._max_queue_size = max_queue_size
        self._ask = ask
        self.jobs: dict[str, Job] = {}
        # Grants that came through the inbox before the reply that names their ticket (it is in the pipeline
        # out now): settled once that reply is in.
        self._early: dict[str, str] = {}
        self._ids = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    async def take(self, job: Job) -> None:
        """Queue a ticket for `job`, just submitted; raise what refuses it (the scheduler has forgotten it then)."""
        key = job.key
        max_queued = key.max_queued if key is not None and key.max_queued is not None else 0
        try:
            result = await self._writer.call(
                self._run("enqueue", *self.enqueue_args(job, "0", max_queued)),
                lambda result: self.admitted(job, result) if result[0] == "ok" else None,
            )
        except CoordinationUnavailable as error:
            if job.pool is not None and not job.pool.shared:
                return  # Redis was lost meanwhile (REDIS_FAILURE_MODE=local): the local queue serves it now
            self.scheduler.refused(job, error, "coordination_unavailable")
            raise
        status = result[0]
        if status == "ok":
            return  # queued, and granted if a slot was free (see admitted)
        refusal: GatewayError
        if status == "conflict":
            refusal, reason = admission.duplicate_id(job.id), "duplicate_request_id"
        elif status == "key_queue_limit":
            assert key is not None
            refusal, reason = admission.key_queue_limit(key, self._place_seconds(job)), "key_queue_limit"
        else:
            waiting = f"{self._max_queue_size} requests waiting across the replicas"
            refusal, reason = admission.queue_full(waiting, self._place_seconds(job)), "queue_full"
        self.scheduler.refused(job, refusal, reason)
        raise refusal

    def enqueue_args(self, job: Job, mode: str, max_queued: int = 0) -> list[Arg]:
        """The enqueue script's arguments for `job` (`mode`: 0 a new request, 1 back at the front, 2 a rejoin)."""
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
            next(self._ids),
        ]

    def admitted(self, job: Job, result: list[Any]) -> None:
        """The enqueue script's reply for `job`: its ticket, the grants it made and how long a budget holds."""
        ticket = result[1]
        log.debug("request %s queued as %s (granted at once: %s)", job.id, ticket, result[3:])
        job.ticket = ticket
        self.jobs[ticket] = job
        self.granted(result[3:])
        self.hold(result[2])
        if job.is_terminal:  # it ended while its ticket was on its way
            self._finished(job, None)

    def lease_again(self, job: Job) -> list[Arg]:
        """The rejoin script's arguments for a request that runs here (a ticket is named for it if it has none)."""
        assert job.member is not None
        if job.ticket is None:
            job.ticket = f"r{next(self._ids)}|{self._replica}"
            self.jobs[job.ticket] = job
        job.lease = job.member.name
        return [job.ticket, job.lease, job.key_name or "", job.id]

    def leases(self) -> list[Arg]:
        """Ticket and member of every lease this replica holds, flat (for the heartbeat that renews them)."""
        leases: list[Arg] = []
        for ticket, job in self.jobs.items():
            if job.lease is not None:
                leases += [ticket, job.lease]
        return leases

    def granted(self, flat: list[Any]) -> None:
        """Grants (ticket, member, flat): dispatch their requests, or give the slot back for one that ended."""
        for ticket, member in zip(flat[::2], flat[1::2], strict=True):
            job = self.jobs.get(ticket)
            if job is None and self._writer.out:
                self._early[ticket] = member
                continue
            log.debug("ticket %s granted %s (request %s)", ticket, member, job.id if job is not None else None)
            if job is not None and self.scheduler.granted(job, member):
                job.lease = member
            else:  # it ended meanwhile: the slot goes on to the next
                self._writer.queue(self._run("release", ticket, member, "", "", "0", "", 0, -1), self.released)

    def settle_early(self) -> None:
        """Every reply is in: a grant whose ticket is still unknown is for a request that ended."""
        early, self._early = self._early, {}
        for ticket, member in early.items():
            self.granted([ticket, member])

    def hold(self, milliseconds: int) -> None:
        """A budget or pause holds the next grant back this long: ask again then (one timer, the earliest)."""
        if milliseconds <= 0:
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + milliseconds / 1000
        if self._timer is not None:
            if self._timer_at <= due:
                return
            self._timer.cancel()
        self._timer_at = due
        self._timer = loop.call_at(due, self._due)

    def _due(self) -> None:
        self._timer = None
        self._ask()

    def released(self, result: list[Any]) -> None:
        """The release script's reply: the grants the freed slot made, and how long a budget holds the next."""
        self.granted(result[1:])
        self.hold(result[0])

    def finished(self, job: Job, used_tokens: int | None) -> None:
        # Once the answer is on its way: its record and the lease's release are no part of its latency.
        asyncio.get_running_loop().call_soon(self._finished, job, used_tokens)

    def _finished(self, job: Job, used_tokens: int | None) -> None:
        ticket = job.ticket
        if ticket is None:
            return
        self.jobs.pop(ticket, None)
        if not self._available():
            return  # Redis forgets it by itself: its lease expires, its ticket goes when this replica rejoins
        record = self._describe(job)
        key = job.key_name or ""
        if job.lease is not None:
            used = -1 if used_tokens is None else used_tokens
            self._writer.queue(
                self._run("release", ticket, job.lease, key, job.id, "1", record, job.cost, used), self.released
            )
            job.lease = None
        else:
            self._writer.queue(self._run("withdraw", ticket, key, job.id, record))
        if job.key is not None and used_tokens is not None and job.started is not None:
            self._budgets.settle(job.key, job.cost, used_tokens)

    def requeue(self, job: Job, avoid: Member) -> None:
        """`job` failed at `avoid` before its client saw a byte: its lease goes, a ticket at the front returns."""
        ticket, lease = job.ticket, job.lease
        if ticket is None or not self._available():
            return
        self.jobs.pop(ticket, None)
        job.lease = None
        if lease is not None:
            self._writer.queue(self._run("release", ticket, lease, "", "", "0", "", job.cost, -1), self.released)
        again = self._run("enqueue", *self.enqueue_args(job, "1"))
        self._writer.queue(again, lambda result: self.admitted(job, result))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _place_seconds(self, job: Job) -> float:
        pool = job.pool
        assert pool is not None
        return eta.pool_wait(pool, 0, job.rank, self.scheduler.clock(), self.scheduler.service.average)
