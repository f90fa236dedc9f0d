"""Helpers of the batch tests: JSONL inputs, the SDK client, waiting for a batch to reach a status."""

from __future__ import annotations

import io
import time
from typing import Any

import openai
import orjson
import pytest

FINAL = ("completed", "failed", "expired", "cancelled")


def chat_line(custom_id: str, content: str | None = None, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": content or custom_id}], **body},
    }


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"\n".join(orjson.dumps(line) for line in lines) + b"\n"


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def upload(sdk: openai.OpenAI, content: bytes, name: str = "input.jsonl") -> Any:
    return sdk.files.create(file=(name, io.BytesIO(content)), purpose="batch")


def submit(sdk: openai.OpenAI, lines: list[dict[str, Any]], window: str = "24h", **extra: Any) -> Any:
    file = upload(sdk, jsonl(lines))
    return sdk.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window=window, **extra)  # type: ignore[arg-type]


def wait_status(sdk: openai.OpenAI, batch_id: str, statuses: tuple[str, ...] = FINAL, timeout: float = 30) -> Any:
    end = time.monotonic() + timeout
    while True:
        batch = sdk.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        if time.monotonic() > end:
            pytest.fail(f"batch {batch_id} is still {batch.status} ({batch.request_counts})")
        time.sleep(0.05)


def lines_of(sdk: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    """The parsed JSONL lines of an output or error file ([] for none)."""
    if file_id is None:
        return []
    return [orjson.loads(line) for line in sdk.files.content(file_id).text.splitlines() if line.strip()]
