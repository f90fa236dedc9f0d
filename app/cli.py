"""The `llm-queue-gateway` command: serve, status of a running gateway, a load test with a priority mix, and
batches (app.batch_cli)."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.__main__ import run
from app.batch_cli import add_batch_commands
from app.settings import Settings
from app.types import Priority


def default_url() -> str:
    """The gateway this machine serves: on PORT, as `serve` reads it, else on the default port."""
    port = os.environ.get("PORT", "")
    return f"http://127.0.0.1:{port if port.isdigit() else 8091}"


# Off a terminal (a pipe, a log file, CI) rich would fold tables to 80 columns and cut their cells.
_WIDE = 200


def _console() -> Console:
    """A console that keeps tables whole: the terminal's width, or wide enough when output is not a terminal."""
    return Console() if sys.stdout.isatty() else Console(width=_WIDE)


API_KEY_ENV = "LLM_QUEUE_GATEWAY_API_KEY"


# serve ------------------------------------------------------------------------------------------------------


def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, named after its variable; unset flags leave the environment's value."""
    for name, info in Settings.model_fields.items():
        default = info.default
        shown = "unset" if default in (None, ()) else default.value if hasattr(default, "value") else default
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=None,
            metavar=name.upper(),
            help=f"{info.description} [env {name.upper()}, default: {shown}]",
        )


def _serve(args: argparse.Namespace) -> None:
    overrides = {name: value for name in Settings.model_fields if (value := getattr(args, name)) is not None}
    run(**overrides)


# status -----------------------------------------------------------------------------------------------------


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def _get_json(url: str, api_key: str | None) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url, headers=_headers(api_key)) as response:
        body = await response.read()
        if response.status != 200:
            raise SystemExit(f"{url} answered {response.status}: {body.decode(errors='replace')}")
        return orjson.loads(body)


def _status(args: argparse.Namespace) -> None:
    if args.watch:
        try:
            asyncio.run(_watch(args.url.rstrip("/"), args.api_key))
        except aiohttp.ClientError as exc:
            raise SystemExit(f"cannot reach {args.url}: {exc}") from None
        except KeyboardInterrupt:
            pass
        return
    try:
        status = asyncio.run(_get_json(args.url.rstrip("/") + "/v1/queue/status", args.api_key))
    except aiohttp.ClientError as exc:
        raise SystemExit(f"cannot reach {args.url}: {exc}") from None
    if args.json:
        print(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode())
        return
    console = _console()
    running = "[green]running[/]" if status["is_running"] else "[yellow]draining[/]"
    console.print(
        f"[bold]llm-queue-gateway[/] at {args.url}: {running}, {status['processing_count']}/"
        f"{status['max_concurrent']} slots busy, {status['queue_size']}/{status['max_queue_size']} waiting"
    )
    queue = Table(title="queue", show_header=True)
    for column in (*(p.value for p in Priority), "held by", "est. service"):
        queue.add_column(column, justify="right")
    service = status.get("estimated_service_seconds")
    queue.add_row(
        *(str(status["queue_size_by_priority"].get(p.value, 0)) for p in Priority),
        status.get("dispatch_held_by") or "-",
        "-" if service is None else f"{service:.2f}s",
    )
    console.print(queue)
    totals = Table(title="totals")
    names = ("queued", "processed", "failed", "rejected", "timed_out", "cancelled")
    for name in names:
        totals.add_column(name, justify="right")
    totals.add_row(*(str(status[f"total_{name}"]) for name in names))
    console.print(totals)
    workers = Table(title="workers")
    for column in ("id", "busy", "current request", "processed", "errors"):
        workers.add_column(column)
    for worker in status["workers"]:
        workers.add_row(
            str(worker["id"]),
            "yes" if worker["busy"] else "no",
            worker["current_request_id"] or "-",
            str(worker["processed"]),
            str(worker["errors"]),
        )
    console.print(workers)
    backends = Table(title="backends")
    for column in ("name", "type", "models", "health", "in flight", "latency", "base url"):
        backends.add_column(column)
    for backend in status.get("backends", []):
        health = "[green]up[/]" if backend["healthy"] else "[red]down[/]"
        if backend["retiring"]:
            health += " (retiring)"
        latency = backend["latency_seconds"]
        backends.add_row(
            backend["name"],
            backend["type"],
            ", ".join(backend["models"]) if backend["models"] is not None else "any",
            health,
            f"{backend['in_flight']}/{backend['max_concurrent']}",
            _ms(latency),
            backend["base_url"] or "-",
        )
    console.print(backends)
    for section in ("rate_limits", "circuit_breaker"):
        if status.get(section):
            table = Table(title=section.replace("_", " "))
            table.add_column("field")
            table.add_column("value", justify="right")
            for field, value in _flatten(status[section]):
                table.add_row(field, value)
            console.print(table)


async def _watch(url: str, api_key: str | None) -> None:
    """The dashboard in the terminal: redrawn from each snapshot of GET /v1/queue/events until Ctrl-C."""
    console = _console()
    timeout = aiohttp.ClientTimeout(total=None, sock_read=30)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(url + "/v1/queue/events", headers=_headers(api_key)) as response,
    ):
        if response.status != 200:
            body = await response.read()
            raise SystemExit(f"{url}/v1/queue/events answered {response.status}: {body.decode(errors='replace')}")
        with Live(console=console, auto_refresh=False) as live:
            async for line in response.content:
                if line.startswith(b"data: "):
                    live.update(watch_view(orjson.loads(line[6:]), url), refresh=True)


WATCH_LISTED = 10  # waiting requests shown per level in the terminal


def watch_view(snapshot: dict[str, Any], url: str) -> Group:
    """One snapshot of the events as rich renderables: the totals, each backend's slots, the waiting by level."""
    queue, rates, totals = snapshot["queue"], snapshot["rates"], snapshot["totals"]
    state = "[green]live[/]" if snapshot["running"] else "[yellow]draining[/]"
    viewer = snapshot.get("viewer")
    head = (
        f"[bold]llm-queue-gateway[/] at {url}: {state}"
        + (f" as {viewer['name']}{' (admin)' if viewer['admin'] else ''}" if viewer else "")
        + f" · {queue['in_flight']}/{queue['max_concurrent']} busy · {queue['waiting']}/{queue['max_queue_size']}"
        f" waiting · {rates['requests_per_s']:.1f} req/s · {rates['tokens_per_s']:.0f} tok/s · "
        f"completed {totals['completed']}, failed {totals['failed']}, timed out {totals['timed_out']}, "
        f"cancelled {totals['cancelled']}, rejected {totals['rejected']}"
    )
    slots = Table(title="slots", expand=True)
    for column in ("backend", "slot", "request", "key", "priority", "elapsed", "tok/s"):
        slots.add_column(column)
    for backend in snapshot["backends"]:
        health = "" if backend["healthy"] else " [red](down)[/]"
        for slot in backend["slots"]:
            if not slot["busy"]:
                slots.add_row(backend["name"] + health, str(slot["id"]), "[dim]free[/]", "", "", "", "")
                continue
            speed = slot.get("tokens_per_s")
            slots.add_row(
                backend["name"] + health,
                str(slot["id"]),
                slot["request_id"] or "[dim](another key)[/]",
                slot["key"] or "",
                slot["priority"],
                f"{slot['elapsed_s']:.1f}s",
                "" if speed is None else f"{speed:.1f}",
            )
    waiting = Table(title="waiting", expand=True)
    for column in ("priority", "#", "request", "key", "waited", "ETA"):
        waiting.add_column(column)
    for priority, level in snapshot["waiting"].items():
        for request in level["requests"][:WATCH_LISTED]:
            waiting.add_row(
                priority,
                str(request["position"]),
                request["id"],
                request["key"] or "",
                f"{request['waited_s']:.1f}s",
                f"{request['eta_s']:.1f}s",
            )
        hidden = level["count"] - min(len(level["requests"]), WATCH_LISTED)
        if hidden > 0:
            waiting.add_row(priority, "", f"[dim]and {hidden} more[/]", "", "", "")
    return Group(head, slots, waiting)


def _flatten(values: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Nested status fields as (dotted name, value) rows; unset ones as '-'."""
    rows: list[tuple[str, str]] = []
    for name, value in values.items():
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{name}.")
        else:
            rows.append((f"{prefix}{name}", "-" if value is None else str(value)))
    return rows


# loadtest ---------------------------------------------------------------------------------------------------


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
    headers = {**_headers(args.api_key), "X-Priority": priority.value, "Content-Type": "application/json"}
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


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


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
            _ms(_percentile(waits, 50)),
            _ms(_percentile(waits, 95)),
            _ms(_percentile(latencies, 50)),
            _ms(_percentile(latencies, 95)),
            _ms(_percentile(latencies, 99)),
        ]
        if stream:
            row.append(_ms(_percentile([o.first_byte for o in ok if o.first_byte is not None], 50)))
        table.add_row(*row)
    return table


def _loadtest(args: argparse.Namespace) -> None:
    try:
        parse_mix(args.priority_mix)
    except ValueError as exc:
        raise SystemExit(f"llm-queue-gateway loadtest: {exc}") from None
    console = _console()
    report = asyncio.run(run_loadtest(args, console))
    console.print(report_table(report, args.stream))
    ok = sum(1 for o in report.outcomes if o.status == 200)
    console.print(f"throughput: {ok / report.elapsed:.2f} completed requests/s" if report.elapsed else "")
    errors = Counter(o.error for o in report.outcomes if o.error)
    for error, count in errors.most_common(3):
        console.print(f"[red]connection error x{count}[/]: {error}")


# the command ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-queue-gateway",
        description="OpenAI-compatible gateway with a bounded priority queue. With no command: serve.",
    )
    commands = parser.add_subparsers(dest="command")
    serve = commands.add_parser(
        "serve",
        help="run the gateway (the default)",
        description="Run the gateway. Every flag overrides its environment variable (or .env entry).",
    )
    _add_serve_flags(serve)
    serve.set_defaults(handler=_serve)

    def client_flags(sub: argparse.ArgumentParser) -> None:
        url = default_url()
        sub.add_argument("--url", default=url, help=f"the gateway's base URL [default: {url}]")
        sub.add_argument(
            "--api-key", default=os.environ.get(API_KEY_ENV), help=f"a client key [default: ${API_KEY_ENV}]"
        )

    status = commands.add_parser("status", help="pretty-print /v1/queue/status of a running gateway")
    client_flags(status)
    status.add_argument("--json", action="store_true", help="print the raw JSON instead")
    status.add_argument(
        "--watch", action="store_true", help="redraw the live view (the dashboard's events) until Ctrl-C"
    )
    status.set_defaults(handler=_status)

    load = commands.add_parser(
        "loadtest",
        help="send chat completions with a priority mix and report by priority",
        description="Send --requests chat completions, --concurrency at a time, with priorities in the "
        "proportions of --priority-mix; then a table by priority of status counts, queue wait (the gateway's "
        "X-Queue-Wait-Ms) and latency percentiles.",
    )
    client_flags(load)
    load.add_argument("--concurrency", type=int, default=8, help="requests in flight at once [default: 8]")
    load.add_argument("--requests", type=int, default=100, help="requests in all [default: 100]")
    load.add_argument(
        "--priority-mix", default="high=1,normal=3,low=6", help="weights by priority [default: high=1,normal=3,low=6]"
    )
    load.add_argument("--stream", action="store_true", help="stream the answers (adds time to first byte)")
    load.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each request [default: 32]")
    load.add_argument("--model", default="default", help="the model field sent [default: default]")
    load.add_argument("--prompt", default="Write one sentence about queues.", help="the user message sent")
    load.add_argument("--timeout", type=float, default=600, help="seconds a request may take [default: 600]")
    load.set_defaults(handler=_loadtest)
    add_batch_commands(commands, client_flags)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of `llm-queue-gateway`."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["serve", *argv]
    args = build_parser().parse_args(argv)
    if getattr(args, "concurrency", 1) < 1 or getattr(args, "requests", 1) < 1:
        raise SystemExit("llm-queue-gateway loadtest: --concurrency and --requests must be at least 1")
    args.handler(args)
