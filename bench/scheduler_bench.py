"""The scheduler alone: submit-to-dispatch operations per second, with 10 to 100,000 requests waiting.

Each operation is what one request costs the scheduler in a saturated gateway: submit (queued behind the
waiting ones, a timeout timer armed), then the finish of a running request, which dispatches the next in
priority order. Flat cost per operation across queue depths means log-time queue operations and no scans.

    python -m bench.scheduler_bench [--ops 200000] [--rounds 5] [--json out.json]

Depths are measured in interleaved rounds (10, 1k, 10k, 100k, 10, 1k, ...) so machine noise hits them
alike; each depth reports its best round, the least disturbed by other work on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import deque

from prometheus_client import CollectorRegistry

from app.metrics import Metrics
from app.queue.scheduler import Scheduler
from app.settings import Priority, QueueFullBehavior

PRIORITIES = (Priority.HIGH, Priority.NORMAL, Priority.LOW)


def make(depth: int, concurrency: int) -> Scheduler:
    return Scheduler(
        max_concurrent=concurrency,
        max_queue_size=depth + 10,
        request_timeout=3600,
        full_behavior=QueueFullBehavior.REJECT,
        history_size=10_000,
        metrics=Metrics(CollectorRegistry()),
    )


async def run_depth(depth: int, ops: int, concurrency: int = 8) -> float:
    """Operations per second with `depth` requests waiting throughout."""
    scheduler = make(depth, concurrency)
    running = []
    for i in range(concurrency + depth):
        job = scheduler.submit(f"fill-{i}", "chat", PRIORITIES[i % 3], None)
        if i < concurrency:
            running.append(job)
    submit, finish = scheduler.submit, scheduler.finish
    start = time.perf_counter()
    for i in range(ops):
        submit(f"op-{i}", "chat", PRIORITIES[i % 3], None)
        done = running[i % concurrency]
        slot = done.slot
        finish(done, None)
        assert slot is not None and slot.job is not None  # the freed slot went straight to the next request
        running[i % concurrency] = slot.job
    elapsed = time.perf_counter() - start
    return ops / elapsed


class _Bare:
    __slots__ = ("id", "state")

    def __init__(self, id: str):
        self.id = id
        self.state = 0


def run_reference(depth: int, ops: int) -> float:
    """The memory-bound floor: the same number of objects in a dict by id and a FIFO, with no scheduling.

    Its slowdown with depth is what caches and memory cost any design that keeps `depth` requests alive.
    """
    live: dict[str, _Bare] = {}
    fifo: deque[_Bare] = deque()
    for i in range(depth):
        item = _Bare(f"fill-{i}")
        live[item.id] = item
        fifo.append(item)
    start = time.perf_counter()
    for i in range(ops):
        item = _Bare(f"op-{i}")
        live[item.id] = item
        fifo.append(item)
        del live[fifo.popleft().id]
    return ops / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    depths = (10, 1_000, 10_000, 100_000)
    best = dict.fromkeys(depths, 0.0)
    floor = dict.fromkeys(depths, 0.0)
    for _ in range(args.rounds):
        for depth in depths:
            best[depth] = max(best[depth], asyncio.run(run_depth(depth, args.ops)))
            floor[depth] = max(floor[depth], run_reference(depth, args.ops))
    rows = [
        {
            "waiting": d,
            "ops_per_s": round(best[d]),
            "us_per_op": round(1e6 / best[d], 2),
            "slowdown_vs_10": round(best[depths[0]] / best[d], 2),
            "reference_slowdown_vs_10": round(floor[depths[0]] / floor[d], 2),
        }
        for d in depths
    ]
    print(f"{'waiting':>8} {'ops/s':>10} {'us/op':>7} {'vs 10':>6} {'reference vs 10':>16}")
    for row in rows:
        print(
            f"{row['waiting']:>8} {row['ops_per_s']:>10,} {row['us_per_op']:>7} {row['slowdown_vs_10']:>5.2f}x"
            f" {row['reference_slowdown_vs_10']:>15.2f}x"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=2)


if __name__ == "__main__":
    main()
