"""tuning stage: `tuning.requested` → wait for inputs → LoRA training → `tuning.completed|failed|cancelled`.

Ack policies (all MANUAL via FailurePolicy):
- tuning.requested: acked only after the job's outcome is stored and published (or it is recorded as
  waiting). While training runs, the message is heartbeated (`in_progress`) every ack_wait/4; if the
  worker dies, JetStream redelivers after ack_wait and the next worker resumes from the checkpoint.
- tuning.cancel.requested, model.pulled / model.pull.failed, dataset.validated / dataset.failed:
  acked after the affected jobs are updated and their follow-up events published.
"""

from events import subjects as sj
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
    MessageDep,
    Outputs,
    SettingsDep,
    StoreDep,
    handler,
    incoming,
    jetstream_subscriber,
    pipeline_router,
)
from handlers.tuning import jobs
from handlers.tuning.runner import RunContext
from handlers.tuning.service import handle_request, request_cancel, resume_waiting

router = pipeline_router()
outputs = Outputs(
    router, "tuning",
    sj.TUNING_COMPLETED, sj.TUNING_FAILED, sj.TUNING_CANCELLED, sj.TUNING_EVALUATED, sj.TUNING_PROGRESS + ".{job_id}",
    sj.MODEL_PULL_REQUESTED, sj.TUNING_REQUESTED,
    letters=[TUNING_REQUESTED, TUNING_CANCEL, TUNING_ON_MODEL, TUNING_ON_MODEL_FAILED, TUNING_ON_DATASET,
             TUNING_ON_DATASET_FAILED],
    notes={sj.TUNING_REQUESTED: "a waiting job once ready"},
)


@router.subscriber(**jetstream_subscriber(TUNING_REQUESTED), title="tuning:tuning.requested",
                   description="trains it")
@handler
async def on_tuning_requested(
    event: TuningRequested, msg: MessageDep, store: StoreDep, settings: SettingsDep
) -> None:
    parent = incoming(msg)
    emit = outputs.answering(parent)

    def make_ctx() -> RunContext:
        return RunContext(store=store, settings=settings, publish=outputs.emit, heartbeat=msg.in_progress,
                          lease_s=TUNING_REQUESTED.ack_wait_s)

    await handle_request(event.job_id or job_id_for(parent.id), event, store, emit, make_ctx,
                         redelivered=parent.num_delivered > 1)


@router.subscriber(**jetstream_subscriber(TUNING_CANCEL), title="tuning:tuning.cancel.requested")
@handler
async def on_cancel(event: TuningCancelRequested, msg: MessageDep) -> None:
    await request_cancel(event.job_id, outputs.answering(incoming(msg)))


@router.subscriber(**jetstream_subscriber(TUNING_ON_MODEL), title="tuning:model.pulled",
                   description="waiting jobs")
@handler
async def on_model_pulled(event: ModelPulled, msg: MessageDep) -> None:
    await resume_waiting(jobs.model_key(event.repo_id, event.revision), outputs.answering(incoming(msg)))


@router.subscriber(**jetstream_subscriber(TUNING_ON_MODEL_FAILED), title="tuning:model.pull.failed",
                   description="waiting jobs")
@handler
async def on_model_failed(event: ModelPullFailed, msg: MessageDep) -> None:
    await resume_waiting(jobs.model_key(event.repo_id, event.revision), outputs.answering(incoming(msg)),
                         failure=event.error)


@router.subscriber(**jetstream_subscriber(TUNING_ON_DATASET), title="tuning:dataset.validated",
                   description="waiting jobs")
@handler
async def on_dataset_validated(event: DatasetValidated, msg: MessageDep) -> None:
    await resume_waiting(jobs.dataset_key(event.dataset_id), outputs.answering(incoming(msg)))


@router.subscriber(**jetstream_subscriber(TUNING_ON_DATASET_FAILED), title="tuning:dataset.failed",
                   description="waiting jobs")
@handler
async def on_dataset_failed(event: DatasetFailed, msg: MessageDep) -> None:
    failure = ErrorInfo(code="invalid_dataset", message=f"dataset {event.dataset_id}: {event.error.message}")
    await resume_waiting(jobs.dataset_key(event.dataset_id), outputs.answering(incoming(msg)), failure=failure)
