"""Tuning jobs as documents: recording, readiness of inputs, waiting, leases, terminal states.

Statuses follow OpenAI's fine-tuning jobs: validating → waiting | queued → running →
succeeded | failed | cancelled. Only Mongo and the bucket are touched here; no broker, no torch.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from pymongo import ReturnDocument

from core.errors import JobNotFoundError
from events.payloads import ErrorInfo, TuningRequested
from storage.documents import BaseLLM, Dataset, TuningJob, now
from storage.jobs import job_id_for as job_id_for  # the job-id rule, shared with the intake stage
from storage.jobs import record_requested
from storage.objects import ObjectStore

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


def model_key(repo_id: str, revision: str) -> str:
    return f"model:{repo_id}@{revision}"


def dataset_key(dataset_id: str) -> str:
    return f"dataset:{dataset_id}"


async def record(job_id: str, event: TuningRequested) -> TuningJob:
    """Create the job on first sight (`validating`); a job already recorded — by the intake stage as
    `queued`, or by an earlier delivery — is returned as it is and left alone."""
    return await record_requested(job_id, event, "validating")


def request_of(job: TuningJob) -> TuningRequested:
    """The job's spec as a `tuning.requested` payload (used to resume a waiting job)."""
    return TuningRequested.model_validate({
        "job_id": job.job_id, "base_model": job.base_model, "revision": job.revision,
        "dataset_id": job.dataset_id, "eval_dataset_id": job.eval_dataset_id,
        "hyperparameters": job.hyperparameters, "name": job.name,
        "export": job.export,
    })


@dataclass
class Inputs:
    dataset: Dataset | None = None
    eval_dataset: Dataset | None = None
    model: BaseLLM | None = None
    missing: list[str] = field(default_factory=list)
    failure: ErrorInfo | None = None
    pull_needed: bool = False


async def check_inputs(job: TuningJob, store: ObjectStore) -> Inputs:
    out = Inputs()
    ds = await Dataset.find_one(Dataset.dataset_id == job.dataset_id)
    if ds is None:
        if await store.list(f"datasets/{job.dataset_id}/"):
            out.missing.append(dataset_key(job.dataset_id))  # uploaded, not validated yet
        else:
            out.failure = ErrorInfo(code="dataset_not_found", message=f"unknown dataset id {job.dataset_id!r}")
            return out
    elif ds.status == "failed":
        reason = ds.error.message if ds.error else "validation failed"
        out.failure = ErrorInfo(code="invalid_dataset", message=f"dataset {job.dataset_id}: {reason}")
        return out
    elif ds.status != "validated":
        out.missing.append(dataset_key(job.dataset_id))
    out.dataset = ds
    if job.eval_dataset_id:
        await _check_eval_dataset(job.eval_dataset_id, store, out)
        if out.failure:
            return out
    bm = await BaseLLM.find_one(BaseLLM.repo_id == job.base_model, BaseLLM.revision == job.revision)
    if bm is None or bm.status == "pulling":
        out.missing.append(model_key(job.base_model, job.revision))
        out.pull_needed = bm is None
    elif bm.status == "failed":
        out.failure = ErrorInfo(code=bm.error.code if bm.error else "model_not_found",
                                message=bm.error.message if bm.error else f"{job.base_model}: pull failed")
    out.model = bm
    return out


async def _check_eval_dataset(dataset_id: str, store: ObjectStore, out: Inputs) -> None:
    """The request's eval dataset: like the training dataset, waited for while it is validated."""
    ds = await Dataset.find_one(Dataset.dataset_id == dataset_id)
    if ds is None and not await store.list(f"datasets/{dataset_id}/"):
        out.failure = ErrorInfo(code="dataset_not_found", message=f"unknown eval dataset id {dataset_id!r}")
    elif ds is not None and ds.status == "failed":
        reason = ds.error.message if ds.error else "validation failed"
        out.failure = ErrorInfo(code="invalid_dataset", message=f"eval dataset {dataset_id}: {reason}")
    elif ds is None or ds.status != "validated":
        out.missing.append(dataset_key(dataset_id))
    else:
        out.eval_dataset = ds


async def update_if(job_id: str, where: dict[str, Any], **fields: Any) -> TuningJob | None:
    """Atomically set `fields` on the job if it exists and matches `where`; never creates a job.
    Returns the job after the update, or None when no job matched."""
    raw = await TuningJob.get_pymongo_collection().find_one_and_update(
        {"job_id": job_id, **where}, {"$set": {**fields, "updated_at": now()}},
        return_document=ReturnDocument.AFTER,
    )
    return TuningJob.model_validate(raw) if raw else None


async def update(job_id: str, **fields: Any) -> TuningJob:
    """Set fields on an existing job. Only `record` creates jobs: no stage upserts a job from a fact."""
    job = await update_if(job_id, {}, **fields)
    if job is None:
        raise JobNotFoundError(f"unknown job id {job_id!r}")
    return job


async def finish(job_id: str, status: str, **fields: Any) -> TuningJob:
    return await update(job_id, status=status, finished_at=now(), lease_owner=None, lease_until=None, **fields)


async def claim(job_id: str, lease_s: float, *, take_over: bool = False) -> TuningJob | None:
    """Atomically take the job for this worker unless another live worker holds it.

    `take_over`: the message that carries this job was redelivered, so whoever held it stopped
    heartbeating (JetStream only redelivers an unacked message after ack_wait): its lease is void.
    """
    t = now()
    live = [{"lease_owner": None}, {"lease_owner": WORKER_ID}, {"lease_until": {"$lt": t}}]
    raw = await TuningJob.get_pymongo_collection().find_one_and_update(
        {"job_id": job_id, "status": {"$nin": list(TERMINAL)}, **({} if take_over else {"$or": live})},
        {"$set": {"lease_owner": WORKER_ID, "lease_until": t + timedelta(seconds=lease_s), "status": "running",
                  "waiting_for": [], "updated_at": t},
         "$inc": {"attempts": 1}},
        return_document=ReturnDocument.AFTER,
    )
    return TuningJob.model_validate(raw) if raw else None


async def renew(job_id: str, lease_s: float) -> bool:
    """Heartbeat: extend the lease; returns whether a cancel was requested."""
    raw = await TuningJob.get_pymongo_collection().find_one_and_update(
        {"job_id": job_id, "lease_owner": WORKER_ID},
        {"$set": {"lease_until": now() + timedelta(seconds=lease_s)}},
        projection={"cancel_requested": 1}, return_document=ReturnDocument.AFTER,
    )
    return bool(raw and raw.get("cancel_requested"))


async def waiting_on(key: str) -> list[TuningJob]:
    return await TuningJob.find(TuningJob.waiting_for == key, TuningJob.status == "waiting").to_list()


async def resolve(job_id: str, key: str) -> TuningJob | None:
    """Remove `key` from a waiting job; returns the job if nothing else is missing (ready to queue)."""
    raw = await TuningJob.get_pymongo_collection().find_one_and_update(
        {"job_id": job_id, "status": "waiting", "waiting_for": key},
        {"$pull": {"waiting_for": key}, "$set": {"updated_at": now()}},
        return_document=ReturnDocument.AFTER,
    )
    if raw and not raw.get("waiting_for"):
        raw = await TuningJob.get_pymongo_collection().find_one_and_update(
            {"job_id": job_id, "status": "waiting", "waiting_for": []},
            {"$set": {"status": "queued", "updated_at": now()}}, return_document=ReturnDocument.AFTER,
        )
        return TuningJob.model_validate(raw) if raw else None
    return None
