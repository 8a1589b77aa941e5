"""tuning stage: `tuning.requested` → wait for inputs → LoRA training → `tuning.completed|failed|cancelled`.

Ack policies (all MANUAL via FailurePolicy):
- tuning.requested: acked only after the job's outcome is stored and published (or it is recorded as
  waiting). While training runs, the message is heartbeated (`in_progress`) every ack_wait/4; if the
  worker dies, JetStream redelivers after ack_wait and the next worker resumes from the checkpoint.
- tuning.cancel.requested, model.pulled / model.pull.failed, dataset.validated / dataset.failed:
  acked after the affected jobs are updated and their follow-up events published.
"""


from events.ids import job_id_for
from events.payloads import (
    DatasetFailed,
    DatasetValidated,
    ErrorInfo,
    ModelPulled,
    ModelPullFailed,
    TuningCancelRequested,
    TuningRequested,
)
from events.streams import (
    TUNING_CANCEL,
    TUNING_ON_DATASET,
    TUNING_ON_DATASET_FAILED,
    TUNING_ON_MODEL,
    TUNING_ON_MODEL_FAILED,
    TUNING_REQUESTED,
)
from handlers.common import (
    EmitterDep,
    MessageDep,
    SettingsDep,
    StoreDep,
    incoming,
    jetstream_subscriber,
    pipeline_router,
)
from handlers.tuning import jobs
from handlers.tuning.runner import RunContext
from handlers.tuning.service import handle_request, request_cancel, resume_waiting

router = pipeline_router()


@router.subscriber(**jetstream_subscriber(TUNING_REQUESTED), title="tuning:tuning.requested")
async def on_tuning_requested(
    event: TuningRequested, msg: MessageDep, store: StoreDep, settings: SettingsDep, emitter: EmitterDep
) -> None:
    parent = incoming(msg)
    emit = emitter.answering(parent)

    def make_ctx() -> RunContext:
        return RunContext(store=store, settings=settings, publish=emitter.emit, heartbeat=msg.in_progress,
                          lease_s=TUNING_REQUESTED.ack_wait_s)

    await handle_request(event.job_id or job_id_for(parent.id), event, store, emit, make_ctx,
                         redelivered=parent.num_delivered > 1)


@router.subscriber(**jetstream_subscriber(TUNING_CANCEL), title="tuning:tuning.cancel.requested")
async def on_cancel(event: TuningCancelRequested, msg: MessageDep, emitter: EmitterDep) -> None:
    await request_cancel(event.job_id, emitter.answering(incoming(msg)))


@router.subscriber(**jetstream_subscriber(TUNING_ON_MODEL), title="tuning:model.pulled")
async def on_model_pulled(event: ModelPulled, msg: MessageDep, emitter: EmitterDep) -> None:
    await resume_waiting(jobs.model_key(event.repo_id, event.revision), emitter.answering(incoming(msg)))


@router.subscriber(**jetstream_subscriber(TUNING_ON_MODEL_FAILED), title="tuning:model.pull.failed")
async def on_model_failed(event: ModelPullFailed, msg: MessageDep, emitter: EmitterDep) -> None:
    await resume_waiting(jobs.model_key(event.repo_id, event.revision), emitter.answering(incoming(msg)),
                         failure=event.error)


@router.subscriber(**jetstream_subscriber(TUNING_ON_DATASET), title="tuning:dataset.validated")
async def on_dataset_validated(event: DatasetValidated, msg: MessageDep, emitter: EmitterDep) -> None:
    await resume_waiting(jobs.dataset_key(event.dataset_id), emitter.answering(incoming(msg)))


@router.subscriber(**jetstream_subscriber(TUNING_ON_DATASET_FAILED), title="tuning:dataset.failed")
async def on_dataset_failed(event: DatasetFailed, msg: MessageDep, emitter: EmitterDep) -> None:
    failure = ErrorInfo(code="invalid_dataset", message=f"dataset {event.dataset_id}: {event.error.message}")
    await resume_waiting(jobs.dataset_key(event.dataset_id), emitter.answering(incoming(msg)), failure=failure)
