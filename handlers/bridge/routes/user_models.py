"""Saved models (the seed's /user-models): CRUD on `UserModel` documents; import → a new `tuning.requested`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path
from pydantic import BaseModel, Field, ValidationError

from events.ids import ID_PATTERN
from handlers.bridge.errors import field_errors, invalid, invalid_field
from handlers.bridge.routes.tuning import recorded
from handlers.bridge.seed import (
    job_result,
    requested_view,
    saved_model_view,
    seed_parameters,
    tuning_view,
)
from handlers.bridge.services import ClientDep, MongoDB, ServicesDep
from handlers.tuning.saved import new_model_id, request_from_saved
from storage.documents import TuningJob, UserModel
from storage.jobs import queue_position

router = APIRouter(prefix="/api/v1/user-models", tags=["user-models"], dependencies=[MongoDB])

ModelId = Annotated[str, Path(min_length=1, max_length=64)]


class SaveBody(BaseModel):
    name: str = Field(min_length=1, max_length=128)
    dataset_id: str | None = None
    parameters: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    job_id: str | None = Field(None, pattern=ID_PATTERN, description="fill the rest from this tuning job")


class RenameBody(BaseModel):
    name: str = Field(min_length=1, max_length=128)


async def find_model(model_id: str) -> UserModel:
    model = await UserModel.find_one(UserModel.model_id == model_id)
    if model is None:
        raise HTTPException(404, f"saved model {model_id!r} not found")
    return model


async def from_job(body: SaveBody) -> dict[str, Any]:
    """The saved fields a job provides (the body's own values win)."""
    if body.job_id is None:
        return {}
    job = await TuningJob.find_one(TuningJob.job_id == body.job_id)
    if job is None:
        raise invalid_field(["body", "job_id"], f"tuning job {body.job_id!r} not found")
    return {"dataset_id": job.dataset_id, "base_model": job.base_model, "result": job_result(job),
            "artifacts": job.artifacts,
            "parameters": seed_parameters(job.base_model, job.name, job.hyperparameters, job.export)}


@router.get("/")
async def list_saved() -> list[dict[str, Any]]:
    return [saved_model_view(m) for m in await UserModel.find_all().sort("-created_at").to_list()]


@router.post("/")
async def save_model(body: SaveBody) -> dict[str, Any]:
    given = body.model_dump(exclude_none=True)
    model = UserModel(model_id=new_model_id(), **(await from_job(body) | given))
    await model.insert()
    return saved_model_view(model)


class ImportBody(BaseModel):
    overrides: dict[str, Any] = Field(default_factory=dict, description="hyperparameters or dataset_id/name")


@router.post("/import/{model_id}")
async def import_model(model_id: ModelId, client: ClientDep, services: ServicesDep,
                       body: ImportBody | None = None) -> dict[str, Any]:
    """Start a new tuning job with the saved model's dataset and parameters (+ overrides); answers the new
    `Tuning` once the intake stage recorded it `queued` (bounded wait, as `POST /api/v1/tuning/`)."""
    saved = await find_model(model_id)
    try:
        request = request_from_saved(saved, body.overrides if body else None)
    except ValidationError as e:
        raise invalid(field_errors(e, ("body", "overrides"))) from None
    await client.publish(request)
    job = await recorded(services, request.job_id or "")  # the intake stage's `queued` record (bounded wait)
    return tuning_view(job, await queue_position(job)) if job else requested_view(request)


@router.delete("/{model_id}")
async def delete_model(model_id: ModelId) -> dict[str, str]:
    await (await find_model(model_id)).delete()
    return {"status": "ok"}


@router.post("/{model_id}/rename")
async def rename_model(model_id: ModelId, body: RenameBody) -> dict[str, Any]:
    model = await find_model(model_id)
    model.name = body.name
    await model.save()
    return saved_model_view(model)
