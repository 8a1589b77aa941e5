"""The job record API shared by every party that records or reads tuning jobs (no broker, no torch).

Two stages record a job from the same `tuning.requested`: the light intake stage (status `queued`, as soon
as JetStream accepted the request) and the tuning stage (status `validating`, when a trainer takes it, in
case intake has not run yet). Both go through `record_requested`, an atomic upsert that only ever inserts:
whoever comes second changes nothing (not even `updated_at`), so intake can never move a running or
finished job back to `queued`, and a redelivery or a second request for the same job is a no-op.

Readers (the bridge, the CLI) use `wait_recorded`, `queue_position(s)` and `job_stats`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING, Any

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from storage.documents import TuningJob, now

if TYPE_CHECKING:
    from events.payloads import TuningRequested

QUEUED = "queued"


def job_id_for(event_id: str) -> str:
    """A job id for a request that named none: stable across redeliveries of that request (and the same
    for intake and the tuning stage, which both derive it from the request's event id)."""
    return "ftjob-" + uuid.uuid5(uuid.NAMESPACE_URL, f"codetune:job:{event_id}").hex[:20]


async def record_requested(job_id: str, request: TuningRequested, status: str) -> TuningJob:
    """Create the job from its request on first sight with `status`; an existing job is left untouched.
    Returns the job as stored (the existing one when it was already recorded)."""
    t = now()
    fields: dict[str, Any] = {
        "job_id": job_id, "base_model": request.base_model, "revision": request.revision,
        "dataset_id": request.dataset_id, "hyperparameters": request.hyperparameters.model_dump(),
        "eval_dataset_id": request.eval_dataset_id, "name": request.name,
        "export": request.export.model_dump() if request.export else None,
        "status": status, "created_at": t, "updated_at": t,
    }
    coll = TuningJob.get_pymongo_collection()
    try:
        raw = await coll.find_one_and_update(
            {"job_id": job_id}, {"$setOnInsert": fields}, upsert=True, return_document=ReturnDocument.AFTER)
    except DuplicateKeyError:  # intake and a trainer inserted the same job at the same moment: theirs won
        raw = None
    if raw is None:  # lost that race (some servers answer no document instead of the key error): read it
        raw = await coll.find_one({"job_id": job_id})
    if raw is None:
        raise RuntimeError(f"job {job_id} could not be recorded")  # retried: never a payload error
    return TuningJob.model_validate(raw)


async def find_job(job_id: str) -> TuningJob | None:
    return await TuningJob.find_one(TuningJob.job_id == job_id)


async def wait_recorded(job_id: str, timeout_s: float) -> TuningJob | None:
    """The job's document once someone recorded it, or None after `timeout_s` (bounded polling: the
    intake stage records a request within milliseconds of JetStream accepting it when it runs)."""
    deadline = time.monotonic() + max(0.0, timeout_s)
    delay = 0.01
    while True:
        job = await find_job(job_id)
        if job is not None or time.monotonic() >= deadline:
            return job
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.2)


def _ahead_of(job: TuningJob) -> dict[str, Any]:
    """Queued jobs recorded before this one (ties on `created_at` broken by job id)."""
    return {"status": QUEUED, "$or": [{"created_at": {"$lt": job.created_at}},
                                      {"created_at": job.created_at, "job_id": {"$lt": job.job_id}}]}


async def queue_position(job: TuningJob) -> int | None:
    """1 for the queued job that starts next, 2 for the one after, ...; None when the job is not queued.
    Computed at read time: the number of queued jobs recorded earlier, plus one."""
    if job.status != QUEUED:
        return None
    return await TuningJob.get_pymongo_collection().count_documents(_ahead_of(job)) + 1


async def queue_positions(jobs: list[TuningJob]) -> dict[str, int]:
    """`queue_position` of every queued job in `jobs`, by job id."""
    out: dict[str, int] = {}
    for job in jobs:
        position = await queue_position(job)
        if position is not None:
            out[job.job_id] = position
    return out


async def job_stats() -> dict[str, Any]:
    """`{total_tasks, average_progress}` over every job document (progress as `TuningJob.progress`:
    1 for a succeeded job, step / max_steps otherwise, 0 before training started)."""
    total = 0
    progress = 0.0
    cursor = TuningJob.get_pymongo_collection().find({}, projection={"status": 1, "step": 1, "max_steps": 1})
    async for raw in cursor:
        total += 1
        if raw.get("status") == "succeeded":
            progress += 1.0
        elif raw.get("max_steps"):
            progress += min(1.0, (raw.get("step") or 0) / raw["max_steps"])
    return {"total_tasks": total, "average_progress": progress / total if total else 0.0}
