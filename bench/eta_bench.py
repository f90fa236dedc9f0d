"""How honest the queue's wait estimate is: the ETA at arrival against the real wait, under steady mixed load.

    python -m bench.eta_bench [--seconds 60] [--load 0.85] [--sized] [--json PATH]

A fake upstream (in this process) answers each completion after a latency drawn uniformly from
[--latency, --latency + --spread] seconds. With --sized, the workload is an LLM's: each request asks for
max_tokens drawn uniformly from 16-256, and the upstream takes --latency plus --per-token seconds per token
asked for, scaled by a factor drawn in [1 - --jitter, 1 + --jitter] (an LLM's time at a slot grows with its
output; the jitter stands for what the size does not tell).

The gateway has 4 slots and room to queue. Requests arrive as a Poisson stream at --load times what the slots
can serve (by the mean latency), 20% high, 50% normal, 30% low. Each answer carries the gateway's estimate at
arrival (x-queue-eta-ms, sent for requests that queued) and the real wait (x-queue-wait-ms, both measured by
the gateway itself, so the network adds nothing). The first --warmup seconds are left out (the estimator has
not measured anything yet). Reported: the relative error |estimate - wait| / wait of every request that
queued, its median and p90, overall and by priority; and, as the reference in the same run, the same errors
of the naive estimate a queue without this estimator gives (the requests ahead times the mean service time
over the slots, ahead read from the status route just before each request is sent). The same errors are
shown for the requests that waited at least two mean service times, whose wait is mostly the work already
ahead of them rather than chance.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import aiohttp

from bench.common import gateway_process, percentile
from testkit.upstream import Behavior, FakeUpstream

ROOT = Path(__file__).resolve().parent.parent
SLOTS = 4
MIX = (("high", 0.2), ("normal", 0.5), ("low", 0.3))


SIZES = (16, 256)  # --sized: max_tokens drawn uniformly in this range


def mean_latency(args: argparse.Namespace) -> float:
    """The upstream's mean seconds per answer."""
    if args.sized:
        return args.latency + args.per_token * sum(SIZES) / 2
    return args.latency + args.spread / 2


async def load(url: str, args: argparse.Namespace) -> list[dict[str, float | str]]:
    """Send the Poisson stream; one row per answered request that queued and was sent after the warm-up."""
    mean = mean_latency(args)
    rate = args.load * SLOTS / mean
    rows: list[dict[str, float | str]] = []
    rng = random.Random(args.seed)
    start = time.monotonic()
    status = {"queue_size_by_priority": {"high": 0, "normal": 0, "low": 0}}

    async def watch(session: aiohttp.ClientSession) -> None:
        nonlocal status
        while time.monotonic() - start < args.seconds:
            async with session.get(url + "/v1/queue/status") as r:
                status = await r.json()
            await asyncio.sleep(0.02)

    async def one(session: aiohttp.ClientSession, priority: str, sent_at: float) -> None:
        sizes = status["queue_size_by_priority"]
        levels = [name for name, _ in MIX]
        ahead = sum(sizes[name] for name in levels[: levels.index(priority) + 1])
        max_tokens = rng.randint(*SIZES) if args.sized else 8
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
        async with session.post(url + "/v1/chat/completions", json=body, headers={"X-Priority": priority}) as r:
            await r.read()
            if r.status != 200 or "x-queue-eta-ms" not in r.headers or sent_at < args.warmup:
                return
            rows.append(
                {
                    "priority": priority,
                    "eta": float(r.headers["x-queue-eta-ms"]) / 1000,
                    "wait": float(r.headers["x-queue-wait-ms"]) / 1000,
                    "naive": (ahead + 1) * mean / SLOTS,
                }
            )

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        watcher = asyncio.create_task(watch(session))
        tasks = []
        at = 0.0
        while at < args.seconds:
            at += rng.expovariate(rate)
            delay = start + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            priority = rng.choices([name for name, _ in MIX], [share for _, share in MIX])[0]
            tasks.append(asyncio.create_task(one(session, priority, at)))
        await asyncio.gather(*tasks)
        watcher.cancel()
    return rows


def errors(rows: list[dict[str, float | str]], field: str) -> dict[str, float]:
    """Median and p90 of the relative errors of `field` against the real wait (waits under 1 ms left out)."""
    values = [abs(float(r[field]) - float(r["wait"])) / float(r["wait"]) for r in rows if float(r["wait"]) >= 0.001]
    return {"n": len(values), "median": percentile(values, 50), "p90": percentile(values, 90)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout of the gateway to run")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--warmup", type=float, default=10)
    parser.add_argument("--load", type=float, default=0.85, help="arrivals as a share of what the slots serve")
    parser.add_argument(
        "--latency", type=float, help="the upstream's shortest seconds per answer [default: 0.1; --sized: 0.02]"
    )
    parser.add_argument("--spread", type=float, default=0.2, help="and up to this many more, uniformly")
    parser.add_argument("--sized", action="store_true", help="an LLM's workload: latency grows with max_tokens")
    parser.add_argument("--per-token", type=float, default=0.001, help="--sized: seconds per max_tokens token")
    parser.add_argument("--jitter", type=float, default=0.15, help="--sized: the latency's relative spread")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.latency is None:
        args.latency = 0.02 if args.sized else 0.1
    if args.sized:
        behavior = Behavior(latency=args.latency, latency_per_token=args.per_token, latency_jitter=args.jitter)
    else:
        behavior = Behavior(latency=args.latency, latency_spread=args.spread)
    upstream = FakeUpstream(behavior=behavior).start()
    process, url = gateway_process(
        args.root,
        "eta_gateway",
        BACKEND="proxy",
        UPSTREAM_BASE_URL=upstream.base_url,
        LOG_LEVEL="warning",
        MAX_CONCURRENT_REQUESTS=str(SLOTS),
        MAX_QUEUE_SIZE="10000",
        REQUEST_TIMEOUT="120",
    )
    try:
        rows = asyncio.run(load(url, args))
    finally:
        process.terminate()
        process.wait(30)
        upstream.stop()
    result: dict[str, object] = {"requests_that_queued": len(rows)}
    long_wait = 2 * mean_latency(args)  # two mean service times: the wait is mostly the work ahead
    for field in ("eta", "naive"):
        result[field] = (
            {"all": errors(rows, field)}
            | {name: errors([r for r in rows if r["priority"] == name], field) for name, _ in MIX}
            | {"waits_over_2_services": errors([r for r in rows if float(r["wait"]) >= long_wait], field)}
        )
    for field, label in (("eta", "gateway ETA"), ("naive", "naive reference")):
        table = result[field]
        assert isinstance(table, dict)
        for group, figures in table.items():
            print(
                f"{label:16} {group:21} n={figures['n']:4} median error {figures['median']:6.1%}  "
                f"p90 {figures['p90']:6.1%}"
            )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
