"""Streams and durable consumers: defined once here, provisioned by `provision()`.

FastStream subscribers reference these with `declare=False`, so a worker never overwrites a stream's
configuration; `provision()` (run by `codetune stack start`, `codetune worker` and the tests) creates or
updates streams and consumers explicitly, because FastStream silently ignores a changed ConsumerConfig
of an existing durable.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from events import subjects as s

DUPLICATE_WINDOW_S = 120.0

EVENTS_NAME = "CODETUNE"
EVENTS = StreamConfig(
    name=EVENTS_NAME,
    subjects=[
        "dataset.>",
        "model.>",
        s.TUNING_REQUESTED,
        s.TUNING_CANCEL_REQUESTED,
        s.TUNING_COMPLETED,
        s.TUNING_FAILED,
        s.TUNING_CANCELLED,
        s.TUNING_EVALUATED,
    ],
    retention=RetentionPolicy.LIMITS,
    storage=StorageType.FILE,
    max_age=30 * 24 * 3600,
    duplicate_window=DUPLICATE_WINDOW_S,
)
PROGRESS = StreamConfig(
    name="CODETUNE_PROGRESS",
    subjects=[s.TUNING_PROGRESS + ".>"],
    storage=StorageType.FILE,
    max_age=7 * 24 * 3600,
    max_msgs_per_subject=10_000,
    duplicate_window=DUPLICATE_WINDOW_S,
)
DEAD_LETTERS = StreamConfig(
    name="CODETUNE_DLQ",
    subjects=[s.DEAD_LETTER + ".>"],
    storage=StorageType.FILE,
    max_age=90 * 24 * 3600,
    duplicate_window=DUPLICATE_WINDOW_S,
)
STREAMS = (EVENTS, PROGRESS, DEAD_LETTERS)


@dataclass(frozen=True)
class RetryPolicy:
    """How a failed message is retried: the one home of the delays and delivery bounds, from which every
    consumer is provisioned (`Consumer.config`) and `handlers.common.FailurePolicy` decides.

    A failed delivery N is nak'ed with `delay(N)` (`delays_s` by delivery, the last one repeating, never
    above `cap_s`). An error of unknown kind (a bug, an object not there yet) is given up after `attempts`
    deliveries (a consumer may ask for another number). A store that is unreachable (S3, MongoDB, NATS
    or Ollama down) is retried until the nak delays add up to `transient_window_s`, so an outage shorter
    than the window loses nothing. Either way the message is then dead-lettered once; a permanent error
    is dead-lettered at once.

    The window is counted in delays, not clock time (no state to keep while a store is down): the real
    time is at least that, plus the time each attempt took to fail. JetStream's own `max_deliver` is set
    to cover the window (`max_deliver()`), so it never cuts it short; JetStream `backoff` is not used,
    because it replaces `ack_wait` for redeliveries after an ack timeout (a crashed worker), not the
    delay of a nak, which is what retries use here.
    """

    delays_s: tuple[float, ...] = (1.0, 5.0, 15.0, 30.0, 60.0)
    cap_s: float = 60.0
    transient_window_s: float = 600.0
    attempts: int = 5

    @classmethod
    def from_settings(cls, settings: Any) -> RetryPolicy:
        """The policy of `settings` (`retry_delays_s`, `retry_cap_s`, `retry_window_s`, `retry_attempts`)."""
        return cls(delays_s=tuple(settings.retry_delays_s), cap_s=settings.retry_cap_s,
                   transient_window_s=settings.retry_window_s, attempts=settings.retry_attempts)

    def delay(self, num_delivered: int) -> float:
        """The nak delay after failed delivery `num_delivered` (1-based)."""
        if not self.delays_s:
            return self.cap_s
        return min(self.delays_s[min(max(num_delivered, 1) - 1, len(self.delays_s) - 1)], self.cap_s)

    def waited(self, num_delivered: int) -> float:
        """Seconds of nak delays before delivery `num_delivered`."""
        return sum(self.delay(n) for n in range(1, num_delivered))

    def window_spent(self, num_delivered: int) -> bool:
        """Whether an unreachable store has been retried for the whole window by this delivery."""
        return self.waited(num_delivered) >= self.transient_window_s

    def window_deliveries(self) -> int:
        """The delivery at which the window is spent (the last one an unreachable store gets)."""
        n = 1
        while not self.window_spent(n):
            n += 1
            if n > 100_000:
                raise ValueError("the retry delays never add up to the transient window")
        return n

    def max_deliver(self, attempts: int | None = None) -> int:
        """JetStream's bound for a consumer: enough deliveries for the window and for `attempts`."""
        return max(attempts or self.attempts, self.window_deliveries())


DEFAULT_RETRY = RetryPolicy()


@dataclass(frozen=True)
class Consumer:
    """One stage's durable pull consumer on one subject, shared by all of that stage's workers."""

    durable: str
    subject: str
    ack_wait_s: float = 30.0
    attempts: int | None = None  # deliveries for an error of unknown kind; None: the policy's
    max_ack_pending: int = 1000
    stream: str = EVENTS_NAME
    # False when another durable on the same subject dead-letters its malformed messages: this one then
    # terminates a malformed message without a second letter (one letter per message, see FailurePolicy)
    letters_malformed: bool = True

    def config(self, retry: RetryPolicy = DEFAULT_RETRY, replicas: int = 1) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=self.durable,
            filter_subject=self.subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait_s,
            max_deliver=retry.max_deliver(self.attempts),
            max_ack_pending=self.max_ack_pending,
            num_replicas=replicas,
        )


DATASETS_UPLOADED = Consumer("datasets-uploaded", s.DATASET_UPLOADED)
# The intake stage's own durable on tuning.requested, separate from the trainers' work queue below: it
# records every request as a `queued` job at once, however busy the trainers are, and it is the one that
# dead-letters a malformed request (at once, instead of when a trainer gets to it).
INTAKE_REQUESTED = Consumer("intake-tuning-requested", s.TUNING_REQUESTED)
MODELS_PULL = Consumer("models-pull", s.MODEL_PULL_REQUESTED, ack_wait_s=60.0)
# A push uploads GGUFs (hundreds of MB): the handler heartbeats (in_progress) while it runs.
MODELS_PUSH = Consumer("models-push", s.MODEL_PUSH_REQUESTED, ack_wait_s=60.0, attempts=4)
# Training is long: the handler heartbeats (in_progress) every ack_wait/4 while it runs. A worker that
# dies stops heartbeating; after ack_wait the job is redelivered and resumes from its last checkpoint.
TUNING_REQUESTED = Consumer("tuning-requested", s.TUNING_REQUESTED, ack_wait_s=20.0, attempts=6,
                            letters_malformed=False)
TUNING_CANCEL = Consumer("tuning-cancel", s.TUNING_CANCEL_REQUESTED)
TUNING_ON_MODEL = Consumer("tuning-on-model-pulled", s.MODEL_PULLED)
TUNING_ON_MODEL_FAILED = Consumer("tuning-on-model-failed", s.MODEL_PULL_FAILED)
TUNING_ON_DATASET = Consumer("tuning-on-dataset-validated", s.DATASET_VALIDATED)
TUNING_ON_DATASET_FAILED = Consumer("tuning-on-dataset-failed", s.DATASET_FAILED)
EXPORT_ON_COMPLETED = Consumer("export-on-completed", s.TUNING_COMPLETED, ack_wait_s=60.0, attempts=4)
SERVING_ON_EXPORTED = Consumer("serving-on-exported", s.MODEL_EXPORTED, ack_wait_s=60.0, attempts=4)

CONSUMERS: tuple[Consumer, ...] = (
    DATASETS_UPLOADED,
    INTAKE_REQUESTED,
    MODELS_PULL,
    MODELS_PUSH,
    TUNING_REQUESTED,
    TUNING_CANCEL,
    TUNING_ON_MODEL,
    TUNING_ON_MODEL_FAILED,
    TUNING_ON_DATASET,
    TUNING_ON_DATASET_FAILED,
    EXPORT_ON_COMPLETED,
    SERVING_ON_EXPORTED,
)


def _same(cur: object, want: StreamConfig | ConsumerConfig) -> bool:
    """Every field the wanted config sets has that value on the server."""
    for f in dataclasses.fields(want):
        b = getattr(want, f.name)
        if b is None:
            continue
        a = getattr(cur, f.name, None)
        if f.name == "subjects":
            a, b = sorted(a or []), sorted(b)
        if a != b:
            return False
    return True


def stream_config(cfg: StreamConfig, replicas: int = 1) -> StreamConfig:
    """A stream as provisioned with `replicas` (settings.nats_replicas: 3 on a 3-node cluster)."""
    return dataclasses.replace(cfg, num_replicas=replicas)


async def provision(js: JetStreamContext, retry: RetryPolicy = DEFAULT_RETRY, replicas: int = 1) -> None:
    """Create or update every stream and durable consumer (idempotent), consumers bounded by `retry`
    (callers with settings pass `RetryPolicy.from_settings(settings)` and `settings.nats_replicas`).

    Streams and consumers get `replicas` JetStream replicas; a provisioned stream or consumer with another
    count is updated in place (JetStream moves its data: R1 → R3 on a cluster keeps every message and
    ack floor; R3 on a single server is refused by the server: "replicas > 1 not supported in
    non-clustered mode").

    It reads first and writes only what differs, so a user without provisioning rights (the `client` or a
    stage user, see README "Security") may call it against a provisioned server: it changes nothing.
    Writing needs the admin user (`events.client.provision_as_admin`)."""
    for cfg in (stream_config(c, replicas) for c in STREAMS):
        try:
            info = await js.stream_info(cfg.name or "")
        except NotFoundError:
            await js.add_stream(cfg)
            continue
        if not _same(info.config, cfg):
            await js.update_stream(cfg)
    for c in CONSUMERS:
        ccfg = c.config(retry, replicas)
        try:
            cinfo = await js.consumer_info(c.stream, c.durable)
        except NotFoundError:
            await js.add_consumer(c.stream, ccfg)
            continue
        if not _same(cinfo.config, ccfg):
            await js.add_consumer(c.stream, ccfg)  # add with an existing durable name updates it
