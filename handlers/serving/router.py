"""serving stage: `model.exported` → Ollama create → ServedModel → `model.published`.

Ack policy for `model.exported`: MANUAL via FailurePolicy — acked after the model exists in Ollama and
`model.published` is out; Ollama refusing the model → `model.publish.failed`; Ollama unreachable →
retried with backoff, then dead-lettered. A fact for an unknown job, or one that is not the job's
recorded export, is dead-lettered and changes nothing; a second one for a job already publishing or
published is acked and ignored (handlers/serving/service.py).

This stage consumes only its durable JetStream consumer, so it can scale to zero on that consumer's lag;
the core-NATS `ollama.*` requests are the always-on `ollama` stage's (handlers/ollama/router.py).
"""

from events import subjects as sj
from events.payloads import ModelExported
from events.streams import SERVING_ON_EXPORTED
from handlers.common import (
    MessageDep,
    Outputs,
    SettingsDep,
    StoreDep,
    handler,
    incoming,
    jetstream_subscriber,
    pipeline_router,
)
from handlers.serving.service import publish

router = pipeline_router()
outputs = Outputs(router, "serving", sj.MODEL_PUBLISHED, sj.MODEL_PUBLISH_FAILED, letters=[SERVING_ON_EXPORTED])


@router.subscriber(**jetstream_subscriber(SERVING_ON_EXPORTED), title="serving:model.exported")
@handler
async def on_model_exported(
    event: ModelExported, msg: MessageDep, store: StoreDep, settings: SettingsDep
) -> None:
    parent = incoming(msg)
    answer = await publish(event, store, settings, redelivered=parent.num_delivered > 1)
    if answer is not None:
        await outputs.emit(answer, parent)
