"""`llm-queue-gateway batch ...`: submit a JSONL file as a batch (and watch it), list, show, cancel, download."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.cli.common import auth_headers

FINAL = ("completed", "failed", "expired", "cancelled")
_POLL_SECONDS = 1.0


class Client:
    """The gateway's Files and Batches routes, for one key."""

    def __init__(self, session: aiohttp.ClientSession, url: str, api_key: str | None):
        self._session = session
        self._url = url.rstrip("/")
        self._headers = auth_headers(api_key)

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        async with self._session.request(method, self._url + path, headers=self._headers, **kwargs) as response:
            body = await response.read()
            if response.status >= 400:
                try:
                    message = orjson.loads(body)["error"]["message"]
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    message = body.decode(errors="replace")
                raise SystemExit(f"{method} {path}: {response.status}: {message}")
            return orjson.loads(body) if response.content_type == "application/json" else body

    async def upload(self, path: Path) -> Any:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        with path.open("rb") as handle:  # aiohttp streams it from the file
            form.add_field("file", handle, filename=path.name, content_type="application/jsonl")
            return await self.call("POST", "/v1/files", data=form)


def add_batch_commands(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    client_flags: Callable[[argparse.ArgumentParser], None],
) -> None:
    batch = commands.add_parser("batch", help="submit, watch, list, cancel and download batches (OpenAI Batch API)")
    actions = batch.add_subparsers(dest="action", required=True)
    submit = actions.add_parser("submit", help="upload a JSONL file and create a batch of its lines")
    submit.add_argument("file", type=Path, help="the JSONL input: one {custom_id, method, url, body} per line")
    submit.add_argument(
        "--endpoint", default="/v1/chat/completions", help="the lines' url [default: /v1/chat/completions]"
    )
    submit.add_argument("--window", default="24h", help="completion_window [default: 24h]")
    submit.add_argument("--wait", action="store_true", help="show its progress until it ends")
    actions.add_parser("list", help="the key's batches, newest first")
    for name, text in (("status", "one batch, as JSON"), ("cancel", "cancel a batch"), ("download", "its results")):
        sub = actions.add_parser(name, help=text)
        sub.add_argument("batch_id")
        if name == "download":
            sub.add_argument("--errors", action="store_true", help="the error file instead of the output file")
            sub.add_argument("--output", "-o", type=Path, help="write to this file [default: standard output]")
    for sub in actions.choices.values():
        client_flags(sub)
    batch.set_defaults(handler=lambda args: asyncio.run(_batch(args)))


async def _batch(args: argparse.Namespace) -> None:
    try:
        async with aiohttp.ClientSession() as session:
            client = Client(session, args.url, args.api_key)
            await _ACTIONS[args.action](client, args)
    except aiohttp.ClientError as exc:
        raise SystemExit(f"cannot reach {args.url}: {exc}") from None


async def _submit(client: Client, args: argparse.Namespace) -> None:
    if not args.file.is_file():
        raise SystemExit(f"no such file: {args.file}")
    file = await client.upload(args.file)
    batch = await client.call(
        "POST",
        "/v1/batches",
        json={"input_file_id": file["id"], "endpoint": args.endpoint, "completion_window": args.window},
    )
    console = Console(stderr=True)
    console.print(f"batch [bold]{batch['id']}[/] of {args.file} ({file['bytes']} bytes): {batch['status']}")
    if args.wait:
        batch = await _watch(client, batch, console)
        console.print(f"{batch['id']}: [bold]{batch['status']}[/] {_counts(batch)}")
    print(batch["id"])
    if args.wait and batch["status"] != "completed":
        raise SystemExit(1)


async def _watch(client: Client, batch: dict[str, Any], console: Console) -> dict[str, Any]:
    """A progress bar of request_counts until the batch ends."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(batch["status"], total=None)
        while batch["status"] not in FINAL:
            await asyncio.sleep(_POLL_SECONDS)
            batch = await client.call("GET", f"/v1/batches/{batch['id']}")
            counts = batch["request_counts"]
            done = counts["completed"] + counts["failed"]
            progress.update(task, description=f"{batch['status']} ({counts['failed']} failed)", completed=done)
            progress.update(task, total=counts["total"] or None)
    return batch


async def _list(client: Client, _: argparse.Namespace) -> None:
    listed = await client.call("GET", "/v1/batches", params={"limit": "100"})
    table = Table(show_header=True)
    for column in ("id", "status", "created", "done / total", "failed"):
        table.add_column(column)
    for batch in listed["data"]:
        counts = batch["request_counts"]
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(batch["created_at"]))
        done = f"{counts['completed'] + counts['failed']} / {counts['total']}"
        table.add_row(batch["id"], batch["status"], created, done, str(counts["failed"]))
    Console(width=None if sys.stdout.isatty() else 200).print(table)


async def _status(client: Client, args: argparse.Namespace) -> None:
    batch = await client.call("GET", f"/v1/batches/{args.batch_id}")
    print(orjson.dumps(batch, option=orjson.OPT_INDENT_2).decode())


async def _cancel(client: Client, args: argparse.Namespace) -> None:
    batch = await client.call("POST", f"/v1/batches/{args.batch_id}/cancel")
    print(f"{batch['id']}: {batch['status']}")


async def _download(client: Client, args: argparse.Namespace) -> None:
    batch = await client.call("GET", f"/v1/batches/{args.batch_id}")
    file_id = batch["error_file_id" if args.errors else "output_file_id"]
    if file_id is None:
        which = "error" if args.errors else "output"
        raise SystemExit(f"{args.batch_id} ({batch['status']}) has no {which} file")
    content = await client.call("GET", f"/v1/files/{file_id}/content")
    if args.output is not None:
        args.output.write_bytes(content)
    else:
        sys.stdout.buffer.write(content)


def _counts(batch: dict[str, Any]) -> str:
    counts = batch["request_counts"]
    return f"{counts['completed']} completed, {counts['failed']} failed of {counts['total']}"


_ACTIONS = {"submit": _submit, "list": _list, "status": _status, "cancel": _cancel, "download": _download}
