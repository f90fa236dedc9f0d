"""Runs batches: validates their input, sends their lines through the queue below `low`, and finalizes them.

A batch's life is OpenAI's: validating → in_progress → finalizing → completed; failed (its file did not pass),
expired (its window ended: the lines that finished are kept, the rest go to the error file as batch_expired),
cancelling → cancelled (queued lines are withdrawn, running ones finish, the rest are batch_cancelled).

Lines run at Priority.BATCH through the completion service (app.batches.lines), so the key's budgets, the
limiters, the breaker and the fleet's routing apply to them as to any request, and the queue dispatches one
only when no interactive request waits for its backends. After a restart, every unfinished batch goes on from
the lines without a result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from app.batches import objects
from app.batches.files import Files
from app.batches.lines import LineSender, Run, Stopped
from app.batches.objects import (
    CANCELLED,
    CANCELLING,
    COMPLETED,
    EXPIRED,
    FAILED,
    FINAL,
    FINALIZING,
    IN_PROGRESS,
    VALIDATING,
)
from app.batches.results import write_results
from app.batches.store import Line, Store
from app.batches.validation import check_input, check_parameters
from app.batches.webhooks import Webhooks
from app.errors import (
    Conflict,
    GatewayError,
    InvalidRequest,
    NotFound,
)
from app.limits.keys import KeyAccount
from app.metrics import Metrics
from app.queue.service import CompletionService
from app.settings import Settings, window_seconds

log = logging.getLogger("app.batches")

_SWEEP_SECONDS = 1.0  # how often windows are checked (a batch expires at most this late)


class BatchRunner:
    """The batches of every key: create, read, list, cancel, and the work of running them."""

    def __init__(
        self,
        store: Store,
        files: Files,
        service: CompletionService,
        settings: Settings,
        account: Callable[[str], KeyAccount | None],
        webhooks: Webhooks,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ):
        self._store = store
        self._files = files
        self._service = service
        self._webhooks = webhooks
        self._metrics = metrics
        self._clock = clock
        self._windows = {window: window_seconds(window) for window in settings.batch_completion_windows}
        self._lines = LineSender(store, service, settings, account, metrics, clock)
        self._runs: dict[str, Run] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self.statuses: dict[str, int] = dict.fromkeys(objects.STATUSES, 0)  # batches by status, for the metrics

    # Life of the runner -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Take up every batch a previous run left unfinished, and start watching the windows."""
        self.statuses.update(await self._store.batch_statuses())
        for owner, record in await self._store.unfinished_batches():
            self._launch(owner, record)
        self._sweeper = asyncio.create_task(self._sweep())

    async def aclose(self) -> None:
        """Stop working: lines in the queue are left without a result, for the next start to run."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for run in list(self._runs.values()):
            run.stop = run.stop or "shutdown"
            if run.task is not None:
                run.task.cancel()
        tasks = [run.task for run in self._runs.values() if run.task is not None]
        if self._sweeper is not None:
            tasks.append(self._sweeper)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def running(self, owner: str | None) -> list[dict[str, Any]]:
        """The batches of `owner` (None: every owner's) being worked on now, for the status route."""
        return [
            {"id": run.record["id"], "status": run.record["status"], "request_counts": dict(run.counts)}
            for run in self._runs.values()
            if owner is None or run.owner == owner
        ]

    # The API ----------------------------------------------------------------------------------------------

    async def create(
        self, owner: str, input_file_id: object, endpoint: object, window: object, metadata: object
    ) -> dict[str, Any]:
        """A new batch, validating; 400 for a parameter OpenAI would refuse, 404 for a file the key cannot see."""
        checked = check_parameters(endpoint, window, self._windows, input_file_id, metadata)
        file = await self._files.get(checked.input_file_id, owner)
        if file.purpose != "batch":
            raise InvalidRequest(
                f"file {checked.input_file_id} has purpose {file.purpose!r}, not 'batch'", param="input_file_id"
            )
        now = int(self._clock())
        record = objects.batch_object(
            objects.batch_id(),
            checked.input_file_id,
            checked.endpoint,
            checked.window,
            checked.metadata,
            now,
            now + int(self._windows[checked.window]),
        )
        await self._store.put_batch(record, owner)
        self.statuses[VALIDATING] += 1
        self._launch(owner, record)
        return dict(record)

    async def get(self, batch_id: str, owner: str | None) -> dict[str, Any]:
        """The batch as of now (a running one's counts are live); 404 if `owner` (None: any) cannot see it."""
        run = self._runs.get(batch_id)
        if run is not None and (owner is None or run.owner == owner):
            return {**run.record, "request_counts": dict(run.counts)}
        found = await self._store.batch(batch_id)
        if found is None or (owner is not None and found[0] != owner):
            raise _not_found(batch_id)
        return found[1]

    async def newest(self, owner: str | None, after: str | None, limit: int) -> list[dict[str, Any]]:
        """Newest first, up to `limit` + 1 (the extra one tells that more follow)."""
        records = await self._store.batches(owner, after, limit + 1)
        return [self._live(record) for record in records]

    def _live(self, record: dict[str, Any]) -> dict[str, Any]:
        run = self._runs.get(record["id"])
        return record if run is None else {**run.record, "request_counts": dict(run.counts)}

    async def cancel(self, batch_id: str, owner: str | None) -> dict[str, Any]:
        """Begin cancelling: 409 once the batch has ended."""
        record = await self.get(batch_id, owner)
        run = self._runs.get(batch_id)
        if run is None or record["status"] in FINAL:
            raise Conflict(f"Cannot cancel a batch with status {record['status']}.", code="batch_not_cancellable")
        if run.stop is None:
            run.stop = CANCELLED
            for job in list(run.jobs.values()):
                if job.started is None:  # a queued line goes back; a running one finishes and is kept
                    self._service.abort(job, Stopped("the batch was cancelled"))
            await self._set_status(run, CANCELLING, "cancelling_at")
        return {**run.record, "request_counts": dict(run.counts)}

    # The work ---------------------------------------------------------------------------------------------

    def _launch(self, owner: str, record: dict[str, Any]) -> None:
        run = self._runs[record["id"]] = Run(owner, record)
        if record["status"] == CANCELLING:
            run.stop = CANCELLED
        run.task = asyncio.create_task(self._drive(run))

    async def _drive(self, run: Run) -> None:
        batch = run.record["id"]
        try:
            if run.record["status"] == VALIDATING and not await self._validate(run):
                return
            if run.record["status"] == IN_PROGRESS:
                await self._lines.execute(run)
            if run.stop == "shutdown":
                return
            # Lines left without an answer and no stop asked for: the window ended before the sweep saw it.
            counts = run.counts
            unanswered = counts["completed"] + counts["failed"] < counts["total"]
            ended = unanswered and self._clock() >= run.record["expires_at"]
            await self._finalize(run, run.stop or (EXPIRED if ended else COMPLETED))
        except asyncio.CancelledError:
            pass  # the gateway stops; the next start resumes the batch
        except Exception:
            log.exception("batch %s failed in the gateway; it resumes at the next start", batch)
        finally:
            self._runs.pop(batch, None)

    async def _validate(self, run: Run) -> bool:
        """Check the input file and store its lines (in_progress), or fail the batch with what was wrong."""
        record = run.record
        try:
            path = self._files.path(record["input_file_id"])
            checked = await asyncio.to_thread(check_input, path, record["endpoint"])
        except OSError as exc:
            errors = [{"code": "invalid_file", "message": f"the input file cannot be read: {exc}", "line": None}]
        else:
            errors = checked.errors
        if errors:
            record["errors"] = {"object": "list", "data": errors}
            await self._set_status(run, FAILED, "failed_at")
            await self._webhooks.emit(run.owner, "batch.failed", {"id": record["id"]})
            return False
        if run.stop is not None:  # cancelled while it was validated: nothing has run
            return True
        lines = [Line(n, objects.line_id(), custom_id, body) for n, (custom_id, body) in enumerate(checked.lines)]
        record["request_counts"] = {"total": len(lines), "completed": 0, "failed": 0}
        self._move(record["status"], IN_PROGRESS)
        record["status"], record["in_progress_at"] = IN_PROGRESS, int(self._clock())
        await self._store.add_lines(record["id"], lines, record, run.owner)
        return True

    async def _finalize(self, run: Run, final: str) -> None:
        """Write the output and error files and end the batch as `final`."""
        record = run.record
        batch = record["id"]
        if final == COMPLETED and record["status"] != FINALIZING:
            await self._set_status(run, FINALIZING, "finalizing_at")
        completed, failed = await write_results(
            self._store, self._files, record, run.owner, final, lambda: self._metrics.batch_line(final)
        )
        record["request_counts"] = {
            "total": record["request_counts"]["total"],
            "completed": completed,
            "failed": failed,
        }
        await self._set_status(run, final, f"{final}_at")
        await self._store.drop_lines(batch)
        await self._webhooks.emit(run.owner, f"batch.{final}", {"id": batch})

    async def _set_status(self, run: Run, status: str, stamp: str) -> None:
        record = run.record
        self._move(record["status"], status)
        record["status"] = status
        record[stamp] = int(self._clock())
        await self._store.put_batch(record, run.owner)

    def _move(self, old: str, new: str) -> None:
        self.statuses[old] -= 1
        self.statuses[new] += 1

    async def _sweep(self) -> None:
        """Expire the batches whose window has ended: their lines in the queue or running stop now."""
        while True:
            await asyncio.sleep(_SWEEP_SECONDS)
            now = self._clock()
            for run in list(self._runs.values()):
                if (
                    run.stop is None
                    and run.record["status"] in (VALIDATING, IN_PROGRESS)
                    and now >= run.record["expires_at"]
                ):
                    run.stop = EXPIRED
                    for job in list(run.jobs.values()):
                        self._service.abort(job, Stopped("the batch's completion window ended"))


def _not_found(batch_id: str) -> GatewayError:
    return NotFound(f"No such Batch object: {batch_id}", param="batch_id")
