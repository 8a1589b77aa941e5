"""The tuning stage's decisions: record a request, wait for inputs, run, resume waiting jobs, cancel.

Idempotent per job, not per message: a job is trained at most once whatever number of `tuning.requested`
name it (redeliveries, or new messages with other `Nats-Msg-Id`s). A request for a job that is running
elsewhere is acked and ignored (the running worker answers). A request for a finished job (succeeded,
failed, cancelled) re-answers with the recorded outcome ONLY if that outcome was never published
(`outcome_sent` false: a crash between storing and publishing); otherwise it is acked and ignored, so
`tuning.completed` is emitted once per job.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from core import tracing
from events.payloads import (
    ErrorInfo,
    ModelPullRequested,
    Payload,
    TuningCancelled,
    TuningFailed,
    TuningProgress,
    TuningRequested,
)
from handlers.tuning import jobs
from handlers.tuning.runner import RunContext, completed_event, run
from storage import jobs as records
from storage.documents import TuningJob
from storage.jobs import CANCELLED, FAILED, QUEUED, RUNNING, TERMINAL, VALIDATING, WAITING
from storage.objects import ObjectStore

Emit = Callable[..., Awaitable[Any]]


def outcome_of(job: TuningJob) -> Payload:
    """The terminal event of a finished job, rebuilt from its record."""
    if job.status == "succeeded":
        return completed_event(job)
    if job.status == "cancelled":
        return TuningCancelled(job_id=job.job_id, step=job.step)
    error = ErrorInfo.model_validate(job.error.model_dump()) if job.error else ErrorInfo(code="error",
                                                                                       message="failed")
    return TuningFailed(job_id=job.job_id, error=error)


async def answer(job_id: str, outcome: Payload, emit: Emit, key: str = "") -> None:
    """Publish a job's terminal outcome, then record that it was published (see the module docstring)."""
    await emit(outcome, key=key)
    await records.set_fields(job_id, TERMINAL, outcome_sent=True)


async def handle_request(job_id: str, event: TuningRequested, store: ObjectStore, emit: Emit,
                         make_ctx: Callable[[], RunContext], *, redelivered: bool = False) -> None:
    job = await jobs.record(job_id, event)
    if job.status in TERMINAL:
        if not job.outcome_sent:  # a crash between storing and publishing: answer with the record
            await answer(job_id, outcome_of(job), emit)
        return  # already answered: a duplicate request changes nothing
    if job.cancel_requested:
        if await records.transition(job_id, CANCELLED):
            await answer(job_id, TuningCancelled(job_id=job_id, step=job.step), emit)
        return
    inputs = await jobs.check_inputs(job, store)
    if inputs.failure:
        if await records.transition(job_id, FAILED, error=inputs.failure.model_dump()):
            await answer(job_id, TuningFailed(job_id=job_id, error=inputs.failure), emit)
        return
    if inputs.missing:
        if await records.transition(job_id, WAITING, waiting_for=inputs.missing) is None:
            return  # finished or cancelled meanwhile
        await emit(TuningProgress(job_id=job_id, status="waiting", step=0, max_steps=0,
                                  message="waiting for " + ", ".join(inputs.missing)))
        if inputs.pull_needed:
            await emit(ModelPullRequested(repo_id=job.base_model, revision=job.revision), key="pull")
        # an input may have become ready between the check and the update
        again = await jobs.check_inputs(job, store)
        if not again.missing and not again.failure:
            for key in inputs.missing:
                ready = await records.resolve(job_id, key)
                if ready:
                    await emit(jobs.request_of(ready), key="ready")
        return
    claimed = await records.claim(job_id, make_ctx().lease_s, take_over=redelivered)
    if claimed is None:
        return  # another live worker is running this job (this is a second request for it)
    assert inputs.model is not None and inputs.dataset is not None
    await answer(job_id, await run(claimed, inputs.model, inputs.dataset, make_ctx(),
                                     eval_dataset=inputs.eval_dataset), emit)


async def resume_waiting(key: str, emit: Emit, failure: ErrorInfo | None = None) -> int:
    """An input became ready (or failed): queue (or fail) the jobs that waited for it."""
    count = 0
    for job in await records.waiting_on(key):
        with tracing.resumed(job.traceparent, job_id=job.job_id):  # the job's events stay in its trace
            if failure is not None:
                if await records.transition(job.job_id, FAILED, only_from={WAITING},
                                            error=failure.model_dump()) is None:
                    continue
                await answer(job.job_id, TuningFailed(job_id=job.job_id, error=failure), emit, key=job.job_id)
            else:
                ready = await records.resolve(job.job_id, key)
                if ready is None:
                    continue
                await emit(jobs.request_of(ready), key=job.job_id)
        count += 1
    return count


async def request_cancel(job_id: str, emit: Emit) -> None:
    job = await TuningJob.find_one(TuningJob.job_id == job_id)
    if job is None or job.status in TERMINAL:
        return
    if job.status != RUNNING:
        done = await records.transition(job_id, CANCELLED, only_from={VALIDATING, QUEUED, WAITING},
                                        cancel_requested=True)
        if done is not None:
            await answer(job_id, TuningCancelled(job_id=job_id, step=job.step), emit)
            return
    # running (or claimed meanwhile): the running worker stops at its next step
    await records.set_fields(job_id, {RUNNING}, cancel_requested=True)
