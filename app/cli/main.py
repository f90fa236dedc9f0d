"""The `llm-queue-gateway` command: serve (the default), and the client commands status, loadtest and batch."""

from __future__ import annotations

import argparse
import os
import sys

from app.__main__ import run
from app.cli.batch import add_batch_commands
from app.cli.common import API_KEY_ENV, default_url
from app.cli.loadtest import loadtest
from app.cli.status import status
from app.settings import Settings


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

    show = commands.add_parser("status", help="pretty-print /v1/queue/status of a running gateway")
    client_flags(show)
    show.add_argument("--json", action="store_true", help="print the raw JSON instead")
    show.add_argument("--watch", action="store_true", help="redraw the live view (the dashboard's events) until Ctrl-C")
    show.set_defaults(handler=status)

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
    load.set_defaults(handler=loadtest)
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
