"""Analytics (the seed's `GET /api/v1/analytics/`): job counts and progress from the job documents."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from handlers.bridge.services import MongoDB
from storage.jobs import job_stats

router = APIRouter(prefix="/api/v1/analytics", tags=["analytics"])


class Analytics(BaseModel):
    total_tasks: int = Field(description="tuning jobs recorded, in every status")
    average_progress: float = Field(description="mean progress (0..1) over those jobs: a succeeded job counts 1, "
                                                "a running one step / max_steps, a queued one 0")


@router.get("/", response_model=Analytics, dependencies=[MongoDB])
async def analytics() -> Analytics:
    return Analytics.model_validate(await job_stats())
