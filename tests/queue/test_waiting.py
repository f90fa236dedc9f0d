"""The waiting room on plain jobs: the queue's capacity, the overflow behind it, positions and sizes."""

from __future__ import annotations

from app.queue.aging import Aging
from app.queue.job import Job
from app.queue.member import Member
from app.queue.pool import Pool
from app.queue.waiting import WaitingRoom
from app.types import INTERACTIVE, JobState, Priority


def job(name: str, pool: Pool, priority: Priority = Priority.NORMAL, arrived: float = 0.0) -> Job:
    made = Job(name, "chat", priority, None, arrived, arrived, arrived + 60.0)
    made.pool = pool
    return made


def room_of(capacity: int, aging: Aging | None = None) -> tuple[WaitingRoom, Pool, Pool]:
    a, b = Pool("a", len(Priority)), Pool("b", len(Priority))
    a.members = b.members = [Member("m", 1)]
    room = WaitingRoom(capacity, aging, clock=lambda: 0.0)
    room.serve((a, b))
    return room, a, b


def test_the_overflow_enters_the_queue_in_order_as_places_free() -> None:
    room, a, b = room_of(capacity=2)
    first, second = job("1", a), job("2", b)
    room.enqueue(first, 0.0)
    room.enqueue(second, 0.0)
    assert room.full() and room.in_queue == 2
    late_low, late_high = job("3", a, Priority.LOW), job("4", a, Priority.HIGH)
    room.wait_for_space(late_low)
    room.wait_for_space(late_high)
    assert room.for_space == 2 and room.waiting_for(late_low) == "queue_space"
    assert room.position(late_high) == 2 and room.position(late_low) == 3  # behind a's queue, high first
    assert room.ahead_of_new(a, Priority.NORMAL.rank, None, full=True) == 2  # a's one, and the high one
    assert room.sizes() == {"high": 1, "normal": 2, "low": 1, "batch": 0}
    assert room.pool_sizes(a) == {"high": 1, "normal": 1, "low": 1, "batch": 0}
    assert not room.admit_overflow(0.0)  # no place yet
    assert room.remove(first) and not room.remove(first)
    assert room.admit_overflow(0.0) and room.for_space == 1 and room.position(late_high) == 1
    assert room.waiting_for(late_high) == "backend_slot"
    assert room.jobs(a) == [late_high, late_low] and room.jobs() == [late_high, second, late_low]
    assert room.sizes_by_model()[("b", "normal")] == 1


def test_batch_lines_take_no_place_in_the_queue() -> None:
    room, a, _ = room_of(capacity=1)
    for n in range(3):
        room.enqueue(job(f"line{n}", a, Priority.BATCH), 0.0)
    assert room.in_queue == 3 and not room.full()
    room.enqueue(job("chat", a), 0.0)
    assert room.full()


def test_aging_raises_what_waited_and_a_first_placed_job_goes_ahead() -> None:
    room, a, _ = room_of(capacity=10, aging=Aging(10.0, len(INTERACTIVE)))
    old_low = job("old", a, Priority.LOW, arrived=0.0)
    room.enqueue(old_low, 0.0)
    normal = job("normal", a, arrived=15.0)
    room.enqueue(normal, 15.0)  # old_low has waited a period by now: it rose to normal first
    assert old_low.rank == Priority.NORMAL.rank and room.position(old_low) == 1 and room.position(normal) == 2
    resumed = job("resumed", a, arrived=15.0)
    room.enqueue(resumed, 15.0, first=True)
    assert room.position(resumed) == 1
    resumed.state = JobState.PROCESSING  # it left the queue's state: nothing to wait for
    assert room.waiting_for(resumed) is None
