"""The proxy hot path, side by side: direct, a bare pass-through, llm-queue-gateway and LiteLLM.

One fast fake upstream on loopback (zero delay) serves every contender. In each round every contender is
measured in turn, so machine noise hits them alike, in the reverse order every other round, so that none
always runs right after the same one (in one run here whichever of bare and gateway ran second was 10-20 %
slower); each cell keeps its best round, and the paired ratios are the medians of each round's own.

  direct      the fake upstream itself: the ceiling
  bare        the smallest FastAPI + aiohttp pass-through (bench/bare_proxy.py): the stack's limit
  gateway     llm-queue-gateway, BACKEND=proxy, everything on: queue, API key auth, metrics, request records
  litellm     LiteLLM proxy (litellm[proxy], one worker) in its own virtual environment, installed once

Load comes from wrk (a Python load generator saturates near 1k req/s here and would measure itself):
requests/s and p50/p99 latency at 1 and 32 connections, non-streaming and streaming. Time to first byte and
the inter-chunk gap of streams come from a sequential client (the same client for every contender, so the
differences are the contenders'). Then 1,000 concurrent slow streams through the gateway, optionally
(--memory) RSS after 10,000 and after 1,000,000 proxied requests, and optionally (--profile) where a copy of
the gateway spends its CPU under wrk at 32 connections, sampled inside its process (bench/cpu_sampler.py): the
share of the scheduler's own code, of its calls with all they call, and of the garbage collector.
With --instructions N, bare and gateway each run again under valgrind's callgrind for N requests at 16
connections: the machine instructions each spends per request, which no noise of the host moves (the
req/s of one round here strayed by 10-20 %); their ratio tells whether a change to the hot path made it
lighter, though not how fast it runs (cache misses and IPC are not counted).

    python -m bench.proxy_bench [--rounds 3] [--duration 10] [--memory] [--profile [--profile-seconds 40]]
                                [--instructions 2000]
                                [--json bench/results/proxy.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.common import ROOT, Contender, percentile, side_env
from testkit.gateway import free_port

API_KEY = "bench-key"
LITELLM = "litellm[proxy]==1.106.2"
BODY = '{"model":"bench","messages":[{"role":"user","content":"hello"}]}'
STREAM_BODY = '{"model":"bench","messages":[{"role":"user","content":"hello"}],"stream":true}'
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(
    url: str, connections: int, duration: float, body: str, pause_ms: int = 0, reconnect: bool = False
) -> dict[str, float]:
    """requests/s, p50 and p99 in ms, and the count of non-2xx answers and socket errors.

    `pause_ms`: each connection waits this long after an answer before its next request (a set offered load).
    `reconnect`: every request on a connection of its own (`Connection: close`).
    """
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{body}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {API_KEY}"\n'
        + ('wrk.headers["Connection"] = "close"\n' if reconnect else "")
        + (f"function delay() return {pause_ms} end\n" if pause_ms else "")
    )
    threads = min(2, connections)
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",  # wrk takes whole seconds only
            "--latency",
            "-s",
            str(script),
            url + "/v1/chat/completions",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    script.unlink()

    def latency(label: str) -> float:
        match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        return float(match.group(1)) * _UNITS[match.group(2)] if match else float("nan")

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    total = re.search(r"(\d+) requests in", out)
    return {
        "rps": float(rps.group(1)) if rps else 0.0,
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "failed": (int(bad.group(1)) if bad else 0) + (sum(map(int, errors.groups())) if errors else 0),
        "requests": int(total.group(1)) if total else 0,
    }


async def stream_timings(url: str, count: int) -> dict[str, float]:
    """Sequential streams on one connection: time to first byte and gaps between chunks, in ms."""
    ttfb: list[float] = []
    gaps: list[float] = []
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        for index in range(count + 20):
            start = time.perf_counter()
            async with session.post(url + "/v1/chat/completions", data=STREAM_BODY, headers=headers) as response:
                last = None
                async for _ in response.content.iter_any():
                    now = time.perf_counter()
                    if index >= 20:  # the first 20 warm the connection and the caches
                        if last is None:
                            ttfb.append((now - start) * 1000)
                        else:
                            gaps.append((now - last) * 1000)
                    last = now
    return {
        "ttfb_p50_ms": percentile(ttfb, 50),
        "ttfb_p99_ms": percentile(ttfb, 99),
        "gap_p50_ms": percentile(gaps, 50),
        "gap_p99_ms": percentile(gaps, 99),
    }


async def slow_streams(url: str, count: int, pace: float) -> dict[str, float]:
    """`count` concurrent streams at one chunk per `pace` seconds: the worst gap between two chunks."""
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    worst: list[float] = []
    failures = 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:

        async def one() -> None:
            nonlocal failures
            try:
                async with session.post(url + "/v1/chat/completions", data=STREAM_BODY, headers=headers) as response:
                    if response.status != 200:
                        failures += 1
                        return
                    last = None
                    largest = 0.0
                    async for _ in response.content.iter_any():
                        now = time.perf_counter()
                        if last is not None:
                            largest = max(largest, now - last)
                        last = now
                    worst.append(largest)
            except aiohttp.ClientError:
                failures += 1

        await asyncio.gather(*[one() for _ in range(count)])
    return {
        "streams": count,
        "pace_s": pace,
        "worst_gap_s": max(worst, default=float("nan")),
        "worst_gap_over_pace": max(worst, default=float("nan")) / pace,
        "p99_gap_s": percentile(worst, 99),
        "failed": failures,
    }


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_check(gateway: Contender, total: int) -> dict[str, float]:
    """RSS after the first 10,000 requests and after `total`, under wrk at 32 connections."""
    assert gateway.process is not None
    done = 0
    early = None
    while done < total:
        result = wrk(gateway.url, 32, 10 if early is None else 30, BODY)
        done += int(result["requests"])
        if early is None and done >= 10_000:
            early = rss_mb(gateway.process.pid)
            print(f"  gateway RSS after {done:,} requests: {early:.1f} MB", flush=True)
    late = rss_mb(gateway.process.pid)
    print(f"  gateway RSS after {done:,} requests: {late:.1f} MB", flush=True)
    assert early is not None
    return {
        "requests": done,
        "rss_after_10k_mb": round(early, 1),
        "rss_after_all_mb": round(late, 1),
        "growth": round(late / early - 1, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10, help="seconds per wrk run at 32 connections")
    parser.add_argument("--streams", type=int, default=300, help="sequential streams for the TTFB figures")
    parser.add_argument("--slow-streams", type=int, default=1000)
    parser.add_argument("--memory", action="store_true", help="also run 1,000,000 requests for the RSS check")
    parser.add_argument("--memory-requests", type=int, default=1_000_000)
    parser.add_argument("--profile", action="store_true", help="also sample the gateway's CPU at c32")
    parser.add_argument("--profile-seconds", type=float, default=40, help="how long to sample [default: 40]")
    parser.add_argument("--instructions", type=int, default=0, help="requests counted under callgrind (0: none)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "proxy.json"))
    args = parser.parse_args()

    litellm_python = side_env("litellm", LITELLM)
    python = sys.executable
    up_port, slow_port, bare_port, gw_port, slow_gw_port, llm_port = (free_port() for _ in range(6))
    upstream = Contender("direct", [python, "-m", "testkit.upstream", "--port", str(up_port)], up_port)
    base = f"http://127.0.0.1:{up_port}/v1"
    config = ROOT / "bench" / "results" / "litellm.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(
        "model_list:\n  - model_name: bench\n    litellm_params:\n      model: openai/bench\n"
        f"      api_base: {base}\n      api_key: upstream-key\n"
        f"general_settings:\n  master_key: {API_KEY}\n"
    )
    gateway_env = {
        "BACKEND": "proxy",
        "UPSTREAM_BASE_URL": base,
        "MAX_CONCURRENT_REQUESTS": "1024",
        "MAX_QUEUE_SIZE": "10000",
        "API_KEYS": API_KEY,
        "LOG_LEVEL": "warning",
    }
    field = [
        upstream,
        Contender(
            "bare",
            [
                python,
                "-m",
                "uvicorn",
                "bench.bare_proxy:app",
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--no-access-log",
                "--log-level",
                "warning",
                "--port",
                str(bare_port),
            ],
            bare_port,
            {"UPSTREAM_BASE_URL": base},
            ready_path="/docs",
        ),
        Contender(
            "gateway", [python, "-m", "app"], gw_port, {**gateway_env, "PORT": str(gw_port)}, ready_path="/ready"
        ),
        Contender(
            "litellm",
            [
                str(litellm_python.parent / "litellm"),
                "--config",
                str(config),
                "--port",
                str(llm_port),
                "--num_workers",
                "1",
            ],
            llm_port,
            {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"},
            ready_path="/health/liveliness",
        ),
    ]
    cells: dict[tuple[str, str], dict[str, float]] = {}
    rounds: dict[tuple[str, str], list[float]] = {}  # each round's req/s, for the paired ratios
    slow_upstream = Contender(
        "slow upstream",
        [python, "-m", "testkit.upstream", "--port", str(slow_port), "--pace", "0.5", "--chunks", "10"],
        slow_port,
    )
    slow_gateway = Contender(
        "slow gateway",
        [python, "-m", "app"],
        slow_gw_port,
        {**gateway_env, "UPSTREAM_BASE_URL": f"http://127.0.0.1:{slow_port}/v1", "PORT": str(slow_gw_port)},
        ready_path="/ready",
    )
    extra: dict[str, object] = {}
    try:
        for contender in field:
            contender.start()
        for round_ in range(args.rounds):
            for contender in field if round_ % 2 == 0 else field[::-1]:
                for label, connections, duration, body in [
                    ("c1", 1, max(args.duration / 2, 3), BODY),
                    ("c32", 32, args.duration, BODY),
                    ("stream_c32", 32, args.duration, STREAM_BODY),
                ]:
                    result = wrk(contender.url, connections, duration, body)
                    key = (contender.name, label)
                    rounds.setdefault(key, []).append(result["rps"])
                    if key not in cells or result["rps"] > cells[key]["rps"]:
                        cells[key] = {**result, "failed": max(result["failed"], cells.get(key, {}).get("failed", 0))}
                    print(
                        f"round {round_ + 1} {contender.name:<8} {label:<10} {result['rps']:>9.0f} req/s "
                        f"p50 {result['p50_ms']:.3f} ms p99 {result['p99_ms']:.3f} ms failed {result['failed']}",
                        flush=True,
                    )
                timings = asyncio.run(stream_timings(contender.url, args.streams))
                key = (contender.name, "stream_timing")
                if key not in cells or timings["ttfb_p50_ms"] < cells[key]["ttfb_p50_ms"]:
                    cells[key] = timings
        slow_upstream.start()
        slow_gateway.start()
        extra["slow_streams_direct"] = asyncio.run(slow_streams(slow_upstream.url, args.slow_streams, 0.5))
        extra["slow_streams_gateway"] = asyncio.run(slow_streams(slow_gateway.url, args.slow_streams, 0.5))
        if args.memory:
            extra["memory"] = memory_check(field[2], args.memory_requests)
        if args.profile:
            extra["profile"] = profile(field[2], args.profile_seconds)
        if args.instructions:
            counted = {contender.name: instructions(contender, args.instructions) for contender in field[1:3]}
            extra["instructions_per_request"] = {**counted, "bare_over_gateway": counted["bare"] / counted["gateway"]}
    finally:
        for contender in [*field, slow_upstream, slow_gateway]:
            contender.stop()

    report(cells, rounds, extra, args.json)


def instructions(contender: Contender, requests: int) -> float:
    """The instructions `contender` executes per request: a copy of it under callgrind, warmed up by wrk, then
    counted over exactly `requests` non-streaming requests (one dump, from a zeroed count)."""
    port = free_port()
    argv = [str(port) if arg == str(contender.port) else arg for arg in contender.argv]
    env = {name: value for name, value in contender.env.items() if name != "DATA_DIR"}  # it gets its own
    env["PYTHONHASHSEED"] = "0"  # a random one moves the count by a few percent from one run to the next
    if "PORT" in env:
        env["PORT"] = str(port)
    with tempfile.TemporaryDirectory(prefix="bench-callgrind-") as out:
        counted = Contender(
            f"{contender.name} under callgrind",
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/counts", *argv],
            port,
            env,
            ready_path=contender.ready_path,
        )
        counted.start(timeout=900)  # the app starts some 50x slower under valgrind
        try:
            assert counted.process is not None
            wrk(counted.url, 8, 10, BODY)
            subprocess.run(["callgrind_control", "--zero", str(counted.process.pid)], check=True, capture_output=True)
            asyncio.run(fixed_load(counted.url, requests, 16))
            subprocess.run(["callgrind_control", "--dump", str(counted.process.pid)], check=True, capture_output=True)
            dump = Path(out, "counts.1").read_text()
        finally:
            counted.stop()
    total = re.search(r"^(?:summary|totals): (\d+)", dump, re.MULTILINE)
    if total is None:
        raise RuntimeError(f"callgrind's dump of {contender.name} holds no total")
    per_request = int(total.group(1)) / requests
    print(f"  {contender.name}: {per_request:,.0f} instructions per request", flush=True)
    return per_request


async def fixed_load(url: str, requests: int, connections: int) -> None:
    """Exactly `requests` chat completions, `connections` at a time; each must succeed."""
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    left = iter(range(requests))
    async with aiohttp.ClientSession() as session:

        async def client() -> None:
            for _ in left:
                async with session.post(url + "/v1/chat/completions", data=BODY, headers=headers) as response:
                    await response.read()
                    assert response.status == 200, response.status

        await asyncio.gather(*(client() for _ in range(connections)))


# The gateway's parts, by the file of the innermost gateway frame of a sample (its own time, with the library
# calls it makes directly): the scheduler and its data structures, the service, the HTTP layer, the backend.
_PROFILE_PARTS = {
    "scheduler": tuple(
        f"app/queue/{name}.py"
        for name in (
            "scheduler",
            "admission",
            "dispatcher",
            "priority_queue",
            "gate",
            "deadlines",
            "aging",
            "slots",
            "job",
        )
    ),
    "service": ("app/queue/service.py",),
    "api": ("app/api/",),
    "backend": ("app/backends/",),
}
# The scheduler's calls from outside it on this path: the share of the CPU spent under them counts everything
# they call (the request records, the metrics, the estimates, the budgets).
_SCHEDULER_ENTRIES = (
    "app/queue/scheduler.py:submit",
    "app/queue/scheduler.py:retire",
    "app/queue/scheduler.py:sheds",
    "app/queue/job.py:abortable",
    "app/queue/job.py:__enter__",
    "app/queue/job.py:__exit__",
    "app/queue/job.py:dispatched",
)


def profile(contender: Contender, duration: float) -> dict[str, float]:
    """Where a copy of the gateway spends its CPU while wrk drives it at 32 connections (bench/cpu_sampler.py):
    each part's share of the samples, the scheduler's calls' share with all they call, and the collector's."""
    port = free_port()
    argv = [contender.argv[0], "-m", "bench.cpu_sampler", *contender.argv[2:]]  # python -m app, run by the sampler
    env = {name: value for name, value in contender.env.items() if name != "DATA_DIR"}  # it gets its own
    env["PORT"] = str(port)
    with tempfile.TemporaryDirectory(prefix="bench-samples-") as out:
        env["CPU_SAMPLES_OUT"] = f"{out}/samples.json"
        env["CPU_SAMPLES_ENTRIES"] = ",".join(_SCHEDULER_ENTRIES)
        sampled = Contender(f"{contender.name} sampled", argv, port, env, ready_path=contender.ready_path)
        sampled.start()
        try:
            assert sampled.process is not None
            wrk(sampled.url, 32, 3, BODY)
            sampled.process.send_signal(signal.SIGUSR1)
            load = wrk(sampled.url, 32, duration, BODY)
            sampled.process.send_signal(signal.SIGUSR2)
            written = Path(out, "samples.json")
            deadline = time.monotonic() + 10
            while not written.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            counted = json.loads(written.read_text())
        finally:
            sampled.stop()
    files: dict[str, int] = counted["files"]
    total = sum(files.values())
    shares: dict[str, float] = {}
    for part, markers in _PROFILE_PARTS.items():
        n = sum(count for path, count in files.items() if any(path.startswith(marker) for marker in markers))
        shares[f"{part}_share"] = round(n / total, 4) if total else float("nan")
    return {
        "samples": total,
        "rps_while_sampled": load["rps"],
        **shares,
        "scheduler_calls_inclusive_share": round(counted["inclusive"] / total, 4) if total else float("nan"),
        "gc_share": round(counted["gc_seconds"] / counted["cpu_seconds"], 4),
    }


def paired(rounds: dict[tuple[str, str], list[float]], label: str, name: str, reference: str) -> float:
    """The median over rounds of name's req/s over reference's in the same round (noise hits a round's pair
    alike; the best cells of the table may come from different rounds)."""
    return statistics.median(a / b for a, b in zip(rounds[name, label], rounds[reference, label], strict=True))


def report(
    cells: dict[tuple[str, str], dict[str, float]],
    rounds: dict[tuple[str, str], list[float]],
    extra: dict[str, object],
    path: str,
) -> None:
    names = ["direct", "bare", "gateway", "litellm"]
    print(
        f"\n{'contender':<9} {'req/s c1':>9} {'p50 c1':>9} {'p99 c1':>9} {'req/s c32':>10} {'p50 c32':>9} "
        f"{'p99 c32':>9} {'stream/s c32':>12} {'ttfb p50':>9} {'ttfb p99':>9} {'gap p99':>8} {'failed':>6}"
    )
    for name in names:
        c1, c32, s32, st = (cells[name, k] for k in ("c1", "c32", "stream_c32", "stream_timing"))
        failed = int(c1["failed"] + c32["failed"] + s32["failed"])
        print(
            f"{name:<9} {c1['rps']:>9.0f} {c1['p50_ms']:>7.3f}ms {c1['p99_ms']:>7.3f}ms {c32['rps']:>10.0f} "
            f"{c32['p50_ms']:>7.3f}ms {c32['p99_ms']:>7.3f}ms {s32['rps']:>12.0f} {st['ttfb_p50_ms']:>7.3f}ms "
            f"{st['ttfb_p99_ms']:>7.3f}ms {st['gap_p99_ms']:>6.3f}ms {failed:>6}"
        )
    gw, bare, llm, direct = (cells[n, "c32"]["rps"] for n in ("gateway", "bare", "litellm", "direct"))
    ratios = {
        "gateway_vs_litellm_c32": gw / llm,
        "gateway_vs_bare_c32": gw / bare,
        "gateway_vs_bare_stream_c32": cells["gateway", "stream_c32"]["rps"] / cells["bare", "stream_c32"]["rps"],
        "gateway_vs_direct_c32": gw / direct,
        "gateway_vs_bare_c32_paired_median": paired(rounds, "c32", "gateway", "bare"),
        "gateway_vs_bare_stream_c32_paired_median": paired(rounds, "stream_c32", "gateway", "bare"),
        "gateway_vs_litellm_c32_paired_median": paired(rounds, "c32", "gateway", "litellm"),
        "added_p50_ms_c1": cells["gateway", "c1"]["p50_ms"] - cells["direct", "c1"]["p50_ms"],
        "bare_added_p50_ms_c1": cells["bare", "c1"]["p50_ms"] - cells["direct", "c1"]["p50_ms"],
        "litellm_added_p50_ms_c1": cells["litellm", "c1"]["p50_ms"] - cells["direct", "c1"]["p50_ms"],
        "added_ttfb_p99_ms": cells["gateway", "stream_timing"]["ttfb_p99_ms"]
        - cells["direct", "stream_timing"]["ttfb_p99_ms"],
    }
    print()
    for key, value in ratios.items():
        print(f"{key:<42} {value:>8.3f}")
    for key, value in extra.items():
        print(f"{key}: {json.dumps(value)}")
    with open(path, "w") as out:
        json.dump({"cells": {f"{n}/{k}": v for (n, k), v in cells.items()}, "ratios": ratios, **extra}, out, indent=2)
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
