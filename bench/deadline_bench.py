"""Upstream work wasted on requests dispatched too close to their deadline: DISPATCH_MARGIN=0 against 1.

    python -m bench.deadline_bench [--seconds 20] [--latency 0.2] [--timeout 0.5]

A fake upstream (in this process, so its counts can be read) answers each completion after --latency
seconds. The gateway has two slots, REQUEST_TIMEOUT=--timeout and room to queue; 20 closed-loop clients keep
it saturated, so requests wait most of their time in the queue. For each DISPATCH_MARGIN it reports the calls
the upstream received, how many of them the gateway abandoned before the answer (its timeout cut them off),
and the clients' completions and 408s. Each margin runs in turn in every round, on a fresh gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import Counter
from pathlib import Path

import aiohttp

from bench.common import gateway_process
from testkit.upstream import Behavior, FakeUpstream

ROOT = Path(__file__).resolve().parent.parent
BODY = '{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}'


async def clients(url: str, count: int, seconds: float) -> Counter[int]:
    """`count` closed-loop clients for `seconds`: the statuses they got."""
    end = time.monotonic() + seconds
    statuses: Counter[int] = Counter()

    async def one(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < end:
            async with session.post(
                url + "/v1/chat/completions", data=BODY, headers={"Content-Type": "application/json"}
            ) as r:
                await r.read()
                statuses[r.status] += 1

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session) for _ in range(count)))
    return statuses


def run(root: Path, margin: float, args: argparse.Namespace) -> dict[str, float]:
    upstream = FakeUpstream(behavior=Behavior(latency=args.latency)).start()
    process, url = gateway_process(
        root,
        "deadline_gateway",
        BACKEND="proxy",
        UPSTREAM_BASE_URL=upstream.base_url,
        LOG_LEVEL="warning",
        MAX_CONCURRENT_REQUESTS="2",
        MAX_QUEUE_SIZE="1000",
        REQUEST_TIMEOUT=str(args.timeout),
        DISPATCH_MARGIN=str(margin),
    )
    try:
        statuses = asyncio.run(clients(url, 20, args.seconds))
        time.sleep(args.latency + 0.2)  # the last calls end
        calls = len(upstream.seen)
        return {
            "upstream_calls": calls,
            "abandoned": upstream.abandoned,
            "wasted_share": upstream.abandoned / calls if calls else float("nan"),
            "completed": statuses[200],
            "timeouts": statuses[408],
        }
    finally:
        process.terminate()
        process.wait(30)
        upstream.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout of the gateway to run")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--latency", type=float, default=0.2, help="the upstream's seconds per completion")
    parser.add_argument("--timeout", type=float, default=0.5, help="REQUEST_TIMEOUT")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict[float, list[dict[str, float]]] = {0.0: [], 1.0: []}
    for n in range(1, args.rounds + 1):
        for margin, rows in results.items():
            row = run(args.root, margin, args)
            rows.append(row)
            print(f"round {n} DISPATCH_MARGIN={margin:g}: {row}", flush=True)
    for margin, rows in results.items():
        medians = {name: statistics.median(row[name] for row in rows) for name in rows[0]}
        print(f"DISPATCH_MARGIN={margin:g}, medians of {args.rounds}: {medians}")


if __name__ == "__main__":
    main()
