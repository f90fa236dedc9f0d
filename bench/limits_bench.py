"""Rate limits and fairness, side by side with their references in one run.

1. Fairness: a noisy key floods the queue while a quiet key sends one request now and then. The quiet key's
   queue wait (p50 / p95) is compared with the noisy key's, with round-robin across keys (two keys) and
   with plain FIFO (the same two clients sharing one key: the reference).
2. Refusals: an upstream that allows RPM requests a minute, refilled continuously, and refuses the rest
   with 429 (no x-ratelimit headers: it says nothing until it refuses). The same offered load, 1.5 times what
   the upstream allows over the run, is sent with
   the gateway's limiter off and with RATE_LIMIT_RPM set to the upstream's limit; the upstream counts what
   it refused.

    python -m bench.limits_bench [--seconds 20] [--json bench/results/limits.json]

Gateway and fake upstream run in this process (threads, each with its own event loop); wait times come from
the gateway's own request records, so the load generator's speed does not enter them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import ROOT, percentile
from testkit.gateway import RunningGateway, gateway_settings
from testkit.upstream import FakeUpstream

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def start(upstream: FakeUpstream, **settings: Any) -> RunningGateway:
    values = {"backend": "proxy", "upstream_base_url": upstream.base_url, "log_level": "error", **settings}
    return RunningGateway(gateway_settings(**values)).start()


async def _post(client: httpx.AsyncClient, url: str, key: str, request_id: str) -> int:
    """The status code, or 0 when the connection failed (counted as an error)."""
    headers = {"Authorization": f"Bearer {key}", "X-Request-ID": request_id}
    try:
        response = await client.post(url + "/v1/chat/completions", json=BODY, headers=headers)
    except httpx.HTTPError as exc:
        print(f"{request_id}: {exc!r}")
        return 0
    return response.status_code


async def _fairness_load(url: str, noisy_key: str, quiet_key: str, seconds: float) -> tuple[list[str], list[str]]:
    """Noisy: 400 requests at once, then 400 more halfway. Quiet: one request every 250 ms."""
    # No keep-alive: a connection reused just as the server's keep-alive timer closes it fails on the client.
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        noisy_ids: list[str] = []
        quiet_ids: list[str] = []
        tasks = []
        for burst in range(2):
            for i in range(400):
                noisy_ids.append(f"noisy-{burst}-{i}")
                tasks.append(asyncio.create_task(_post(client, url, noisy_key, noisy_ids[-1])))
            end = time.monotonic() + seconds / 2
            n = 0
            while time.monotonic() < end:
                quiet_ids.append(f"quiet-{burst}-{n}")
                tasks.append(asyncio.create_task(_post(client, url, quiet_key, quiet_ids[-1])))
                n += 1
                await asyncio.sleep(0.25)
        await asyncio.gather(*tasks)
        return noisy_ids, quiet_ids


def _waits(gw: RunningGateway, ids: list[str]) -> list[float]:
    waits = []
    for request_id in ids:
        job = gw.scheduler.registry.lookup_any(request_id)
        if job is not None and job.started is not None:
            waits.append(job.started - job.arrived)
    return waits


def fairness(seconds: float) -> dict[str, Any]:
    results: dict[str, Any] = {}
    upstream = FakeUpstream().start()
    upstream.behavior.latency = 0.05  # 2 slots: 40 requests a second
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys.yaml"
        keys.write_text("keys:\n  - {key: sk-noisy, name: noisy}\n  - {key: sk-quiet, name: quiet}\n")
        try:
            for mode, quiet_key in (("round robin (two keys)", "sk-quiet"), ("FIFO (one shared key)", "sk-noisy")):
                gw = start(
                    upstream,
                    api_keys_file=str(keys),
                    max_concurrent_requests=2,
                    max_queue_size=10_000,
                    request_history_size=100_000,
                )
                try:
                    noisy_ids, quiet_ids = asyncio.run(_fairness_load(gw.url, "sk-noisy", quiet_key, seconds))
                    noisy, quiet = _waits(gw, noisy_ids), _waits(gw, quiet_ids)
                finally:
                    gw.stop()
                results[mode] = {
                    "quiet_requests": len(quiet),
                    "quiet_wait_p50_ms": percentile(quiet, 50) * 1000,
                    "quiet_wait_p95_ms": percentile(quiet, 95) * 1000,
                    "noisy_requests": len(noisy),
                    "noisy_wait_p50_ms": percentile(noisy, 50) * 1000,
                    "noisy_wait_p95_ms": percentile(noisy, 95) * 1000,
                }
        finally:
            upstream.stop()
    return results


async def _paced_load(url: str, rate: float, seconds: float) -> list[int]:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        tasks = []
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            tasks.append(asyncio.create_task(_post(client, url, "none", f"r{n}")))
            n += 1
            await asyncio.sleep(1 / rate)
        return list(await asyncio.gather(*tasks))


def refusals(seconds: float, rpm: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    # Half as much again as the upstream allows over the run: its full bucket plus what refills meanwhile.
    allowed = rpm + rpm * seconds / 60
    offered_rate = 1.5 * allowed / seconds
    for mode, limit in (("limiter off", None), ("limiter on (RATE_LIMIT_RPM)", rpm)):
        upstream = FakeUpstream().start()
        upstream.behavior.rate_limit = rpm
        gw = start(
            upstream,
            max_concurrent_requests=16,
            max_queue_size=10_000,
            upstream_max_retries=0,
            rate_limit_rpm=limit,
            request_timeout=seconds,
        )
        try:
            statuses = asyncio.run(_paced_load(gw.url, offered_rate, seconds))
        finally:
            gw.stop()
            upstream.stop()
        results[mode] = {
            "offered": len(statuses),
            "upstream_refused": upstream.refused,
            "client_200": statuses.count(200),
            "client_429": statuses.count(429),
            "client_408": statuses.count(408),
            "connection_errors": statuses.count(0),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each load (default 20)")
    parser.add_argument("--rpm", type=int, default=120, help="the upstream's requests per minute (default 120)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "limits.json"))
    args = parser.parse_args()

    fair = fairness(args.seconds)
    print("\nQueue wait of a quiet key beside a noisy one (2 slots, 50 ms per request, 800 noisy requests)\n")
    print("| queueing | quiet p50 | quiet p95 | noisy p50 | noisy p95 | quiet p95 / noisy p95 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode, r in fair.items():
        ratio = r["quiet_wait_p95_ms"] / r["noisy_wait_p95_ms"]
        print(
            f"| {mode} | {r['quiet_wait_p50_ms']:.0f} ms | {r['quiet_wait_p95_ms']:.0f} ms | "
            f"{r['noisy_wait_p50_ms']:.0f} ms | {r['noisy_wait_p95_ms']:.0f} ms | {ratio:.3f} |"
        )

    refused = refusals(args.seconds, args.rpm)
    print(f"\nRequests the upstream refused ({args.rpm} RPM, offered 1.5x its budget over {args.seconds:g} s)\n")
    print("| gateway | offered | refused by upstream | client 200 | client 429 | client 408 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode, r in refused.items():
        print(
            f"| {mode} | {r['offered']} | {r['upstream_refused']} | {r['client_200']} | {r['client_429']} | "
            f"{r['client_408']} |"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"fairness": fair, "refusals": refused}, indent=2))
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
