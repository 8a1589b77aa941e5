"""models stage: `model.pull.requested` → hub snapshot → bucket → BaseModel document → `model.pulled`.

Ack policy: MANUAL via FailurePolicy — acked after the snapshot is in the bucket and the answer is
published; a missing or gated repo is answered with `model.pull.failed` (the hub's reason) and acked;
hub/S3 outages are retried with backoff, then dead-lettered.
"""


from events.payloads import ModelPullRequested
from events.streams import MODELS_PULL
from handlers.common import (
    EmitterDep,
    MessageDep,
    SettingsDep,
    StoreDep,
    incoming,
    jetstream_subscriber,
    pipeline_router,
)
from handlers.models.service import pull

router = pipeline_router()


@router.subscriber(**jetstream_subscriber(MODELS_PULL), title="models:model.pull.requested")
async def on_pull_requested(
    event: ModelPullRequested, msg: MessageDep, store: StoreDep, settings: SettingsDep, emitter: EmitterDep
) -> None:
    answer = await pull(event, store, settings)
    await emitter.emit(answer, incoming(msg))
