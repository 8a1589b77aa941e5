"""Streams and durable consumers: defined once here, provisioned by `provision()`.

FastStream subscribers reference these with `declare=False`, so a worker never overwrites a stream's
configuration; `provision()` (run by `codetune stack start`, `codetune worker` and the tests) creates or
updates streams and consumers explicitly, because FastStream silently ignores a changed ConsumerConfig
of an existing durable.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

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
class Consumer:
    """One stage's durable pull consumer on one subject, shared by all of that stage's workers."""

    durable: str
    subject: str
    ack_wait_s: float = 30.0
    max_deliver: int = 5
    backoff_s: tuple[float, ...] = field(default=())
    max_ack_pending: int = 1000
    stream: str = EVENTS_NAME
    # False when another durable on the same subject dead-letters its malformed messages: this one then
    # terminates a malformed message without a second letter (one letter per message, see FailurePolicy)
    letters_malformed: bool = True

    def config(self) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=self.durable,
            filter_subject=self.subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait_s,
            max_deliver=self.max_deliver,
            backoff=list(self.backoff_s) or None,
            max_ack_pending=self.max_ack_pending,
        )


DATASETS_UPLOADED = Consumer("datasets-uploaded", s.DATASET_UPLOADED)
# The intake stage's own durable on tuning.requested, separate from the trainers' work queue below: it
# records every request as a `queued` job at once, however busy the trainers are, and it is the one that
# dead-letters a malformed request (at once, instead of when a trainer gets to it).
INTAKE_REQUESTED = Consumer("intake-tuning-requested", s.TUNING_REQUESTED)
MODELS_PULL = Consumer("models-pull", s.MODEL_PULL_REQUESTED, ack_wait_s=60.0)
# A push uploads GGUFs (hundreds of MB): the handler heartbeats (in_progress) while it runs.
MODELS_PUSH = Consumer("models-push", s.MODEL_PUSH_REQUESTED, ack_wait_s=60.0, max_deliver=4)
# Training is long: the handler heartbeats (in_progress) every ack_wait/4 while it runs. A worker that
# dies stops heartbeating; after ack_wait the job is redelivered and resumes from its last checkpoint.
TUNING_REQUESTED = Consumer("tuning-requested", s.TUNING_REQUESTED, ack_wait_s=20.0, max_deliver=6,
                            letters_malformed=False)
TUNING_CANCEL = Consumer("tuning-cancel", s.TUNING_CANCEL_REQUESTED)
TUNING_ON_MODEL = Consumer("tuning-on-model-pulled", s.MODEL_PULLED)
TUNING_ON_MODEL_FAILED = Consumer("tuning-on-model-failed", s.MODEL_PULL_FAILED)
TUNING_ON_DATASET = Consumer("tuning-on-dataset-validated", s.DATASET_VALIDATED)
TUNING_ON_DATASET_FAILED = Consumer("tuning-on-dataset-failed", s.DATASET_FAILED)
EXPORT_ON_COMPLETED = Consumer("export-on-completed", s.TUNING_COMPLETED, ack_wait_s=60.0, max_deliver=4)
SERVING_ON_EXPORTED = Consumer("serving-on-exported", s.MODEL_EXPORTED, ack_wait_s=60.0, max_deliver=4)

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


async def provision(js: JetStreamContext) -> None:
    """Create or update every stream and durable consumer (idempotent).

    It reads first and writes only what differs, so a user without provisioning rights (the `client` or a
    stage user, see README "Security") may call it against a provisioned server: it changes nothing.
    Writing needs the admin user (`events.client.provision_as_admin`)."""
    for cfg in STREAMS:
        try:
            info = await js.stream_info(cfg.name or "")
        except NotFoundError:
            await js.add_stream(cfg)
            continue
        if not _same(info.config, cfg):
            await js.update_stream(cfg)
    for c in CONSUMERS:
        ccfg = c.config()
        try:
            cinfo = await js.consumer_info(c.stream, c.durable)
        except NotFoundError:
            await js.add_consumer(c.stream, ccfg)
            continue
        if not _same(cinfo.config, ccfg):
            await js.add_consumer(c.stream, ccfg)  # add with an existing durable name updates it
