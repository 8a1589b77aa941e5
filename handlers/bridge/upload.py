"""Multipart uploads streamed straight into the bucket, in constant memory.

The request body is parsed as it arrives (python-multipart's push parser); the bytes of the file field go
through a bounded `ChunkPipe` to the object store's `put_stream` running in a worker thread (the minio
client is synchronous and uploads 16 MiB parts). Memory is bounded by the pipe (`depth` x `block`) plus
one part, whatever the file size; nothing is spooled to disk. A client that disconnects, a truncated
body or a failing S3 aborts the upload (minio aborts the multipart upload) and raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import IO, Any, Generic, TypeVar, cast

from fastapi import HTTPException
from python_multipart.multipart import MultipartParser, parse_options_header

from handlers.bridge.errors import invalid_field

T = TypeVar("T")
BLOCK = 1024 * 1024
DEPTH = 4
MAX_FIELD_BYTES = 64 * 1024
MAX_FIELDS = 16


class UploadAborted(IOError):
    pass


class ChunkPipe(io.RawIOBase):
    """A bounded pipe from the event loop (writer) to a worker thread (reader, e.g. minio).

    The writer coalesces chunks into blocks of about `block` bytes and waits while `depth` blocks are
    queued; `read(n)` in the thread blocks until it has `n` bytes or the end of the stream, so minio gets a
    whole part in one read.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *, block: int = BLOCK, depth: int = DEPTH) -> None:
        super().__init__()
        self._loop = loop
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(depth)
        self._block = block
        self._pending = bytearray()
        self._rest = b""
        self._eof = False
        self._error: BaseException | None = None
        self.size = 0

    # -------------------------------------------------------------- writer (event loop)

    async def write_async(self, data: bytes, reader: asyncio.Future[Any]) -> None:
        self._pending += data
        self.size += len(data)
        if len(self._pending) >= self._block:
            block, self._pending = bytes(self._pending), bytearray()
            await self._put(block, reader)

    async def close_async(self, reader: asyncio.Future[Any]) -> None:
        if self._pending:
            block, self._pending = bytes(self._pending), bytearray()
            await self._put(block, reader)
        await self._put(None, reader)

    def abort(self, error: BaseException) -> None:
        """Make the reader raise; never blocks."""
        self._error = error
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)  # wakes a reader waiting on an empty queue

    async def _put(self, item: bytes | None, reader: asyncio.Future[Any]) -> None:
        if not self._queue.full():
            self._queue.put_nowait(item)
            return
        put = asyncio.ensure_future(self._queue.put(item))
        await asyncio.wait({put, reader}, return_when=asyncio.FIRST_COMPLETED)
        if not put.done():  # the reader ended first: it failed
            put.cancel()
            reader.result()
            raise UploadAborted("the upload stopped reading before the end of the file")

    # -------------------------------------------------------------- reader (worker thread)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes (fewer only at the end); `n < 0` returns the next block, not the whole stream."""
        parts, have = ([self._rest], len(self._rest)) if self._rest else ([], 0)
        self._rest = b""
        while (have < n or (n < 0 and not parts)) and not self._eof:
            item = asyncio.run_coroutine_threadsafe(self._queue.get(), self._loop).result()
            if self._error is not None:
                raise UploadAborted(f"upload aborted: {self._error!r}") from self._error
            if item is None:
                self._eof = True
                break
            parts.append(item)
            have += len(item)
        if 0 <= n < have:  # split the last block only, so the part is joined (copied) once
            keep = len(parts[-1]) - (have - n)
            parts[-1], self._rest = parts[-1][:keep], parts[-1][keep:]
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        return data


@dataclass
class Received(Generic[T]):
    """What `receive_file` read: the sink's result, the file's name and size, and the form's text fields."""

    result: T
    filename: str
    size: int
    fields: dict[str, str] = field(default_factory=dict)


class _FormEvents:
    """python-multipart callbacks collected as (kind, value) events: part headers, data, part end."""

    def __init__(self, boundary: bytes) -> None:
        # value: the part's headers (dict[str, str]) for "part", bytes for "data", None for "end"
        self.events: list[tuple[str, Any]] = []
        self.finished = False
        self._headers: dict[str, str] = {}
        self._name = bytearray()
        self._value = bytearray()
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._headers.clear,
            "on_header_field": lambda d, s, e: self._name.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": lambda: self.events.append(("part", dict(self._headers))),
            "on_part_data": lambda d, s, e: self.events.append(("data", d[s:e])),
            "on_part_end": lambda: self.events.append(("end", None)),
            "on_end": self._end,
        })

    def _header_end(self) -> None:
        self._headers[self._name.decode("latin-1").lower()] = self._value.decode("utf-8", "replace")
        self._name.clear()
        self._value.clear()

    def _end(self) -> None:
        self.finished = True

    def feed(self, chunk: bytes) -> list[tuple[str, Any]]:
        self.parser.write(chunk)
        events, self.events = self.events, []
        return events


def _disposition(headers: dict[str, str]) -> tuple[str, str | None]:
    _, params = parse_options_header(headers.get("content-disposition", ""))
    name = params.get(b"name", b"").decode("utf-8", "replace")
    filename = params.get(b"filename")
    return name, filename.decode("utf-8", "replace") if filename is not None else None


def boundary_of(content_type: str | None) -> bytes:
    ctype, params = parse_options_header(content_type)
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise HTTPException(415, "expected a multipart/form-data body with a boundary")
    return params[b"boundary"]


async def receive_file(
    body: AsyncIterator[bytes], content_type: str | None, field_name: str,
    sink: Callable[[str, IO[bytes]], Awaitable[T]],
) -> Received[T]:
    """Stream the form's `field_name` file into `sink(filename, stream)`; small text fields are collected."""
    form = _FormEvents(boundary_of(content_type))
    loop = asyncio.get_running_loop()
    pipe: ChunkPipe | None = None
    upload: asyncio.Future[T] | None = None
    received: Received[T] | None = None
    fields: dict[str, str] = {}
    current: str | None = None  # the text field being read, or None for the file / a skipped part
    filename = ""
    text = bytearray()
    try:
        async for chunk in body:
            for kind, value in form.feed(chunk):
                if kind == "part":
                    name, part_file = _disposition(value)
                    if name == field_name and part_file is not None and upload is None:
                        filename = part_file
                        pipe = ChunkPipe(loop)
                        upload = asyncio.ensure_future(sink(filename, cast(IO[bytes], pipe)))  # a readable stream
                        current = None
                    else:
                        if len(fields) >= MAX_FIELDS:
                            raise HTTPException(413, f"more than {MAX_FIELDS} form fields")
                        current, text = name, bytearray()
                elif kind == "data":
                    if current is not None:
                        text += value
                        if len(text) > MAX_FIELD_BYTES:
                            raise HTTPException(413, f"form field {current!r} is over {MAX_FIELD_BYTES} bytes")
                    elif pipe is not None and upload is not None and received is None:
                        await pipe.write_async(value, upload)
                elif current is not None:
                    fields[current] = text.decode("utf-8", "replace")
                    current = None
                elif pipe is not None and upload is not None and received is None:
                    await pipe.close_async(upload)
                    received = Received(await upload, filename, pipe.size)
        if not form.finished:
            raise invalid_field(["body"], "the multipart body ended before its closing boundary")
        if received is None:
            raise invalid_field(["body", field_name], "Field required (a file part)", "missing")
    except BaseException as e:
        if pipe is not None and upload is not None and not upload.done():
            pipe.abort(e)
            upload.add_done_callback(lambda f: f.cancelled() or f.exception())
            if not isinstance(e, asyncio.CancelledError):
                with contextlib.suppress(BaseException):
                    await upload
        raise
    received.fields = fields
    return received
