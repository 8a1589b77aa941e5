"""Saved models (the original's /user-models): a finished job kept under a name with its parameters,
metrics and real artifact keys; importing one requests a new tuning job with those parameters and any
overrides. Plain functions over documents, used by the CLI and the bridge."""

from __future__ import annotations

import uuid
from typing import Any

from core.errors import InvalidInputError, JobNotFoundError, NotFoundError
from events.ids import new_job_id
from events.payloads import SEED_QUANTIZATION, ExportOptions, TuningRequested
from storage.documents import TuningJob, UserModel

SEED_KEYS = {"epochs": "epochs", "trainingSteps": "max_steps", "learningRate": "learning_rate"}
TOP_LEVEL = ("dataset_id", "name", "base_model", "revision")


def new_model_id() -> str:
    return f"um-{uuid.uuid4().hex[:20]}"


async def save_job(job_id: str, name: str) -> UserModel:
    job = await TuningJob.find_one(TuningJob.job_id == job_id)
    if job is None:
        raise JobNotFoundError(f"no tuning job {job_id!r}")
    if job.status != "succeeded":
        raise InvalidInputError(f"job {job_id} is {job.status}: only a succeeded job can be saved")
    model = UserModel(
        model_id=new_model_id(), name=name, job_id=job.job_id, dataset_id=job.dataset_id, base_model=job.base_model,
        parameters={"repo_id": job.base_model, "revision": job.revision, "name": job.name,
                    "hyperparameters": job.hyperparameters, "export": job.export},
        result={"metrics": job.metrics, "loss": job.loss, "eval_loss": job.eval_loss},
        artifacts={"adapter": job.adapter_key, "plot": job.plot_key, **job.artifacts},
    )
    await model.insert()
    return model


async def find(model_id: str) -> UserModel:
    saved = await UserModel.find_one(UserModel.model_id == model_id)
    if saved is None:
        raise NotFoundError(f"saved model {model_id!r} not found")
    return saved


def request_from_saved(saved: UserModel, overrides: dict[str, Any] | None = None, *, job_id: str | None = None
                       ) -> TuningRequested:
    """A new `tuning.requested` from a saved model: its typed hyperparameters (or the original's camelCase
    keys), then `overrides` (hyperparameter fields, or dataset_id / name / base_model / revision)."""
    params = dict(saved.parameters or {})
    over = dict(overrides or {})
    top = {k: over.pop(k) for k in TOP_LEVEL if k in over}
    hp = dict(params.get("hyperparameters") or {})
    for seed, typed in SEED_KEYS.items():
        if params.get(seed) is not None and typed not in hp:
            hp[typed] = params[seed]
    export = params.get("export") or SEED_QUANTIZATION.get(params.get("quantization") or "none", ExportOptions())
    dataset_id = top.get("dataset_id") or saved.dataset_id
    if not dataset_id:
        raise InvalidInputError("the saved model has no dataset_id: pass one as an override")
    return TuningRequested(
        job_id=job_id or new_job_id(),
        base_model=top.get("base_model") or saved.base_model or params.get("repo_id") or "",
        revision=top.get("revision") or params.get("revision") or "main", dataset_id=dataset_id,
        name=top.get("name", params.get("name")), hyperparameters={**hp, **over}, export=export,
    )
