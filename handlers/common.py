"""What every pipeline stage shares: the failure policy, the envelope decoder and injected services.

Ack policy (the same for every JetStream subscriber; each declares `ack_policy=AckPolicy.MANUAL`
and lets `FailurePolicy` decide):

- success                    → ack, after the handler has stored its effect and published its event;
- not JSON / schema-invalid  → dead-letter (`dlq.<subject>`, body + headers + reason) and the stage's
                               `*.failed` event when the body names its id; then `term` (never redelivered);
- permanent `CodeTuneError`  → dead-letter with its code and message, then `term`;
- a store unreachable (`unreachable`: S3, MongoDB, NATS or Ollama down) → `nak` with the retry policy's
                               capped backoff until the delays add up to its window (`retry_window_s`),
                               then dead-lettered once, the reason saying for how long it was unreachable;
- anything else (a bug, an object not there yet) → `nak` with backoff; after the consumer's `attempts`
                               deliveries it is dead-lettered and terminated instead of dropped.
The delays and bounds are one `events.streams.RetryPolicy`, built from the worker's settings; the
consumers' JetStream `max_deliver` is provisioned from the same policy, so it never ends a window early.

One letter per message: where two durables consume one subject (`tuning.requested`: intake and the
trainers), only the one marked `letters_malformed` dead-letters a malformed body; the other terminates it
quietly (its body fails the subject's schema there too, so the letter is already written or will be).

Handlers that report domain failures themselves (e.g. `dataset.failed` with line errors) simply return.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import typing
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from faststream import AckPolicy, BaseMiddleware
from faststream.context import Context
from faststream.nats import JStream, NatsRouter, PubAck, PullSub
from faststream.nats.message import NatsMessage
from faststream.nats.publisher.usecase import LogicPublisher
from pydantic import BaseModel, ValidationError

from core import tracing
from core.errors import CodeTuneError, InvalidPayloadError
from core.settings import Settings
from events import subjects as s
from events.envelope import EventMeta, body_text, ce_headers, derived_id, new_event_id, unwrap
from events.payloads import DeadLetter, ErrorInfo, Payload
from events.streams import CONSUMERS, DEFAULT_RETRY, EVENTS, STREAMS, Consumer, RetryPolicy
from handlers.metrics import DEAD_LETTERS, subject_label
from storage.objects import ObjectStore

log = logging.getLogger("codetune")

_CONSUMERS = {c.durable: c for c in CONSUMERS}
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


# FastStream's view of the streams: provisioned by events.streams.provision, never declared by a worker.
_JSTREAMS = {str(cfg.name): JStream(str(cfg.name), subjects=list(cfg.subjects or []), declare=False) for cfg in STREAMS}
EVENTS_STREAM = _JSTREAMS[str(EVENTS.name)]
PUBLISH_TIMEOUT_S = 5.0  # how long a publish waits for the stream's ack (nats-py's own default)

# stage durable → the outputs that dead-letter its messages (filled as the stage routers are imported)
_LETTERS: dict[str, Outputs] = {}


def _stream_of(subject: str) -> JStream:
    """FastStream's view of the stream that stores `subject` (provisioned by events.streams, never declared)."""
    for cfg in STREAMS:
        for pattern in cfg.subjects or []:
            head = pattern.removesuffix(">")
            if subject == pattern or (pattern.endswith(">") and subject.startswith(head)):
                return _JSTREAMS[str(cfg.name)]
    raise KeyError(f"no stream stores {subject!r}")


class Outputs:
    """What one stage publishes, declared as FastStream publishers on its router.

    Each declared subject is a publisher (an AsyncAPI send operation, and the contract's "emitted by");
    `letters` adds, for each of the stage's JetStream consumers, its dead-letter subject and the
    subject's `*.failed` event (what `FailurePolicy` publishes for an unusable message). Publishing an
    undeclared subject is an error. Every event goes out as a binary-mode CloudEvent through a JetStream
    publish acked by the stream; an answer's id (its `Nats-Msg-Id`) derives from the event it answers
    (+ `key`), so a replay is dropped by the stream's duplicate window.
    """

    def __init__(self, router: NatsRouter, stage: str, *subjects: str, letters: Iterable[Consumer] = (),
                 notes: Mapping[str, str] | None = None) -> None:
        self.stage = stage
        self.source = f"codetune/{stage}"
        notes = dict(notes or {})
        declared = list(subjects)
        for consumer in letters:
            declared.append(s.dead_letter_subject(consumer.subject))
            failure = getattr(s.payload_for(consumer.subject), "failure_subject", None)
            if failure and failure not in declared:
                declared.append(failure)
                notes.setdefault(failure, f"a malformed `{consumer.subject}`")
            _LETTERS[consumer.durable] = self
        # each declared subject's stream, found once here rather than on every publish
        self.streams: dict[str, JStream] = {subject: _stream_of(subject.split("{", 1)[0])
                                            for subject in dict.fromkeys(declared)}
        self.publishers: dict[str, LogicPublisher] = {
            subject: router.publisher(
                subject, stream=stream, timeout=PUBLISH_TIMEOUT_S,
                schema=s.payload_for(subject), title=f"{stage}:publish:{subject}",
                description=notes.get(subject),
            )
            for subject, stream in self.streams.items()
        }

    def declared(self, subject: str) -> str:
        """The declared subject that covers `subject` (`tuning.progress.{job_id}` covers every job's progress)."""
        if subject in self.publishers:
            return subject
        key = next((key for key in self.publishers if "{" in key and subject.startswith(key.split("{", 1)[0])), None)
        if key is None:
            raise RuntimeError(f"the {self.stage} stage publishes {subject!r} but does not declare it")
        return key

    def publisher(self, subject: str) -> LogicPublisher:
        """The declared publisher for `subject`."""
        return self.publishers[self.declared(subject)]

    async def publish(self, payload: BaseModel, event_id: str, subject: str | None = None) -> PubAck:
        subject = subject or s.subject_of(payload)
        headers = ce_headers(subject, event_id, self.source, version=getattr(payload, "v", 1))
        body = payload.model_dump_json(exclude_none=False).encode()
        key = self.declared(subject)
        return await self.publishers[key].publish(body, subject=subject, headers=headers, correlation_id=event_id,
                                                  stream=self.streams[key].name)

    async def emit(self, payload: BaseModel, parent: Incoming | None = None, *, key: str = "") -> str:
        """Publish `payload` on its subject; answering `parent`, its id derives from it (+ `key`)."""
        subject = s.subject_of(payload)
        event_id = derived_id(parent.id + key, subject) if parent else new_event_id()
        await self.publish(payload, event_id, subject)
        return event_id

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
        msg._codetune_meta = meta  # type: ignore[attr-defined]  # our own stash on FastStream's message
    tracing.tag(data)  # the stage's `<subject> process` span gets the job/dataset/model ids (tracing on)
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
    from storage.documents import BaseLLM, Dataset, TuningJob

    if "job_id" in ids:
        return await TuningJob.find_one({"job_id": ids["job_id"]}) is None
    if "dataset_id" in ids:
        dataset_id = ids["dataset_id"]
        if await Dataset.find_one({"dataset_id": dataset_id}) is not None:
            return False
        return await TuningJob.find_one({"waiting_for": f"dataset:{dataset_id}"}) is None
    if "repo_id" in ids:
        revision = ids.get("revision", "main")
        if await BaseLLM.find_one({"repo_id": ids["repo_id"], "revision": revision}) is not None:
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
        return failure if isinstance(failure, Payload) else None  # every contract payload is a Payload
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


def unreachable(exc: BaseException) -> bool:
    """Whether `exc` (or an error it was raised from) says a store could not be reached: S3 connection
    errors, MongoDB server selection / reconnects / network timeouts, NATS timeouts and lost connections,
    Ollama unreachable. Those are retried for the policy's whole window; nothing else is."""
    from nats import errors as nats_errors
    from pymongo.errors import ConnectionFailure
    from urllib3.exceptions import HTTPError as Urllib3Error

    from core.errors import OllamaUnavailableError, StorageUnavailableError

    kinds = (StorageUnavailableError, OllamaUnavailableError, ConnectionFailure, Urllib3Error, ConnectionError,
             TimeoutError, nats_errors.TimeoutError, nats_errors.ConnectionClosedError, nats_errors.NoServersError,
             nats_errors.StaleConnectionError)
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, kinds):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


class FailurePolicy(BaseMiddleware):
    # override: FastStream types `msg` as StreamMessage[Any]; a NATS subscriber always passes a NatsMessage
    async def consume_scope(self, call_next: Any, msg: NatsMessage) -> Any:  # type: ignore[override]
        token = _DELIVERY.set((msg, self.context))  # what `handler` hands the stage's function
        try:
            result = await call_next(msg)
        except BaseException as exc:
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            await self._on_error(msg, exc)
            return None
        finally:
            _DELIVERY.reset(token)
        if not msg.committed:
            await msg.ack()
        return result

    async def _on_error(self, msg: NatsMessage, exc: BaseException) -> None:
        md = msg.raw_message.metadata
        permanent = isinstance(exc, (ValidationError, InvalidPayloadError)) or (
            isinstance(exc, CodeTuneError) and not exc.retryable
        )
        settings = self.context.get("settings")
        policy = RetryPolicy.from_settings(settings) if settings is not None else DEFAULT_RETRY
        consumer = _CONSUMERS.get(md.consumer or "")
        attempts = (consumer.attempts if consumer else None) or policy.attempts
        down = not permanent and unreachable(exc)
        # the consumer's JetStream bound is the last delivery there is: never let a message drop silently
        last = md.num_delivered >= policy.max_deliver(attempts) or (
            policy.window_spent(md.num_delivered) if down else md.num_delivered >= attempts)
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
            if down:
                why = ErrorInfo(code=why.code, message=(
                    f"store unreachable for {policy.waited(md.num_delivered):.0f}s of retries "
                    f"({md.num_delivered} deliveries, window {policy.transient_window_s:.0f}s): {why.message}"))
                log.error("giving up on %s: %s", msg.raw_message.subject, why.message)
            elif not permanent:
                why = ErrorInfo(code=why.code, message=f"gave up after {md.num_delivered} deliveries: {why.message}")
                log.exception("giving up on %s", msg.raw_message.subject, exc_info=exc)
            await dead_letter(msg, why, self.context.get("store"), self.context.get("max_payload"))
            await msg.reject()  # JetStream TERM: never redelivered
            return
        delay = policy.delay(md.num_delivered)
        log.warning("%s failed (delivery %d%s), retrying in %.0fs: %s", msg.raw_message.subject,
                    md.num_delivered, ", store unreachable" if down else "", delay, why.message)
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


async def dead_letter(msg: NatsMessage, reason: ErrorInfo, store: ObjectStore | None = None,
                      max_payload: int | None = None) -> None:
    """Publish `dlq.<subject>` (through the outputs of the stage whose consumer delivered it); a body that
    would not fit the server's max payload goes to the bucket (`dlq/<stream>-<seq>`) and the letter keeps
    its key, size, sha256 and a bounded prefix."""
    raw = msg.raw_message
    md = raw.metadata
    outputs = _LETTERS.get(md.consumer or "")
    if outputs is None:  # a programming error: a pipeline subscriber whose stage declares no letters for it
        raise RuntimeError(f"no stage declares the dead letters of consumer {md.consumer!r} (Outputs(letters=...))")
    body: bytes = msg.body or b""
    headers = _bounded_headers(dict(msg.headers or {}))
    text = body_text(body)
    extra: dict[str, Any] = {"body_size": len(body), "body_sha256": hashlib.sha256(body).hexdigest()}
    room = (max_payload or 1024 * 1024) - _LETTER_MARGIN - len(reason.model_dump_json())
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
    filed = await outputs.publish(letter, dlq_id, s.dead_letter_subject(raw.subject))
    DEAD_LETTERS.labels(subject=subject_label(raw.subject)).inc()
    # the failure names its letter (a redelivered duplicate is acked with the first letter's sequence)
    failure = await _failure_payload(raw.subject, body, reason.model_copy(update={"dead_letter_seq": filed.seq}))
    if failure is not None:
        with contextlib.suppress(Exception):
            await outputs.publish(failure, derived_id(dlq_id, "failure"))
    log.error("dead-lettered %s seq=%s: %s", raw.subject, md.sequence.stream, reason.message)


class StructuredTraceContext(BaseMiddleware):
    """With tracing on (README "Tracing"), ahead of FastStream's telemetry middleware, which reads only the
    `traceparent` header: a structured-mode CloudEvent's `traceparent` attribute (CloudEvents'
    distributed-tracing extension, in the JSON body) becomes the message's header when it has none, so a
    publisher that is not ours joins its trace in either mode. The body is parsed only when it names one."""

    # override: FastStream types `msg` as StreamMessage[Any]; a NATS subscriber always passes a NatsMessage
    async def consume_scope(self, call_next: Any, msg: NatsMessage) -> Any:  # type: ignore[override]
        body = msg.body
        if isinstance(msg.headers, dict) and "traceparent" not in msg.headers and isinstance(body, bytes) \
                and b'"traceparent"' in body:
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                event = json.loads(body)
                for name in ("traceparent", "tracestate"):
                    value = event.get(name) if isinstance(event, dict) and "specversion" in event else None
                    if isinstance(value, str) and len(value) <= 512 and value.isprintable():
                        msg.headers[name] = value  # the propagator checks its format; a bad one is ignored
        return await call_next(msg)


class ErrorReplies(BaseMiddleware):
    """Request-reply policy: every request gets an answer; a failure is `{ok: false, error: {code, message}}`."""

    # override: FastStream types `msg` as StreamMessage[Any]; a NATS subscriber always passes a NatsMessage
    async def consume_scope(self, call_next: Any, msg: NatsMessage) -> Any:  # type: ignore[override]
        token = _DELIVERY.set((msg, self.context))  # what `handler` hands the stage's function
        try:
            return await call_next(msg)
        except Exception as exc:
            if not isinstance(exc, (CodeTuneError, ValidationError)):
                log.exception("request on %s failed", msg.raw_message.subject)
            return {"ok": False, "error": reason(exc).model_dump()}
        finally:
            _DELIVERY.reset(token)


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

    # override: deliberately async where the base's `use` is sync (see above); fast_depends awaits either
    async def use(self, /, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return super().use(**kwargs)


@dataclass(frozen=True)
class Services:
    """What a stage handler uses, set once at startup: one context parameter instead of two."""

    settings: Settings
    store: ObjectStore


# Injected per message (set into the app context at startup by handlers.app). Every parameter costs a
# context lookup per message: a handler takes the message and what it needs, `ServicesDep` for several.
MessageDep = Annotated[NatsMessage, Injected("message")]
ServicesDep = Annotated[Services, Injected("services")]
SettingsDep = Annotated[Settings, Injected("settings")]
StoreDep = Annotated[ObjectStore, Injected("store")]


# The message being handled and its broker's context, set by the routers' policy middleware (FailurePolicy,
# ErrorReplies) around each call: a context variable, so each concurrently handled message sees its own.
_DELIVERY: ContextVar[tuple[NatsMessage, Any]] = ContextVar("codetune_delivery")  # (message, ContextRepo)


def handler(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A stage handler as FastStream calls it with the broker's `apply_types=False` (handlers.app): with the
    decoded body alone, no dependency injection per message (fast_depends' resolution cost a hop ~250 us of
    CPU on 2 cores; bench/bench_datasets.py, the hop rows).

    `fn` keeps its typed signature: its first parameter is the payload, validated here with its pydantic
    model (a ValidationError is the failure policy's "malformed": dead-lettered, never retried); the others
    are `MessageDep` (or a plain `NatsMessage`) and the `Injected` context values (`ServicesDep`,
    `SettingsDep`, `StoreDep`), looked up in the broker's context. FastStream still sees the payload's
    type (the AsyncAPI document), and a broker with `apply_types=True` (FastStream's TestNatsBroker in the
    unit tests) hands the validated model, which passes through."""
    hints = typing.get_type_hints(fn, include_extras=True)
    first, *rest = inspect.signature(fn).parameters.values()
    model = hints[first.name]
    keys: dict[str, str | None] = {}  # parameter → context key (None: the message itself)
    for param in rest:
        hint = hints[param.name]
        field = next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Context)), None)
        if field is None and hint is not NatsMessage:
            raise TypeError(f"{fn.__qualname__}: parameter {param.name!r} is neither the message nor an Injected "
                            "context value")
        keys[param.name] = None if field is None or field.name == "message" else field.name

    async def call(event: Any) -> Any:
        if not isinstance(event, model):
            event = model.model_validate(event)
        msg, context = _DELIVERY.get()
        return await fn(event, **{name: msg if key is None else context.get(key) for name, key in keys.items()})

    # what FastStream documents and fast_depends (when on) validates: the payload parameter alone
    call.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [first.replace(annotation=model)], return_annotation=hints.get("return", inspect.Signature.empty))
    call.__annotations__ = {first.name: model, "return": hints.get("return")}
    for attr in ("__name__", "__qualname__", "__doc__", "__module__"):  # not functools.wraps: no __wrapped__
        setattr(call, attr, getattr(fn, attr))
    return call


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
