"""The serving stage's work: create an exported model in Ollama and record it."""

from __future__ import annotations

from typing import Any

from events.errors import CodeTuneError
from events.payloads import ErrorInfo, ModelExported, ModelPublished, ModelPublishFailed
from handlers.serving import ollama_ops
from handlers.tuning.jobs import update
from storage.documents import ServedModel
from storage.objects import ObjectStore


async def publish(event: ModelExported, store: ObjectStore, settings: Any) -> ModelPublished | ModelPublishFailed:
    await update(event.job_id, stage="publishing")
    cache = settings.scratch_dir / "gguf"
    model_path = await store.fetch(event.model_key, cache / event.model_key)
    adapter_path = await store.fetch(event.adapter_key, cache / event.adapter_key) if event.adapter_key else None
    client = ollama_ops.make_client(settings.ollama_host)
    try:
        created = await ollama_ops.create_model(client, event.name, model_path, adapter_path, event.template,
                                                event.stop, event.system, event.quantize)
    except CodeTuneError as e:
        if e.retryable:
            raise  # Ollama unreachable: retried with backoff, then dead-lettered
        info = ErrorInfo(code=e.code, message=e.message)
        await update(event.job_id, stage="publish_failed", error=info.model_dump())
        return ModelPublishFailed(job_id=event.job_id, name=event.name, error=info)
    await ServedModel.upsert_by({"name": event.name}, {
        "job_id": event.job_id, "ollama_host": settings.ollama_host, "files": created["files"],
        "adapters": created["adapters"], "quantize": event.quantize,
    })
    await update(event.job_id, stage="published")
    return ModelPublished(job_id=event.job_id, name=event.name, ollama_host=settings.ollama_host)
