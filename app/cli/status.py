"""`llm-queue-gateway status`: a running gateway's /v1/queue/status as tables, or with --watch its live events
redrawn in the terminal."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import aiohttp
import orjson
from rich.console import Group
from rich.live import Live
from rich.table import Table

from app.cli.common import auth_headers, ms, wide_console
from app.types import Priority


async def _get_json(url: str, api_key: str | None) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url, headers=auth_headers(api_key)) as response:
        body = await response.read()
        if response.status != 200:
            raise SystemExit(f"{url} answered {response.status}: {body.decode(errors='replace')}")
        return orjson.loads(body)


def status(args: argparse.Namespace) -> None:
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
    console = wide_console()
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
            ms(latency),
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
    console = wide_console()
    timeout = aiohttp.ClientTimeout(total=None, sock_read=30)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(url + "/v1/queue/events", headers=auth_headers(api_key)) as response,
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
