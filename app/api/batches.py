"""OpenAI's Files and Batches routes, and the result of a background request; the work is app.batches'."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response, StreamingResponse

from app.api.deps import Caller, SchedulerDep, owner, read_body, viewer
from app.api.status import request_status
from app.batches import Persisted
from app.batches.background import BackgroundRequests
from app.batches.files import Files
from app.batches.objects import file_object, page
from app.batches.runner import BatchRunner
from app.errors import BodyTooLarge, InvalidRequest, NotFound

router = APIRouter(tags=["batches"])

# A multipart body carries its boundaries and headers around the file: this much over FILE_MAX_BYTES is allowed
# through the Content-Length check (the file itself is counted exactly as it streams).
_FORM_OVERHEAD = 64 << 10


async def get_files(request: Request) -> Files:
    persisted: Persisted = request.app.state.persisted
    return persisted.files


async def get_batches(request: Request) -> BatchRunner:
    persisted: Persisted = request.app.state.persisted
    return persisted.batches


async def get_background(request: Request) -> BackgroundRequests:
    persisted: Persisted = request.app.state.persisted
    return persisted.background


FilesDep = Annotated[Files, Depends(get_files)]
BatchesDep = Annotated[BatchRunner, Depends(get_batches)]
BackgroundDep = Annotated[BackgroundRequests, Depends(get_background)]


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status, headers=headers, media_type="application/json")


# Files --------------------------------------------------------------------------------------------------------


@router.post("/v1/files")
async def upload_file(request: Request, caller: Caller, files: FilesDep) -> Response:
    """Upload a file (multipart: `file`, `purpose=batch`), streamed to disk; 413 past FILE_MAX_BYTES."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > files.max_bytes + _FORM_OVERHEAD:
        raise BodyTooLarge(f"the upload is {declared} bytes; FILE_MAX_BYTES is {files.max_bytes}")
    stored = await files.upload(request.headers.get("content-type"), request.stream(), owner(caller))
    return _json(file_object(stored))


@router.get("/v1/files")
async def list_files(
    caller: Caller,
    files: FilesDep,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
) -> Response:
    """The caller's files, newest first."""
    found = await files.store.files(viewer(caller), purpose, after, limit + 1)
    return _json(page([file_object(file) for file in found], limit))


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, caller: Caller, files: FilesDep) -> Response:
    return _json(file_object(await files.get(file_id, viewer(caller))))


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, caller: Caller, files: FilesDep) -> StreamingResponse:
    """The file's bytes (a batch's output and error files are JSONL)."""
    file = await files.get(file_id, viewer(caller))
    return StreamingResponse(
        files.content(file), media_type="application/octet-stream", headers={"content-length": str(file.bytes)}
    )


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, caller: Caller, files: FilesDep) -> Response:
    file = await files.get(file_id, viewer(caller))
    await files.delete(file)
    return _json({"id": file.id, "object": "file", "deleted": True})


# Batches ------------------------------------------------------------------------------------------------------


@router.post("/v1/batches")
async def create_batch(request: Request, caller: Caller, batches: BatchesDep) -> Response:
    """A batch of the lines of an uploaded file, run below `low` priority within `completion_window`."""
    limit = request.app.state.settings.max_body_bytes
    raw = await read_body(request.receive, limit, request.headers.get("content-length"))
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    record = await batches.create(
        owner(caller),
        body.get("input_file_id"),
        body.get("endpoint"),
        body.get("completion_window"),
        body.get("metadata"),
    )
    return _json(record)


@router.get("/v1/batches")
async def list_batches(
    caller: Caller,
    batches: BatchesDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> Response:
    """The caller's batches, newest first."""
    return _json(page(await batches.newest(viewer(caller), after, limit), limit))


@router.get("/v1/batches/{batch_id}")
async def get_batch(batch_id: str, caller: Caller, batches: BatchesDep) -> Response:
    return _json(await batches.get(batch_id, viewer(caller)))


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, caller: Caller, batches: BatchesDep) -> Response:
    """Begin cancelling a batch: queued lines are withdrawn, running ones finish; then it is `cancelled`."""
    return _json(await batches.cancel(batch_id, viewer(caller)))


# Background requests ------------------------------------------------------------------------------------------


@router.get("/v1/queue/request/{request_id}/result", tags=["queue"])
async def background_result(
    request_id: str, caller: Caller, scheduler: SchedulerDep, background: BackgroundDep
) -> Response:
    """A background request's answer (`Prefer: respond-async`): 202 with its record while it waits or runs,
    then the completion or the error, as its own request would have had them; 404 after ASYNC_RESULT_TTL."""
    item = await background.result(viewer(caller), request_id)
    if item is None:
        raise NotFound(f"no background request with id {request_id!r}", param="request_id")
    if item.status is None or item.result is None:
        job = scheduler.registry.lookup(request_id, item.owner or None)
        record: Any = (
            request_status(scheduler, job).model_dump(mode="json")
            if job is not None
            else {"id": request_id, "status": "queued"}
        )
        return _json(record, 202, {"retry-after": "1"})
    media = "application/json"
    return Response(item.result, item.status, media_type=media)
