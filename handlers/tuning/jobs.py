"""The tuning stage's view of its jobs: recording a request, readiness of its inputs, its spec.

Every write to a job document goes through `storage.jobs` (statuses, transitions, leases); this module
only decides what the tuning stage needs. Only Mongo and the bucket are touched here; no broker, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from events.payloads import ErrorInfo, TuningRequested
from storage.documents import BaseLLM, Dataset, TuningJob
from storage.jobs import VALIDATING, record_requested
from storage.objects import ObjectStore


def model_key(repo_id: str, revision: str) -> str:
    return f"model:{repo_id}@{revision}"


def dataset_key(dataset_id: str) -> str:
    return f"dataset:{dataset_id}"


async def record(job_id: str, event: TuningRequested) -> TuningJob:
    """Create the job on first sight (`validating`); a job already recorded — by the intake stage as
    `queued`, or by an earlier delivery — is returned as it is and left alone."""
    return await record_requested(job_id, event, VALIDATING)


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
