"""The SQLite database under DATA_DIR: files, batches and their lines, background requests, webhook deliveries.

One connection (aiosqlite: the stdlib sqlite3 on a thread of its own, so the event loop never waits on disk),
in WAL mode. Every change is committed when it is made: a line's result when the line ends, a batch's status
when it changes. After a SIGKILL the database holds everything that had ended, and nothing half-written.
This module holds the SQL and nothing else; the objects' shapes are app.batches.objects'.
"""

from __future__ import annotations

import asyncio
import fcntl
import sqlite3
from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiosqlite
import orjson

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, purpose TEXT NOT NULL, filename TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, status TEXT NOT NULL, created_at INTEGER NOT NULL, record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS lines (
    batch_id TEXT NOT NULL, line INTEGER NOT NULL, id TEXT NOT NULL, custom_id TEXT NOT NULL, body TEXT NOT NULL,
    outcome TEXT, result TEXT, PRIMARY KEY (batch_id, line)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS background (
    owner TEXT NOT NULL, id TEXT NOT NULL, kind TEXT NOT NULL, priority TEXT NOT NULL, body BLOB NOT NULL,
    created_at REAL NOT NULL, status INTEGER, result BLOB, ended_at REAL, PRIMARY KEY (owner, id)
);
CREATE TABLE IF NOT EXISTS deliveries (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, type TEXT NOT NULL, payload BLOB NOT NULL, created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL, state TEXT NOT NULL DEFAULT 'pending', last_error TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_at);
"""


# An update keeps the row's rowid, which orders the lists (newest first) and their pages.
_PUT_BATCH = (
    "INSERT INTO batches VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET status = excluded.status, "
    "record = excluded.record"
)


@dataclass(slots=True, frozen=True)
class StoredFile:
    id: str
    owner: str
    purpose: str
    filename: str
    bytes: int
    created_at: int


@dataclass(slots=True, frozen=True)
class Line:
    """One request of a batch, as validated: its place in the file, its id, the client's custom_id and body."""

    line: int
    id: str
    custom_id: str
    body: str


@dataclass(slots=True, frozen=True)
class Background:
    """A background request (Prefer: respond-async): what to run and, once it has ended, its answer."""

    owner: str
    id: str
    kind: str
    priority: str
    body: bytes
    created_at: float
    status: int | None
    result: bytes | None
    ended_at: float | None


@dataclass(slots=True, frozen=True)
class Delivery:
    id: str
    owner: str
    type: str
    payload: bytes
    created_at: float
    attempts: int


Result = tuple[str | None, str | None, Line]  # a line's outcome and result (None: it has none yet), and the line


class Store:
    """The database; open() it, then await its methods (each one statement or one transaction)."""

    def __init__(self, path: Path):
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._lock: IO[bytes] | None = None

    async def open(self) -> Store:
        """Open (or create) the database; StoreInUse if another gateway has it open."""
        self._lock = await asyncio.to_thread(_lock, self.path.with_suffix(".lock"))
        db = await aiosqlite.connect(self.path)
        await db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives the process being killed (the OS has it); only a power loss may
        # take the last ones back, never leave the database torn.
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.executescript(_SCHEMA)
        await db.commit()
        self._db = db
        return self

    async def aclose(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None
        if self._lock is not None:
            self._lock.close()  # and with it the lock
            self._lock = None

    @property
    def db(self) -> aiosqlite.Connection:
        assert self._db is not None, "Store.open() first"
        return self._db

    async def _change(self, sql: str, args: Sequence[Any] = ()) -> int:
        cursor = await self.db.execute(sql, args)
        await self.db.commit()
        return cursor.rowcount

    async def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        return list(await self.db.execute_fetchall(sql, args))

    # Files ------------------------------------------------------------------------------------------------

    async def add_file(self, file: StoredFile) -> None:
        await self._change(
            "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET bytes = excluded.bytes, "
            "created_at = excluded.created_at",
            (file.id, file.owner, file.purpose, file.filename, file.bytes, file.created_at),
        )

    async def file(self, file_id: str) -> StoredFile | None:
        rows = await self._rows("SELECT * FROM files WHERE id = ?", (file_id,))
        return StoredFile(*rows[0]) if rows else None

    async def files(self, owner: str | None, purpose: str | None, after: str | None, limit: int) -> list[StoredFile]:
        """Newest first; `after` is the id of the last file of the previous page; owner None: every owner's."""
        where, args = _page(owner, after, "files")
        if purpose is not None:
            where.append("purpose = ?")
            args.append(purpose)
        sql = f"SELECT * FROM files WHERE {' AND '.join(where) or '1'} ORDER BY rowid DESC LIMIT ?"
        return [StoredFile(*row) for row in await self._rows(sql, [*args, limit])]

    async def delete_file(self, file_id: str) -> None:
        await self._change("DELETE FROM files WHERE id = ?", (file_id,))

    # Batches ----------------------------------------------------------------------------------------------

    async def put_batch(self, record: dict[str, Any], owner: str) -> None:
        """Insert or update a batch's record (the OpenAI object, counts as of now)."""
        await self._change(
            _PUT_BATCH,
            (record["id"], owner, record["status"], record["created_at"], orjson.dumps(record).decode()),
        )

    async def batch(self, batch_id: str) -> tuple[str, dict[str, Any]] | None:
        """(owner, record) of a batch."""
        rows = await self._rows("SELECT owner, record FROM batches WHERE id = ?", (batch_id,))
        return (rows[0][0], orjson.loads(rows[0][1])) if rows else None

    async def batches(self, owner: str | None, after: str | None, limit: int) -> list[dict[str, Any]]:
        where, args = _page(owner, after, "batches")
        sql = f"SELECT record FROM batches WHERE {' AND '.join(where) or '1'} ORDER BY rowid DESC LIMIT ?"
        return [orjson.loads(row[0]) for row in await self._rows(sql, [*args, limit])]

    async def unfinished_batches(self) -> list[tuple[str, dict[str, Any]]]:
        """(owner, record) of every batch a restart must take up again, oldest first."""
        rows = await self._rows(
            "SELECT owner, record FROM batches WHERE status IN ('validating', 'in_progress', 'finalizing', "
            "'cancelling') ORDER BY rowid"
        )
        return [(row[0], orjson.loads(row[1])) for row in rows]

    async def batch_statuses(self) -> dict[str, int]:
        rows = await self._rows("SELECT status, count(*) FROM batches GROUP BY status")
        return {row[0]: row[1] for row in rows}

    # Lines ------------------------------------------------------------------------------------------------

    async def add_lines(self, batch_id: str, lines: Iterable[Line], record: dict[str, Any], owner: str) -> None:
        """A validated batch's lines and its new record, in one transaction (a crash leaves neither)."""
        db = self.db
        await db.execute("DELETE FROM lines WHERE batch_id = ?", (batch_id,))
        await db.executemany(
            "INSERT INTO lines (batch_id, line, id, custom_id, body) VALUES (?, ?, ?, ?, ?)",
            ((batch_id, line.line, line.id, line.custom_id, line.body) for line in lines),
        )
        await db.execute(
            _PUT_BATCH,
            (batch_id, owner, record["status"], record["created_at"], orjson.dumps(record).decode()),
        )
        await db.commit()

    async def pending_lines(self, batch_id: str, page: int = 500) -> AsyncGenerator[list[Line], None]:
        """The lines without a result, in file order, a page at a time (a batch's bodies are never all in memory)."""
        sql = "SELECT line, id, custom_id, body FROM lines WHERE batch_id = ? AND outcome IS NULL AND line > ?"
        async for rows in self._pages(sql, batch_id, page):
            yield [Line(*row) for row in rows]

    async def end_line(self, batch_id: str, line: int, outcome: str, result: bytes) -> None:
        """Commit a line's result; a line that has one already keeps it (each custom_id ends once)."""
        await self._change(
            "UPDATE lines SET outcome = ?, result = ? WHERE batch_id = ? AND line = ? AND outcome IS NULL",
            (outcome, result.decode(), batch_id, line),
        )

    async def line_counts(self, batch_id: str) -> dict[str | None, int]:
        rows = await self._rows("SELECT outcome, count(*) FROM lines WHERE batch_id = ? GROUP BY outcome", (batch_id,))
        return {row[0]: row[1] for row in rows}

    async def results(self, batch_id: str, page: int = 1000) -> AsyncGenerator[list[Result], None]:
        """Every line of a batch in file order with its (outcome, result), a page at a time."""
        sql = "SELECT line, id, custom_id, '', outcome, result FROM lines WHERE batch_id = ? AND line > ?"
        async for rows in self._pages(sql, batch_id, page):
            yield [(row[4], row[5], Line(*row[:4])) for row in rows]

    async def _pages(self, sql: str, batch_id: str, page: int) -> AsyncGenerator[list[sqlite3.Row], None]:
        """The rows of `sql` (lines of a batch, `line` first, after the one given) in line order, `page` at a time."""
        last = -1
        while rows := await self._rows(sql + " ORDER BY line LIMIT ?", (batch_id, last, page)):
            yield rows
            last = rows[-1][0]

    async def drop_lines(self, batch_id: str) -> None:
        """A finished batch's lines: its files hold them now."""
        await self._change("DELETE FROM lines WHERE batch_id = ?", (batch_id,))

    # Background requests ----------------------------------------------------------------------------------

    async def add_background(self, item: Background) -> None:
        await self._change(
            "INSERT OR REPLACE INTO background VALUES (?, ?, ?, ?, ?, ?, NULL, NULL, NULL)",
            (item.owner, item.id, item.kind, item.priority, item.body, item.created_at),
        )

    async def end_background(self, owner: str, request_id: str, status: int, result: bytes, ended_at: float) -> None:
        await self._change(
            "UPDATE background SET status = ?, result = ?, ended_at = ? WHERE owner = ? AND id = ?",
            (status, result, ended_at, owner, request_id),
        )

    async def background(self, owner: str | None, request_id: str) -> Background | None:
        if owner is None:
            rows = await self._rows("SELECT * FROM background WHERE id = ? ORDER BY created_at DESC", (request_id,))
        else:
            rows = await self._rows("SELECT * FROM background WHERE owner = ? AND id = ?", (owner, request_id))
        return Background(*rows[0]) if rows else None

    async def unfinished_background(self) -> list[Background]:
        rows = await self._rows("SELECT * FROM background WHERE ended_at IS NULL ORDER BY created_at")
        return [Background(*row) for row in rows]

    async def forget_background(self, ended_before: float) -> int:
        return await self._change("DELETE FROM background WHERE ended_at < ?", (ended_before,))

    # Webhook deliveries -----------------------------------------------------------------------------------

    async def add_delivery(self, delivery: Delivery, next_at: float) -> None:
        await self._change(
            "INSERT INTO deliveries (id, owner, type, payload, created_at, next_at) VALUES (?, ?, ?, ?, ?, ?)",
            (delivery.id, delivery.owner, delivery.type, delivery.payload, delivery.created_at, next_at),
        )

    async def due_deliveries(self, now: float, limit: int) -> list[Delivery]:
        rows = await self._rows(
            "SELECT id, owner, type, payload, created_at, attempts FROM deliveries WHERE state = 'pending' "
            "AND next_at <= ? ORDER BY next_at LIMIT ?",
            (now, limit),
        )
        return [Delivery(*row) for row in rows]

    async def next_delivery_at(self) -> float | None:
        rows = await self._rows("SELECT min(next_at) FROM deliveries WHERE state = 'pending'")
        return rows[0][0] if rows else None

    async def delivery_tried(self, delivery_id: str, state: str, next_at: float, error: str | None) -> None:
        await self._change(
            "UPDATE deliveries SET attempts = attempts + 1, state = ?, next_at = ?, last_error = ? WHERE id = ?",
            (state, next_at, error, delivery_id),
        )

    async def delivery_counts(self) -> dict[str, int]:
        rows = await self._rows("SELECT state, count(*) FROM deliveries GROUP BY state")
        return {row[0]: row[1] for row in rows}


class StoreInUse(Exception):
    """Another gateway process has this DATA_DIR open: two would both resume the same batches."""


def _lock(path: Path) -> IO[bytes]:
    """An exclusive lock on `path`, held while the file stays open (the kernel drops it if the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("ab")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StoreInUse(f"{path.parent} is in use by another gateway; give each gateway its own DATA_DIR") from None
    return handle


def _page(owner: str | None, after: str | None, table: str) -> tuple[list[str], list[Any]]:
    """The WHERE terms of a page: the owner's rows (None: all), older than the row `after` names."""
    where: list[str] = []
    args: list[Any] = []
    if owner is not None:
        where.append("owner = ?")
        args.append(owner)
    if after is not None:
        where.append(f"rowid < (SELECT rowid FROM {table} WHERE id = ?)")
        args.append(after)
    return where, args
