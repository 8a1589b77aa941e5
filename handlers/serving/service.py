"""The serving stage's work: create an exported model in Ollama and record it.

`model.exported` is a fact anyone could publish, so it is checked against the job's record before any
effect: an unknown job is JobNotFoundError; a job not in stage `exported` (or a retry after
`publish_failed`), or keys/name/options that are not the job's recorded export artifacts, is
FactMismatchError; both are permanent (dead letter) and change nothing. The GGUF files are fetched only
under the stage's cache, at paths derived from the validated keys. Per job, publish runs once: a second
`model.exported` for a job already publishing or published is acked and ignored (only a redelivery of the
message whose publish never finished, a crash, may take it over).
"""

from __future__ import annotations

from core import tracing
from core.errors import CodeTuneError, FactMismatchError, JobNotFoundError
from core.settings import Settings
from events.payloads import ErrorInfo, ModelExported, ModelPublished, ModelPublishFailed
from handlers import ollama_ops
from storage import retention
from storage.documents import ServedModel, TuningJob
from storage.jobs import must_transition, transition
from storage.objects import ObjectStore

PUBLISHABLE = ("exported", "publish_failed")
PUBLISHED = ("publishing", "published")


def check_exported(job: TuningJob | None, event: ModelExported) -> TuningJob:
    """The job a `model.exported` names, if the fact matches its recorded export; raises otherwise."""
    if job is None:
        raise JobNotFoundError(f"model.exported for unknown job {event.job_id!r}")
    if job.stage not in (*PUBLISHABLE, *PUBLISHED):
        raise FactMismatchError(f"model.exported for job {job.job_id} whose stage is {job.stage!r}, not exported")
    art = job.artifacts or {}
    opts = job.export or {}
    expected = {"model_key": art.get("model_gguf"), "adapter_key": art.get("adapter_gguf"),
                "modelfile_key": art.get("modelfile"), "name": job.name or job.job_id.lower(),
                "mode": opts.get("mode", "adapter"), "system": opts.get("system"), "quantize": opts.get("quantize")}
    wrong = [k for k, v in expected.items() if getattr(event, k) != v]
    if wrong:
        raise FactMismatchError(f"model.exported for job {job.job_id} does not match its recorded export: "
                                + ", ".join(f"{k} {str(getattr(event, k))[:80]!r}" for k in wrong))
    return job


async def publish(event: ModelExported, store: ObjectStore, settings: Settings, *, redelivered: bool = False
                  ) -> ModelPublished | ModelPublishFailed | None:
    """Create the model in Ollama; None when the job is already publishing or published (a duplicate)."""
    check_exported(await TuningJob.find_one(TuningJob.job_id == event.job_id), event)
    allowed = [*PUBLISHABLE, *PUBLISHED] if redelivered else list(PUBLISHABLE)
    if await transition(event.job_id, stage="publishing", only_from=allowed) is None:
        return None
    cache = settings.scratch_dir / "gguf"
    model_path = await store.fetch(event.model_key, cache)
    adapter_path = await store.fetch(event.adapter_key, cache) if event.adapter_key else None
    client = ollama_ops.client_for(settings.ollama_host)
    try:
        with tracing.span("ollama create", job_id=event.job_id, model=event.name, ollama_host=settings.ollama_host):
            created = await ollama_ops.create_model(client, event.name, model_path, adapter_path, event.template,
                                                    event.stop, event.system, event.quantize)
    except CodeTuneError as e:
        if e.retryable:
            raise  # Ollama unreachable: retried with backoff, then dead-lettered
        info = ErrorInfo(code=e.code, message=e.message)
        await must_transition(event.job_id, stage="publish_failed", error=info.model_dump())
        await retention.after_publish(settings, event.job_id)
        return ModelPublishFailed(job_id=event.job_id, name=event.name, error=info)
    await ServedModel.upsert_by({"name": event.name}, {
        "job_id": event.job_id, "ollama_host": settings.ollama_host, "files": created["files"],
        "adapters": created["adapters"], "quantize": event.quantize,
    })
    await must_transition(event.job_id, stage="published")
    await retention.after_publish(settings, event.job_id)  # Ollama holds the model now: local copies go
    return ModelPublished(job_id=event.job_id, name=event.name, ollama_host=settings.ollama_host)
