"""A finished batch's output and error files, written from its lines' results in the order of its input."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from app.batches import objects
from app.batches.files import Files, ResultFile
from app.batches.objects import CANCELLED, COMPLETED, FAILED
from app.batches.store import Store

_EXPIRED = "This request could not be executed before the completion window expired."
_CANCELLED = "This request was not executed: the batch was cancelled."


async def write_results(
    store: Store, files: Files, record: dict[str, Any], owner: str, final: str, unanswered: Callable[[], None]
) -> tuple[int, int]:
    """Write the output file (the 2xx answers) and the error file (the other answers, and the lines that never
    ran as batch_cancelled or batch_expired, as `final` says); set their ids on `record`.

    `unanswered` is called once per line that never ran; returns the counts (completed, failed) the files hold.
    """
    batch = record["id"]
    code, message = ("batch_cancelled", _CANCELLED) if final == CANCELLED else ("batch_expired", _EXPIRED)
    output = ResultFile(files, objects.result_file_id(batch, "output"), owner, f"{batch}_output.jsonl")
    errors = ResultFile(files, objects.result_file_id(batch, "error"), owner, f"{batch}_error.jsonl")
    completed = failed = 0
    try:
        async for page in store.results(batch):
            good, bad = [], []
            for outcome, result, line in page:
                if outcome == COMPLETED:
                    good.append(result.encode() if result else b"")
                elif outcome == FAILED and result:
                    bad.append(result.encode())
                else:
                    bad.append(orjson.dumps(objects.unanswered_line(line.id, line.custom_id, code, message)))
                    unanswered()
            completed += len(good)
            failed += len(bad)
            await output.add(good)
            await errors.add(bad)
        record["output_file_id"] = await output.finish()
        record["error_file_id"] = await errors.finish()
    finally:
        await output.discard()
        await errors.discard()
    return completed, failed
