"""datasets stage: `dataset.uploaded` → validate + profile → Dataset document → `dataset.validated|failed`.

Ack policy: MANUAL via FailurePolicy — acked after the document is stored and the answer published;
a missing object is retried with backoff (bounded), malformed messages are dead-lettered once.

Concurrency: a validation mostly waits (S3 get, MongoDB write, publish), so each worker handles up to
`MAX_WORKERS` uploads at once, each acked on its own when done (bench/bench_datasets.py --only load).
"""

from events import subjects as sj
from events.payloads import DatasetUploaded
from events.streams import DATASETS_UPLOADED
from handlers.common import MessageDep, Outputs, ServicesDep, handler, incoming, jetstream_subscriber, pipeline_router
from handlers.datasets.service import validate_upload

MAX_WORKERS = 16

router = pipeline_router()
outputs = Outputs(router, "datasets", sj.DATASET_VALIDATED, sj.DATASET_FAILED, letters=[DATASETS_UPLOADED])


@router.subscriber(**jetstream_subscriber(DATASETS_UPLOADED, batch_size=MAX_WORKERS, max_workers=MAX_WORKERS),
                   title="datasets:dataset.uploaded")
@handler
async def on_dataset_uploaded(event: DatasetUploaded, msg: MessageDep, services: ServicesDep) -> None:
    answer = await validate_upload(event, services.store, services.settings.dataset_max_line_errors)
    await outputs.emit(answer, incoming(msg))
