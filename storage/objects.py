"""The object store: the synchronous `minio` client, driven off the event loop.

Uploads of unknown length stream in constant memory (multipart, `part_size`); downloads stream in
chunks. Works against MinIO (production) and any S3 server (SeaweedFS in the local stack).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

import urllib3
from minio import Minio
from minio.error import S3Error

from core.errors import NotFoundError, StorageUnavailableError, UnsafeKeyError
from core.keys import check_key
from core.settings import Settings

PART_SIZE = 16 * 1024 * 1024
CHUNK = 1024 * 1024


class ObjectNotFoundError(NotFoundError):
    code = "object_not_found"


def local_path(root: Path, key: str) -> Path:
    """Where `key` lives under the local folder `root`: derived only from a validated key (core.keys)
    and refused if it would resolve outside `root` (a symlink inside the cache, say)."""
    path = root / check_key(key)
    base = root.resolve()
    if not path.resolve().is_relative_to(base):
        raise UnsafeKeyError(f"key {key[:80]!r} resolves outside the cache")
    return path


def _client(settings: Settings) -> Minio:
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=5, read=300), retries=urllib3.Retry(total=3, backoff_factor=0.2,
                                                                            status_forcelist=[500, 502, 503, 504]),
        maxsize=8,
    )
    return Minio(
        settings.s3_endpoint,
        access_key=settings.s3_access_key.get_secret_value(),
        secret_key=settings.s3_secret_key.get_secret_value(),
        secure=settings.s3_secure,
        region=settings.s3_region,
        http_client=http,
    )


class _HashingReader(io.RawIOBase):
    """Wraps a readable stream; counts bytes and computes sha256 while minio reads it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.size = 0
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.size += len(data)
        self.sha.update(data)
        return data


def _read_some(it: Iterator[bytes], chunk: int) -> tuple[list[bytes], bool]:
    """Chunks from `it` until they hold `chunk` bytes (False: more may follow) or it ends (True)."""
    out: list[bytes] = []
    size = 0
    for data in it:
        out.append(data)
        size += len(data)
        if size >= chunk:
            return out, False
    return out, True


class ObjectStore:
    def __init__(self, settings: Settings) -> None:
        self.bucket = settings.s3_bucket
        self.client = _client(settings)

    # -------------------------------------------------------------- sync core (runs in threads)

    def _call(self, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except S3Error as e:
            if e.code in {"NoSuchKey", "NoSuchObject", "NoSuchBucket"}:
                raise ObjectNotFoundError(f"s3://{self.bucket}/{e.object_name or ''}: {e.code}") from e
            raise
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise StorageUnavailableError(f"S3 unreachable: {type(e).__name__}") from e

    def ensure_bucket_sync(self) -> None:
        if not self._call(self.client.bucket_exists, self.bucket):
            try:
                self._call(self.client.make_bucket, self.bucket)
            except S3Error as e:
                if e.code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                    raise

    def put_stream_sync(self, key: str, stream: IO[bytes], content_type: str = "application/octet-stream"
                        ) -> tuple[int, str]:
        """Upload a stream of unknown length in constant memory. Returns (size, sha256)."""
        reader = _HashingReader(stream)
        self._call(self.client.put_object, self.bucket, check_key(key), reader, length=-1,
                   part_size=PART_SIZE, content_type=content_type)
        return reader.size, reader.sha.hexdigest()

    def put_file_sync(self, key: str, path: Path) -> tuple[int, str]:
        with open(path, "rb") as f:
            return self.put_stream_sync(key, f)

    def iter_sync(self, key: str, chunk: int = CHUNK) -> Iterator[bytes]:
        resp = self._call(self.client.get_object, self.bucket, check_key(key))
        try:
            yield from resp.stream(chunk)
        finally:
            resp.close()
            resp.release_conn()

    def download_sync(self, key: str, path: Path) -> int:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        size = 0
        with open(tmp, "wb") as f:
            for data in self.iter_sync(key):
                f.write(data)
                size += len(data)
        os.replace(tmp, path)
        return size

    def list_sync(self, prefix: str) -> list[tuple[str, int]]:
        objs = self._call(lambda: list(self.client.list_objects(self.bucket, prefix=prefix, recursive=True)))
        return [(o.object_name, o.size or 0) for o in objs]

    # -------------------------------------------------------------- async API

    async def ensure_bucket(self) -> None:
        await asyncio.to_thread(self.ensure_bucket_sync)

    async def put_stream(self, key: str, stream: IO[bytes], content_type: str = "application/octet-stream"
                         ) -> tuple[int, str]:
        return await asyncio.to_thread(self.put_stream_sync, key, stream, content_type)

    async def put_file(self, key: str, path: Path) -> tuple[int, str]:
        return await asyncio.to_thread(self.put_file_sync, key, path)

    async def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        await asyncio.to_thread(self.put_stream_sync, key, io.BytesIO(data), content_type)

    async def get_bytes(self, key: str) -> bytes:
        return await asyncio.to_thread(lambda: b"".join(self.iter_sync(key)))

    async def iter_chunks(self, key: str, chunk: int = CHUNK) -> AsyncIterator[bytes]:
        """The object's bytes in chunks of about `chunk`, at most two chunks in memory. Each thread hop
        reads until it has `chunk` bytes or the end: a small object is one hop (GET, body, end)."""
        it = self.iter_sync(key, chunk)  # a generator: nothing is read until the first hop
        done = False
        while not done:
            parts, done = await asyncio.to_thread(_read_some, it, chunk)
            for data in parts:
                yield data

    async def download(self, key: str, path: Path) -> int:
        return await asyncio.to_thread(self.download_sync, key, path)

    async def stat(self, key: str) -> Any:
        return await asyncio.to_thread(self._call, self.client.stat_object, self.bucket, check_key(key))

    async def exists(self, key: str) -> bool:
        try:
            await self.stat(key)
            return True
        except ObjectNotFoundError:
            return False

    async def list(self, prefix: str) -> list[tuple[str, int]]:
        return await asyncio.to_thread(self.list_sync, prefix)

    async def upload_dir(self, prefix: str, root: Path) -> tuple[int, int]:
        """Upload every file under `root` to `prefix/<relative path>`. Returns (files, bytes)."""
        files = total = 0
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            size, _ = await self.put_file(f"{prefix}/{rel}", path)
            files += 1
            total += size
        return files, total

    async def download_prefix(self, prefix: str, root: Path) -> int:
        """Download every object under `prefix/` into `root`, keeping relative paths (each one checked to
        stay inside `root` before anything is written)."""
        prefix = check_key(prefix.rstrip("/"))
        objs = await self.list(prefix + "/")
        targets = [(name, local_path(root, name[len(prefix) + 1:])) for name, _ in objs]
        for name, target in targets:
            await self.download(name, target)
        return len(objs)

    async def mirror(self, prefix: str, target: Path, marker: str = "") -> Path:
        """A local copy of everything under `prefix/`, downloaded once (atomically) and then reused."""
        prefix = check_key(prefix.rstrip("/"))
        done = target / ".complete"
        if done.exists():
            return target
        tmp = target.with_name(target.name + ".partial")
        await asyncio.to_thread(shutil.rmtree, tmp, True)
        if not await self.download_prefix(prefix, tmp):
            raise ObjectNotFoundError(f"s3://{self.bucket}/{prefix}/: no objects")
        (tmp / ".complete").write_text(marker or prefix)
        await asyncio.to_thread(shutil.rmtree, target, True)
        tmp.rename(target)
        return target

    async def fetch(self, key: str, cache: Path) -> Path:
        """A local copy of one object at `cache/<key>`, downloaded once and then reused (keys are immutable).

        The path comes only from the validated key and stays inside `cache`; an unsafe key raises
        UnsafeKeyError before anything (not even a `.part` file) is created."""
        target = local_path(cache, key)
        if not target.exists():
            await self.download(key, target)
        return target

    async def remove_prefix(self, prefix: str) -> int:
        objs = await self.list(prefix)
        for name, _ in objs:
            await asyncio.to_thread(self._call, self.client.remove_object, self.bucket, name)
        return len(objs)

    async def ping(self) -> None:
        """A real round trip to the bucket (readiness probes)."""
        await asyncio.to_thread(self._call, self.client.bucket_exists, self.bucket)

    async def presigned_get(self, key: str, expires_s: int = 3600) -> str:
        return await asyncio.to_thread(
            self.client.presigned_get_object, self.bucket, check_key(key), expires=timedelta(seconds=expires_s)
        )
