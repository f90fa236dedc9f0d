"""A batch's input file checked as OpenAI checks it, line by line; run on a worker thread (it reads the file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

MAX_LINES = 50_000  # OpenAI's limit per batch
MAX_ERRORS = 1000  # a file that is wrong throughout is told so without a report as large as itself


class Checked:
    """What validation found: the lines to run (custom_id, body as JSON text), or the errors that fail the batch."""

    __slots__ = ("errors", "lines")

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []
        self.errors: list[dict[str, Any]] = []

    def error(self, code: str, message: str, line: int | None, param: str | None = None) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append({"code": code, "message": message, "param": param, "line": line})


def check_input(path: Path, endpoint: str) -> Checked:
    """Every line JSON with a unique string `custom_id`, `method` POST, `url` the batch's endpoint and a `body`
    object without `stream: true`; at most MAX_LINES lines; blank lines are skipped. Lines are 1-based."""
    checked = Checked()
    seen: set[str] = set()
    count = 0
    with path.open("rb") as file:
        for number, raw in enumerate(file, 1):
            if not raw.strip():
                continue
            count += 1
            if count > MAX_LINES:
                checked.error("too_many_requests", f"a batch has at most {MAX_LINES} requests", number)
                break
            _check_line(raw, number, endpoint, seen, checked)
    if count == 0:
        checked.error("empty_file", "the input file has no requests", None)
    if checked.errors:
        checked.lines = []
    return checked


def _check_line(raw: bytes, number: int, endpoint: str, seen: set[str], checked: Checked) -> None:
    try:
        item = orjson.loads(raw)
    except orjson.JSONDecodeError:
        checked.error("invalid_json_line", "this line is not valid JSON", number)
        return
    if not isinstance(item, dict):
        checked.error("invalid_json_line", "each line must be a JSON object", number)
        return
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        checked.error("missing_required_parameter", "custom_id must be a non-empty string", number, "custom_id")
        return
    if custom_id in seen:
        checked.error("duplicate_custom_id", f"custom_id {custom_id!r} appears more than once", number, "custom_id")
        return
    seen.add(custom_id)
    if item.get("method") != "POST":
        checked.error("invalid_method", f"method must be 'POST', not {item.get('method')!r}", number, "method")
        return
    if item.get("url") != endpoint:
        checked.error(
            "mismatched_endpoint",
            f"url must be the batch's endpoint {endpoint!r}, not {item.get('url')!r}",
            number,
            "url",
        )
        return
    body = item.get("body")
    if not isinstance(body, dict):
        checked.error("invalid_request", "body must be a JSON object", number, "body")
        return
    if body.get("stream") is True:
        checked.error("invalid_request", "a batch request cannot stream (stream: true)", number, "body.stream")
        return
    checked.lines.append((custom_id, orjson.dumps(body).decode()))
