"""The bounded priority queue in front of the backends: a request's life, from its admission to its end.

Requests wait in the pool of their model (app.queue.pool), one priority queue per pool, so a model whose
backends are busy never delays another; MAX_QUEUE_SIZE bounds them all together (app.queue.waiting holds the
queues and the overflow behind them; app.queue.roster the members and their pools). The scheduler owns each
request's life: app.queue.admission decides whether it may wait, app.queue.dispatcher moves it onto a slot
(the best head among the pools a freed slot's member serves) and off again, and retire() ends it.

The event loop is the one owner of this state: every method runs to completion without awaiting, so no
lock is needed and nothing polls. Dispatch happens the moment a slot frees or a request arrives.
A request ends in one place, retire(), which the completion service calls once per request it admitted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from app.backends.base import Usage
from app.errors import GatewayError, RequestTimeout, ShuttingDown
from app.limits.breaker import BreakerState
from app.limits.keys import KeyAccount
from app.metrics import Metrics
from app.queue import admission, eta, preemption
from app.queue.admission import Admission
from app.queue.aging import Aging
from app.queue.deadlines import Deadlines
from app.queue.dispatcher import Dispatcher
from app.queue.gate import DispatchGate
from app.queue.job import Job, Totals, terminal_state
from app.queue.member import Member
from app.queue.pool import Routing
from app.queue.registry import Registry
from app.queue.roster import Roster
from app.queue.service_time import ServiceTime
from app.queue.shared import SharedQueue
from app.queue.timeline import Timeline
from app.queue.waiting import WaitingRoom
from app.settings import QueueFullBehavior
from app.types import INTERACTIVE, CompletionKind, JobState, Priority

log = logging.getLogger("app.queue")


class Scheduler:
    """Admits, orders, dispatches and retires requests; see the module docstring.

    `members` are the fleet's backends (see set_members); without them, one member of `max_concurrent`
    slots behind `gate` serves any model (the scheduler alone, as its tests and benchmarks use it).
    """

    def __init__(
        self,
        *,
        max_queue_size: int,
        request_timeout: float,
        full_behavior: QueueFullBehavior,
        history_size: int,
        metrics: Metrics,
        members: list[Member] | None = None,
        max_concurrent: int = 1,
        gate: DispatchGate | None = None,
        aliases: Mapping[str, str] | None = None,
        routing: Routing = Routing.AFFINITY,
        aging_seconds: float | None = None,
        dispatch_margin: float = 0.0,
        deadline_admission: bool = True,
        preempt_max: int = 0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.request_timeout = request_timeout
        self.totals = Totals()
        self.draining = False
        self.service = ServiceTime(1)  # how long a request holds a slot, and the waits it implies
        self.timeline = Timeline()  # the last minutes, for the dashboard (sampled by the app, fed here)
        self._metrics = metrics
        self.clock = clock  # monotonic seconds: the jobs' times are on it
        self._wall_clock = wall_clock
        self.roster = Roster(routing)  # the members and the pools of their models
        aging = Aging(aging_seconds, len(INTERACTIVE)) if aging_seconds else None
        self.waiting_room = WaitingRoom(max_queue_size, aging, clock)  # where requests wait
        self.registry = Registry(history_size)  # the requests known by id, live and ended
        self.admission = Admission(
            self.waiting_room,
            self.registry,
            self.service,
            self.totals,
            metrics,
            full_behavior=full_behavior,
            deadline_admission=deadline_admission,
            clock=clock,
        )
        self.dispatcher = Dispatcher(
            self.roster,
            self.waiting_room,
            self.service,
            self.timeline,
            metrics,
            dispatch_margin=dispatch_margin,
            preempt_max=preempt_max,
            clock=clock,
        )
        self._deadlines = Deadlines(clock, self._expire)
        # REDIS_URL: the replicas' shared queue, and whether it dispatches now (else this replica serves alone).
        self.shared: SharedQueue | None = None
        self.sharing = False
        self.set_members(members if members is not None else [Member("default", max_concurrent, gate=gate)], aliases)

    # The fleet ------------------------------------------------------------------------------------------

    def set_members(self, members: list[Member], aliases: Mapping[str, str] | None = None) -> None:
        """Serve with these members from now on (at start, and at each reload); requests waiting stay.

        A pool no member serves any more answers what waits in it 503 (see Roster.replace).
        """
        roster = self.roster
        for pool in roster.replace(members, aliases):
            self.dispatcher.close_pool(pool)
        self.waiting_room.serve(roster.pool_list)
        self.service.slots = max(1, sum(member.max_concurrent for member in members))
        roster.share(self.sharing)
        if self.shared is not None:
            self.shared.fleet_changed()
        self.dispatch()

    def share(self, shared: SharedQueue | None, active: bool = True, replicas: int = 1) -> None:
        """Dispatch the pools whose members are all proxies through `shared` from now on (`active`), or serve
        them from here alone with 1/`replicas` of their slots (the shared queue is out of reach)."""
        self.shared = shared
        self.sharing = shared is not None and active
        self.roster.share(self.sharing, replicas if shared is not None and not active else 1)
        self.dispatch()

    # Admission and dispatch ------------------------------------------------------------------------------

    def submit(
        self,
        request_id: str,
        kind: CompletionKind,
        priority: Priority,
        key: KeyAccount | None,
        cost: int = 0,
        model: str | None = None,
        affinity: int | None = None,
        timeout: float | None = None,
        choices: int = 1,
        size: int = 0,
    ) -> Job:
        """Accept a request for `model`: dispatch it now if a member is free, else queue it; raise if it cannot wait.

        `cost` is what the request is charged in tokens when it is dispatched; `key` is its client key's
        account, whose waiting count it joins while it waits; `affinity` names its conversation; `timeout` is
        the client's own limit in seconds, which applies when it is shorter than REQUEST_TIMEOUT; `choices` is
        its n, which at the local model takes a slot per choice; `size` its max_tokens, which its expected
        time at a slot grows with (app.queue.eta).
        """
        if self.draining:
            self.admission.count(priority, "shutting_down")
            raise ShuttingDown()
        pool = self.roster.pool_for(model)
        at_once = not pool.shared and not pool.queue.size and pool.has_room(priority.rank, choices)
        full = self.admission.check(pool, request_id, priority, key, choices, at_once)
        room = self.waiting_room
        now = self.clock()
        lifetime = admission.lifetime(self.request_timeout, timeout, priority is Priority.BATCH)
        expected = None if at_once else self.admission.expected_wait(pool, priority, key, lifetime, full, now)
        pool.arrivals[priority.rank].arrived(now)
        deadline = now + lifetime
        job = Job(
            request_id, kind, priority, key, now, self._wall_clock(), deadline, cost, model, affinity, choices, size
        )
        job.pool = pool
        job.eta = expected
        self.registry.add(job)
        self.totals.queued += 1
        self._deadlines.add(job)
        if at_once:
            # A fleet of one: has_room() found its slot free and its gate idle. Several: routing picks.
            member = pool.members[0] if len(pool.members) == 1 else pool.choose(job, now, self.dispatch)
            if member is not None:
                self.dispatcher.start(job, member, now)
                return job
        if key is not None:
            key.joined()
        if full:
            room.wait_for_space(job)
        else:
            room.enqueue(job, now)
            if pool.shared:
                return job  # its ticket goes to the shared queue next (see refused() and granted())
            if pool.has_free_slot():
                self.dispatcher.run(now)  # only a gate holds a request back from a free slot: it arms its timer
            elif not job.rank and self.dispatcher.preempt_max and pool.preemptive:
                self.dispatcher.run(now)  # every slot is busy: lower-priority work may give its slot up
        return job

    def sheds(self) -> bool:
        """Whether a new request would now be refused for a full queue, and for nothing that comes first
        (Admission.sheds)."""
        return not self.draining and self.admission.sheds()

    def dispatch(self) -> None:
        """Dispatch what the slots and the gates allow now (Dispatcher.dispatch)."""
        self.dispatcher.dispatch()

    def granted(self, job: Job, member_name: str) -> bool:
        """The shared queue gave `job` a slot at the member of that name (Dispatcher.granted)."""
        return self.dispatcher.granted(job, member_name, self.clock())

    def refused(self, job: Job, error: GatewayError, reason: str) -> None:
        """The shared queue refused `job` (a full queue, its key's max_queued, an id live elsewhere): it was
        never accepted, so it leaves no trace but the rejection (`reason`, one of metrics.REJECTION_REASONS)."""
        self.dispatcher.unqueue(job)
        if job.watched:
            self._deadlines.discard(job)
        self.registry.drop(job)
        self.totals.queued -= 1
        job.error = error
        job.mark_finished(terminal_state(error), self.clock())
        self.admission.count(job.priority, reason)

    def abort_shared(self, error: GatewayError) -> int:
        """Answer `error` to every request waiting for a shared pool (its queue is out of reach); how many."""
        waiting = [job for job in self.waiting_room.jobs() if job.pool is not None and job.pool.shared]
        for job in waiting:
            self.abort(job, error)
        return len(waiting)

    def paused(self, member: Member, seconds: float) -> None:
        """`member`'s upstream asked for a pause: the other replicas hold their requests for it too."""
        if self.shared is not None and member.kind == "proxy":
            self.shared.pause(member, seconds)

    def reroute(self, job: Job, error: GatewayError, retry: bool = True) -> bool:
        """A request failed at its member before its client saw a byte: send it back to wait for another,
        False if it cannot (Dispatcher.reroute)."""
        if not self.dispatcher.reroute(job, error, retry, self.clock()):
            return False
        if job.pool is not None and job.pool.shared and self.shared is not None:
            assert job.avoid is not None
            self.shared.requeue(job, job.avoid)
        return True

    def breaker_changed(self, state: BreakerState) -> None:
        """The breaker of the one member changed (the scheduler alone, as its tests use it)."""
        self.member_changed(next(iter(self.roster.members.values())), state)

    def member_changed(self, member: Member, state: BreakerState) -> None:
        """A member's breaker opened (what waits for a pool it leaves without members is answered 503 now),
        or it lets traffic go again (dispatch)."""
        if state is not BreakerState.OPEN:
            self.dispatch()
            return
        if member.gate is not None and member.gate.breaker is not None:
            self.paused(member, member.gate.breaker.retry_after())
        self.dispatcher.member_down(member)

    # Ending -----------------------------------------------------------------------------------------------

    def abort(self, job: Job, error: GatewayError) -> bool:
        """Stop a request for `error`, wherever it is; False if it had already ended (Dispatcher.abort)."""
        return self.dispatcher.abort(job, error)

    def retire(self, job: Job, error: GatewayError | None, usage: Usage | None) -> None:
        """End a request: record how it ended, free what it held, settle its budgets, dispatch the next.

        Called exactly once per submitted request, by the code that serves it.
        """
        assert job.finished is None, f"request {job.id} retired twice"
        now = self.clock()
        state = terminal_state(error)
        if job.watched:
            self._deadlines.discard(job)
        if job.waiting_in is not None:  # it ended before its turn came (a timeout, a cancel)
            self.dispatcher.unqueue(job)
        used = None if usage is None else usage.total_tokens
        if job.key is not None and job.cost:
            spent = 0 if job.started is None else used
            if spent is not None:  # else the backend did not say, and the estimate stands
                job.key.settle(job.cost, spent)
        member = job.member
        if member is not None and member.gate is not None:
            member.gate.ended(job, used)
        if job.parked:
            assert member is not None
            preemption.unpark(job, member)
            self.roster.check_retired(member)
        if usage is not None:
            self._metrics.tokens(usage.prompt_tokens, usage.completion_tokens)
        if job.slot is not None:
            assert member is not None
            self.dispatcher.ended(job, member, state, now)
        if error is not None and job.error is None:
            job.error = error
        job.mark_finished(state, now)
        self.totals.ended(state)
        self._metrics.finished(job.priority, state, now - job.arrived)
        self.registry.ended(job)
        if job.ticket is not None and self.shared is not None:
            self.shared.finished(job, used)
        self.dispatcher.run(now)

    def _expire(self, job: Job) -> None:
        where = "in the queue" if job.started is None else "at the backend"
        self.abort(job, RequestTimeout(f"request timed out after {job.deadline - job.arrived:g}s ({where})"))

    def drain(self) -> None:
        """Stop taking work and answer every waiting request 503; running ones go on to the end."""
        if self.draining:
            return
        self.draining = True
        waiting = self.waiting_room.jobs()
        for job in waiting:
            self.abort(job, ShuttingDown())
        log.info("draining: %d waiting requests answered 503, %d running", len(waiting), self.in_flight)

    def close(self) -> None:
        """Stop everything still running (the drain grace period is over)."""
        self.drain()
        for job in self.registry.alive():
            self.abort(job, ShuttingDown("the gateway stopped before this request finished"))
        self._deadlines.close()
        self.roster.close()

    # Reading ----------------------------------------------------------------------------------------------
    # The counts of what waits and what runs are the waiting room's and the roster's; these two are asked
    # everywhere.

    @property
    def in_flight(self) -> int:
        """Slots busy at the backends now (see Roster.in_flight)."""
        return self.roster.in_flight

    @property
    def waiting(self) -> int:
        """Requests waiting, overflow included."""
        room = self.waiting_room
        return room.in_queue + room.for_space

    def eta(self, job: Job) -> float | None:
        """Estimated seconds until a waiting request is dispatched (app.queue.eta); None once it is not waiting."""
        if job.state is not JobState.QUEUED or job.pool is None:
            return None
        place = self.waiting_room.position(job)
        return (
            None if place is None else eta.pool_wait(job.pool, place - 1, job.rank, self.clock(), self.service.average)
        )
