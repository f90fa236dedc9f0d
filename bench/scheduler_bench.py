"""The scheduler alone: submit-to-dispatch operations per second, with 10 to 100,000 requests waiting.

Each operation is what one request costs the scheduler in a saturated gateway: submit (queued behind the
waiting ones, a timeout timer armed), then the finish of a running request, which dispatches the next in
priority order. Flat cost per operation across queue depths means log-time queue operations and no scans.

    python -m bench.scheduler_bench [--ops 200000] [--rounds 5] [--json out.json]

Depths are measured in interleaved rounds (10, 1k, 10k, 100k, 10, 1k, ...) so machine noise hits them
alike; each depth reports its best round, the least disturbed by other work on a shared machine.

The process imports the gateway and freezes its startup heap as the server does (app/heap.py). Each depth
is timed twice: as the server runs it (the cyclic garbage collector on; its full passes walk every live
object, so their cost per request grows with what is alive) and by timeit's convention
(collector off while timing), which isolates the scheduler's own cost per request. The reference, a dict
and a FIFO of bare objects with no scheduling at all, is timed the same two ways: its slowdown with depth
is what caches, memory and the collector cost any design that keeps that many requests alive.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry

import app.main  # noqa: F401  (the gateway's whole import graph: a heap like the server's)
from app.heap import freeze_startup_heap
from app.metrics import Metrics
from app.queue.scheduler import Scheduler
from app.settings import QueueFullBehavior
from app.types import Priority

PRIORITIES = (Priority.HIGH, Priority.NORMAL, Priority.LOW)


def make(depth: int, concurrency: int) -> Scheduler:
    return Scheduler(
        max_concurrent=concurrency,
        max_queue_size=depth + 10,
        request_timeout=10**9,  # nothing times out, and admission by deadline (whose estimate is timed) admits all
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
    submit, retire = scheduler.submit, scheduler.retire
    start = time.perf_counter()
    for i in range(ops):
        submit(f"op-{i}", "chat", PRIORITIES[i % 3], None)
        done = running[i % concurrency]
        slot = done.slot
        retire(done, None, None)
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


def timed(measure: Callable[[], float], collector: bool) -> float:
    """Run `measure` with the cyclic garbage collector on or off, as it was found afterwards."""
    was_on = gc.isenabled()
    gc.collect()
    if not collector:
        gc.disable()
    try:
        return measure()
    finally:
        if was_on:
            gc.enable()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    freeze_startup_heap()  # as the server does once started
    depths = (10, 1_000, 10_000, 100_000)
    modes = (True, False)  # collector on, off
    best = {(d, m): 0.0 for d in depths for m in modes}
    floor = {(d, m): 0.0 for d in depths for m in modes}
    for _ in range(args.rounds):
        for depth in depths:
            for mode in modes:
                ours = timed(lambda: asyncio.run(run_depth(depth, args.ops)), mode)  # noqa: B023
                reference = timed(lambda: run_reference(depth, args.ops), mode)  # noqa: B023
                best[depth, mode] = max(best[depth, mode], ours)
                floor[depth, mode] = max(floor[depth, mode], reference)
    rows = [
        {
            "waiting": d,
            "ops_per_s": round(best[d, True]),
            "us_per_op": round(1e6 / best[d, True], 2),
            "slowdown_vs_10": round(best[depths[0], True] / best[d, True], 2),
            "reference_slowdown_vs_10": round(floor[depths[0], True] / floor[d, True], 2),
            "ops_per_s_collector_off": round(best[d, False]),
            "slowdown_vs_10_collector_off": round(best[depths[0], False] / best[d, False], 2),
            "reference_slowdown_vs_10_collector_off": round(floor[depths[0], False] / floor[d, False], 2),
        }
        for d in depths
    ]
    print(f"{'':>8} {'collector on (a process)':^38} | {'collector off (timeit convention)':^34}")
    head = f"{'ops/s':>10} {'us/op':>7} {'vs 10':>6} {'reference':>10}"
    print(f"{'waiting':>8} {head} | {'ops/s':>10} {'vs 10':>6} {'reference':>10}")
    for row in rows:
        print(
            f"{row['waiting']:>8} {row['ops_per_s']:>10,} {row['us_per_op']:>7} {row['slowdown_vs_10']:>5.2f}x"
            f" {row['reference_slowdown_vs_10']:>9.2f}x | {row['ops_per_s_collector_off']:>10,}"
            f" {row['slowdown_vs_10_collector_off']:>5.2f}x {row['reference_slowdown_vs_10_collector_off']:>9.2f}x"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=2)


if __name__ == "__main__":
    main()
