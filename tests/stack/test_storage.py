"""The object store against the real S3 server: unknown-length multipart uploads, presigned URLs, credentials."""

from __future__ import annotations

import hashlib
import io

import httpx
import pytest

from core.errors import StorageUnavailableError, UnsafeKeyError
from storage.objects import PART_SIZE, ObjectNotFoundError, ObjectStore

_PATTERN = bytes((i * 7) % 251 for i in range(4093))


class _Stream(io.RawIOBase):
    """A non-seekable stream of `size` bytes whose length nobody knows up front."""

    def __init__(self, size: int) -> None:
        self.left = size
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = (_PATTERN * (n // len(_PATTERN) + 1))[:n]
        self.left -= len(data)
        self.sha.update(data)
        return data


async def test_unknown_length_upload_spans_several_parts_and_reads_back(store, uid) -> None:
    size = PART_SIZE * 2 + 12345  # three multipart parts
    stream = _Stream(size)
    got_size, sha = await store.put_stream(f"tests/{uid}/big.bin", stream)
    assert got_size == size and sha == stream.sha.hexdigest()
    h = hashlib.sha256()
    async for chunk in store.iter_chunks(f"tests/{uid}/big.bin"):
        h.update(chunk)
    assert h.hexdigest() == sha


async def test_presigned_get_works_and_a_tampered_url_is_refused(store, uid) -> None:
    await store.put_bytes(f"tests/{uid}/p.txt", b"presigned body")
    url = await store.presigned_get(f"tests/{uid}/p.txt", expires_s=60)
    async with httpx.AsyncClient() as http:
        ok = await http.get(url)
        assert ok.status_code == 200 and ok.content == b"presigned body"
        tampered = await http.get(url.replace("p.txt", "q.txt"))
        assert tampered.status_code == 403


async def test_wrong_credentials_are_refused_by_the_real_server(settings, uid) -> None:
    from pydantic import SecretStr

    bad = ObjectStore(settings.model_copy(update={"s3_secret_key": SecretStr("not-the-secret")}))
    with pytest.raises(Exception) as err:
        await bad.put_bytes(f"tests/{uid}/x.txt", b"x")
    assert "SignatureDoesNotMatch" in str(err.value) or "AccessDenied" in str(err.value)


async def test_missing_objects_and_unsafe_keys_have_precise_errors(store, uid) -> None:
    with pytest.raises(ObjectNotFoundError):
        await store.get_bytes(f"tests/{uid}/nope.txt")
    with pytest.raises(UnsafeKeyError):
        await store.put_bytes("../outside.txt", b"x")
    assert not await store.exists(f"tests/{uid}/nope.txt")


async def test_an_unreachable_server_is_a_transient_error(settings) -> None:
    down = ObjectStore(settings.model_copy(update={"s3_endpoint": "127.0.0.1:9"}))
    with pytest.raises(StorageUnavailableError):
        await down.exists("tests/x")
