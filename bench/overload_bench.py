"""Served throughput under a flood of rejections: one slot, a small queue, and wrk far past capacity.

    python -m bench.overload_bench                   # this checkout
    python -m bench.overload_bench --root /tmp/old   # another checkout of the gateway (before/after)

A fake upstream answers each completion after --latency seconds; the gateway has MAX_CONCURRENT_REQUESTS=1 and
MAX_QUEUE_SIZE=2, so its capacity is about 1/latency requests per second. In each round:
  capacity   four closed-loop clients keep the slot busy: completions per second
  floods     the same four clients, plus wrk with 100 connections (nearly all refused 503 queue_full; wrk's
             answered requests per second are shown, which a gateway that holds refused connections lowers):
    100x           each connection pauses between requests so that it offers --overload times capacity
    flat out       each connection sends again as soon as it is answered (the case the gateway was slow in)
    reconnecting   flat out, a new connection for every request (Connection: close): a flood the gateway
                   cannot hold back to its Retry-After, so what each refusal costs shows whole
The gateway runs on a core of its own, everything else on the others (--no-pin: all share every core).
Completions are counted by the gateway's own gateway_requests_total{outcome="completed"}. The figure is the
median over rounds of overload / capacity (>= 0.90 wanted at 100x overload).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import aiohttp
import httpx

from bench.common import Contender
from bench.proxy_bench import wrk
from testkit.gateway import free_port

ROOT = Path(__file__).resolve().parent.parent
BODY = '{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}'


def completed(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("gateway_requests_total{") and 'outcome="completed"' in line
    )


async def clients(url: str, count: int, seconds: float) -> None:
    """`count` closed-loop clients: each sends a completion, waits for its answer, and sends the next.

    Refused, they try again after a millisecond, ignoring Retry-After, as a busy client would; whatever is
    still unanswered when the time is up is abandoned.
    """
    end = time.monotonic() + seconds

    async def one(session: aiohttp.ClientSession) -> None:
        while (left := end - time.monotonic()) > 0:
            try:
                async with session.post(
                    url + "/v1/chat/completions",
                    data=BODY,
                    headers={"Content-Type": "application/json"},
                    timeout=aiohttp.ClientTimeout(total=left),
                ) as r:
                    await r.read()
                    if r.status != 200:
                        await asyncio.sleep(0.001)
            except (TimeoutError, aiohttp.ClientError):
                return

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session) for _ in range(count)))


def measure(url: str, seconds: float, flood: bool, pause_ms: int = 0, reconnect: bool = False) -> tuple[float, float]:
    """Completions per second over `seconds`, and the flood's answered requests per second (0 without it)."""
    result: dict[str, float] = {}
    load = [threading.Thread(target=lambda: asyncio.run(clients(url, 4, seconds)))]
    if flood:
        load.append(threading.Thread(target=lambda: result.update(wrk(url, 100, seconds, BODY, pause_ms, reconnect))))
    before = completed(url)
    for thread in load:
        thread.start()
    time.sleep(seconds)
    served = (completed(url) - before) / seconds
    for thread in load:
        thread.join()
    return served, result.get("rps", 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout of the gateway to run")
    parser.add_argument("--latency", type=float, default=0.02, help="the upstream's seconds per completion")
    parser.add_argument("--overload", type=float, default=100, help="offered load as a multiple of capacity")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-pin", action="store_true", help="leave every process on every core")
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    python = sys.executable
    up_port, gw_port = free_port(), free_port()
    upstream = Contender(
        "overload upstream",
        [python, "-m", "testkit.upstream", "--port", str(up_port), "--latency", str(args.latency)],
        up_port,
    )
    root = str(args.root)
    start = f"import sys; sys.path.insert(0, {root!r}); from app.__main__ import main; main()"
    gateway = Contender(
        "overload gateway",
        [python, "-c", start],
        gw_port,
        {
            "BACKEND": "proxy",
            "UPSTREAM_BASE_URL": f"http://127.0.0.1:{up_port}/v1",
            "MAX_CONCURRENT_REQUESTS": "1",
            "MAX_QUEUE_SIZE": "2",
            "LOG_LEVEL": "warning",
            "PORT": str(gw_port),
        },
        ready_path="/ready",
    )
    upstream.start()
    gateway.start()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2 and not args.no_pin:
        # The gateway gets a core of its own, the load (wrk, the clients, the upstream) the others: on a small
        # machine the load generator would otherwise take the gateway's CPU and measure itself.
        assert gateway.process is not None and upstream.process is not None
        os.sched_setaffinity(gateway.process.pid, cpus[:1])
        for pid in (0, upstream.process.pid):
            os.sched_setaffinity(pid, cpus[1:])
    floods = {
        f"{args.overload:g}x": {},  # keep-alive, paced to the offered load asked for
        "flat out": {"pause": False},  # keep-alive, each connection sending again as soon as it is answered
        "reconnecting": {"pause": False, "reconnect": True},  # a new connection for every request, flat out
    }
    ratios: dict[str, list[float]] = {name: [] for name in floods}
    try:
        print(f"gateway: {root}; upstream latency {args.latency * 1000:g} ms; one slot, MAX_QUEUE_SIZE=2", flush=True)
        for n in range(1, args.rounds + 1):
            capacity, _ = measure(gateway.url, args.seconds, flood=False)
            # 100 connections, each pausing a little less than its share of the period: an answer takes time too
            pause_ms = max(1, int(100 / (args.overload * capacity) * 1000 * 0.9))
            cells = [f"round {n}: capacity {capacity:.1f}/s"]
            for name, how in floods.items():
                served, answered = measure(
                    gateway.url,
                    args.seconds,
                    flood=True,
                    pause_ms=pause_ms if how.get("pause", True) else 0,
                    reconnect=bool(how.get("reconnect")),
                )
                ratios[name].append(served / capacity)
                cells.append(
                    f"{name}: answered {answered:.0f} req/s ({answered / capacity:.0f}x), served {served:.1f}/s "
                    f"= {served / capacity:.3f}"
                )
            print(" | ".join(cells), flush=True)
        for name, values in ratios.items():
            print(f"served / capacity, {name} flood, median of {args.rounds}: {statistics.median(values):.3f}")
    finally:
        gateway.stop()
        upstream.stop()


if __name__ == "__main__":
    main()
