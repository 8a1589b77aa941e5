"""Idempotency receipts: the first answer to a webhook id / Idempotency-Key, returned again on a replay.

JetStream's duplicate window drops a second publish with the same `Nats-Msg-Id`, but it cannot give the
sender the first answer again, and it forgets after 120 s. So the bridge keeps a receipt per key in a NATS
KV bucket (no extra store on the webhook path):

- `create` of the key is atomic: the first request reserves it ("pending"), publishes, then stores its
  answer ("done"); a concurrent duplicate gets 409, a later one the stored answer;
- the same key with a different request (subject or body) is refused with 422 (the IETF
  Idempotency-Key draft's rule), so a key cannot be reused to smuggle a different event;
- a pending receipt older than `STALE_S` (a bridge died between reserve and publish) is taken over with
  a compare-and-set, so a crash never blocks a key for the whole TTL;
- bounded: entries expire after `TTL_S` (max_age) and the bucket keeps at most `MAX_BYTES`, dropping the
  oldest receipts first (discard=old) instead of refusing new webhooks.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel

BUCKET = "CODETUNE_WEBHOOKS"
TTL_S = 24 * 3600.0
MAX_BYTES = 64 * 1024 * 1024
STALE_S = 30.0


class IdempotencyConflict(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Receipt(BaseModel):
    state: Literal["pending", "done"]
    fingerprint: str
    at: float
    status: int | None = None
    answer: dict[str, Any] | None = None


def fingerprint(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\x00")
    return h.hexdigest()


def bucket_config(ttl_s: float = TTL_S, max_bytes: int = MAX_BYTES, replicas: int = 1) -> StreamConfig:
    """The KV bucket's stream, as nats-py's create_key_value makes it, except discard=old; `replicas`:
    settings.nats_replicas, as the product's streams."""
    return StreamConfig(
        name=f"KV_{BUCKET}", subjects=[f"$KV.{BUCKET}.>"], allow_rollup_hdrs=True, deny_delete=True,
        allow_direct=True, discard=DiscardPolicy.OLD, duplicate_window=120.0, max_age=ttl_s,
        max_bytes=max_bytes, max_msgs_per_subject=1, max_msg_size=64 * 1024, storage=StorageType.FILE,
        num_replicas=replicas,
    )


class Receipts:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext, *, ttl_s: float = TTL_S, max_bytes: int = MAX_BYTES,
                   replicas: int = 1) -> Receipts:
        cfg = bucket_config(ttl_s, max_bytes, replicas)
        try:
            await js.stream_info(cfg.name or "")
            await js.update_stream(cfg)
        except NotFoundError:
            await js.add_stream(cfg)
        return cls(await js.key_value(BUCKET))

    async def once(
        self, key: str, fp: str, produce: Callable[[], Awaitable[tuple[int, dict[str, Any]]]]
    ) -> tuple[int, dict[str, Any], bool]:
        """Run `produce` once per key; returns `(status, answer, replayed)`."""
        k = "r." + hashlib.sha256(key.encode()).hexdigest()
        replay = await self._reserve(k, fp)
        if replay is not None:
            assert replay.status is not None and replay.answer is not None
            return replay.status, replay.answer, True
        try:
            status, answer = await produce()
        except BaseException:
            with contextlib.suppress(Exception):
                await self.kv.delete(k)
            raise
        done = Receipt(state="done", fingerprint=fp, at=time.time(), status=status, answer=answer)
        await self.kv.put(k, done.model_dump_json().encode())
        return status, answer, False

    async def _reserve(self, k: str, fp: str) -> Receipt | None:
        """Reserve `k` for this request; returns the stored receipt when the request was answered before."""
        pending = Receipt(state="pending", fingerprint=fp, at=time.time()).model_dump_json().encode()
        for _ in range(3):
            try:
                await self.kv.create(k, pending)
                return None
            except KeyWrongLastSequenceError:
                pass
            try:
                entry = await self.kv.get(k)
            except (KeyNotFoundError, KeyDeletedError):
                continue  # expired or released in between: try to reserve again
            seen = Receipt.model_validate_json(entry.value or b"{}")
            if seen.fingerprint != fp:
                raise IdempotencyConflict(422, "this idempotency key was already used for a different request")
            if seen.state == "done":
                return seen
            if time.time() - seen.at < STALE_S:
                raise IdempotencyConflict(409, "a request with this idempotency key is still being processed")
            try:
                await self.kv.update(k, pending, last=entry.revision)  # take over an abandoned attempt
                return None
            except KeyWrongLastSequenceError:
                continue
        raise IdempotencyConflict(409, "a request with this idempotency key is still being processed")
