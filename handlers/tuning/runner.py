"""Run one claimed tuning job: inputs from the bucket, the recipe off the event loop, artifacts back.

While the recipe trains in a worker thread, the event loop heartbeats the JetStream message
(`in_progress`), renews the job's lease, notices cancel requests, publishes progress and uploads each
checkpoint (the training thread waits until its checkpoint is durable in the bucket). A redelivered job
downloads its last checkpoint and resumes at that step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import ctypes
import ctypes.util
import functools
import gc
import logging
import shutil
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core import tracing
from core.errors import CodeTuneError, TransientError
from core.settings import Settings
from events.payloads import (
    ErrorInfo,
    EvaluationReport,
    Hyperparameters,
    LossPoint,
    TrainMetrics,
    TuningCancelled,
    TuningCompleted,
    TuningEvaluated,
    TuningFailed,
    TuningProgress,
)
from handlers import metrics
from handlers.report import job_lint
from handlers.report import save as save_report
from handlers.tuning.distributed import RanksLost, devices_for
from handlers.tuning.lint import Estimator, estimate_summary, lint_summary, prepare_with_lint
from storage import jobs, keys, retention
from storage.documents import BaseLLM, Dataset, TuningJob, now
from storage.jobs import CANCELLED, FAILED, RUNNING, SUCCEEDED
from storage.local import local_model_dir
from storage.objects import ObjectStore

log = logging.getLogger("codetune.tuning")
PROGRESS_EVERY_S = 0.5
KEEP_CHECKPOINTS = 2
# NATS caps a message at 1 MB and MongoDB a document at 16 MB: long histories are thinned (the plot is full).
EVENT_HISTORY_POINTS = 500
DOC_HISTORY_POINTS = 5000

Publish = Callable[[Any], Awaitable[Any]]

# Every job trains on this one thread. With the loop's default pool a job could land on any of its threads,
# and glibc gives each thread its own malloc arena, each keeping the peak of the job it served (the RSS of a
# worker grew 3.2 -> 4.7 GB over five SmolLM2 jobs). One thread, one arena, trimmed after every job.
_TRAIN_THREAD = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="codetune-train")


def release_memory() -> None:
    """Give a finished job's memory back to the OS: collect cycles, then `malloc_trim` (glibc only)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


async def on_training_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` on the one training thread, its memory released afterwards (success or not):
    training and evaluation both load a model, so both run here."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(
            _TRAIN_THREAD, functools.partial(contextvars.copy_context().run, fn, *args, **kwargs))
    finally:
        await loop.run_in_executor(_TRAIN_THREAD, release_memory)


async def train_on_worker_thread(*args: Any, devices: int = 1) -> Any:
    """`recipe.train(*args)` on the training thread; over `devices` ranks when more than one."""
    from handlers.tuning import recipe  # torch is imported only by processes that train

    if devices > 1:
        from handlers.tuning import distributed

        return await on_training_thread(distributed.train, devices, *args)
    return await on_training_thread(recipe.train, *args)


@dataclass
class RunContext:
    store: ObjectStore
    settings: Settings
    publish: Publish  # emits an event (progress or terminal)
    heartbeat: Callable[[], Awaitable[None]]  # keeps the JetStream message alive
    lease_s: float


class _Hooks:
    """TrainHooks bridging the training thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, job: TuningJob, ctx: RunContext, hp: Hyperparameters
                 ) -> None:
        self.loop, self.job, self.ctx, self.hp = loop, job, ctx, hp
        self.cancel = threading.Event()
        self.infra_error: BaseException | None = None
        self._last = 0.0
        self.estimator: Estimator | None = None

    def prepare(self, tokenizer: Any, *args: Any) -> tuple[list[Any], list[Any]]:
        """`data.prepare` for the recipe, plus the dataset lint, stored on the job before training."""
        lint, train, val = prepare_with_lint(tokenizer, *args)
        self.estimator = Estimator(train, self.hp.batch_size, self.hp.gradient_accumulation_steps,
                                   self.job.checkpoint_step or 0)
        log.info("job %s: %s", self.job.job_id, lint_summary(lint))
        try:
            self._submit(self._note(lint_summary(lint), self.job.checkpoint_step or 0, self.job.max_steps,
                                    dataset_lint=lint.model_dump())).result(timeout=60)
        except Exception as e:  # the lint is advice: a slow database must not fail the training
            log.warning("lint of %s not stored: %s", self.job.job_id, e)
        return train, val

    async def _note(self, message: str, step: int, max_steps: int, **fields: Any) -> None:
        """Store `fields` on the job and announce `message` as a progress event (at `step`)."""
        await jobs.set_fields(self.job.job_id, {RUNNING}, **fields)
        await self.ctx.publish(TuningProgress(job_id=self.job.job_id, status="running", step=step,
                                              max_steps=max_steps, message=message))

    def _submit(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def on_step(self, info: Any) -> None:
        if info.eval_loss is None:  # an optimizer step (an eval repeats the step's info)
            metrics.observe_step(info.step_s, info.step_tokens, info.tokens_per_s)
        estimate = self.estimator.observe(info) if self.estimator else None
        if estimate is not None:
            log.info("job %s: %s", self.job.job_id, estimate_summary(estimate))
            self._submit(self._note(estimate_summary(estimate), info.step, info.max_steps,
                                    estimate=estimate.model_dump()))
        now = time.monotonic()
        final = info.step >= info.max_steps
        if info.eval_loss is None and not final and now - self._last < PROGRESS_EVERY_S:
            return
        self._last = now
        self._submit(self._progress(info))

    async def _progress(self, info: Any) -> None:
        event = TuningProgress(job_id=self.job.job_id, status="running", step=info.step, max_steps=info.max_steps,
                               epoch=info.epoch, loss=info.loss, eval_loss=info.eval_loss,
                               learning_rate=info.learning_rate, tokens_per_s=info.tokens_per_s, eta_s=info.eta_s)
        try:
            await jobs.set_fields(self.job.job_id, {RUNNING}, step=info.step, max_steps=info.max_steps,
                                  epoch=info.epoch, loss=info.loss, eval_loss=info.eval_loss,
                                  tokens_per_s=info.tokens_per_s, eta_s=info.eta_s)
            await self.ctx.publish(event)
        except Exception as e:
            log.warning("progress of %s not published: %s", self.job.job_id, e)

    def on_checkpoint(self, ckpt_dir: Path, step: int) -> None:
        try:
            self._submit(self._upload_checkpoint(ckpt_dir, step)).result(timeout=600)
        except BaseException as e:
            self.infra_error = e
            self.cancel.set()  # stop training: the job is redelivered and resumes from the last good checkpoint
            return
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # durable in the bucket; the disk copy is not needed

    async def _upload_checkpoint(self, ckpt_dir: Path, step: int) -> None:
        """Upload the checkpoint, its state file last (what makes it complete, see `latest_checkpoint`),
        then record it on the job and drop all but the newest `KEEP_CHECKPOINTS`."""
        prefix = keys.checkpoint_prefix(self.job.job_id, step)
        state = ckpt_dir / keys.CHECKPOINT_STATE_FILE
        with tracing.span("checkpoint upload", job_id=self.job.job_id, step=step), \
                metrics.CHECKPOINT_UPLOAD_SECONDS.time():  # observed when the upload succeeded or failed
            for path in sorted(p for p in ckpt_dir.rglob("*") if p.is_file() and p != state):
                await self.ctx.store.put_file(f"{prefix}/{path.relative_to(ckpt_dir).as_posix()}", path)
            await self.ctx.store.put_file(f"{prefix}/{keys.CHECKPOINT_STATE_FILE}", state)
        try:
            await jobs.set_fields(self.job.job_id, {RUNNING}, checkpoint_key=prefix, checkpoint_step=step)
        except Exception as e:  # the checkpoint is durable: a resume finds it in the bucket (latest_checkpoint)
            log.warning("checkpoint %s of %s is in the bucket but not recorded: %s", step, self.job.job_id, e)
        old = sorted({"/".join(k.split("/")[:4]) for k, _ in await self.ctx.store.list(
            keys.checkpoints_prefix(self.job.job_id) + "/")})
        for stale in old[:-KEEP_CHECKPOINTS]:
            await self.ctx.store.remove_prefix(stale + "/")

    def should_stop(self) -> bool:
        return self.cancel.is_set()


async def latest_checkpoint(store: ObjectStore, job_id: str) -> tuple[str, int] | None:
    """The job's newest complete checkpoint in the bucket, as (prefix, step), whether or not the job's
    record names it (a MongoDB outage may have kept a checkpoint from being recorded). Complete: it holds
    its state file, which is uploaded last; a prefix without one (an upload cut short) is skipped."""
    root = keys.checkpoints_prefix(job_id)
    best: tuple[str, int] | None = None
    for key, _ in await store.list(root + "/"):
        rest = key[len(root) + 1:]
        name, _, file = rest.partition("/")
        if file != keys.CHECKPOINT_STATE_FILE or not name.startswith("step-") or not name[5:].isdigit():
            continue
        step = int(name[5:])
        if best is None or step > best[1]:
            best = (f"{root}/{name}", step)
    return best


async def _heartbeat(job: TuningJob, hooks: _Hooks, ctx: RunContext) -> None:
    while True:
        await asyncio.sleep(ctx.lease_s / 4)
        with contextlib.suppress(Exception):
            await ctx.heartbeat()
            if await jobs.renew(job.job_id, ctx.lease_s):
                hooks.cancel.set()


async def run(job: TuningJob, model: BaseLLM, dataset: Dataset, ctx: RunContext,
              eval_dataset: Dataset | None = None) -> TuningCompleted | TuningFailed | TuningCancelled:
    from handlers.tuning.recipe import thin_history

    hp = Hyperparameters.model_validate(job.hyperparameters)
    work = ctx.settings.scratch_dir / "jobs" / job.job_id
    base_dir = await ctx.store.mirror(model.prefix or "", local_model_dir(ctx.settings.scratch_dir, model),
                                      model.sha or "")
    data_path = work / "data" / keys.safe_name(dataset.name)
    await ctx.store.download(dataset.key, data_path)
    eval_data = None
    if eval_dataset is not None:  # the request named its own held-out rows
        eval_data = (work / "eval" / keys.safe_name(eval_dataset.name), eval_dataset.format or "text")
        await ctx.store.download(eval_dataset.key, eval_data[0])
    resume_dir = None
    found = await latest_checkpoint(ctx.store, job.job_id)
    if found is not None:
        key, step = found
        if key != job.checkpoint_key:  # newer than the record says (or never recorded): record it now
            log.info("job %s: checkpoint %s is in the bucket but was not recorded", job.job_id, key)
            job = job.model_copy(update={"checkpoint_key": key, "checkpoint_step": step})
            await jobs.set_fields(job.job_id, {RUNNING}, checkpoint_key=key, checkpoint_step=step)
        resume_dir = work / "resume" / key.rsplit("/", 1)[-1]
        shutil.rmtree(resume_dir, ignore_errors=True)
        await ctx.store.download_prefix(key, resume_dir)
        log.info("job %s resumes from %s", job.job_id, key)
    await jobs.set_fields(job.job_id, {RUNNING}, started_at=job.started_at or now(), sha=model.sha)
    await ctx.publish(TuningProgress(job_id=job.job_id, status="running", step=job.checkpoint_step or 0,
                                     max_steps=job.max_steps, message="resumed" if resume_dir else "started"))

    loop = asyncio.get_running_loop()
    hooks = _Hooks(loop, job, ctx, hp)
    beat = asyncio.create_task(_heartbeat(job, hooks, ctx))
    devices = devices_for(hp, ctx.settings.tuning_max_devices)
    try:
        # the training thread runs in a copy of this context: its progress and checkpoint uploads are children
        with tracing.span("training", job_id=job.job_id, resume_step=job.checkpoint_step if resume_dir else None):
            result = await train_on_worker_thread(base_dir, data_path, dataset.format or "text", hp, work / "out",
                                                  hooks, resume_dir, hooks.prepare,
                                                  (model.repo_id, model.sha or model.revision), devices=devices)
        # still heartbeating: scoring a real model takes longer than the message's ack wait
        report = None if result.cancelled else await evaluate_job(job, base_dir, data_path, dataset, hp,
                                                                  result.adapter_dir, ctx.settings, eval_data)
    except RanksLost as e:  # a training rank died: retried, and the next delivery resumes from the checkpoint
        raise TransientError(str(e)) from e
    except CodeTuneError as e:
        return await _failed(job, ErrorInfo(code=e.code, message=e.message))
    except Exception as e:
        if hooks.infra_error is None:
            log.exception("job %s failed in training", job.job_id)
            return await _failed(job, ErrorInfo(code="training_error", message=f"{type(e).__name__}: {e}"[:2000]))
        result = None
    finally:
        beat.cancel()
    if hooks.infra_error is not None:
        raise TransientError(f"checkpoint upload failed: {hooks.infra_error}") from hooks.infra_error
    assert result is not None
    history = [p.model_dump() for p in thin_history(result.loss_history, DOC_HISTORY_POINTS)]
    try:
        if result.cancelled:
            await jobs.must_transition(job.job_id, CANCELLED, step=result.metrics.steps, loss_history=history)
            return TuningCancelled(job_id=job.job_id, step=result.metrics.steps)
        assert report is not None
        return await _succeeded(job, model, result, work, ctx, report)
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)


async def evaluate_job(job: TuningJob, base_dir: Path, data_path: Path, dataset: Dataset, hp: Hyperparameters,
                       adapter_dir: Path, settings: Settings, eval_data: tuple[Path, str] | None = None
                       ) -> EvaluationReport:
    """The report's first part: base vs tuned on the held-out rows (an error is reported, not raised:
    the trained adapter is kept, and the gate fails a job whose evaluation did not run)."""
    from handlers.tuning.evaluate import evaluate

    report = EvaluationReport(job_id=job.job_id, base_model=job.base_model, source="none",
                              lint=await job_lint(job.job_id))
    try:
        with tracing.span("evaluation", job_id=job.job_id):
            ev = await on_training_thread(evaluate, base_dir, adapter_dir, data_path, dataset.format or "text", hp,
                                          max_rows=settings.eval_max_rows,
                                          max_new_tokens=settings.eval_max_new_tokens,
                                          keep_ids=settings.eval_agree_tokens, eval_data=eval_data)
    except Exception as e:  # torch/transformers raise many types; the report carries the message
        log.exception("job %s: evaluation failed", job.job_id)
        return report.model_copy(update={"error": f"{type(e).__name__}: {e}"[:2000]})
    return report.model_copy(update={"source": ev.source, "rows": ev.rows, "base": ev.base, "tuned": ev.tuned,
                                     "samples": ev.samples, "duration_s": ev.duration_s})


async def _succeeded(job: TuningJob, model: BaseLLM, result: Any, work: Path, ctx: RunContext,
                     report: EvaluationReport) -> TuningCompleted:
    from handlers.tuning.recipe import plot_loss, thin_history

    adapter_key = keys.adapter_prefix(job.job_id)
    await ctx.store.upload_dir(adapter_key, result.adapter_dir)
    plot_key = keys.plot_key(job.job_id)
    png = plot_loss(result.loss_history, work / "loss.png")
    await ctx.store.put_file(plot_key, png)
    doc = await jobs.must_transition(
        job.job_id, SUCCEEDED, step=result.metrics.steps, max_steps=result.metrics.steps,
        adapter_key=adapter_key, plot_key=plot_key, metrics=result.metrics.model_dump(),
        loss_history=[p.model_dump() for p in thin_history(result.loss_history, DOC_HISTORY_POINTS)],
        loss=result.metrics.train_loss,
        eval_loss=result.metrics.eval_loss,
    )
    report = await save_report(ctx.store, report)
    await ctx.publish(TuningEvaluated(job_id=job.job_id, report=report))
    await retention.after_training(ctx.store, ctx.settings, doc)  # the adapter is stored: checkpoints go
    return completed_event(doc)


def completed_event(doc: TuningJob) -> TuningCompleted:
    """`tuning.completed` rebuilt from the job document (also used to re-emit after a crash)."""
    from handlers.tuning.recipe import thin_history

    return TuningCompleted(
        job_id=doc.job_id, base_model=doc.base_model, sha=doc.sha or "", dataset_id=doc.dataset_id,
        adapter_key=doc.adapter_key or "", plot_key=doc.plot_key, metrics=TrainMetrics.model_validate(doc.metrics),
        loss_history=thin_history([LossPoint.model_validate(p) for p in doc.loss_history], EVENT_HISTORY_POINTS),
        name=doc.name,
        export=doc.export,
    )


async def _failed(job: TuningJob, error: ErrorInfo) -> TuningFailed:
    await jobs.must_transition(job.job_id, FAILED, error=error.model_dump())
    return TuningFailed(job_id=job.job_id, error=error)
