"""export stage: `tuning.completed` → GGUF (adapter + cached base, or merged) + Modelfile → GGUF check in
llama.cpp + quality gate → `model.evaluated`, then `model.exported` (or `model.export.failed`, code
`quality_gate`, when the report does not pass and the request did not opt out with `export.gate: false`).

Ack policy: MANUAL via FailurePolicy — acked after the files are in the bucket and the answer is
published; a converter failure is answered with `model.export.failed` (the converter's own error lines);
S3 outages are retried with backoff, then dead-lettered. A job that asked for no export is acked as is.
A fact for an unknown job, or one that contradicts the job's record, is dead-lettered and changes
nothing; a second `tuning.completed` for a job already exporting or exported is acked and ignored
(see handlers/export/service.py).
"""


from core import tracing
from events import subjects as sj
from events.payloads import TuningCompleted
from events.streams import EXPORT_ON_COMPLETED
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
from handlers.export.service import export

router = pipeline_router()
outputs = Outputs(router, "export", sj.MODEL_EVALUATED, sj.MODEL_EXPORTED, sj.MODEL_EXPORT_FAILED,
                  letters=[EXPORT_ON_COMPLETED])


@router.subscriber(**jetstream_subscriber(EXPORT_ON_COMPLETED), title="export:tuning.completed")
@handler
async def on_tuning_completed(
    event: TuningCompleted, msg: MessageDep, store: StoreDep, settings: SettingsDep
) -> None:
    parent = incoming(msg)
    with tracing.span("export", job_id=event.job_id, mode=event.export.mode if event.export else None):
        answers = await export(event, store, settings, redelivered=parent.num_delivered > 1)
    for answer in answers:
        await outputs.emit(answer, parent)
