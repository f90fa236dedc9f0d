"""Files on disk under DATA_DIR/files, one per id: uploads streamed there from a multipart body, batch results
written there. The database (app.batches.store) holds what is known of each; the bytes never pass through it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO, Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.batches import objects
from app.batches.store import Store, StoredFile
from app.errors import BodyTooLarge, InvalidRequest, NotFound

PURPOSES = ("batch",)  # what a client may upload; the gateway writes `batch_output` files itself
_FLUSH = 1 << 20  # bytes gathered before a write goes to the worker thread
_FIELD_MAX = 1024  # a form field other than the file (`purpose`)


class Files:
    """The files of every key: create (upload or write), read, delete."""

    def __init__(self, store: Store, directory: Path, max_bytes: int, clock: Callable[[], float] = time.time):
        self.store = store
        self.directory = directory
        self.max_bytes = max_bytes
        self.clock = clock

    async def start(self) -> None:
        """Make the directory (at start: an upload never waits on it)."""
        await asyncio.to_thread(self.directory.mkdir, parents=True, exist_ok=True)

    def path(self, file_id: str) -> Path:
        return self.directory / file_id

    async def get(self, file_id: str, owner: str | None) -> StoredFile:
        """The file of that id, if `owner` (None: any) may see it; 404 otherwise, whether or not it exists."""
        file = await self.store.file(file_id)
        if file is None or (owner is not None and file.owner != owner):
            raise NotFound(f"No such File object: {file_id}", param="file_id")
        return file

    async def upload(self, content_type: str | None, body: AsyncIterator[bytes], owner: str) -> StoredFile:
        """A `multipart/form-data` upload of `file` and `purpose`, streamed to disk as it arrives.

        Raises BodyTooLarge past FILE_MAX_BYTES, InvalidRequest for a body that is not such a form.
        """
        kind, params = parse_options_header(content_type or "")
        boundary = params.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise InvalidRequest("send the file as multipart/form-data, with fields 'file' and 'purpose'")
        new_id = objects.file_id()
        partial = self.directory / f".upload-{new_id}"
        form = _Form(partial, self.max_bytes)
        parser = MultipartParser(boundary, form.callbacks())
        try:
            try:
                async for chunk in body:
                    parser.write(chunk)
                    await form.flush()
                parser.finalize()
                await form.flush(last=True)
            except MultipartParseError:
                raise InvalidRequest("the multipart body is malformed") from None
            finally:
                await form.close()
            purpose = form.fields.get("purpose", b"").decode(errors="replace")
            if not form.received_file:
                raise InvalidRequest("the 'file' field is missing", param="file")
            if purpose not in PURPOSES:
                raise InvalidRequest(f"purpose must be 'batch', not {purpose!r}", param="purpose")
            await asyncio.to_thread(os.replace, partial, self.path(new_id))
        finally:
            await asyncio.to_thread(partial.unlink, True)
        stored = StoredFile(new_id, owner, purpose, form.filename or "upload.jsonl", form.size, int(self.clock()))
        await self.store.add_file(stored)
        return stored

    async def content(self, file: StoredFile) -> AsyncIterator[bytes]:
        """The file's bytes, a chunk at a time, each read on the worker thread."""
        handle = await asyncio.to_thread(self.path(file.id).open, "rb")
        try:
            while chunk := await asyncio.to_thread(handle.read, _FLUSH):
                yield chunk
        finally:
            await asyncio.to_thread(handle.close)

    async def delete(self, file: StoredFile) -> None:
        await self.store.delete_file(file.id)
        await asyncio.to_thread(self.path(file.id).unlink, True)


class ResultFile:
    """A batch's output or error file, written a page of lines at a time; created only if a line is written."""

    def __init__(self, files: Files, file_id: str, owner: str, filename: str):
        self._files = files
        self.id = file_id
        self._owner = owner
        self._filename = filename
        self._partial = files.directory / f".write-{file_id}"
        self._handle: IO[bytes] | None = None
        self._size = 0

    async def add(self, lines: list[bytes]) -> None:
        if not lines:
            return
        if self._handle is None:
            self._handle = await asyncio.to_thread(self._partial.open, "wb")
        data = b"".join(line + b"\n" for line in lines)
        self._size += len(data)
        await asyncio.to_thread(self._handle.write, data)

    async def finish(self) -> str | None:
        """Put the file in place and on record; its id, or None if no line was written."""
        if self._handle is None:
            return None
        handle, self._handle = self._handle, None
        await asyncio.to_thread(handle.close)
        await asyncio.to_thread(os.replace, self._partial, self._files.path(self.id))
        created = int(self._files.clock())
        await self._files.store.add_file(
            StoredFile(self.id, self._owner, "batch_output", self._filename, self._size, created)
        )
        return self.id

    async def discard(self) -> None:
        """Remove what finish() did not put in place."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            await asyncio.to_thread(handle.close)
        await asyncio.to_thread(self._partial.unlink, True)


class _Form:
    """The parser's callbacks: the file part goes to `partial` (through a buffer), other fields to memory."""

    def __init__(self, partial: Path, max_bytes: int):
        self.partial = partial
        self.max_bytes = max_bytes
        self.fields: dict[str, bytes] = {}
        self.filename: str | None = None
        self.size = 0
        self.received_file = False
        self._pending = bytearray()
        self._handle: IO[bytes] | None = None
        self._header = b""
        self._value = b""
        self._disposition = b""
        self._name: str | None = None
        self._in_file = False
        self._field = bytearray()

    def callbacks(self) -> Any:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._disposition = b""
        self._header = self._value = b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if self._header.lower() == b"content-disposition":
            self._disposition = self._value
        self._header = self._value = b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._disposition)
        self._name = params.get(b"name", b"").decode(errors="replace")
        self._in_file = self._name == "file"
        if self._in_file:
            self.received_file = True
            filename = params.get(b"filename")
            self.filename = filename.decode(errors="replace") if filename else None
        self._field = bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self.size += end - start
            if self.size > self.max_bytes:
                raise BodyTooLarge(f"the file is over FILE_MAX_BYTES={self.max_bytes} bytes")
            self._pending += data[start:end]
        else:
            self._field += data[start:end]
            if len(self._field) > _FIELD_MAX:
                raise InvalidRequest(f"the form field {self._name!r} is over {_FIELD_MAX} bytes", param=self._name)

    def _part_end(self) -> None:
        if not self._in_file and self._name:
            self.fields[self._name] = bytes(self._field)
        self._in_file = False

    async def flush(self, last: bool = False) -> None:
        if len(self._pending) < _FLUSH and not (last and self._pending):
            if last and self._handle is None and self.received_file:
                self._handle = await asyncio.to_thread(self.partial.open, "wb")  # an empty file
            return
        if self._handle is None:
            self._handle = await asyncio.to_thread(self.partial.open, "wb")
        data = bytes(self._pending)
        self._pending.clear()
        await asyncio.to_thread(self._handle.write, data)

    async def close(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            with contextlib.suppress(OSError):
                await asyncio.to_thread(handle.close)
