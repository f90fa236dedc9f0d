"""What the client commands share: the gateway they talk to, a key's headers, and a console that keeps tables
whole."""

from __future__ import annotations

import os
import sys

from rich.console import Console

API_KEY_ENV = "LLM_QUEUE_GATEWAY_API_KEY"

# Off a terminal (a pipe, a log file, CI) rich would fold tables to 80 columns and cut their cells.
_WIDE = 200


def default_url() -> str:
    """The gateway this machine serves: on PORT, as `serve` reads it, else on the default port."""
    port = os.environ.get("PORT", "")
    return f"http://127.0.0.1:{port if port.isdigit() else 8091}"


def wide_console() -> Console:
    """A console that keeps tables whole: the terminal's width, or wide enough when output is not a terminal."""
    return Console() if sys.stdout.isatty() else Console(width=_WIDE)


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def ms(value: float | None) -> str:
    """Seconds as whole milliseconds for a table cell; '-' when unknown."""
    return "-" if value is None else f"{value * 1000:.0f}"
