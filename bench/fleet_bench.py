"""A fleet behind one queue: scaling with members, failover when one dies, and conversation affinity.

    python -m bench.fleet_bench                       # all parts
    python -m bench.fleet_bench --only scaling,affinity

  scaling    fake upstreams with a fixed --latency and max_concurrent 4 each, offered twice what the fleet can
             take: completions per second with 1, 2 and 4 members; each against members x the one-member figure
             (>= 0.95 wanted)
  failover   3 members, the busiest SIGKILLed a third of the way through a --failover-seconds run of whole
             answers and streams: errors of requests that had not begun streaming (0 wanted), and the streams cut
  affinity   30 conversations of 5 turns over 3 fake members that report whether they had seen the
             conversation's opening before (a prompt cache): hit rate of follow-up turns, ROUTING=affinity
             against round_robin (>= 90% wanted)
  llama      two real llama-server processes on the bundled model (-np 2 each, so a pool always has a choice
             of free slots), conversations with a long opening of their own, two at a time: time to first token
             of follow-up turns and the share of their prompt the server had cached, affinity against
             round_robin (the servers' prompt caches are the real thing)

Every gateway and upstream is a process of its own, started in an empty directory with no setting inherited.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import yaml

from app.backends.llama.backend import default_model_path
from bench.common import (
    ROOT,
    Contender,
    gateway_process,
    llama_server_binary,
    llama_server_flags,
    percentile,
    stop_process,
)
from testkit.gateway import free_port

SYSTEM = "You are a careful assistant."
_WORDS = ("river", "stone", "cloud", "maple", "copper", "lantern", "orbit", "meadow", "signal", "harbor", "ember")


def document(number: int) -> str:
    """A long opening of its own for each conversation (about 400 tokens): what a prompt cache saves."""
    rng = random.Random(number)
    return " ".join(rng.choice(_WORDS) for _ in range(300))


def fake_upstream(latency: float, pace: float = 0.0) -> Contender:
    port = free_port()
    argv = [sys.executable, "-m", "testkit.upstream", "--port", str(port), "--latency", str(latency)]
    argv += ["--pace", str(pace), "--chunks", "5"]
    upstream = Contender(f"fake-upstream-{port}", argv, port)
    upstream.start()
    return upstream


def backends_file(members: list[tuple[str, str, int]], **extra: Any) -> str:
    entries = [
        {"name": name, "type": "proxy", "base_url": url, "max_concurrent": slots, "models": ["m"], **extra}
        for name, url, slots in members
    ]
    path = Path(tempfile.mkdtemp(prefix="fleet-bench-")) / "backends.yaml"
    path.write_text(yaml.safe_dump({"backends": entries}))
    return str(path)


# Scaling ------------------------------------------------------------------------------------------------


async def closed_loop(url: str, clients: int, seconds: float) -> float:
    """Completions per second from `clients` that each send again as soon as they are answered."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    done = 0
    end = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            nonlocal done
            while time.monotonic() < end:
                async with session.post(url + "/v1/chat/completions", json=body) as response:
                    await response.read()
                    if response.status == 200:
                        done += 1

        started = time.monotonic()
        await asyncio.gather(*(one() for _ in range(clients)))
        return done / (time.monotonic() - started)


def scaling(args: argparse.Namespace) -> dict[str, Any]:
    upstreams = [fake_upstream(args.latency) for _ in range(4)]
    rates: dict[int, list[float]] = {1: [], 2: [], 4: []}
    try:
        for _ in range(args.rounds):
            for count, values in rates.items():
                members = [(f"m{i}", u.url + "/v1", 4) for i, u in enumerate(upstreams[:count])]
                process, url = gateway_process(
                    ROOT,
                    "fleet-gateway",
                    BACKENDS_FILE=backends_file(members),
                    MAX_QUEUE_SIZE="1000",
                    LOG_LEVEL="warning",
                )
                try:
                    asyncio.run(closed_loop(url, 2, 1.0))  # warm the connections
                    values.append(asyncio.run(closed_loop(url, 8 * count, args.seconds)))
                finally:
                    stop_process(process)
    finally:
        for upstream in upstreams:
            upstream.stop()
    one = statistics.median(rates[1])
    result: dict[str, Any] = {"capacity_per_member": 4 / args.latency}
    print(f"\nscaling: fake members of max_concurrent 4 at {args.latency * 1000:.0f} ms, offered 2x capacity")
    print(f"{'members':>8} {'req/s (median)':>15} {'vs members x one':>17}   rounds")
    for count, values in rates.items():
        ratio = statistics.median(values) / (count * one)
        result[f"members_{count}"] = {"rps": round(statistics.median(values), 1), "vs_linear": round(ratio, 3)}
        print(f"{count:>8} {statistics.median(values):>15.1f} {ratio:>16.3f}x   {[round(v) for v in values]}")
    return result


# Failover -----------------------------------------------------------------------------------------------


@dataclass
class Tally:
    whole_ok: int = 0
    whole_errors: list[int] = field(default_factory=list)
    streams_ok: int = 0
    streams_cut: int = 0
    streams_refused: list[int] = field(default_factory=list)  # errors before a stream began


async def mixed_load(url: str, seconds: float, kill_at: float, members: dict[str, Contender]) -> tuple[Tally, str]:
    """Whole answers and streams for `seconds`; at `kill_at` the member with the most requests in flight (streams
    last longest, so most of them are streams) is SIGKILLed. The tally, and the name of the member killed."""
    tally = Tally()
    killed = ""
    end = time.monotonic() + seconds
    whole = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    streamed = {**whole, "stream": True}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def whole_client() -> None:
            while time.monotonic() < end:
                async with session.post(url + "/v1/chat/completions", json=whole) as response:
                    await response.read()
                    if response.status == 200:
                        tally.whole_ok += 1
                    else:
                        tally.whole_errors.append(response.status)

        async def stream_client() -> None:
            while time.monotonic() < end:
                async with session.post(url + "/v1/chat/completions", json=streamed) as response:
                    text = (await response.read()).decode()
                    if response.status != 200:
                        tally.streams_refused.append(response.status)
                    elif '"error"' in text:
                        tally.streams_cut += 1
                    else:
                        tally.streams_ok += 1

        async def killer() -> None:
            nonlocal killed
            await asyncio.sleep(kill_at)
            async with session.get(url + "/v1/queue/status") as response:
                backends = (await response.json())["backends"]
            killed = max(backends, key=lambda backend: backend["in_flight"])["name"]
            victim = members[killed].process
            assert victim is not None
            victim.kill()  # SIGKILL: connections reset, nothing answered

        await asyncio.gather(killer(), *(whole_client() for _ in range(6)), *(stream_client() for _ in range(6)))
    return tally, killed


def failover(args: argparse.Namespace) -> dict[str, Any]:
    upstreams = [fake_upstream(args.latency, pace=0.1) for _ in range(3)]  # streams of about half a second
    members = [(f"m{i}", u.url + "/v1", 4) for i, u in enumerate(upstreams)]
    process, url = gateway_process(
        ROOT, "fleet-gateway", BACKENDS_FILE=backends_file(members, probe_interval=0.5), LOG_LEVEL="warning"
    )
    try:
        by_name = {f"m{i}": upstream for i, upstream in enumerate(upstreams)}
        tally, killed = asyncio.run(mixed_load(url, args.failover_seconds, args.failover_seconds / 3, by_name))
        backends = httpx.get(url + "/v1/queue/status").json()["backends"]
    finally:
        stop_process(process)
        for upstream in upstreams:
            upstream.stop()
    errors = len(tally.whole_errors) + len(tally.streams_refused)
    at, seconds = args.failover_seconds / 3, args.failover_seconds
    print(f"\nfailover: 3 members, {killed} (the busiest) killed at {at:.0f}s of {seconds:.0f}s")
    print(f"  whole answers: {tally.whole_ok} ok, {len(tally.whole_errors)} errors {sorted(set(tally.whole_errors))}")
    print(f"  streams: {tally.streams_ok} whole, {tally.streams_cut} cut by the kill (ended with their error event),")
    print(f"           {len(tally.streams_refused)} refused before they began")
    print(f"  client errors of requests that had not begun streaming: {errors}")
    print(f"  {killed} healthy at the end: {next(b['healthy'] for b in backends if b['name'] == killed)}")
    return {
        "whole_ok": tally.whole_ok,
        "errors_before_streaming": errors,
        "streams_whole": tally.streams_ok,
        "streams_cut": tally.streams_cut,
    }


# Affinity -----------------------------------------------------------------------------------------------


def conversation(number: int, turns: int) -> list[dict[str, str]]:
    opening = f"Conversation {number}. Summarise this: {document(number)}"
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": opening}]
    for turn in range(turns):
        messages += [
            {"role": "assistant", "content": f"Answer {turn}."},
            {"role": "user", "content": f"Tell me more ({turn + 1})."},
        ]
    return messages


@dataclass
class Turns:
    """What the follow-up turns of the conversations met."""

    hits: list[bool] = field(default_factory=list)  # a fake member had seen the opening (whole answers)
    ttfts: list[float] = field(default_factory=list)  # seconds to the first content token (streams)
    cached: list[float] = field(default_factory=list)  # share of the prompt the server had cached (streams)


async def first_token(response: aiohttp.ClientResponse, started: float, turns: Turns) -> None:
    """Read a stream: when its first content arrived, and the share of its prompt the upstream had cached."""
    first = None
    async for line in response.content:
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        choices = event.get("choices") or [{}]
        if first is None and (choices[0].get("delta") or {}).get("content"):
            first = time.monotonic() - started
        usage = event.get("usage")
        if usage:
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            turns.cached.append(cached / max(1, usage["prompt_tokens"]))
    if first is not None:
        turns.ttfts.append(first)


async def conversations(
    url: str, count: int, turns: int, workers: int, stream: bool = False, max_tokens: int = 8
) -> Turns:
    """Run `count` conversations of `turns` turns, `workers` at a time; what their follow-up turns met."""
    seen = Turns()
    pending = list(range(count))
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            while pending:
                number = pending.pop(0)
                for turn in range(turns):
                    body: dict[str, Any] = {
                        "model": "m",
                        "messages": conversation(number, turn),
                        "max_tokens": max_tokens,
                    }
                    if stream:
                        body |= {"stream": True, "stream_options": {"include_usage": True}}
                    started = time.monotonic()
                    async with session.post(url + "/v1/chat/completions", json=body) as response:
                        assert response.status == 200, response.status
                        if stream:
                            await first_token(response, started, seen if turn else Turns())
                        else:
                            answer = json.loads(await response.read())
                            if turn:
                                seen.hits.append(answer.get("prefix_cache") == "hit")

        await asyncio.gather(*(worker() for _ in range(workers)))
    return seen


def affinity(args: argparse.Namespace) -> dict[str, Any]:
    upstreams = [fake_upstream(0.02) for _ in range(3)]
    rates: dict[str, float] = {}
    try:
        for routing in ("affinity", "round_robin"):
            members = [(f"m{i}", u.url + "/v1", 4) for i, u in enumerate(upstreams)]
            process, url = gateway_process(
                ROOT, "fleet-gateway", BACKENDS_FILE=backends_file(members), ROUTING=routing, LOG_LEVEL="warning"
            )
            try:
                hits = asyncio.run(conversations(url, 30, 5, workers=6)).hits
            finally:
                stop_process(process)
            rates[routing] = sum(hits) / len(hits)
            for upstream in upstreams:  # a fresh cache for the next routing
                upstream.stop()
                upstream.start()
    finally:
        for upstream in upstreams:
            upstream.stop()
    print("\naffinity: 30 conversations x 5 turns over 3 fake members, 6 at a time")
    for routing, rate in rates.items():
        print(f"  {routing:>12}: prompt-cache hit rate of follow-up turns {rate * 100:5.1f}%")
    return {"hit_rate_affinity": round(rates["affinity"], 3), "hit_rate_round_robin": round(rates["round_robin"], 3)}


def llama(args: argparse.Namespace) -> dict[str, Any]:
    binary = llama_server_binary()
    servers = []
    for _ in range(2):
        port = free_port()
        argv = [binary, "-m", default_model_path(), "-t", "1", "-tb", "1", "-c", "8192", "-np", "2"]
        argv += ["--port", str(port), *llama_server_flags()]
        servers.append(Contender(f"llama-server-{port}", argv, port, ready_path="/health"))
    ttft: dict[str, list[float]] = {}
    cached: dict[str, float] = {}
    try:
        for routing in ("affinity", "round_robin"):
            for server in servers:  # fresh caches, and a first request that loads the model (seconds) out of the way
                server.start()
                warm = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
                httpx.post(server.url + "/v1/chat/completions", json=warm, timeout=120)
            members = [(f"l{i}", s.url + "/v1", 2) for i, s in enumerate(servers)]
            process, url = gateway_process(
                ROOT, "fleet-gateway", BACKENDS_FILE=backends_file(members), ROUTING=routing, LOG_LEVEL="warning"
            )
            try:
                turns = asyncio.run(
                    conversations(
                        url, args.llama_conversations, 4, workers=args.llama_workers, stream=True, max_tokens=4
                    )
                )
                ttft[routing] = turns.ttfts
                cached[routing] = statistics.fmean(turns.cached) if turns.cached else float("nan")
            finally:
                stop_process(process)
                for server in servers:
                    server.stop()
    finally:
        for server in servers:
            server.stop()
    count, workers = args.llama_conversations, args.llama_workers
    print(f"\nllama-server x2 (bundled model, -np 2 each): {count} conversations x 4 turns, {workers} at a time")
    result: dict[str, Any] = {}
    for routing, values in ttft.items():
        p50, p90, mean = (
            statistics.median(values) * 1000,
            percentile(values, 90) * 1000,
            statistics.fmean(values) * 1000,
        )
        share = cached[routing] * 100
        print(f"  {routing:>12}: TTFT of follow-up turns p50 {p50:6.0f} ms, p90 {p90:6.0f} ms, mean {mean:6.0f} ms;")
        print(f"  {'':>12}  {share:.0f}% of their prompt tokens were in the server's cache")
        result[routing] = {
            "ttft_p50_ms": round(p50),
            "ttft_mean_ms": round(mean),
            "cached_share": round(share / 100, 3),
        }
    ratio = statistics.median(ttft["round_robin"]) / statistics.median(ttft["affinity"])
    mean_ratio = statistics.fmean(ttft["round_robin"]) / statistics.fmean(ttft["affinity"])
    print(f"  affinity is {mean_ratio:.2f}x faster to the first token on average, {ratio:.2f}x at the median")
    result["speedup_mean"], result["speedup_p50"] = round(mean_ratio, 2), round(ratio, 2)
    return result


PARTS = {"scaling": scaling, "failover": failover, "affinity": affinity, "llama": llama}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(PARTS), help="comma-separated parts: " + ", ".join(PARTS))
    parser.add_argument("--latency", type=float, default=0.05, help="fake members' latency, seconds")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of a scaling measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--failover-seconds", type=float, default=15.0)
    parser.add_argument("--llama-conversations", type=int, default=16)
    parser.add_argument("--llama-workers", type=int, default=2, help="llama part: conversations at a time")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    results = {name: PARTS[name](args) for name in args.only.split(",")}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
