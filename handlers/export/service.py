"""The export stage's work: a finished job's adapter → GGUF files + Modelfile in the bucket.

Adapter mode (default): the adapter becomes a GGUF LoRA (megabytes) and the base model a GGUF once per
base model, cached in the bucket by its commit sha. Merged mode: peft merge, then one GGUF.
Artifacts are uploaded before anything references them; the job and the event name them only on success.

`tuning.completed` is a fact anyone could publish, so it is checked against the job's record first: an
unknown job is JobNotFoundError, a fact that does not match the record (job not succeeded, other base
model, sha, dataset, adapter, name or export options) is FactMismatchError; both are permanent (dead
letter), and nothing is changed. Per job, export runs once: a second `tuning.completed` for a job whose
stage is already exporting, exported or later is acked and ignored; only a redelivery of the message
whose export never finished (a crash) may take over a job stuck in `exporting`/`exported`. A job whose
export failed may be exported again by a new `tuning.completed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from pathlib import Path

from core.errors import CodeTuneError, ExportError, FactMismatchError, JobNotFoundError, QualityGateError
from core.settings import Settings
from events.payloads import (
    ErrorInfo,
    EvaluationReport,
    ModelEvaluated,
    ModelExported,
    ModelExportFailed,
    Payload,
    TuningCompleted,
)
from handlers.export.gate import decide
from handlers.metrics import EXPORT_SECONDS
from handlers.report import of_job as report_of
from handlers.report import save as save_report
from storage import keys
from storage.documents import BaseLLM, TuningJob
from storage.jobs import must_transition, transition
from storage.local import local_model_dir
from storage.objects import ObjectStore


def model_name(event: TuningCompleted) -> str:
    return event.name or event.job_id.lower()


def check_completed(job: TuningJob | None, event: TuningCompleted) -> TuningJob:
    """The job a `tuning.completed` names, if the fact matches its record; raises otherwise."""
    if job is None:
        raise JobNotFoundError(f"tuning.completed for unknown job {event.job_id!r}")
    if job.status != "succeeded":
        raise FactMismatchError(f"tuning.completed for job {job.job_id} whose status is {job.status!r}")
    expected = {"base_model": job.base_model, "sha": job.sha, "dataset_id": job.dataset_id,
                "adapter_key": job.adapter_key, "name": job.name}
    got = {"base_model": event.base_model, "sha": event.sha, "dataset_id": event.dataset_id,
           "adapter_key": event.adapter_key, "name": event.name}
    wrong = [k for k in expected if expected[k] != got[k]]
    if (event.export.model_dump() if event.export else None) != job.export:
        wrong.append("export")
    if wrong:
        raise FactMismatchError(f"tuning.completed for job {job.job_id} does not match the job's record: "
                                + ", ".join(f"{k} {str(got.get(k, 'options'))[:80]!r}" for k in wrong))
    return job


async def claim_export(event: TuningCompleted, *, redelivered: bool = False) -> TuningJob | None:
    """Check the fact against the job and move the job to `exporting`; None when its export already
    ran or runs (a duplicate: nothing to do). Only a redelivered message (its export crashed) may take
    over a job already exporting or exported."""
    check_completed(await TuningJob.find_one(TuningJob.job_id == event.job_id), event)
    start = [None, "export_failed", *(("exporting", "exported") if redelivered else ())]
    return await transition(event.job_id, stage="exporting", only_from=start)


async def export(event: TuningCompleted, store: ObjectStore, settings: Settings, *, redelivered: bool = False
                 ) -> list[Payload]:
    """Export the job's model, check the GGUF and apply the quality gate; returns the events to emit, in
    order (`model.evaluated`, then `model.exported` or `model.export.failed`); none when there is nothing
    to do (no export asked, or already exported); the export's time goes to `codetune_export_seconds`."""
    if event.export is None:
        check_completed(await TuningJob.find_one(TuningJob.job_id == event.job_id), event)
        return []
    job = await claim_export(event, redelivered=redelivered)
    if job is None:
        return []
    started, outcome = time.perf_counter(), "error"  # error: raised (retried or dead-lettered)
    try:
        answers = await _export_claimed(job, event, store, settings)
        outcome = "exported" if isinstance(answers[-1], ModelExported) else "failed"
        return answers
    finally:
        EXPORT_SECONDS.labels(mode=event.export.mode, outcome=outcome).observe(time.perf_counter() - started)


async def _export_claimed(job: TuningJob, event: TuningCompleted, store: ObjectStore, settings: Settings
                          ) -> list[Payload]:
    """`export` of a job claimed for it (stage `exporting`)."""
    from handlers.export import gguf
    from handlers.export.llamacpp import ensure_converters
    from handlers.ollama_format.chat_format import ollama_template
    from handlers.ollama_format.modelfile import render_modelfile

    opts = event.export
    assert opts is not None
    model = await BaseLLM.find_one(BaseLLM.repo_id == event.base_model, BaseLLM.sha == event.sha)
    if model is None or not model.prefix:
        return [await _failed(event, ExportError(f"base model {event.base_model}@{event.sha} is not in the bucket"))]
    report = report_of(job) or EvaluationReport(job_id=job.job_id, base_model=job.base_model, source="none",
                                                error="the job has no evaluation report")
    work = settings.scratch_dir / "jobs" / event.job_id / "export"
    try:
        conv = await asyncio.to_thread(ensure_converters, settings)
        base_dir = await store.mirror(model.prefix, local_model_dir(settings.scratch_dir, model), model.sha or "")
        adapter_dir = await store.mirror(event.adapter_key, work / "adapter")
        # the adapter folder carries the tokenizer (and chat template) the job actually trained with
        template, stop = await asyncio.to_thread(ollama_template, adapter_dir)
        out = keys.export_prefix(event.job_id)
        adapter_key = None
        # the GGUFs name the hub repo + revision, never this worker's folders
        source = (event.base_model, event.sha)
        tuned = event.name or f"{event.base_model.rsplit('/', 1)[-1]}-{event.job_id}"
        if opts.mode == "merged":
            merged = await asyncio.to_thread(gguf.merge_adapter, base_dir, adapter_dir, work / "merged")
            path = await asyncio.to_thread(gguf.convert_base, merged, work / f"model-{opts.outtype}.gguf",
                                           opts.outtype, converters_dir=conv, source=source, name=tuned)
            model_key = f"{out}/model-{opts.outtype}.gguf"
            await store.put_file(model_key, path)
            model_path, adapter_path = path, None
        else:
            model_key = keys.base_gguf_key(event.base_model, event.sha, opts.outtype)
            model_path = work / f"base-{opts.outtype}.gguf"
            if not await store.exists(model_key):  # once per base model and outtype
                await asyncio.to_thread(gguf.convert_base, base_dir, model_path, opts.outtype, converters_dir=conv,
                                        source=source)
                await store.put_file(model_key, model_path)
            else:
                model_path = await store.fetch(model_key, settings.scratch_dir / "gguf")
            adapter_path = await asyncio.to_thread(gguf.convert_adapter, adapter_dir, base_dir,
                                                   work / f"adapter-{opts.outtype}.gguf", opts.outtype,
                                                   converters_dir=conv, source=source, name=tuned)
            adapter_key = f"{out}/adapter-{opts.outtype}.gguf"
            await store.put_file(adapter_key, adapter_path)
        modelfile = render_modelfile(Path(model_key).name, Path(adapter_key).name if adapter_key else None,
                                     template, stop, opts.system)
        modelfile_key = f"{out}/Modelfile"
        await store.put_bytes(modelfile_key, modelfile.encode(), content_type="text/plain")
        report = await check_runtime(report, model_path, adapter_path, adapter_dir, template, stop, settings)
    except CodeTuneError as e:
        if e.retryable:
            raise
        return [await _failed(event, e)]
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)
        with contextlib.suppress(OSError):  # the job's folder, unless another stage still has files in it
            work.parent.rmdir()
    report = await save_report(store, report.model_copy(update={"gate": decide(report, settings, opts.gate)}))
    assert report.gate is not None
    evaluated = ModelEvaluated(job_id=event.job_id, passed=report.gate.passed, report=report)
    if opts.gate and not report.gate.passed:
        why = "; ".join(report.gate.reasons)
        return [evaluated, await _failed(event, QualityGateError(
            f"not published: the evaluation report did not pass the quality gate: {why} "
            f"(report: {report.markdown_key}; publish anyway with export.gate: false)"))]
    artifacts = {"model_gguf": model_key, "adapter_gguf": adapter_key, "modelfile": modelfile_key}
    await must_transition(event.job_id, stage="exported", artifacts=artifacts)
    return [evaluated, ModelExported(job_id=event.job_id, name=model_name(event), mode=opts.mode, model_key=model_key,
                                     adapter_key=adapter_key, modelfile_key=modelfile_key, template=template,
                                     stop=stop, system=opts.system, quantize=opts.quantize)]


async def check_runtime(report: EvaluationReport, model_path: Path, adapter_path: Path | None, tokenizer_dir: Path,
                        template: str, stop: list[str], settings: Settings) -> EvaluationReport:
    """The report completed with the GGUF's answer to its first held-out prompt (none: nothing to check)."""
    from handlers.export.runtime_check import check

    if not report.samples:
        return report
    threads = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))
    started = time.perf_counter()
    result = await asyncio.to_thread(check, model_path, adapter_path, tokenizer_dir, template, stop,
                                     report.samples[0], settings.eval_max_new_tokens, threads)
    took = time.perf_counter() - started
    return report.model_copy(update={"runtime": result, "duration_s": round(report.duration_s + took, 3)})


async def _failed(event: TuningCompleted, error: CodeTuneError) -> ModelExportFailed:
    info = ErrorInfo(code=error.code, message=error.message)
    await must_transition(event.job_id, stage="export_failed", error=info.model_dump())
    return ModelExportFailed(job_id=event.job_id, error=info)
