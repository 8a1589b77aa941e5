"""The tuning stage's decisions: record a request, wait for inputs, run, resume waiting jobs, cancel."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from events.payloads import (
    ErrorInfo,
    ModelPullRequested,
    TuningCancelled,
    TuningFailed,
    TuningProgress,
    TuningRequested,
)
from handlers.tuning import jobs
from handlers.tuning.runner import RunContext, completed_event, run
from storage.documents import TuningJob
from storage.objects import ObjectStore

Emit = Callable[..., Awaitable[Any]]


async def handle_request(job_id: str, event: TuningRequested, store: ObjectStore, emit: Emit,
                         make_ctx: Callable[[], RunContext], *, redelivered: bool = False) -> None:
    job = await jobs.record(job_id, event)
    if job.status in jobs.TERMINAL:
        if job.status == "succeeded":  # a crash between storing and publishing: publish again (same id)
            await emit(completed_event(job))
        return
    if job.cancel_requested:
        await jobs.finish(job_id, "cancelled")
        await emit(TuningCancelled(job_id=job_id, step=job.step))
        return
    inputs = await jobs.check_inputs(job, store)
    if inputs.failure:
        await jobs.finish(job_id, "failed", error=inputs.failure.model_dump())
        await emit(TuningFailed(job_id=job_id, error=inputs.failure))
        return
    if inputs.missing:
        await jobs.update(job_id, status="waiting", waiting_for=inputs.missing)
        await emit(TuningProgress(job_id=job_id, status="waiting", step=0, max_steps=0,
                                  message="waiting for " + ", ".join(inputs.missing)))
        if inputs.pull_needed:
            await emit(ModelPullRequested(repo_id=job.base_model, revision=job.revision), key="pull")
        # an input may have become ready between the check and the update
        again = await jobs.check_inputs(job, store)
        if not again.missing and not again.failure:
            for key in inputs.missing:
                ready = await jobs.resolve(job_id, key)
                if ready:
                    await emit(jobs.request_of(ready), key="ready")
        return
    claimed = await jobs.claim(job_id, make_ctx().lease_s, take_over=redelivered)
    if claimed is None:
        return  # another live worker is running this job (this is a second request for it)
    assert inputs.model is not None and inputs.dataset is not None
    await emit(await run(claimed, inputs.model, inputs.dataset, make_ctx()))


async def resume_waiting(key: str, emit: Emit, failure: ErrorInfo | None = None) -> int:
    """An input became ready (or failed): queue (or fail) the jobs that waited for it."""
    count = 0
    for job in await jobs.waiting_on(key):
        if failure is not None:
            await jobs.finish(job.job_id, "failed", error=failure.model_dump())
            await emit(TuningFailed(job_id=job.job_id, error=failure), key=job.job_id)
        else:
            ready = await jobs.resolve(job.job_id, key)
            if ready is None:
                continue
            await emit(jobs.request_of(ready), key=job.job_id)
        count += 1
    return count


async def request_cancel(job_id: str, emit: Emit) -> None:
    job = await TuningJob.find_one(TuningJob.job_id == job_id)
    if job is None or job.status in jobs.TERMINAL:
        return
    if job.status == "running":
        await jobs.update(job_id, cancel_requested=True)  # the running worker stops at its next step
        return
    await jobs.finish(job_id, "cancelled", cancel_requested=True)
    await emit(TuningCancelled(job_id=job_id, step=job.step))
