"""datasets stage: `dataset.uploaded` → validate + profile → Dataset document → `dataset.validated|failed`.

Ack policy: MANUAL via FailurePolicy — acked after the document is stored and the answer published;
a missing object is retried with backoff (bounded), malformed messages are dead-lettered once.
"""

from faststream.nats import NatsMessage

from events.payloads import DatasetUploaded
from events.streams import DATASETS_UPLOADED
from handlers.common import EmitterDep, SettingsDep, StoreDep, incoming, jetstream_subscriber, pipeline_router
from handlers.datasets.service import validate_upload

router = pipeline_router()


@router.subscriber(**jetstream_subscriber(DATASETS_UPLOADED), title="datasets:dataset.uploaded")
async def on_dataset_uploaded(
    event: DatasetUploaded, msg: NatsMessage, store: StoreDep, settings: SettingsDep, emitter: EmitterDep
) -> None:
    answer = await validate_upload(event, store, settings.dataset_max_line_errors)
    await emitter.emit(answer, incoming(msg))
