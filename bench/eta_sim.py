"""The wait estimate of the real scheduler on a fake clock: bench.eta_bench's loads with many more requests and
no machine noise, so that two estimators can be told apart (the HTTP bench's run-to-run spread is wider than
their difference).

    python -m bench.eta_sim [--requests 20000] [--load 0.85] [--sized] [--seed 1]

The app's Scheduler, with 4 slots and room to queue, gets a Poisson stream of requests at --load times what
the slots serve, 20% high, 50% normal, 30% low. Each holds its slot for a service time drawn as bench.eta_bench
draws its fake upstream's latency: uniform in 0.1-0.3 s, or with --sized an LLM's (max_tokens uniform in
16-256, 20 ms + 1 ms per token, scaled by a factor in 0.85-1.15). Reported: the relative error of each queued
request's estimate at arrival (job.eta) against its real wait, median and p90, overall and by priority, after
the first 10 % of requests (the estimator has measured nothing before); and, as the reference in the same run,
the same errors of the naive estimate (the requests waiting at its level or above, plus one, times the mean
service time over the slots), as bench.eta_bench reports it.

Last, the best any estimator can do: for every --bound-every'th queued request, the future is drawn
--futures times from the state at its arrival (the requests running and for how long, the requests waiting
ahead, the true distributions of service times and arrivals; unknown only what has not happened yet), which
gives the distribution of its wait. Whatever an estimator answers, the share of requests it gets within c of
their real wait is at most the mean, over requests, of the largest share of that distribution one estimate
can fall within c of (draws under a millisecond left out, as the errors above leave them out); "best
possible" prints the least c at which that mean reaches one half (the median
error no estimator can beat) and nine tenths (the p90). The draws make it slightly optimistic, never
pessimistic.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import heapq
import random

from prometheus_client import CollectorRegistry

from app.metrics import Metrics
from app.queue.job import Job
from app.queue.scheduler import Scheduler
from app.settings import QueueFullBehavior
from app.types import JobState, Priority
from bench.common import percentile
from testkit.clock import FakeClock

SLOTS = 4
MIX = ((Priority.HIGH, 0.2), (Priority.NORMAL, 0.5), (Priority.LOW, 0.3))
SIZES = (16, 256)


def service_time(rng: random.Random, sized: bool) -> tuple[int, float]:
    """(max_tokens, seconds at the slot) of one request."""
    if not sized:
        return 8, rng.uniform(0.1, 0.3)
    size = rng.randint(*SIZES)
    return size, (0.02 + 0.001 * size) * rng.uniform(0.85, 1.15)


def remaining(rng: random.Random, size: int, held: float, sized: bool) -> float:
    """Seconds left to a request of `size` that has held its slot `held` seconds: its service time drawn as
    service_time draws it, given that it is longer than `held`."""
    low, high = (0.1, 0.3) if not sized else ((0.02 + 0.001 * size) * 0.85, (0.02 + 0.001 * size) * 1.15)
    return rng.uniform(max(low, held), high) - held


def future_wait(
    rng: random.Random, running: list[tuple[int, float]], ahead: list[list[int]], rank: int, rate: float, sized: bool
) -> float:
    """One draw of the wait of a request of level `rank` that has just queued: `running` the (size, seconds
    held) of the busy slots, `ahead[level]` the sizes waiting at each level up to its own, in order, ahead of
    it. Strict priority, in order within a level, as the scheduler serves one key; requests of higher levels
    arrive meanwhile at their share of `rate`, the others queue behind it."""
    ends = sorted(remaining(rng, size, held, sized) for size, held in running)
    queues = [list(sizes) for sizes in ahead]
    queues[rank].append(-1)  # the request itself
    weights = [share for _, share in MIX]
    now, arrival = 0.0, rng.expovariate(rate)
    while True:
        if arrival < ends[0]:
            now = arrival
            level = rng.choices(range(len(MIX)), weights)[0]
            if level < rank:
                queues[level].append(service_time(rng, sized)[0])
            arrival = now + rng.expovariate(rate)
            continue
        now = heapq.heappop(ends)
        size = next(queue for queue in queues if queue).pop(0)
        if size < 0:
            return now
        heapq.heappush(ends, now + remaining(rng, size, 0.0, sized))


def covered(waits: list[float], error: float) -> float:
    """The largest share of `waits` (sorted) that one estimate can fall within `error` (relative) of: those in
    [e / (1 + error), e / (1 - error)] for the best e."""
    if error >= 1.0:
        return 1.0  # an estimate of 0 is within 100 % of every wait
    ratio, count = (1 + error) / (1 - error), len(waits)
    return max(bisect.bisect_right(waits, low * ratio, lo=i) - i for i, low in enumerate(waits)) / count


def least_error(futures: list[list[float]], share: float) -> float:
    """The least relative error within which no estimator can get more than `share` of the requests whose
    waits are distributed as `futures` (bisection: the covered share grows with the error)."""
    low, high = 0.0, 1.0
    for _ in range(12):
        middle = (low + high) / 2
        if sum(covered(waits, middle) for waits in futures) / len(futures) >= share:
            high = middle
        else:
            low = middle
    return high


Row = tuple[Priority, float, float, float]  # priority, the estimate at arrival, the naive one, the real wait
Futures = tuple[Priority, list[float]]  # priority, the sorted draws of its wait from the state at its arrival


async def simulate(args: argparse.Namespace) -> tuple[list[Row], list[Futures]]:
    """A row for every request that queued after the warm-up (in a running event loop, where the scheduler arms
    its deadline timer: none fires, the deadlines being far off), and the futures of every
    args.bound_every'th of them."""
    rng = random.Random(args.seed)
    clock = FakeClock(0.0)
    scheduler = Scheduler(
        max_concurrent=SLOTS,
        max_queue_size=1_000_000,
        request_timeout=1e9,
        full_behavior=QueueFullBehavior.REJECT,
        history_size=16,
        metrics=Metrics(CollectorRegistry()),
        clock=clock,
        wall_clock=clock,
    )
    mean = 0.02 + 0.001 * sum(SIZES) / 2 if args.sized else 0.2
    rate = args.load * SLOTS / mean
    events: list[tuple[float, int, int]] = []  # (time, order, request index): arrivals and ends
    at = 0.0
    for index in range(args.requests):
        at += rng.expovariate(rate)
        heapq.heappush(events, (at, 1, index))
    drawn = [
        (rng.choices([p for p, _ in MIX], [w for _, w in MIX])[0], *service_time(rng, args.sized))
        for _ in range(args.requests)
    ]
    jobs: dict[int, Job] = {}
    naive: dict[int, float] = {}
    waiting: set[int] = set()
    rows: list[Row] = []
    futures: list[Futures] = []
    draws = random.Random(args.seed + 1)
    warmup = args.requests // 10
    while events:
        now, kind, index = heapq.heappop(events)
        clock.now = now
        if kind == 1:
            priority, size, _ = drawn[index]
            sizes = scheduler.waiting_room.sizes()
            ahead = sum(sizes[p.value] for p in Priority if p.rank <= priority.rank)
            naive[index] = (ahead + 1) * mean / SLOTS
            job = jobs[index] = scheduler.submit(str(index), "chat", priority, None, size=size)
            if job.state is JobState.QUEUED:
                waiting.add(index)
                if index >= warmup and args.futures and index % args.bound_every == 0:
                    running = [(drawn[i][1], now - job.started) for i, job in jobs.items() if job.started is not None]
                    ahead = [[drawn[i][1] for i in sorted(waiting - {index}) if drawn[i][0] is p] for p, _ in MIX]
                    waits = [
                        future_wait(draws, running, ahead[: priority.rank + 1], priority.rank, rate, args.sized)
                        for _ in range(args.futures)
                    ]
                    # As errors() counts only waits of a millisecond or more, so does the bound.
                    futures.append((priority, sorted(w for w in waits if w >= 0.001)))
        else:
            scheduler.retire(jobs.pop(index), None, None)
        for started in [i for i in (waiting if kind == 0 else waiting | {index}) if jobs[i].started is not None]:
            waiting.discard(started)
            job = jobs[started]
            assert job.started is not None
            heapq.heappush(events, (job.started + drawn[started][2], 0, started))
            if job.eta is not None and started >= warmup:
                rows.append((job.priority, job.eta, naive[started], job.started - job.arrived))
    return rows, futures


def errors(rows: list[Row], field: int) -> str:
    """Median and p90 of the relative errors of the estimate in `field` (1: the gateway's, 2: the naive one)."""
    values = [abs(row[field] - row[3]) / row[3] for row in rows if row[3] >= 0.001]
    return f"n={len(values):6} median error {percentile(values, 50):6.1%}  p90 {percentile(values, 90):6.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--load", type=float, default=0.85, help="arrivals as a share of what the slots serve")
    parser.add_argument("--sized", action="store_true", help="an LLM's workload: service time grows with max_tokens")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--futures", type=int, default=150, help="draws of each sampled wait (0: no bound)")
    parser.add_argument("--bound-every", type=int, default=10, help="the bound samples every n-th request")
    args = parser.parse_args()
    rows, futures = asyncio.run(simulate(args))
    for field, label in ((1, "gateway ETA"), (2, "naive reference")):
        print(f"{label:16} {'all':8} {errors(rows, field)}")
        for priority, _ in MIX:
            print(f"{label:16} {priority.value:8} {errors([r for r in rows if r[0] is priority], field)}")
    if not futures:
        return
    for name, some in [("all", futures)] + [(p.value, [f for f in futures if f[0] is p]) for p, _ in MIX]:
        waits = [w for _, w in some]
        print(
            f"{'best possible':16} {name:8} n={len(waits):6} median error "
            f">={least_error(waits, 0.5):5.1%}  p90 >={least_error(waits, 0.9):5.1%}"
        )


if __name__ == "__main__":
    main()
