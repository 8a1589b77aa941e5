"""models stage: `model.pull.requested` → hub snapshot → bucket → BaseLLM document → `model.pulled`;
`model.push.requested` → a job's adapter, GGUFs, Modelfile and model card → hub repo → `model.pushed`.

Ack policy: MANUAL via FailurePolicy — acked after the snapshot is in the bucket (or the push is
committed) and the answer is published; a missing or gated repo is answered with `model.pull.failed`,
a push without a token, of a job not exported, or refused by the hub with `model.push.failed` (the
reason), and acked; hub/S3 outages are retried with backoff, then dead-lettered. A push heartbeats its
message (`in_progress`) while it uploads.
"""

import asyncio
import contextlib

from events import subjects as sj
from events.payloads import ModelPullRequested, ModelPushRequested
from events.streams import MODELS_PULL, MODELS_PUSH
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
from handlers.models.service import pull, push

router = pipeline_router()
outputs = Outputs(router, "models", sj.MODEL_PULLED, sj.MODEL_PULL_FAILED, sj.MODEL_PUSHED, sj.MODEL_PUSH_FAILED,
                  letters=[MODELS_PULL, MODELS_PUSH])


@router.subscriber(**jetstream_subscriber(MODELS_PULL), title="models:model.pull.requested")
@handler
async def on_pull_requested(
    event: ModelPullRequested, msg: MessageDep, store: StoreDep, settings: SettingsDep
) -> None:
    answer = await pull(event, store, settings)
    await outputs.emit(answer, incoming(msg))


@router.subscriber(**jetstream_subscriber(MODELS_PUSH), title="models:model.push.requested")
@handler
async def on_push_requested(
    event: ModelPushRequested, msg: MessageDep, store: StoreDep, settings: SettingsDep
) -> None:
    async def heartbeat() -> None:
        while True:
            await asyncio.sleep(MODELS_PUSH.ack_wait_s / 4)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    beat = asyncio.create_task(heartbeat())
    try:
        answer = await push(event, store, settings)
    finally:
        beat.cancel()
    await outputs.emit(answer, incoming(msg))
