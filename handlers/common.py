"""What every pipeline stage shares: the failure policy, the envelope decoder and injected services.

Ack policy (the same for every JetStream subscriber; each declares `ack_policy=AckPolicy.MANUAL`
and lets `FailurePolicy` decide):

- success                    → ack, after the handler has stored its effect and published its event;
- not JSON / schema-invalid  → dead-letter (`dlq.<subject>`, body + headers + reason) and the stage's
                               `*.failed` event when the body names its id; then `term` (never redelivered);
- permanent `CodeTuneError`  → dead-letter with its code and message, then `term`;
- anything else (S3 or Mongo down, a bug) → `nak` with backoff; on the consumer's last delivery
                               (`max_deliver`) it is dead-lettered and terminated instead of dropped.

One letter per message: where two durables consume one subject (`tuning.requested`: intake and the
trainers), only the one marked `letters_malformed` dead-letters a malformed body; the other terminates it
quietly (its body fails the subject's schema there too, so the letter is already written or will be).

Handlers that report domain failures themselves (e.g. `dataset.failed` with line errors) simply return.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from faststream import AckPolicy, BaseMiddleware
from faststream.context import Context
from faststream.nats import JStream, NatsRouter, PullSub
from faststream.nats.message import NatsMessage
from pydantic import BaseModel, ValidationError

from events import subjects as s
from events.client import CodeTuneClient
from events.envelope import EventMeta, body_text, derived_id, unwrap
from events.errors import CodeTuneError, InvalidPayloadError
from events.payloads import DeadLetter, ErrorInfo, Payload
from events.streams import CONSUMERS, EVENTS, Consumer
from infra.settings import Settings
from storage.objects import ObjectStore

log = logging.getLogger("codetune")

RETRY_DELAYS_S = (1.0, 5.0, 15.0, 30.0, 60.0)
_MAX_DELIVER = {c.durable: c.max_deliver for c in CONSUMERS}
_QUIET_ON_MALFORMED = frozenset(c.durable for c in CONSUMERS if not c.letters_malformed)


@dataclass(frozen=True)
class Incoming:
    """Identity of the message being handled; answers derive their ids from it (idempotent emits)."""

    id: str
    subject: str
    num_delivered: int
    meta: EventMeta


def incoming(msg: NatsMessage) -> Incoming:
    raw = msg.raw_message
    meta = getattr(msg, "_codetune_meta", None)  # kept by the decoder: the body is parsed once per message
    if meta is None:
        _, meta = unwrap(msg.body, dict(msg.headers or {}))
    md = raw.metadata
    # A bare `nats pub` has no id: the stream sequence is stable across redeliveries.
    event_id = meta.id or f"{md.stream}-{md.sequence.stream}"
    return Incoming(id=event_id, subject=raw.subject, num_delivered=md.num_delivered, meta=meta)


class Emitter:
    """Publishes a stage's events; ids derive from the incoming event so a replay is deduplicated."""

    def __init__(self, client: CodeTuneClient) -> None:
        self.client = client

    async def emit(self, payload: BaseModel, parent: Incoming | None = None, *, key: str = "") -> str:
        subject = s.subject_of(payload)
        event_id = derived_id(parent.id + key, subject) if parent else None
        return (await self.client.publish(payload, subject=subject, event_id=event_id)).id

    def answering(self, parent: Incoming) -> Callable[..., Awaitable[str]]:
        """`emit` bound to the event being handled: `await emit(payload, key="...")`."""

        async def emit(payload: BaseModel, key: str = "") -> str:
            return await self.emit(payload, parent, key=key)

        return emit


async def cloudevents_decoder(msg: NatsMessage, original: Any) -> Any:
    """Accept bare JSON, binary CloudEvents and structured CloudEvents alike; return the data (and keep the
    envelope's attributes on the message for `incoming`, so the body is parsed once)."""
    data, meta = unwrap(msg.body, dict(msg.headers or {}))
    with contextlib.suppress(AttributeError):  # a slotted message class: `incoming` parses again
        msg._codetune_meta = meta  # type: ignore[attr-defined]
    return data


_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/@")


def _valid_id(value: Any) -> bool:
    """An id a `*.failed` event may name: a short, safe string (no traversal, no control characters)."""
    return (
        isinstance(value, str) and 0 < len(value) <= 200 and set(value) <= _ID_CHARS
        and ".." not in value and not value.startswith("/")
    )


async def _nothing_depends_on(ids: dict[str, Any]) -> bool:
    """True when no valid record exists for these ids and nothing waits on them (a `*.failed` is harmless)."""
    from storage.documents import BaseModel as BaseModelDoc
    from storage.documents import Dataset, TuningJob

    if "job_id" in ids:
        return await TuningJob.find_one({"job_id": ids["job_id"]}) is None
    if "dataset_id" in ids:
        dataset_id = ids["dataset_id"]
        if await Dataset.find_one({"dataset_id": dataset_id}) is not None:
            return False
        return await TuningJob.find_one({"waiting_for": f"dataset:{dataset_id}"}) is None
    if "repo_id" in ids:
        revision = ids.get("revision", "main")
        if await BaseModelDoc.find_one({"repo_id": ids["repo_id"], "revision": revision}) is not None:
            return False
        return await TuningJob.find_one({"waiting_for": f"model:{ids['repo_id']}@{revision}"}) is None
    return False


async def _failure_payload(subject: str, body: bytes, error: ErrorInfo) -> Payload | None:
    """The `*.failed` event for an unusable message: only when its body names a valid id that no valid
    record has and nothing waits on, so a malformed message never changes valid work."""
    try:
        spec = s.spec_for(subject)
        fail_subject = getattr(spec.payload, "failure_subject", None)
        if not fail_subject:
            return None
        data, _ = unwrap(body)
        if not isinstance(data, dict):
            return None
        model = s.payload_for(fail_subject)
        ids = {k: data[k] for k in ("job_id", "dataset_id", "repo_id", "revision", "name") if k in data}
        if not ids or not all(_valid_id(v) for v in ids.values()):
            return None
        failure = model.model_validate({**ids, "error": error.model_dump()})
        if not await _nothing_depends_on(ids):
            return None
        return failure  # type: ignore[return-value]
    except Exception:  # the database unreachable or an odd body: emit nothing rather than fail valid work
        return None


def reason(exc: BaseException) -> ErrorInfo:
    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors()[:10]:
            loc_parts = list(err["loc"])
            if loc_parts and loc_parts[0] in ("event", "body"):  # the handler's argument name
                loc_parts = loc_parts[1:]
            loc = ".".join(str(x) for x in loc_parts) or "payload"
            parts.append(f"{loc}: {err['msg']}")
        return ErrorInfo(code="invalid_payload", message="; ".join(parts))
    if isinstance(exc, CodeTuneError):
        return ErrorInfo(code=exc.code, message=exc.message)
    return ErrorInfo(code="internal", message=f"{type(exc).__name__}: {exc}"[:2000])


class FailurePolicy(BaseMiddleware):
    async def consume_scope(self, call_next: Any, msg: NatsMessage) -> Any:  # type: ignore[override]
        try:
            result = await call_next(msg)
        except BaseException as exc:
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            await self._on_error(msg, exc)
            return None
        if not msg.committed:
            await msg.ack()
        return result

    async def _on_error(self, msg: NatsMessage, exc: BaseException) -> None:
        md = msg.raw_message.metadata
        permanent = isinstance(exc, (ValidationError, InvalidPayloadError)) or (
            isinstance(exc, CodeTuneError) and not exc.retryable
        )
        last = md.num_delivered >= _MAX_DELIVER.get(md.consumer or "", 5)
        why = reason(exc)
        if permanent and md.consumer in _QUIET_ON_MALFORMED and malformed(msg):
            log.info("%s seq=%s is malformed; terminated (the subject's other consumer dead-letters it): %s",
                     msg.raw_message.subject, md.sequence.stream, why.message)
            await msg.reject()
            return
        if permanent or last:
            if isinstance(exc, ValidationError) and not malformed(msg):  # the body is fine: a bug of ours
                log.error("%s seq=%s: a valid message failed in the handler", msg.raw_message.subject,
                          md.sequence.stream, exc_info=exc)
            if not permanent:
                why = ErrorInfo(code=why.code, message=f"gave up after {md.num_delivered} deliveries: {why.message}")
                log.exception("giving up on %s", msg.raw_message.subject, exc_info=exc)
            await dead_letter(self.context.get("emitter"), msg, why, self.context.get("store"))
            await msg.reject()  # JetStream TERM: never redelivered
            return
        delay = RETRY_DELAYS_S[min(md.num_delivered - 1, len(RETRY_DELAYS_S) - 1)]
        log.warning("%s failed (delivery %d), retrying in %.0fs: %s", msg.raw_message.subject,
                    md.num_delivered, delay, why.message)
        await msg.nack(delay=delay)


def malformed(msg: NatsMessage) -> bool:
    """The message's body itself fails its subject's envelope or schema (not an error of the handler)."""
    try:
        data, _ = unwrap(msg.body, dict(msg.headers or {}))
        s.payload_for(msg.raw_message.subject).model_validate(data)
    except (ValidationError, InvalidPayloadError):
        return True
    except Exception:
        return False
    return False


_HEADER_LIMIT = 4096  # bytes of headers kept in a letter, in all
_BODY_PREFIX = 4096  # bytes of body kept in a letter whose body went to the bucket
_LETTER_MARGIN = 8192  # room for the letter's own fields and headers under the server's max payload


def _bounded_headers(headers: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    used = 0
    for k, v in headers.items():
        if k.lower() == "authorization":
            continue
        k, v = str(k)[:128], str(v)[:512]
        used += len(k) + len(v)
        if used > _HEADER_LIMIT:
            break
        out[k] = v
    return out


def _max_payload(emitter: Emitter) -> int:
    try:
        return int(emitter.client.nc.max_payload) or 1024 * 1024
    except Exception:
        return 1024 * 1024


async def dead_letter(emitter: Emitter, msg: NatsMessage, reason: ErrorInfo, store: ObjectStore | None = None) -> None:
    """Publish `dlq.<subject>`; a body that would not fit the server's max payload goes to the bucket
    (`dlq/<stream>-<seq>`) and the letter keeps its key, size, sha256 and a bounded prefix."""
    raw = msg.raw_message
    md = raw.metadata
    body: bytes = msg.body or b""
    headers = _bounded_headers(dict(msg.headers or {}))
    text = body_text(body)
    extra: dict[str, Any] = {"body_size": len(body), "body_sha256": hashlib.sha256(body).hexdigest()}
    room = _max_payload(emitter) - _LETTER_MARGIN - len(reason.model_dump_json())
    if len(json.dumps(text)) > room:
        key = f"dlq/{md.stream}-{md.sequence.stream}"
        if store is not None:
            try:
                await store.put_bytes(key, body)
                extra["body_key"] = key
            except Exception:
                log.exception("could not store the dead-lettered body of %s in the bucket", raw.subject)
        text = body_text(body[:_BODY_PREFIX])
        extra["body_truncated"] = True
    letter = DeadLetter(
        subject=raw.subject, reason=reason, body=text, headers=headers,
        num_delivered=md.num_delivered, stream_seq=md.sequence.stream, at=datetime.now(UTC), **extra,
    )
    dlq_id = derived_id(f"{md.stream}-{md.sequence.stream}", "dlq")
    filed = await emitter.client.publish(letter, subject=s.dead_letter_subject(raw.subject), event_id=dlq_id)
    # the failure names its letter (a redelivered duplicate is acked with the first letter's sequence)
    failure = await _failure_payload(raw.subject, body, reason.model_copy(update={"dead_letter_seq": filed.seq}))
    if failure is not None:
        with contextlib.suppress(Exception):
            await emitter.client.publish(failure, event_id=derived_id(dlq_id, "failure"))
    log.error("dead-lettered %s seq=%s: %s", raw.subject, md.sequence.stream, reason.message)


class ErrorReplies(BaseMiddleware):
    """Request-reply policy: every request gets an answer; a failure is `{ok: false, error: {code, message}}`."""

    async def consume_scope(self, call_next: Any, msg: NatsMessage) -> Any:  # type: ignore[override]
        try:
            return await call_next(msg)
        except Exception as exc:
            if not isinstance(exc, (CodeTuneError, ValidationError)):
                log.exception("request on %s failed", msg.raw_message.subject)
            return {"ok": False, "error": reason(exc).model_dump()}


def request_router(prefix: str = "") -> NatsRouter:
    """A router for core-NATS request-reply subscribers (no stream, no acks)."""
    return NatsRouter(prefix=prefix, middlewares=[ErrorReplies], decoder=cloudevents_decoder)


def pipeline_router(prefix: str = "") -> NatsRouter:
    """A router for JetStream stage subscribers: the failure policy and the envelope decoder applied."""
    return NatsRouter(prefix=prefix, middlewares=[FailurePolicy], decoder=cloudevents_decoder)


class Injected(Context):
    """A value from the app context, resolved in the event loop.

    fast_depends runs a synchronous `CustomField.use` (which FastStream's `Context` has) through
    `anyio.to_thread.run_sync`: a worker-thread round trip per parameter per message, about 150 us of CPU
    each on 2 cores (bench/bench_datasets.py, the hop rows). An `async def use` is awaited inline instead.
    `faststream.context.Context` is the public class; `use` is fast_depends' documented custom-field hook.
    """

    async def use(self, /, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return super().use(**kwargs)


@dataclass(frozen=True)
class Services:
    """What a stage handler uses, set once at startup: one context parameter instead of three."""

    settings: Settings
    store: ObjectStore
    emitter: Emitter


# Injected per message (set into the app context at startup by handlers.app). Every parameter costs a
# context lookup per message: a handler takes the message and what it needs, `ServicesDep` for several.
MessageDep = Annotated[NatsMessage, Injected("message")]
ServicesDep = Annotated[Services, Injected("services")]
SettingsDep = Annotated[Settings, Injected("settings")]
StoreDep = Annotated[ObjectStore, Injected("store")]
EmitterDep = Annotated[Emitter, Injected("emitter")]


# FastStream's view of the events stream: provisioned by events.streams.provision, never declared by a worker.
EVENTS_STREAM = JStream(EVENTS.name, subjects=list(EVENTS.subjects or []), declare=False)


def jetstream_subscriber(consumer: Consumer, *, batch_size: int = 1, max_workers: int = 1) -> dict[str, Any]:
    """Subscriber arguments for a stage's durable pull consumer (defined in events.streams).

    `max_workers` > 1 handles up to that many messages of this worker at once (FastStream's concurrent pull
    subscriber: each is acked on its own when done, no batch waits for its slowest message), for stages
    whose handling is mostly waiting on S3, MongoDB and NATS; `batch_size` is how many one fetch asks for."""
    kw: dict[str, Any] = {
        "subject": consumer.subject,
        "stream": EVENTS_STREAM,
        "durable": consumer.durable,
        "config": consumer.config(),
        "pull_sub": PullSub(batch_size=max(batch_size, 1), timeout=1.0),
        "ack_policy": AckPolicy.MANUAL,  # decided by FailurePolicy: ack after effect, DLQ or bounded nak
    }
    if max_workers > 1:
        kw["max_workers"] = max_workers
    return kw
