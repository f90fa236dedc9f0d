"""The wait estimator on its own and in the scheduler, on a fake clock: residual service times, the work ahead,
higher levels arriving meanwhile, admission by deadline, and the Retry-After the queue gives."""

from __future__ import annotations

import math

import pytest

from app.errors import DeadlineUnreachable, KeyQueueLimit
from app.limits.keys import KeyAccount, KeyEntry
from app.queue import eta
from app.queue.eta import ArrivalRate, ServiceSamples
from app.types import JobState, Priority
from tests.queue.test_scheduler import make, sample

pytestmark = pytest.mark.anyio


def test_the_service_time_is_the_mean_of_the_recent_ones() -> None:
    samples = ServiceSamples()
    assert samples.mean is None
    for held in (1.0, 2.0, 3.0, 4.0):
        samples.observe(held)
    assert samples.mean == pytest.approx(2.5)
    for _ in range(200):  # the oldest fall out of the window
        samples.observe(1.0)
    assert samples.mean == pytest.approx(1.0)


def test_service_times_that_grow_with_the_size_are_fitted_and_others_take_the_mean() -> None:
    samples = ServiceSamples()
    assert samples.fit() == (0.0, 0.0)
    for size in range(16, 256, 8):  # an LLM's: 20 ms, then 1 ms per token
        samples.observe(0.02 + 0.001 * size, size)
    base, per_token = samples.fit()
    assert base == pytest.approx(0.02) and per_token == pytest.approx(0.001)
    alike = ServiceSamples()
    for held in (1.0, 2.0, 3.0):  # one size: nothing to fit, the mean for all
        alike.observe(held, 64)
    assert alike.fit() == pytest.approx((2.0, 0.0))
    shrinking = ServiceSamples()
    for size in (10, 20, 30):  # longer asks ending sooner is no relation to use
        shrinking.observe(1.0 / size, size)
    assert shrinking.fit() == pytest.approx((shrinking.mean, 0.0))
    for _ in range(200):  # the window forgets: the sums follow what is in it
        samples.observe(0.5, 100)
    assert samples.fit() == pytest.approx((0.5, 0.0)) and samples.mean == pytest.approx(0.5)


async def test_a_running_request_is_expected_to_take_what_its_size_implies() -> None:
    s, clock, _ = make(concurrency=2, queue=50)
    for size in (10, 100, 10, 100):  # 0.1 s per 10 tokens
        job = s.submit(f"m{size}-{clock.now}", "chat", Priority.NORMAL, None, size=size)
        clock.advance(size / 100)
        s.retire(job, None, None)
    s.submit("long", "chat", Priority.NORMAL, None, size=200)  # expected to hold its slot 2 s
    s.submit("short", "chat", Priority.NORMAL, None, size=20)  # 0.2 s
    clock.advance(0.1)
    waiting = s.submit("waits", "chat", Priority.NORMAL, None, size=50)
    assert waiting.eta == pytest.approx(0.1)  # the short one frees its slot first, in 0.1 s
    behind = s.submit("behind", "chat", Priority.NORMAL, None, size=50)
    assert behind.eta == pytest.approx(1.9)  # then the long one's


def test_the_spread_of_service_times_is_what_the_fit_leaves_unexplained() -> None:
    samples = ServiceSamples()
    samples.observe(0.2)
    assert samples.spread(0.0) == 0.0  # one time tells no spread
    for held in (0.1, 0.3) * 50:  # a deviation of 0.1 s: a uniform spread of √3 * 0.1 s about the 0.2 s mean
        samples.observe(held)
    assert samples.spread(0.0) == pytest.approx(0.5 * math.sqrt(3), rel=0.02)
    sized = ServiceSamples()
    for size in range(16, 256, 8):  # exactly 20 ms + 1 ms per token: the fit explains it all
        sized.observe(0.02 + 0.001 * size, size)
    assert sized.spread(sized.fit()[1]) == pytest.approx(0.0, abs=1e-6)
    assert sized.spread(0.0) > 0.5  # without the sizes the times vary widely


def test_the_first_of_several_busy_slots_frees_at_the_median_of_their_earliest_end() -> None:
    # Two slots, each freeing uniformly within 0-1 s: none has freed by t with odds (1 - t)², even at 1 - 1/√2.
    both = [(0.5, 0.0, 1.0), (0.5, 0.0, 1.0)]
    assert eta._first_release(both) == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-4)
    # One certain to free within 0.1-0.2 s decides alone; one that cannot free before 0.5 s is not counted.
    assert eta._first_release([(0.15, 0.1, 0.2), (0.7, 0.5, 0.9)]) == pytest.approx(0.15, abs=1e-4)
    # The more slots may free soon, the sooner the first does, earlier than the least expected of them.
    many = eta._first_release([(0.5, 0.0, 1.0)] * 8)
    assert many < eta._first_release(both) < 0.5


async def test_a_busy_pool_whose_times_vary_expects_its_first_release_before_the_soonest_expected_end() -> None:
    s, clock, _ = make(concurrency=2, queue=50)
    for n, held in enumerate((0.5, 1.5) * 4):  # a mean of 1 s, spread over 0.5-1.5 s
        job = s.submit(f"m{n}", "chat", Priority.NORMAL, None)
        clock.advance(held)
        s.retire(job, None, None)
    s.submit("a", "chat", Priority.NORMAL, None)
    s.submit("b", "chat", Priority.NORMAL, None)
    clock.advance(0.1)
    waiting = s.submit("waits", "chat", Priority.NORMAL, None)
    assert waiting.eta is not None and 0.1 < waiting.eta < 0.9  # each is expected in 0.9 s, the first sooner
    behind = s.submit("behind", "chat", Priority.NORMAL, None)
    assert behind.eta == pytest.approx(0.9)  # the second release: the expected end


def test_arrival_rates_decay_with_time() -> None:
    rate = ArrivalRate()
    assert rate.rate(0.0) == 0.0
    for tick in range(2000):  # 10 a second for 200 s: the window has filled
        rate.arrived(tick / 10)
    assert rate.rate(200.0) == pytest.approx(10.0, rel=0.05)
    assert rate.rate(300.0) < 0.1


async def test_the_wait_counts_releases_then_rounds_then_higher_arrivals() -> None:
    s, clock, _ = make(concurrency=3, queue=50)
    for n in range(3):  # a mean of 1 s
        job = s.submit(f"m{n}", "chat", Priority.HIGH, None)
        clock.advance(1.0)
        s.retire(job, None, None)
    s.submit("a", "chat", Priority.HIGH, None)
    clock.advance(0.2)
    s.submit("b", "chat", Priority.HIGH, None)
    clock.advance(0.4)
    s.submit("c", "chat", Priority.HIGH, None)  # they free in 0.4 s, 0.6 s and 1 s
    pool = s.roster.pools["*"]
    outlook = eta.Outlook(pool, 0, clock.now, None)
    assert outlook.wait(0) == pytest.approx(0.4)  # the first slot to free
    assert outlook.wait(2) == pytest.approx(1.0)
    assert outlook.wait(3) == pytest.approx(1.4)  # a round later
    # High requests arriving meanwhile take a share of the slots' work: 1 / sqrt(1 - share) for a normal request.
    normal = eta.Outlook(pool, 1, clock.now, None)
    share = pool.arrivals[0].rate(clock.now) * 1.0 / 3
    assert 0 < share < 1 and normal.wait(3) == pytest.approx(1.4 / math.sqrt(1 - share))
    assert eta.place(4, 2.0) == pytest.approx(0.5) and eta.place(4, None) == pytest.approx(0.25)
    for member in pool.members:
        member.slots.slots.clear()  # no slot up (every member down): a mean per request ahead, and its own
    assert eta.pool_wait(pool, 3, 0, clock.now, None) == pytest.approx(4.0)


async def test_a_request_past_the_mean_is_expected_to_end_soon_and_a_free_slot_at_once() -> None:
    s, clock, _ = make(concurrency=2, queue=50)
    job = s.submit("measure", "chat", Priority.NORMAL, None)
    clock.advance(1.0)
    s.retire(job, None, None)
    s.submit("long", "chat", Priority.NORMAL, None)
    clock.advance(3.0)  # three times the mean already
    assert s.submit("second", "chat", Priority.NORMAL, None).state is JobState.PROCESSING
    assert s.submit("waits", "chat", Priority.NORMAL, None).eta == pytest.approx(0.1)


async def test_a_waiting_request_knows_its_eta_and_it_shrinks_as_work_ends() -> None:
    s, clock, _ = make(concurrency=2, queue=50)
    for n in range(4):  # measure: each holds its slot 2 s
        job = s.submit(f"m{n}", "chat", Priority.NORMAL, None)
        clock.advance(2.0)
        s.retire(job, None, None)
    running = [s.submit(f"r{n}", "chat", Priority.NORMAL, None) for n in range(2)]
    waiting = [s.submit(f"w{n}", "chat", Priority.NORMAL, None) for n in range(3)]
    assert all(job.state is JobState.QUEUED for job in waiting)
    # Two slots, each freeing in 2 s and then every 2 s: the first two waiters at 2 s, the third at 4 s.
    assert [job.eta for job in waiting] == pytest.approx([2.0, 2.0, 4.0])
    clock.advance(1.5)
    assert s.eta(waiting[2]) == pytest.approx(2.5)  # the running ones are three quarters through
    s.retire(running[0], None, None)
    assert waiting[0].state is JobState.PROCESSING and s.eta(waiting[0]) is None
    assert waiting[2].eta == pytest.approx(4.0)  # the estimate at arrival is kept
    # Second in line now: the one before it takes the slot that frees first (the old one's, in 0.4 s by the
    # mean of 1.9 s with the 1.5 s just measured); it takes the new one's, 1.9 s.
    assert s.eta(waiting[2]) == pytest.approx(1.9)


async def test_higher_levels_arriving_stretch_a_low_requests_eta() -> None:
    s, clock, _ = make(concurrency=1, queue=500)
    for n in range(100):  # one high request a second, each 0.5 s at the backend: half the slot's time
        job = s.submit(f"h{n}", "chat", Priority.HIGH, None)
        clock.advance(0.5)
        s.retire(job, None, None)
        clock.advance(0.5)
    s.submit("running", "chat", Priority.LOW, None)
    low = s.submit("low", "chat", Priority.LOW, None)
    high = s.submit("high", "chat", Priority.HIGH, None)
    assert high.eta == pytest.approx(0.5, rel=0.02)  # nothing higher comes ahead of it
    # Behind the high one, stretched by 1 / sqrt(1 - 0.5) for the half of the slot that high requests take.
    assert s.eta(low) == pytest.approx((0.5 + 0.5) / math.sqrt(0.5), rel=0.1)


async def test_a_deadline_the_queue_cannot_meet_is_refused_at_once() -> None:
    s, clock, registry = make(concurrency=1, queue=50)
    job = s.submit("measure", "chat", Priority.NORMAL, None)
    clock.advance(1.0)
    s.retire(job, None, None)
    s.submit("running", "chat", Priority.NORMAL, None)
    s.submit("queued", "chat", Priority.NORMAL, None)  # waits about 1 s: ahead of what comes next
    with pytest.raises(DeadlineUnreachable) as refused:
        s.submit("late", "chat", Priority.NORMAL, None, timeout=1.5)  # needs about 2 s
    error = refused.value
    assert error.status_code == 503 and error.code == "deadline_unreachable"
    assert error.headers["x-queue-eta-ms"] == "2000" and error.retry_after == pytest.approx(1.0)
    assert s.registry.lookup("late", None) is None and s.waiting == 1  # it never joined
    assert sample(registry, "gateway_rejections_total", reason="deadline_unreachable") == 1
    assert s.submit("in-time", "chat", Priority.NORMAL, None, timeout=2.5).state is JobState.QUEUED
    assert s.submit("high", "chat", Priority.HIGH, None, timeout=1.5).state is JobState.QUEUED  # goes first
    s.admission.deadline_admission = False
    assert s.submit("tries", "chat", Priority.NORMAL, None, timeout=0.5).state is JobState.QUEUED


async def test_nothing_is_refused_before_the_service_time_is_measured() -> None:
    s, _, _ = make(concurrency=1, queue=50)
    s.submit("running", "chat", Priority.NORMAL, None)
    for n in range(5):
        assert s.submit(f"w{n}", "chat", Priority.NORMAL, None, timeout=0.5).eta is not None


async def test_a_key_at_its_queue_limit_is_told_when_a_place_frees() -> None:
    s, clock, _ = make(concurrency=1, queue=50)
    job = s.submit("measure", "chat", Priority.NORMAL, None)
    clock.advance(3.0)
    s.retire(job, None, None)
    key = KeyAccount.build(KeyEntry(key="k", name="team", max_queued=1))
    s.submit("running", "chat", Priority.NORMAL, key)
    clock.advance(1.0)
    s.submit("queued", "chat", Priority.NORMAL, key)
    with pytest.raises(KeyQueueLimit) as refused:
        s.submit("more", "chat", Priority.NORMAL, key)
    assert refused.value.retry_after == pytest.approx(2.0)  # the running one has 2 s left


async def test_turns_of_several_keys_count_in_the_arrival_estimate() -> None:
    s, clock, _ = make(concurrency=1, queue=50)
    job = s.submit("measure", "chat", Priority.NORMAL, None)
    clock.advance(1.0)
    s.retire(job, None, None)
    a, b = KeyAccount.unlimited("a"), KeyAccount.unlimited("b")
    s.submit("running", "chat", Priority.NORMAL, a)
    for n in range(4):
        s.submit(f"a{n}", "chat", Priority.NORMAL, a)
    first_of_b = s.submit("b0", "chat", Priority.NORMAL, b)  # one turn of a's goes before it, not four
    assert first_of_b.eta == pytest.approx(2.0)
    assert s.waiting_room.position(first_of_b) == 2
