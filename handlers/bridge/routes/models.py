"""Base models: `POST /api/v1/models/pull` → `model.pull.requested` (the models stage snapshots the repo)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from events.payloads import ModelPullRequested
from handlers.bridge.errors import field_errors, invalid
from handlers.bridge.services import ClientDep

router = APIRouter(prefix="/api/v1/models", tags=["models"])


class PullBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    repo_id: str
    revision: str = "main"
    local_dir: str | None = Field(None, description="ignored: snapshots live in the bucket")


class PullAnswer(BaseModel):
    status: str = "ok"
    local_dir: str = Field(description="the repo id: what tuning's parameters.repo_id takes to use the snapshot")
    repo_id: str
    revision: str
    event_id: str


@router.post("/pull", response_model=PullAnswer)
async def pull_model(body: PullBody, client: ClientDep) -> PullAnswer:
    """Ask the models stage to snapshot `repo_id` at `revision` into the bucket."""
    try:
        command = ModelPullRequested(repo_id=body.repo_id, revision=body.revision)
    except ValidationError as e:
        raise invalid(field_errors(e)) from None
    published = await client.publish(command)
    return PullAnswer(local_dir=command.repo_id, repo_id=command.repo_id, revision=command.revision,
                      event_id=published.id)
