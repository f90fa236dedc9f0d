"""Batches fill the idle capacity without delaying interactive traffic: side by side, in one run.

    python -m bench.batch_bench [--seconds 20] [--latency 0.1] [--slots 8] [--load 0.5] [--rounds 1]

A fake upstream (a process of its own) answers each completion after --latency seconds; the gateway has
--slots slots, so the capacity is about slots / latency completions a second. Interactive chat completions
arrive at random (Poisson) at --load of that capacity, at priorities high, normal and low in turn.

Each round, on one gateway:
  1. interactive load alone for --seconds: the p95 of its queue wait (X-Queue-Wait-Ms);
  2. a 2,000-line batch submitted; once it runs, the batch alone for a few seconds: what it completes a
     second is the capacity measured;
  3. the same interactive load again for --seconds while the batch runs: its p95 queue wait, and the lines
     the batch completed a second meanwhile.

Figures (issue: Batch API): p95 wait with the batch <= 1.1 x p95 without it + one line's service time, and
the batch's rate in phase 3 >= 80% of the capacity the interactive load leaves idle (measured capacity less
the interactive completions a second).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import subprocess
import sys
import time
from typing import Any

import aiohttp
import httpx

from bench.common import ROOT, gateway_process, percentile, stop_process
from testkit.gateway import free_port

LINES = 2000
PRIORITIES = ("high", "normal", "low")


def _body(content: str) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 8}


async def interactive(url: str, rate: float, seconds: float) -> tuple[list[float], int]:
    """Poisson arrivals at `rate` a second for `seconds`: the queue waits (s) of the answered, and their count."""
    waits: list[float] = []
    failures: list[int] = []
    rng = random.Random(7)
    tasks: list[asyncio.Task[None]] = []

    async def one(session: aiohttp.ClientSession, n: int) -> None:
        headers = {"X-Priority": PRIORITIES[n % 3]}
        async with session.post(url + "/v1/chat/completions", json=_body(f"i{n}"), headers=headers) as response:
            await response.read()
            if response.status == 200:
                waits.append(float(response.headers["x-queue-wait-ms"]) / 1000)
            else:
                failures.append(response.status)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.monotonic()
        at, n = start, 0
        while at < start + seconds:
            at += rng.expovariate(rate)
            delay = at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, n)))
            n += 1
        await asyncio.gather(*tasks)
    if failures:
        print(f"  {len(failures)} interactive requests failed: statuses {sorted(set(failures))}", flush=True)
    return waits, len(waits)


def _done(url: str, batch: str) -> int:
    counts = httpx.get(f"{url}/v1/batches/{batch}", timeout=10).json()["request_counts"]
    return int(counts["completed"] + counts["failed"])


def submit_batch(url: str) -> str:
    lines = "\n".join(
        json.dumps({"custom_id": f"b{n}", "method": "POST", "url": "/v1/chat/completions", "body": _body(f"b{n}")})
        for n in range(LINES)
    )
    file = httpx.post(
        url + "/v1/files", files={"file": ("batch.jsonl", io.BytesIO(lines.encode()))}, data={"purpose": "batch"}
    ).json()
    batch = httpx.post(
        url + "/v1/batches",
        json={"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    ).json()
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/v1/batches/{batch['id']}").json()["status"] != "in_progress":
        if time.monotonic() > deadline:
            raise RuntimeError("the batch did not start")
        time.sleep(0.1)
    return str(batch["id"])


def one_round(args: argparse.Namespace) -> dict[str, float]:
    port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-m", "testkit.upstream", "--port", str(port), "--latency", str(args.latency)], cwd=ROOT
    )
    process = None
    try:
        time.sleep(1.0)
        process, url = gateway_process(
            ROOT,
            "batch_gateway",
            BACKEND="proxy",
            UPSTREAM_BASE_URL=f"http://127.0.0.1:{port}/v1",
            LOG_LEVEL="warning",
            MAX_CONCURRENT_REQUESTS=str(args.slots),
            BATCH_MAX_IN_FLIGHT=str(args.slots),
            MAX_QUEUE_SIZE="10000",
        )
        rate = args.load * args.slots / args.latency
        alone, _ = asyncio.run(interactive(url, rate, args.seconds))

        batch = submit_batch(url)
        time.sleep(1.0)
        before, started = _done(url, batch), time.monotonic()
        time.sleep(args.capacity_seconds)
        capacity = (_done(url, batch) - before) / (time.monotonic() - started)

        before, started = _done(url, batch), time.monotonic()
        beside, answered = asyncio.run(interactive(url, rate, args.seconds))
        elapsed = time.monotonic() - started
        batch_rate = (_done(url, batch) - before) / elapsed
        left = LINES - _done(url, batch)
        service = httpx.get(url + "/v1/queue/status").json()["estimated_service_seconds"]
        httpx.post(f"{url}/v1/batches/{batch}/cancel")
    finally:
        if process is not None:
            stop_process(process)
        upstream.terminate()
        upstream.wait(10)
    idle = capacity - answered / elapsed
    p95_alone, p95_beside = percentile(alone, 95), percentile(beside, 95)
    return {
        "rate": rate,
        "p95_alone": p95_alone,
        "p95_beside": p95_beside,
        "service": service,
        "bound": 1.1 * p95_alone + service,
        "capacity": capacity,
        "idle": idle,
        "batch_rate": batch_rate,
        "usage": batch_rate / idle,
        "lines_left": left,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="each interactive phase [default: 20]")
    parser.add_argument("--capacity-seconds", type=float, default=5.0, help="the batch alone [default: 5]")
    parser.add_argument("--latency", type=float, default=0.1, help="the upstream's answer time [default: 0.1]")
    parser.add_argument("--slots", type=int, default=8, help="MAX_CONCURRENT_REQUESTS [default: 8]")
    parser.add_argument("--load", type=float, default=0.5, help="interactive share of capacity [default: 0.5]")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    rows = [one_round(args) for _ in range(args.rounds)]
    print(
        f"{'round':>5} {'p95 alone':>10} {'p95 w/ batch':>13} {'bound':>8} {'met':>4}   "
        f"{'capacity/s':>10} {'idle/s':>7} {'batch/s':>8} {'usage':>6} {'met':>4}"
    )
    for n, row in enumerate(rows, 1):
        waits_met = row["p95_beside"] <= row["bound"]
        usage_met = row["usage"] >= 0.8
        print(
            f"{n:>5} {row['p95_alone'] * 1000:>8.1f}ms {row['p95_beside'] * 1000:>11.1f}ms "
            f"{row['bound'] * 1000:>6.1f}ms {'yes' if waits_met else 'NO':>4}   {row['capacity']:>10.1f} "
            f"{row['idle']:>7.1f} {row['batch_rate']:>8.1f} {row['usage']:>6.0%} {'yes' if usage_met else 'NO':>4}"
        )
        if row["lines_left"] <= 0:
            print("      (the batch ended before the phase did: raise the batch or shorten --seconds)")
    out = ROOT / "bench" / "results" / "batch.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rounds": rows}, indent=2))
    print(f"interactive load {rows[0]['rate']:.1f}/s; results in {out}")


if __name__ == "__main__":
    main()
