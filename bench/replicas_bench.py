"""Replicas sharing one real Redis, side by side with the same gateway keeping everything in process.

    python -m bench.replicas_bench                         # all parts
    python -m bench.replicas_bench --only cost --rounds 3

  correctness  3 replicas, 64 connections spread across them for --seconds (20), priorities drawn at random,
               a fake upstream (20-60 ms) whose max_concurrent of 8 all replicas share: concurrency violations
               (a request that reached the upstream while 8 were already there) and priority inversions (a
               slot granted while a request of a higher priority waited in the shared queue, from Redis' own
               MONITOR record of what the scripts ran, in order): 0 of each wanted
  cost         wrk against one gateway keeping its queue in process and the same gateway in Redis mode, in
               turns, each keeping its best round: the p50 Redis mode adds at 1 connection (<= 1.0 ms wanted),
               requests/s at 32 connections (Redis mode >= 0.5x in process), and three Redis-mode replicas
               loaded at once, 32 connections each (together >= 2x one replica's figure)
  quota        a key with rpm 60 hammered from 3 replicas for 10 s: admitted against 60 plus what refilled
               meanwhile (over-admission 0 wanted)

Every gateway is a process of its own (bench.common.gateway_process), started with no setting inherited.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import redis

from bench.common import ROOT, Contender, gateway_process, stop_process
from bench.proxy_bench import API_KEY, BODY, wrk
from testkit.gateway import free_port
from testkit.redis_server import RedisServer
from testkit.upstream import Behavior, FakeUpstream


def replicas(count: int, name: str, **settings: str) -> list[tuple[subprocess.Popen[bytes], str]]:
    return [
        gateway_process(ROOT, f"replicas-{name}-{n}", REPLICA_ID=f"{name}-{n}", LOG_LEVEL="warning", **settings)
        for n in range(count)
    ]


# Correctness -----------------------------------------------------------------------------------------------


async def _load(urls: list[str], connections: int, seconds: float) -> list[tuple[str, str, str, int]]:
    """Closed-loop clients spread over the replicas: (replica url, request id, priority, status) of each."""
    done: list[tuple[str, str, str, int]] = []
    rng = random.Random(7)
    end = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def client(index: int) -> None:
            url = urls[index % len(urls)]
            n = 0
            while time.monotonic() < end:
                n += 1
                request_id = f"c{index}-{n}"
                priority = rng.choice(("high", "normal", "normal", "low", "low"))
                headers = {"X-Request-ID": request_id, "X-Priority": priority}
                body = {"model": "m", "messages": [{"role": "user", "content": request_id}]}
                async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as response:
                    await response.read()
                    done.append((url, request_id, priority, response.status))

        await asyncio.gather(*(client(i) for i in range(connections)))
    return done


class GrantAudit:
    """Redis' own record of the shared queue (MONITOR: the commands the scripts ran, in the order they ran).

    A ticket joins `P:q:<pool>` at its level (the score's leading digit) and leaves it; a grant then adds it to
    a member's leases, `P:l:<member>`. A grant while a ticket of a higher level waits in the queue is a
    priority inversion, whichever replicas the two came from.
    """

    def __init__(self, port: int):
        self._client = redis.Redis(port=port, decode_responses=True)  # connects at its first command
        self._stop = threading.Event()
        self.waiting: dict[str, int] = {}  # ticket: its level
        self.by_level: Counter[int] = Counter()
        self.grants = 0
        self.inversions = 0
        self._left: int | None = None  # the level of the ticket that just left the queue
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> GrantAudit:
        self._thread.start()
        time.sleep(0.2)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._client.ping()  # one more command wakes the monitor to see the flag
        self._thread.join(10)

    def _watch(self) -> None:
        with self._client.monitor() as monitor:
            for event in monitor.listen():
                if self._stop.is_set():
                    return
                words = event["command"].split(" ")
                if event.get("client_type") == "lua" and len(words) >= 3:
                    self._see(words)

    def _see(self, words: list[str]) -> None:
        verb, key = words[0].upper(), words[1]
        if verb == "ZADD" and ":q:" in key:
            ticket, level = words[3], int(float(words[2]) // 1e13)
            if ticket in self.waiting:
                self.by_level[self.waiting[ticket]] -= 1
            self.waiting[ticket] = level
            self.by_level[level] += 1
        elif verb == "ZREM" and ":q:" in key:
            self._left = self.waiting.pop(words[2], None)
            if self._left is not None:
                self.by_level[self._left] -= 1
        elif verb == "ZADD" and ":l:" in key and words[2].upper() != "XX":
            self.grants += 1
            level = self._left
            if level is not None and any(self.by_level[higher] > 0 for higher in range(level)):
                self.inversions += 1


def correctness(seconds: float) -> dict[str, Any]:
    redis_server = RedisServer().start()
    upstream = FakeUpstream(behavior=Behavior(latency=0.02, latency_spread=0.04), capacity=8).start()
    gateways = replicas(
        3,
        "correct",
        BACKEND="proxy",
        UPSTREAM_BASE_URL=upstream.base_url,
        MAX_CONCURRENT_REQUESTS="8",
        MAX_QUEUE_SIZE="1000",
        REDIS_URL=redis_server.url,
    )
    audit = GrantAudit(redis_server.port).start()
    try:
        done = asyncio.run(_load([url for _, url in gateways], 64, seconds))
    finally:
        audit.stop()
        for process, _ in gateways:
            stop_process(process)
        upstream.stop()
        redis_server.stop()
    return {
        "requests": len(done),
        "statuses": dict(Counter(status for *_, status in done)),
        "by_priority": dict(Counter(priority for _, _, priority, _ in done)),
        "upstream_peak": upstream.peak,
        "concurrency_violations": upstream.over_capacity,
        "grants_audited": audit.grants,
        "priority_inversions": audit.inversions,
    }


# Cost --------------------------------------------------------------------------------------------------------


def cost(rounds: int, duration: float) -> dict[str, Any]:
    redis = RedisServer().start()
    up_port = free_port()
    upstream = Contender(
        "replicas-upstream", [sys.executable, "-m", "testkit.upstream", "--port", str(up_port)], up_port
    )
    upstream.start()
    common = {
        "BACKEND": "proxy",
        "UPSTREAM_BASE_URL": upstream.url + "/v1",
        "MAX_CONCURRENT_REQUESTS": "64",
        "API_KEYS": API_KEY,
    }
    best: dict[str, float] = {}

    def keep(label: str, value: float, higher: bool) -> None:
        old = best.get(label)
        if old is None or (value > old if higher else value < old):
            best[label] = value

    try:
        for _ in range(rounds):
            for mode in ("in_process", "redis"):
                extra = {"REDIS_URL": redis.url} if mode == "redis" else {}
                [(process, url)] = replicas(1, mode, **common, **extra)
                try:
                    wrk(url, 8, 2, BODY)  # warm up
                    one = wrk(url, 1, duration, BODY)
                    many = wrk(url, 32, duration, BODY)
                finally:
                    stop_process(process)
                keep(f"{mode}_p50_c1_ms", one["p50_ms"], higher=False)
                keep(f"{mode}_rps_c32", many["rps"], higher=True)
            three = replicas(3, "three", **common, REDIS_URL=redis.url)
            try:
                for _, url in three:
                    wrk(url, 8, 1, BODY)
                total = asyncio.run(_together([url for _, url in three], duration))
            finally:
                for process, _ in three:
                    stop_process(process)
            keep("three_replicas_rps_c32_each", total, higher=True)
    finally:
        upstream.stop()
        redis.stop()
    return {
        **best,
        "added_p50_c1_ms": best["redis_p50_c1_ms"] - best["in_process_p50_c1_ms"],
        "rps_c32_redis_over_in_process": best["redis_rps_c32"] / best["in_process_rps_c32"],
        "three_over_one_replica": best["three_replicas_rps_c32_each"] / best["redis_rps_c32"],
    }


async def _together(urls: list[str], duration: float) -> float:
    results = await asyncio.gather(*(asyncio.to_thread(wrk, url, 32, duration, BODY) for url in urls))
    return sum(result["rps"] for result in results)


# Quota -------------------------------------------------------------------------------------------------------


async def _hammer(urls: list[str], seconds: float) -> tuple[Counter[int], float]:
    statuses: Counter[int] = Counter()
    headers = {"Authorization": "Bearer sk-bench-quota"}
    started = time.monotonic()
    end = started + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def client(index: int) -> None:
            url = urls[index % len(urls)]
            while time.monotonic() < end:
                async with session.post(url + "/v1/chat/completions", data=BODY, headers=headers) as response:
                    await response.read()
                    statuses[response.status] += 1

        await asyncio.gather(*(client(i) for i in range(30)))
    return statuses, time.monotonic() - started


def quota(seconds: float) -> dict[str, Any]:
    redis = RedisServer().start()
    upstream = FakeUpstream().start()
    keys = Path(tempfile.mkdtemp(prefix="replicas-bench-")) / "keys.yaml"
    keys.write_text("keys:\n  - {key: sk-bench-quota, name: bench, rpm: 60}\n")
    gateways = replicas(
        3, "quota", BACKEND="proxy", UPSTREAM_BASE_URL=upstream.base_url, REDIS_URL=redis.url, API_KEYS_FILE=str(keys)
    )
    try:
        statuses, elapsed = asyncio.run(_hammer([url for _, url in gateways], seconds))
    finally:
        for process, _ in gateways:
            stop_process(process)
        upstream.stop()
        redis.stop()
    allowed = 60 + int(elapsed * 60 / 60)  # the burst, plus one a second refilled
    return {
        "seconds": round(elapsed, 2),
        "statuses": dict(statuses),
        "admitted": statuses[200],
        "allowed": allowed,
        "over_admission": max(0, statuses[200] - allowed),
        "in_process_would_admit_up_to": 3 * allowed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="correctness,cost,quota")
    parser.add_argument("--seconds", type=float, default=20.0, help="correctness: seconds of load")
    parser.add_argument("--rounds", type=int, default=3, help="cost: rounds, the best of each kept")
    parser.add_argument("--duration", type=float, default=5.0, help="cost: seconds of each wrk run")
    parser.add_argument("--quota-seconds", type=float, default=10.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    parts = set(args.only.split(","))
    results: dict[str, Any] = {}
    if "correctness" in parts:
        results["correctness"] = correctness(args.seconds)
        print("correctness", json.dumps(results["correctness"]), flush=True)
    if "cost" in parts:
        results["cost"] = cost(args.rounds, args.duration)
        print("cost", json.dumps(results["cost"]), flush=True)
    if "quota" in parts:
        results["quota"] = quota(args.quota_seconds)
        print("quota", json.dumps(results["quota"]), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
