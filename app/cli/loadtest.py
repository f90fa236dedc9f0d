"""`llm-queue-gateway loadtest`: chat completions with a priority mix, then status counts, queue wait and latency
percentiles by priority."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import aiohttp
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.cli.common import auth_headers, ms, wide_console
from app.types import Priority


def parse_mix(text: str) -> list[tuple[Priority, int]]:
    """'high=1,normal=3,low=6' as weights; raises ValueError naming what is wrong."""
    mix = []
    for part in text.split(","):
        name, _, weight = part.partition("=")
        try:
            priority = Priority(name.strip().lower())
            value = int(weight)
        except ValueError:
            raise ValueError(f"bad --priority-mix entry {part!r}: want high|normal|low=<whole number>") from None
        if value < 0:
            raise ValueError(f"bad --priority-mix weight {part!r}: must not be negative")
        mix.append((priority, value))
    if not sum(w for _, w in mix):
        raise ValueError("--priority-mix has no positive weight")
    return mix


def spread(mix: list[tuple[Priority, int]], count: int) -> list[Priority]:
    """`count` priorities in the mix's proportions, interleaved (smooth weighted round robin)."""
    total = sum(w for _, w in mix)
    credit = dict.fromkeys((p for p, _ in mix), 0)
    order = []
    for _ in range(count):
        for priority, weight in mix:
            credit[priority] += weight
        chosen = max(credit, key=lambda p: credit[p])
        credit[chosen] -= total
        order.append(chosen)
    return order


@dataclass
class Outcome:
    priority: Priority
    status: int  # 0: the connection failed
    latency: float
    wait: float | None  # X-Queue-Wait-Ms
    first_byte: float | None = None
    error: str | None = None


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    elapsed: float = 0.0


async def _one(session: aiohttp.ClientSession, args: argparse.Namespace, priority: Priority, index: int) -> Outcome:
    body = {
        "model": args.model,
        "messages": [{"role": "user", "content": f"{args.prompt} (request {index})"}],
        "max_tokens": args.max_tokens,
        "stream": args.stream,
    }
    headers = {**auth_headers(args.api_key), "X-Priority": priority.value, "Content-Type": "application/json"}
    started = time.monotonic()
    first = None
    try:
        async with session.post(
            args.url.rstrip("/") + "/v1/chat/completions", data=orjson.dumps(body), headers=headers
        ) as response:
            async for _ in response.content.iter_any():
                if first is None:
                    first = time.monotonic() - started
            wait = response.headers.get("x-queue-wait-ms")
            return Outcome(
                priority, response.status, time.monotonic() - started, float(wait) / 1000 if wait else None, first
            )
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Outcome(priority, 0, time.monotonic() - started, None, error=str(exc) or type(exc).__name__)


async def run_loadtest(args: argparse.Namespace, console: Console) -> Report:
    """Send args.requests requests, args.concurrency at a time, in the priority mix's proportions."""
    priorities = spread(parse_mix(args.priority_mix), args.requests)
    report = Report()
    pending = iter(enumerate(priorities))
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    progress = Progress(
        TextColumn("[bold]loadtest"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[summary]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        task = progress.add_task("requests", total=args.requests, summary="")
        statuses: Counter[int] = Counter()

        async def worker() -> None:
            for index, priority in pending:
                outcome = await _one(session, args, priority, index)
                report.outcomes.append(outcome)
                statuses[outcome.status] += 1
                summary = " ".join(f"{s or 'error'}:{n}" for s, n in sorted(statuses.items()))
                progress.update(task, advance=1, summary=summary)

        started = time.monotonic()
        with progress:
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        report.elapsed = time.monotonic() - started
    return report


def _percentile(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def report_table(report: Report, stream: bool) -> Table:
    """Status counts and wait / latency percentiles by priority, then all together."""
    title = f"{len(report.outcomes)} requests in {report.elapsed:.1f}s (times in ms)"
    table = Table(title=title, show_lines=False)
    columns = ["priority", "n", "statuses", "wait p50", "wait p95", "lat p50", "lat p95", "lat p99"]
    if stream:
        columns.append("ttfb p50")
    for column in columns:
        table.add_column(column, justify="left" if column in ("priority", "statuses") else "right")
    groups: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in report.outcomes:
        groups[outcome.priority.value].append(outcome)
    rows = [(p.value, groups[p.value]) for p in Priority if groups.get(p.value)]
    rows.append(("all", report.outcomes))
    for name, outcomes in rows:
        counts = Counter(o.status for o in outcomes)
        ok = [o for o in outcomes if o.status == 200]
        waits = [o.wait for o in ok if o.wait is not None]
        latencies = [o.latency for o in ok]
        row = [
            name,
            str(len(outcomes)),
            " ".join(f"{s or 'error'}x{n}" for s, n in sorted(counts.items())),
            ms(_percentile(waits, 50)),
            ms(_percentile(waits, 95)),
            ms(_percentile(latencies, 50)),
            ms(_percentile(latencies, 95)),
            ms(_percentile(latencies, 99)),
        ]
        if stream:
            row.append(ms(_percentile([o.first_byte for o in ok if o.first_byte is not None], 50)))
        table.add_row(*row)
    return table


def loadtest(args: argparse.Namespace) -> None:
    try:
        parse_mix(args.priority_mix)
    except ValueError as exc:
        raise SystemExit(f"llm-queue-gateway loadtest: {exc}") from None
    console = wide_console()
    report = asyncio.run(run_loadtest(args, console))
    console.print(report_table(report, args.stream))
    ok = sum(1 for o in report.outcomes if o.status == 200)
    console.print(f"throughput: {ok / report.elapsed:.2f} completed requests/s" if report.elapsed else "")
    errors = Counter(o.error for o in report.outcomes if o.error)
    for error, count in errors.most_common(3):
        console.print(f"[red]connection error x{count}[/]: {error}")
