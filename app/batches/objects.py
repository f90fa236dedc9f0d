"""OpenAI's shapes for files, batches and their JSONL lines, and the ids they carry."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from app.batches.store import StoredFile

# A batch's statuses, exactly OpenAI's; the last five are final.
VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING = "validating", "in_progress", "finalizing", "cancelling"
COMPLETED, FAILED, EXPIRED, CANCELLED = "completed", "failed", "expired", "cancelled"
STATUSES = (VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING, COMPLETED, FAILED, EXPIRED, CANCELLED)
FINAL = frozenset((COMPLETED, FAILED, EXPIRED, CANCELLED))

# A batch line's outcomes, for the metrics: an answer (2xx or not), or no answer before the batch ended.
LINE_OUTCOMES = ("completed", "failed", "expired", "cancelled")


def file_id() -> str:
    return "file-" + secrets.token_hex(12)


def batch_id() -> str:
    return "batch_" + secrets.token_hex(12)


def line_id() -> str:
    return "batch_req_" + secrets.token_hex(12)


def result_file_id(batch: str, which: str) -> str:
    """The id of a batch's output or error file: the same each time the batch is finalized (after a crash too)."""
    return "file-" + hashlib.sha256(f"{batch}/{which}".encode()).hexdigest()[:24]


def file_object(file: StoredFile) -> dict[str, Any]:
    return {
        "id": file.id,
        "object": "file",
        "bytes": file.bytes,
        "created_at": file.created_at,
        "filename": file.filename,
        "purpose": file.purpose,
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


def batch_object(
    batch: str,
    input_file_id: str,
    endpoint: str,
    completion_window: str,
    metadata: dict[str, str] | None,
    created_at: int,
    expires_at: int,
) -> dict[str, Any]:
    """A new batch, validating."""
    return {
        "id": batch,
        "object": "batch",
        "endpoint": endpoint,
        "errors": None,
        "input_file_id": input_file_id,
        "completion_window": completion_window,
        "status": VALIDATING,
        "output_file_id": None,
        "error_file_id": None,
        "created_at": created_at,
        "in_progress_at": None,
        "expires_at": expires_at,
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": metadata,
    }


def page(data: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    """A list answer; `data` holds up to limit + 1 items, the extra one only telling that more follow."""
    shown = data[:limit]
    return {
        "object": "list",
        "data": shown,
        "first_id": shown[0]["id"] if shown else None,
        "last_id": shown[-1]["id"] if shown else None,
        "has_more": len(data) > limit,
    }


def answered_line(line_id: str, custom_id: str, status: int, body: Any) -> dict[str, Any]:
    """A line the backend answered (2xx goes to the output file, the rest to the error file)."""
    return {
        "id": line_id,
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": line_id, "body": body},
        "error": None,
    }


def unanswered_line(line_id: str, custom_id: str, code: str, message: str) -> dict[str, Any]:
    """A line that got no answer: its batch expired or was cancelled first."""
    return {"id": line_id, "custom_id": custom_id, "response": None, "error": {"code": code, "message": message}}
