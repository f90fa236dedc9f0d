"""Logging: LOG_LEVEL and LOG_FORMAT: text lines tagged `[RequestQueue]`, `[Upstream]`, ... or JSON lines."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

# Each text line is tagged with the part of the gateway it comes from.
_PREFIXES = (
    ("app.queue", "RequestQueue"),
    ("app.access.chat", "Chat Completions"),
    ("app.access.completion", "Completions"),
    ("app.access.embedding", "Embeddings"),
    ("app.access", "API"),
    ("app.api", "API"),
    ("app.backends.proxy", "Upstream"),
    ("app.backends.llama", "LocalModel"),
    ("uvicorn", "Server"),
)
# LogRecord attributes that every record has; anything else was passed in `extra` and is a field of its own.
# uvicorn's color_message repeats the message with ANSI escapes for terminals: never a field of ours.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}
# Control characters in a text line (a decoded request path may hold CR, LF or NUL) are written escaped, so no
# client can forge a line of its own or hide one: \r as \x0d, and so on. JSON lines escape them already.
_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0))}


def escape_controls(text: str) -> str:
    """`text` with every control character written as \\xNN."""
    return text.translate(_ESCAPES)


def _prefix(name: str) -> str:
    for start, prefix in _PREFIXES:
        if name == start or name.startswith(start + "."):
            return prefix
    return name


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class TextFormatter(logging.Formatter):
    """`2026-11-23T10:00:00.123Z INFO [RequestQueue] message key=value ...`."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        message = escape_controls(record.getMessage())
        line = f"{stamp}.{int(record.msecs):03d}Z {record.levelname} [{_prefix(record.name)}] {message}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and every `extra` field as its own key."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "component": _prefix(record.name),
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: str, fmt: str) -> None:
    """Send every log line (the gateway's and uvicorn's) to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
