"""The export stage's work: a finished job's adapter → GGUF files + Modelfile in the bucket.

Adapter mode (default): the adapter becomes a GGUF LoRA (megabytes) and the base model a GGUF once per
base model, cached in the bucket by its commit sha. Merged mode: peft merge, then one GGUF.
Artifacts are uploaded before anything references them; the job and the event name them only on success.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

from events.errors import CodeTuneError, ExportError
from events.payloads import ErrorInfo, ExportOptions, ModelExported, ModelExportFailed, TuningCompleted
from handlers.tuning.jobs import update
from handlers.tuning.runner import local_model_dir
from storage import keys
from storage.documents import BaseModel
from storage.objects import ObjectStore


def model_name(event: TuningCompleted) -> str:
    return event.name or event.job_id.lower()


async def export(event: TuningCompleted, store: ObjectStore, settings: Any) -> ModelExported | ModelExportFailed:
    from handlers.export import gguf
    from handlers.export.modelfile import ollama_template, render_modelfile
    from infra.llamacpp import ensure_converters

    opts = event.export or ExportOptions()
    await update(event.job_id, stage="exporting")
    model = await BaseModel.find_one(BaseModel.repo_id == event.base_model, BaseModel.sha == event.sha)
    if model is None or not model.prefix:
        return await _failed(event, ExportError(f"base model {event.base_model}@{event.sha} is not in the bucket"))
    work = settings.scratch_dir / "jobs" / event.job_id / "export"
    try:
        conv = await asyncio.to_thread(ensure_converters, settings)
        base_dir = await store.mirror(model.prefix, local_model_dir(settings, model), model.sha or "")
        adapter_dir = await store.mirror(event.adapter_key, work / "adapter")
        # the adapter folder carries the tokenizer (and chat template) the job actually trained with
        template, stop = await asyncio.to_thread(ollama_template, adapter_dir)
        out = keys.export_prefix(event.job_id)
        adapter_key = None
        if opts.mode == "merged":
            merged = await asyncio.to_thread(gguf.merge_adapter, base_dir, adapter_dir, work / "merged")
            path = await asyncio.to_thread(gguf.convert_base, merged, work / f"model-{opts.outtype}.gguf",
                                           opts.outtype, converters_dir=conv)
            model_key = f"{out}/model-{opts.outtype}.gguf"
            await store.put_file(model_key, path)
        else:
            model_key = keys.base_gguf_key(event.base_model, event.sha, opts.outtype)
            if not await store.exists(model_key):  # once per base model and outtype
                path = await asyncio.to_thread(gguf.convert_base, base_dir, work / f"base-{opts.outtype}.gguf",
                                               opts.outtype, converters_dir=conv)
                await store.put_file(model_key, path)
            path = await asyncio.to_thread(gguf.convert_adapter, adapter_dir, base_dir,
                                           work / f"adapter-{opts.outtype}.gguf", opts.outtype, converters_dir=conv)
            adapter_key = f"{out}/adapter-{opts.outtype}.gguf"
            await store.put_file(adapter_key, path)
        modelfile = render_modelfile(Path(model_key).name, Path(adapter_key).name if adapter_key else None,
                                     template, stop, opts.system)
        modelfile_key = f"{out}/Modelfile"
        await store.put_bytes(modelfile_key, modelfile.encode(), content_type="text/plain")
    except CodeTuneError as e:
        if e.retryable:
            raise
        return await _failed(event, e)
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)
    artifacts = {"model_gguf": model_key, "adapter_gguf": adapter_key, "modelfile": modelfile_key}
    await update(event.job_id, stage="exported", artifacts=artifacts)
    return ModelExported(job_id=event.job_id, name=model_name(event), mode=opts.mode, model_key=model_key,
                         adapter_key=adapter_key, modelfile_key=modelfile_key, template=template, stop=stop,
                         system=opts.system, quantize=opts.quantize)


async def _failed(event: TuningCompleted, error: CodeTuneError) -> ModelExportFailed:
    info = ErrorInfo(code=error.code, message=error.message)
    await update(event.job_id, stage="export_failed", error=info.model_dump())
    return ModelExportFailed(job_id=event.job_id, error=info)
