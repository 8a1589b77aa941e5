"""Tuning jobs: create (→ `tuning.requested`), list, get, progress, cancel (→ `tuning.cancel.requested`),
and a Server-Sent Events stream relaying `tuning.progress.<job_id>` and the job's terminal event.

Create answers once the job is recorded: after publishing it waits (at most `intake_wait_s`) for the
intake stage's `queued` record, so the client's very first GET / progress is a 200 `queued` with its
`queue_position` — however busy the trainers are. The answer says whether the record was seen
(`recorded`); without a running intake stage it comes after the wait with `recorded: false`.

SSE events on `GET /api/v1/tuning/{id}/events`: `snapshot` (the job's document, or `status: null` while
no stage has recorded it yet; sent once subscribed, so nothing after it is missed), then
`progress` (a `TuningProgress` + `progress` fraction, SSE id = the event id) and finally one of
`completed` / `failed` / `cancelled`, after which the stream ends. A job already finished ends after
its snapshot. Keep-alive comments every 15 s. An unknown job id is a 404 once the job has not been
recorded within a few seconds (`JOB_GRACE_S`: the stage may not have recorded a just-created job yet).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query
from fastapi.responses import PlainTextResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent

from events import subjects as s
from events.client import CodeTuneClient
from events.ids import ID_PATTERN
from events.payloads import TuningCancelRequested
from handlers.bridge.seed import (
    SeedTuningCreate,
    progress_view,
    seed_status,
    tuning_request,
    tuning_view,
)
from handlers.bridge.services import ClientDep, MongoDB, Services, ServicesDep
from storage.documents import TuningJob
from storage.jobs import TERMINAL, queue_position, queue_positions, wait_recorded

router = APIRouter(prefix="/api/v1/tuning", tags=["tuning"])

JobId = Annotated[str, Path(pattern=ID_PATTERN, description="the job id")]
JOB_GRACE_S = 5.0
TERMINAL_SUBJECTS = {s.TUNING_COMPLETED: "completed", s.TUNING_FAILED: "failed", s.TUNING_CANCELLED: "cancelled"}


async def find_job(job_id: str) -> TuningJob:
    job = await TuningJob.find_one(TuningJob.job_id == job_id)
    if job is None:
        raise HTTPException(404, f"tuning job {job_id!r} not found")
    return job


async def recorded(services: ServicesDep, job_id: str) -> TuningJob | None:
    """The just-requested job once the intake stage recorded it (bounded wait; None without MongoDB)."""
    if not services.mongodb.ready.is_set():
        return None
    return await wait_recorded(job_id, services.settings.intake_wait_s)


@router.post("/")
async def create_tuning(body: SeedTuningCreate, client: ClientDep, services: ServicesDep) -> dict[str, Any]:
    """The seed's job request (camelCase `parameters`) → a typed `tuning.requested`. Answers `{id}` (+ the
    recorded `status` / `job_status` / `queue_position`) once the job is recorded (see the module doc)."""
    request, ignored = tuning_request(body.dataset_id, body.parameters)
    published = await client.publish(request)
    job = await recorded(services, request.job_id or "")
    return {"id": request.job_id, "event_id": published.id, "ignored": ignored, "recorded": job is not None,
            "status": seed_status(job) if job else "queued", "job_status": job.status if job else None,
            "queue_position": await queue_position(job) if job else None}


@router.get("/", dependencies=[MongoDB])
async def list_tunings(limit: int = Query(100, ge=1, le=1000)) -> list[dict[str, Any]]:
    jobs = await TuningJob.find_all().sort("-created_at").limit(limit).to_list()
    positions = await queue_positions(jobs)
    return [tuning_view(j, positions.get(j.job_id)) for j in jobs]


@router.get("/{job_id}", dependencies=[MongoDB])
async def get_tuning(job_id: JobId) -> dict[str, Any]:
    job = await find_job(job_id)
    return tuning_view(job, await queue_position(job))


@router.get("/{job_id}/progress", dependencies=[MongoDB])
async def get_progress(job_id: JobId) -> dict[str, Any]:
    job = await find_job(job_id)
    return progress_view(job, await queue_position(job))


@router.get("/{job_id}/report", dependencies=[MongoDB],
            responses={404: {"description": "no such job, or its evaluation report is not written yet"}})
async def get_report(job_id: JobId, format: Literal["json", "markdown"] = Query("json")) -> Any:
    """The job's evaluation report (base vs tuned on held-out rows, sample answers, the GGUF check, the
    quality gate) as JSON, or its Markdown card with `?format=markdown`."""
    from handlers.report import of_job, render_markdown

    report = of_job(await find_job(job_id))
    if report is None:
        raise HTTPException(404, f"tuning job {job_id!r} has no evaluation report yet")
    if format == "markdown":
        return PlainTextResponse(render_markdown(report), media_type="text/markdown")
    return report.model_dump(mode="json")


@router.post("/{job_id}/cancel", status_code=202)
async def cancel_tuning(job_id: JobId, client: ClientDep) -> dict[str, Any]:
    """Ask the tuning stage to stop the job at its next step (`tuning.cancel.requested`)."""
    published = await client.publish(TuningCancelRequested(job_id=job_id))
    return {"status": "ok", "id": job_id, "event_id": published.id}


def job_events(client: CodeTuneClient, job_id: str) -> AbstractAsyncContextManager[asyncio.Queue[Any]]:
    """Live subscription to one job's progress and terminal events: (subject, data, event id)."""

    def this_job(subject: str, data: Any) -> bool:
        return subject not in TERMINAL_SUBJECTS or (isinstance(data, dict) and data.get("job_id") == job_id)

    return client.subscribe([s.progress_subject(job_id), *TERMINAL_SUBJECTS], accept=this_job, maxsize=1000,
                            with_ids=True)


async def snapshot(services: Services, job_id: str) -> dict[str, Any]:
    job = await TuningJob.find_one(TuningJob.job_id == job_id) if services.mongodb.ready.is_set() else None
    if job is None:
        return {"task_id": job_id, "status": None, "job_status": None, "progress": 0.0}
    return progress_view(job, await queue_position(job))


async def job_recorded(job_id: str, grace_s: float = JOB_GRACE_S) -> bool:
    """Whether the job is recorded (by intake or tuning), waiting up to `grace_s` for a just-created one
    (its request may still be on its way to the stage)."""
    deadline = time.monotonic() + grace_s
    while await TuningJob.find_one(TuningJob.job_id == job_id) is None:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.2)
    return True


async def known_job(job_id: JobId) -> str:
    """404 for a job the tuning stage has not recorded within `JOB_GRACE_S`, instead of a stream of
    keep-alives that never ends."""
    if not await job_recorded(job_id):
        raise HTTPException(404, f"tuning job {job_id!r} not found")
    return job_id


async def job_stream(services: Services, job_id: str) -> AsyncIterator[tuple[str, Any, str | None]]:
    """One job's live events as `(kind, data, event id)`: `snapshot` first (once subscribed, so nothing after
    it is missed), then `progress` (+ a `progress` fraction), ending with `completed` / `failed` /
    `cancelled`; a finished job ends after its snapshot. Shared by the SSE route and `WS /ws`."""
    async with job_events(services.client, job_id) as queue:
        first = await snapshot(services, job_id)
        yield "snapshot", first, None
        if first.get("job_status") in TERMINAL:
            return
        while True:
            subject, data, event_id = await queue.get()
            if subject in TERMINAL_SUBJECTS:
                yield TERMINAL_SUBJECTS[subject], data, event_id
                return
            if isinstance(data, dict) and data.get("max_steps"):
                data = {**data, "progress": min(1.0, data.get("step", 0) / data["max_steps"])}
            yield "progress", data, event_id


@router.get("/{job_id}/events", response_class=EventSourceResponse, dependencies=[MongoDB],
            responses={404: {"description": "no such job (after a short grace for a just-created one)"}})
async def stream_events(job_id: Annotated[str, Depends(known_job)], services: ServicesDep
                        ) -> AsyncIterable[ServerSentEvent]:
    """Server-Sent Events: the job's progress as it happens, until its terminal event."""
    async for kind, data, event_id in job_stream(services, job_id):
        if kind == "snapshot":
            yield ServerSentEvent(event=kind, data=data, retry=3000)
        else:
            yield ServerSentEvent(event=kind, data=data, id=event_id)
