"""A request's life in the queue: its identity, state, timestamps, and the means to stop its work."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from app.errors import (
    ClientDisconnected,
    GatewayError,
    RequestCancelled,
    RequestTimeout,
    ShuttingDown,
)
from app.types import CompletionKind, JobState, Priority

if TYPE_CHECKING:
    from app.backends.base import Turn
    from app.limits.keys import KeyAccount
    from app.queue.member import Member
    from app.queue.pool import Pool
    from app.queue.slots import Slot


def terminal_state(error: GatewayError | None) -> JobState:
    """The state a request ends in, given what ended it."""
    if error is None:
        return JobState.COMPLETED
    if isinstance(error, RequestTimeout):
        return JobState.TIMEOUT
    if isinstance(error, RequestCancelled | ClientDisconnected | ShuttingDown):
        return JobState.CANCELLED
    return JobState.FAILED


@dataclass(slots=True)
class Totals:
    """Requests counted since start, by how they ended (rejected: refused before they were queued)."""

    queued: int = 0
    completed: int = 0
    failed: int = 0
    rejected: int = 0
    timeout: int = 0
    cancelled: int = 0

    def ended(self, state: JobState) -> None:
        """Count a request that ended in `state`."""
        if state is JobState.COMPLETED:
            self.completed += 1
        elif state is JobState.FAILED:
            self.failed += 1
        elif state is JobState.TIMEOUT:
            self.timeout += 1
        else:
            self.cancelled += 1


class Job:
    """One accepted request. Only the scheduler changes its state; times are monotonic seconds."""

    __slots__ = (
        "_dispatched",
        "_finished_waiters",
        "_scope",
        "affinity",
        "arrived",
        "arrived_wall",
        "avoid",
        "choices",
        "cost",
        "deadline",
        "error",
        "error_message",
        "eta",
        "extra_slots",
        "finished",
        "id",
        "key",
        "kind",
        "lease",
        "member",
        "model",
        "parked",
        "parked_for",
        "parked_since",
        "pool",
        "preemptions",
        "priority",
        "rank",
        "size",
        "slot",
        "slot_taken",
        "started",
        "state",
        "ticket",
        "turn",
        "turn_key",
        "waiting_in",
        "waiting_level",
        "watched",
    )

    def __init__(
        self,
        id: str,
        kind: CompletionKind,
        priority: Priority,
        key: KeyAccount | None,
        arrived: float,
        arrived_wall: float,
        deadline: float,
        cost: int = 0,
        model: str | None = None,
        affinity: int | None = None,
        choices: int = 1,
        size: int = 0,
    ):
        self.id = id
        self.kind = kind
        self.priority = priority
        self.rank = priority.rank  # the level it waits at: its priority's, or higher once aging raised it
        self.key = key  # the client key's account; None with authentication off
        self.arrived = arrived
        self.arrived_wall = arrived_wall
        self.deadline = deadline
        self.state = JobState.QUEUED
        self.started: float | None = None
        self.finished: float | None = None
        self.error: GatewayError | None = None  # what ends it, until it has ended
        self.error_message: str | None = None  # what ended it, once it has
        self.slot: Slot | None = None
        self.choices = choices  # n: at the local model, each choice decodes in a slot of its own (Member.slots_for)
        self.extra_slots: tuple[Slot, ...] = ()  # the slots past the first it holds, while it runs
        self.waiting_in: object | None = None  # the PriorityQueue this job waits in, if any
        self.waiting_level: object | None = None  # and the level there (the queue's own bookkeeping)
        self.turn_key: object = None  # whose turn it takes in the queue's round robin
        self.size = size  # max_tokens (its choices generate side by side): what its time at a slot grows with
        self.cost = cost  # tokens charged to the budgets: estimated prompt + max_tokens (0 when none counts tokens)
        self.model = model  # the model asked for, after aliases
        self.affinity = affinity  # the conversation it belongs to (see app.queue.affinity), if its pool cares
        self.pool: Pool | None = None  # the pool it waits in or was dispatched from
        self.member: Member | None = None  # the member it runs at, while it does
        self.avoid: Member | None = None  # the member it just failed at: not to be tried again next
        self.eta: float | None = None  # the wait estimated at arrival (app.queue.eta); None if it did not wait
        self.turn: Turn | None = None  # how its backend lets it be paused, while it runs at one that can
        self.slot_taken: float | None = None  # when it last took a slot (dispatched, or resumed)
        self.parked = False  # preempted: off its slot, waiting to resume at its member (job.member)
        self.parked_since = 0.0
        self.parked_for = 0.0  # seconds spent parked, left out of its service time
        self.preemptions = 0  # times it was parked (at most PREEMPT_MAX)
        self.watched = False  # whether the scheduler's Deadlines still watch this job
        self.ticket: str | None = None  # its ticket in the replicas' shared queue (app.queue.shared), if any
        self.lease: str | None = None  # the member whose shared slot it holds, while it does
        self._dispatched: asyncio.Future[None] | None = None
        self._scope: AbortScope | None = None
        self._finished_waiters: list[asyncio.Future[None]] | None = None

    @property
    def key_name(self) -> str | None:
        """The name of the client key that sent it; None with authentication off."""
        return None if self.key is None else self.key.name

    @property
    def is_terminal(self) -> bool:
        """Whether the request has ended (mark_finished is the one place that sets `finished`)."""
        return self.finished is not None

    def wall_time(self, monotonic: float | None) -> float | None:
        """A monotonic instant of this job as seconds since the epoch."""
        return None if monotonic is None else self.arrived_wall + (monotonic - self.arrived)

    async def dispatched(self) -> None:
        """Return once the scheduler gives this job a backend slot; raise what ended it otherwise."""
        if self.state is JobState.PROCESSING:
            return
        if self.error is not None:
            raise self.error
        if self._dispatched is None:
            self._dispatched = asyncio.get_running_loop().create_future()
        await self._dispatched

    async def dispatched_within(self, seconds: float) -> bool:
        """Like dispatched(), but False once `seconds` have passed with the job still waiting."""
        if self.state is JobState.PROCESSING:
            return True
        if self.error is not None:
            raise self.error
        if self._dispatched is None:
            self._dispatched = asyncio.get_running_loop().create_future()
        future = self._dispatched
        done, _ = await asyncio.wait((future,), timeout=seconds)
        if not done:
            return False
        if future.cancelled():  # it ended without a word to its waiter: its error says how
            raise self.error if self.error is not None else RequestCancelled("the request ended while waiting")
        future.result()
        return True

    def abortable(self) -> AbortScope:
        """A scope whose body is stopped, raising the job's error, if the job is aborted meanwhile."""
        return AbortScope(self)

    async def wait_finished(self) -> None:
        """Return once the job has reached a terminal state."""
        if self.is_terminal:
            return
        future = asyncio.get_running_loop().create_future()
        if self._finished_waiters is None:
            self._finished_waiters = []
        self._finished_waiters.append(future)
        await future

    # The scheduler's side -------------------------------------------------------------------------------

    def mark_dispatched(self) -> None:
        """Wake the request's handler: its turn has come."""
        self.state = JobState.PROCESSING
        if self._dispatched is not None and not self._dispatched.done():
            self._dispatched.set_result(None)

    def mark_requeued(self) -> None:
        """It failed at its member before its client saw a byte, and waits again, for another member."""
        self.state = JobState.QUEUED
        self._dispatched = None

    def interrupt(self, error: GatewayError) -> None:
        """Make the handler raise `error`: at once if it waits for a slot, else inside its abort scope."""
        if self.error is None:
            self.error = error
        if self._dispatched is not None and not self._dispatched.done():
            self._dispatched.set_exception(self.error)
        if self._scope is not None:
            self._scope.cancel()

    def mark_finished(self, state: JobState, now: float) -> None:
        """Record the terminal state and release whoever waits for it."""
        self.state = state
        self.finished = now
        # The error's traceback holds the handler's frames, and with them the request's body: only its words
        # stay, so a finished job is a small record (the history keeps REQUEST_HISTORY_SIZE of them, and the
        # lazy structures, deadlines and queue levels, keep some until they compact).
        if self.error is not None:
            self.error_message = self.error.message
            self.error = None
        self._scope = None
        if self._dispatched is not None and not self._dispatched.done():
            # Nobody awaits it any more; mark the exception as retrieved so asyncio does not log it.
            self._dispatched.cancel()
        self._dispatched = None
        if self._finished_waiters:
            for waiter in self._finished_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._finished_waiters = None


class AbortScope:
    """Like asyncio.timeout(), but fired by Job.interrupt(): the task is cancelled and the job's error raised.

    Used as `with job.abortable(): await work()`, inside the task to stop. Interrupts come from other tasks or
    callbacks (a timer, a disconnect watcher, a DELETE), so the scoped task is always suspended inside the
    scope when its cancellation is requested, and the CancelledError surfaces inside it. Entering and leaving
    await nothing, so it is a plain context manager.
    """

    __slots__ = ("_cancelled", "_job", "_task")

    def __init__(self, job: Job):
        self._job = job
        self._task: asyncio.Task[object] | None = None
        self._cancelled = False

    def __enter__(self) -> None:
        job = self._job
        if job.error is not None:
            raise job.error
        self._task = asyncio.current_task()
        job._scope = self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        job = self._job
        if job._scope is self:
            job._scope = None
        if self._cancelled and self._task is not None:
            if self._task.uncancel() > 0 and exc_type is asyncio.CancelledError:
                return  # someone else cancelled the task too: let their cancellation go on
            assert job.error is not None
            # The error raised here keeps this frame in its traceback: were the CancelledError still one of its
            # locals, the two would form a cycle that holds the request's frames, and its body, until the
            # cyclic collector runs.
            del exc, tb
            raise job.error from None

    def cancel(self) -> None:
        """Stop the scoped work (idempotent)."""
        if not self._cancelled and self._task is not None:
            self._cancelled = True
            self._task.cancel()
