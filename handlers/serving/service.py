"""The serving stage's work: create an exported model in Ollama and record it."""

from __future__ import annotations

from typing import Any

from events.errors import CodeTuneError, InvalidInputError
from events.payloads import ErrorInfo, ModelExported, ModelPublished, ModelPublishFailed, OllamaCreateRequest
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


async def create_from_modelfile(req: OllamaCreateRequest, store: ObjectStore, settings: Any) -> dict[str, Any]:
    """The original's /ollama/create: a Modelfile whose FROM is a GGUF in the bucket (or an Ollama model)."""
    from handlers.serving.modelfile_parse import parse
    from storage.keys import check_key

    mf = parse(req.modelfile)
    client = ollama_ops.make_client(settings.ollama_host)
    cache = settings.scratch_dir / "gguf"
    gguf_key = req.gguf_key or (mf.from_ if mf.from_.endswith(".gguf") else None)
    if gguf_key is None:  # FROM an existing Ollama model: only the Modelfile's settings change
        if mf.adapter:
            raise InvalidInputError("ADAPTER needs FROM to name a GGUF in the bucket (or pass gguf_key)")
        await ollama_ops.create_from(client, req.name, mf.from_, mf.template, mf.parameters, mf.system)
        return {"model": req.name, "from": mf.from_}
    model_path = await store.fetch(check_key(gguf_key), cache / gguf_key)
    adapter_path = await store.fetch(check_key(mf.adapter), cache / mf.adapter) if mf.adapter else None
    stop = mf.parameters.pop("stop", None)
    created = await ollama_ops.create_model(client, req.name, model_path, adapter_path, mf.template, stop,
                                            mf.system, parameters=mf.parameters)
    await ServedModel.upsert_by({"name": req.name}, {"ollama_host": settings.ollama_host, "files": created["files"],
                                                    "adapters": created["adapters"]})
    return {"model": req.name, "files": created["files"], "adapters": created["adapters"]}
