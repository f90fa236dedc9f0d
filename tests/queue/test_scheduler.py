"""The scheduler alone, on a fake clock: ordering, bounds, aborts, exactly-once accounting. No sleeping."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from app.errors import Conflict, QueueFull, RequestCancelled, RequestTimeout, ShuttingDown
from app.metrics import Metrics
from app.queue.scheduler import Scheduler
from app.settings import QueueFullBehavior
from app.types import JobState, Priority
from testkit.clock import FakeClock

pytestmark = pytest.mark.anyio


def make(
    concurrency: int = 1, queue: int = 10, behavior: QueueFullBehavior = QueueFullBehavior.REJECT, history: int = 100
) -> tuple[Scheduler, FakeClock, CollectorRegistry]:
    clock = FakeClock()
    registry = CollectorRegistry()
    scheduler = Scheduler(
        max_concurrent=concurrency,
        max_queue_size=queue,
        request_timeout=60,
        full_behavior=behavior,
        history_size=history,
        metrics=Metrics(registry),
        clock=clock,
        wall_clock=lambda: 5000.0 + clock.now,
    )
    return scheduler, clock, registry


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_dispatches_at_once_when_idle_then_queues_by_priority_and_arrival() -> None:
    s, _, _ = make(concurrency=1)
    running = s.submit("r", "chat", Priority.LOW, None)
    assert running.state is JobState.PROCESSING
    order = [
        ("l1", Priority.LOW),
        ("n1", Priority.NORMAL),
        ("h1", Priority.HIGH),
        ("l2", Priority.LOW),
        ("h2", Priority.HIGH),
        ("n2", Priority.NORMAL),
    ]
    jobs = {rid: s.submit(rid, "chat", p, None) for rid, p in order}
    assert s.waiting_room.sizes() == {"high": 2, "normal": 2, "low": 2, "batch": 0}
    assert [s.waiting_room.position(jobs[r]) for r in ("h1", "h2", "n1", "n2", "l1", "l2")] == [1, 2, 3, 4, 5, 6]

    served = []
    current = running
    for _ in range(6):
        s.retire(current, None, None)
        current = next(j for j in jobs.values() if j.state is JobState.PROCESSING)
        served.append(current.id)
    assert served == ["h1", "h2", "n1", "n2", "l1", "l2"]


async def test_full_queue_rejects_with_retry_after_from_measured_service_time() -> None:
    s, clock, registry = make(concurrency=2, queue=2)
    a = s.submit("a", "chat", Priority.NORMAL, None)
    s.submit("b", "chat", Priority.NORMAL, None)
    clock.now += 4.0
    s.retire(a, None, None)  # measured: a request holds a slot for 4 s
    s.submit("c", "chat", Priority.NORMAL, None)  # takes the free slot
    s.submit("d", "chat", Priority.NORMAL, None)
    s.submit("e", "chat", Priority.NORMAL, None)
    with pytest.raises(QueueFull) as caught:
        s.submit("f", "chat", Priority.HIGH, None)
    # One place frees about every 4 s / 2 slots: the first refused comes back after one, the next after two.
    first = caught.value.retry_after
    assert 2.0 <= first <= 3.0
    assert caught.value.headers["retry-after-ms"] == str(round(first * 1000))
    with pytest.raises(QueueFull) as again:
        s.submit("g", "chat", Priority.HIGH, None)
    assert 4.0 <= again.value.retry_after <= 5.0
    clock.now += 10.0  # the appointments have passed: the next refused gets the first place again
    with pytest.raises(QueueFull) as later:
        s.submit("h", "chat", Priority.HIGH, None)
    assert 2.0 <= later.value.retry_after <= 3.0
    assert s.totals.rejected == 3
    assert sample(registry, "gateway_requests_total", priority="high", outcome="rejected") == 3


async def test_retry_after_before_any_measure_is_one_second_a_place() -> None:
    s, _, _ = make(concurrency=1, queue=1)
    s.submit("a", "chat", Priority.NORMAL, None)
    s.submit("b", "chat", Priority.NORMAL, None)
    waits = []
    for name in ("c", "d", "e"):
        with pytest.raises(QueueFull) as caught:
            s.submit(name, "chat", Priority.NORMAL, None)
        waits.append(caught.value.retry_after)
    assert [int(wait) for wait in waits] == [1, 2, 3]  # one place apart, each with up to half a place of jitter


async def test_waiting_job_aborted_leaves_queue_and_its_waiter_raises() -> None:
    s, _, _ = make(concurrency=1)
    s.submit("a", "chat", Priority.NORMAL, None)
    b = s.submit("b", "chat", Priority.NORMAL, None)
    waiter = asyncio.ensure_future(b.dispatched())
    await asyncio.sleep(0)
    assert s.abort(b, RequestCancelled("stop"))
    assert s.waiting == 0  # out of the queue at once
    with pytest.raises(RequestCancelled):
        await waiter
    s.retire(b, b.error, None)  # what its handler does once woken
    assert b.state is JobState.CANCELLED
    assert not s.abort(b, RequestCancelled("again"))
    assert s.totals.cancelled == 1


async def test_running_job_aborted_inside_scope_raises_its_error_and_frees_slot() -> None:
    s, _, _ = make(concurrency=1)
    a = s.submit("a", "chat", Priority.NORMAL, None)
    b = s.submit("b", "chat", Priority.NORMAL, None)
    started = asyncio.Event()

    async def work() -> None:
        await a.dispatched()
        with a.abortable():
            started.set()
            await asyncio.Event().wait()

    task = asyncio.ensure_future(work())
    await started.wait()
    s.abort(a, RequestTimeout("too slow"))
    with pytest.raises(RequestTimeout):
        await task
    assert not task.cancelled()  # the scope turned the cancellation into the job's error
    s.retire(a, a.error, None)
    assert a.state is JobState.TIMEOUT and b.state is JobState.PROCESSING
    assert s.roster.slots[0].errors == 1


async def test_outside_cancellation_is_not_swallowed_by_the_scope() -> None:
    s, _, _ = make()
    a = s.submit("a", "chat", Priority.NORMAL, None)
    started = asyncio.Event()

    async def work() -> None:
        with a.abortable():
            started.set()
            await asyncio.Event().wait()

    task = asyncio.ensure_future(work())
    await started.wait()
    task.cancel()
    s.abort(a, RequestCancelled("and also this"))
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_every_job_ends_exactly_once() -> None:
    s, _, registry = make(concurrency=1)
    a = s.submit("a", "chat", Priority.NORMAL, None)
    s.retire(a, None, None)
    with pytest.raises(AssertionError, match="retired twice"):
        s.retire(a, RequestTimeout("late"), None)
    assert not s.abort(a, RequestCancelled("late"))
    assert a.state is JobState.COMPLETED
    assert s.totals.completed == 1 and s.totals.timeout == 0 and s.totals.cancelled == 0
    assert sample(registry, "gateway_requests_total", priority="normal", outcome="completed") == 1
    assert sample(registry, "gateway_requests_total", priority="normal", outcome="timeout") == 0


async def test_duplicate_live_id_conflicts_but_finished_id_may_be_reused() -> None:
    s, _, _ = make(concurrency=1)
    a = s.submit("same", "chat", Priority.NORMAL, None)
    with pytest.raises(Conflict):
        s.submit("same", "chat", Priority.NORMAL, None)
    s.retire(a, None, None)
    again = s.submit("same", "chat", Priority.NORMAL, None)
    assert s.registry.lookup("same", None) is again


async def test_history_is_bounded() -> None:
    s, _, _ = make(concurrency=1, history=3)
    for i in range(10):
        s.retire(s.submit(f"r{i}", "completion", Priority.NORMAL, None), None, None)
    assert [s.registry.lookup(f"r{i}", None) is not None for i in range(10)] == [False] * 7 + [True] * 3


async def test_wait_mode_holds_overflow_in_priority_order() -> None:
    s, _, _ = make(concurrency=1, queue=1, behavior=QueueFullBehavior.WAIT)
    a = s.submit("a", "chat", Priority.NORMAL, None)
    s.submit("b", "chat", Priority.LOW, None)  # fills the queue
    c = s.submit("c", "chat", Priority.LOW, None)  # overflow
    d = s.submit("d", "chat", Priority.HIGH, None)  # overflow, ahead of c
    assert s.waiting_room.for_space == 2
    assert s.waiting_room.position(d) == 2 and s.waiting_room.position(c) == 3
    s.retire(a, None, None)  # b runs, d enters the queue
    assert s.waiting_room.for_space == 1
    assert s.waiting_room.position(d) == 1 and s.waiting_room.position(c) == 2


async def test_drain_answers_waiting_and_refuses_new_but_running_goes_on() -> None:
    s, _, _ = make(concurrency=1)
    a = s.submit("a", "chat", Priority.NORMAL, None)
    b = s.submit("b", "chat", Priority.NORMAL, None)
    s.drain()
    assert isinstance(b.error, ShuttingDown) and s.waiting == 0
    s.retire(b, b.error, None)
    assert b.state is JobState.CANCELLED
    assert a.state is JobState.PROCESSING
    with pytest.raises(ShuttingDown):
        s.submit("c", "chat", Priority.NORMAL, None)
    assert s.draining


async def test_timeout_fires_in_the_queue_when_the_clock_says_so() -> None:
    clock = FakeClock()
    s = Scheduler(
        max_concurrent=1,
        max_queue_size=5,
        request_timeout=0.01,
        full_behavior=QueueFullBehavior.REJECT,
        history_size=10,
        metrics=Metrics(CollectorRegistry()),
        clock=clock,
    )
    a = s.submit("a", "chat", Priority.NORMAL, None)
    b = s.submit("b", "chat", Priority.NORMAL, None)
    clock.now += 0.005  # not yet: the timer fires on time and finds nothing due
    await asyncio.sleep(0.02)
    assert b.state is JobState.QUEUED
    clock.now += 0.005
    with pytest.raises(RequestTimeout, match="in the queue"):
        await b.dispatched()
    s.retire(b, b.error, None)
    assert b.state is JobState.TIMEOUT and s.totals.timeout == 1
    assert a.state is JobState.PROCESSING  # its abort has begun; its handler would now finish it
    assert isinstance(a.error, RequestTimeout)


async def test_deadlines_compact_instead_of_growing() -> None:
    s, _, _ = make(concurrency=1, queue=10)
    for i in range(5000):
        s.retire(s.submit(f"r{i}", "chat", Priority.NORMAL, None), None, None)
    assert len(s._deadlines) == 0
    assert len(s._deadlines._jobs) <= 2 * 256


async def test_a_request_with_too_little_time_left_is_answered_408_instead_of_dispatched() -> None:
    clock = FakeClock()
    registry = CollectorRegistry()
    s = Scheduler(
        max_concurrent=1,
        max_queue_size=5,
        request_timeout=10,
        full_behavior=QueueFullBehavior.REJECT,
        history_size=10,
        metrics=Metrics(registry),
        dispatch_margin=1.0,
        clock=clock,
    )
    first = s.submit("first", "chat", Priority.NORMAL, None)
    clock.now += 4.0
    s.retire(first, None, None)  # measured: a request holds the slot for 4 s
    a = s.submit("a", "chat", Priority.NORMAL, None)  # takes the slot at once, whatever the estimate
    late = s.submit("late", "chat", Priority.NORMAL, None)
    clock.now += 3.0
    fresh = s.submit("fresh", "chat", Priority.NORMAL, None)
    clock.now += 4.0  # `late` has 3 s left, under the 4 s a request takes; `fresh` has 6 s
    s.retire(a, None, None)
    with pytest.raises(RequestTimeout, match=r"3\.00s were left"):
        await late.dispatched()
    s.retire(late, late.error, None)
    assert fresh.state is JobState.PROCESSING  # the slot went to the one that can make it
    assert late.state is JobState.TIMEOUT and late.started is None
    assert s.totals.timeout == 1
    assert sample(registry, "gateway_timeouts_before_dispatch_total") == 1
    assert sample(registry, "gateway_requests_total", priority="normal", outcome="timeout") == 1


async def test_a_zero_dispatch_margin_dispatches_whatever_time_is_left() -> None:
    s, clock, _ = make(concurrency=1, queue=5)
    first = s.submit("first", "chat", Priority.NORMAL, None)
    clock.now += 50.0
    s.retire(first, None, None)
    a = s.submit("a", "chat", Priority.NORMAL, None)
    b = s.submit("b", "chat", Priority.NORMAL, None)
    clock.now += 55.0  # b has 5 s left of 60, a tenth of the 50 s a request takes
    s.retire(a, None, None)
    assert b.state is JobState.PROCESSING
