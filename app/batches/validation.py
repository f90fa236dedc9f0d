"""A batch checked as OpenAI checks it: the parameters it is created with, and its input file line by line (on a
worker thread: it reads the file)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from app.errors import InvalidRequest
from app.schemas import COMPLETION_ROUTES

MAX_LINES = 50_000  # OpenAI's limit per batch
MAX_ERRORS = 1000  # a file that is wrong throughout is told so without a report as large as itself
_METADATA_KEYS, _METADATA_KEY_MAX, _METADATA_VALUE_MAX = 16, 64, 512


class Parameters(NamedTuple):
    """What a batch is created with, checked."""

    input_file_id: str
    endpoint: str
    window: str
    metadata: dict[str, str] | None


def check_parameters(
    endpoint: object, window: object, windows: Mapping[str, float], input_file_id: object, metadata: object
) -> Parameters:
    """The parameters of a batch to create, checked; 400 for one OpenAI would refuse.

    `windows` are the completion windows allowed (BATCH_COMPLETION_WINDOWS).
    """
    if endpoint not in COMPLETION_ROUTES:
        allowed = ", ".join(f"'{path}'" for path in COMPLETION_ROUTES)
        raise InvalidRequest(f"endpoint must be one of {allowed}, not {endpoint!r}", param="endpoint")
    if not isinstance(window, str) or window not in windows:
        allowed = ", ".join(f"'{w}'" for w in windows)
        raise InvalidRequest(f"completion_window must be one of {allowed}, not {window!r}", param="completion_window")
    if not isinstance(input_file_id, str) or not input_file_id:
        raise InvalidRequest("input_file_id must be the id of an uploaded file", param="input_file_id")
    return Parameters(input_file_id, endpoint, window, _metadata(metadata))


def _metadata(value: object) -> dict[str, str] | None:
    """OpenAI's metadata rules: up to 16 string pairs, keys up to 64 characters, values up to 512."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > _METADATA_KEYS:
        raise InvalidRequest(f"metadata must be an object of at most {_METADATA_KEYS} pairs", param="metadata")
    for key, item in value.items():
        if not isinstance(item, str) or len(key) > _METADATA_KEY_MAX or len(item) > _METADATA_VALUE_MAX:
            raise InvalidRequest(
                f"metadata keys are strings of up to {_METADATA_KEY_MAX} characters, values up to "
                f"{_METADATA_VALUE_MAX}",
                param="metadata",
            )
    return dict(value)


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
