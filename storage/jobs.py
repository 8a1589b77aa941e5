"""The one API for job documents: who may create a job, which status and stage moves are allowed, reads.

Every stage that records anything on a tuning job goes through here; no stage writes `TuningJob` itself.

Creation. Two stages record a job from the same `tuning.requested`: the light intake stage (status
`queued`, as soon as JetStream accepted the request) and the tuning stage (status `validating`, when a
trainer takes it, in case intake has not run yet). Both go through `record_requested`, an atomic insert
(an upsert with `$setOnInsert` only): whoever comes second changes nothing (not even `updated_at`), so
intake can never move a running or finished job back to `queued`, and a redelivery or a second request
for the same job is a no-op. Nothing else ever creates a job document.

Changes. Every other write is a conditional update on the job's current status (and stage), never an
upsert: `transition` moves a job along `STATUS_FROM` / `STAGE_FROM` (the from → to tables, here and only
here), `set_fields` stores fields while the job is in the statuses the caller names. A refused move (no
such job, or a job in another status) changes nothing, creates nothing, is logged, and is reported to the
caller (`None`, or `TransitionRefusedError` from `must_transition`).

Readers (the bridge, the CLI) use `find_job`, `wait_recorded`, `queue_position(s)` and `job_stats`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Collection, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from core import tracing
from core.errors import FactMismatchError
from storage.documents import TuningJob, now

if TYPE_CHECKING:
    from events.payloads import TuningRequested

log = logging.getLogger("codetune.jobs")

VALIDATING = "validating"
QUEUED = "queued"
WAITING = "waiting"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
# Statuses follow OpenAI's fine-tuning jobs: validating | queued → waiting ⇄ queued → running →
# succeeded | failed | cancelled. A terminal job never changes status again.
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
_OPEN = frozenset({VALIDATING, QUEUED, WAITING, RUNNING})
CREATED_AS = frozenset({VALIDATING, QUEUED})  # the statuses `record_requested` inserts a job with

# target status → the statuses a job may move to it from
STATUS_FROM: dict[str, frozenset[str]] = {
    WAITING: _OPEN,  # an input is missing (a redelivered running job may find one gone)
    QUEUED: frozenset({WAITING}),  # the last missing input arrived (`resolve`)
    RUNNING: _OPEN,  # a trainer claimed it (`claim`; a redelivery takes over a running job)
    SUCCEEDED: frozenset({RUNNING}),
    FAILED: _OPEN,
    CANCELLED: _OPEN,
}

# After training a succeeded job moves through the export and serving stages' `stage`:
# (none) → exporting → exported | export_failed; exported → publishing → published | publish_failed.
STAGE_FROM: dict[str, frozenset[str | None]] = {
    # a new export, a retry after a failed one, or (redelivered message only) a takeover after a crash
    "exporting": frozenset({None, "export_failed", "exporting", "exported"}),
    "exported": frozenset({"exporting"}),
    "export_failed": frozenset({"exporting"}),
    # a publish, a retry after a failed one, or (redelivered message only) a takeover after a crash
    "publishing": frozenset({"exported", "publish_failed", "publishing", "published"}),
    "published": frozenset({"publishing"}),
    "publish_failed": frozenset({"publishing"}),
}
STAGE_STATUS = SUCCEEDED  # only a succeeded job has an export / serving stage

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"  # this process, as a lease owner


class TransitionRefusedError(FactMismatchError):
    """A job move the table does not allow from the job's current status/stage (or no such job)."""

    code = "transition_refused"


async def record_requested(job_id: str, request: TuningRequested, status: str) -> TuningJob:
    """Create the job from its request on first sight with `status` (`validating` or `queued`); an existing
    job is left untouched.
    Returns the job as stored (the existing one when it was already recorded)."""
    if status not in CREATED_AS:
        raise ValueError(f"a job is created as {sorted(CREATED_AS)}, not {status!r}")
    t = now()
    fields: dict[str, Any] = {
        "job_id": job_id, "base_model": request.base_model, "revision": request.revision,
        "dataset_id": request.dataset_id, "hyperparameters": request.hyperparameters.model_dump(),
        "eval_dataset_id": request.eval_dataset_id, "name": request.name,
        "export": request.export.model_dump() if request.export else None,
        "status": status, "created_at": t, "updated_at": t,
        "traceparent": tracing.traceparent(),  # the trace its request came with: a resumed job goes on in it
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


def _allowed(table: Mapping[str, frozenset[Any]], to: str, only_from: Collection[Any] | None) -> list[Any]:
    if to not in table:
        raise ValueError(f"no job moves to {to!r}")  # a bug of ours, never input
    allowed = table[to]
    if only_from is not None:
        if not set(only_from) <= allowed:
            raise ValueError(f"{to!r} cannot be reached from {sorted(map(str, set(only_from) - allowed))}")
        allowed = frozenset(only_from)
    return list(allowed)


async def _refused(job_id: str, what: str) -> None:
    raw = await TuningJob.get_pymongo_collection().find_one({"job_id": job_id}, {"status": 1, "stage": 1})
    why = "no such job" if raw is None else f"status {raw.get('status')!r}, stage {raw.get('stage')!r}"
    log.info("job %s: %s refused (%s)", job_id, what, why)


async def _update(job_id: str, where: dict[str, Any], change: dict[str, Any], what: str) -> TuningJob | None:
    """One conditional `find_one_and_update` (never an upsert); logs and returns None when nothing matched."""
    change.setdefault("$set", {})["updated_at"] = now()
    raw = await TuningJob.get_pymongo_collection().find_one_and_update(
        {"job_id": job_id, **where}, change, return_document=ReturnDocument.AFTER)
    if raw is None:
        await _refused(job_id, what)
        return None
    return TuningJob.model_validate(raw)


async def transition(job_id: str, status: str | None = None, *, stage: str | None = None,
                     only_from: Collection[str | None] | None = None, where: Mapping[str, Any] | None = None,
                     **fields: Any) -> TuningJob | None:
    """Move the job to `status` (or, for a succeeded job, to export/serving `stage`) and set `fields`,
    atomically and only from a status (stage) the table allows — `only_from` narrows that set, `where`
    adds conditions. Returns the job after the move, or None (logged) when refused; never creates a job."""
    if (status is None) == (stage is None):
        raise ValueError("a transition names a status or a stage")
    cond: dict[str, Any] = dict(where or {})
    if status is not None:
        cond["status"] = {"$in": _allowed(STATUS_FROM, status, only_from)}
        fields["status"] = status
        if status in TERMINAL:
            fields = {"finished_at": now(), "lease_owner": None, "lease_until": None, **fields}
        what = f"status → {status}"
    else:
        assert stage is not None
        cond["status"] = STAGE_STATUS
        cond["stage"] = {"$in": _allowed(STAGE_FROM, stage, only_from)}
        fields["stage"] = stage
        what = f"stage → {stage}"
    return await _update(job_id, cond, {"$set": fields}, what)


async def must_transition(job_id: str, status: str | None = None, *, stage: str | None = None,
                          only_from: Collection[str | None] | None = None, **fields: Any) -> TuningJob:
    """`transition`, raising `TransitionRefusedError` (permanent) when it is refused."""
    job = await transition(job_id, status, stage=stage, only_from=only_from, **fields)
    if job is None:
        target = f"status {status!r}" if status is not None else f"stage {stage!r}"
        raise TransitionRefusedError(f"job {job_id!r} cannot move to {target} from where it is (or does not exist)")
    return job


async def set_fields(job_id: str, statuses: Collection[str], **fields: Any) -> TuningJob | None:
    """Store `fields` (not status or stage: those move by `transition`) on the job if it is in one of
    `statuses`; None (logged) otherwise. Never creates a job."""
    if "status" in fields or "stage" in fields:
        raise ValueError("status and stage change by transition()")
    return await _update(job_id, {"status": {"$in": list(statuses)}}, {"$set": fields},
                         f"fields {sorted(fields)} while {sorted(statuses)}")


async def claim(job_id: str, lease_s: float, *, take_over: bool = False) -> TuningJob | None:
    """Atomically take the job for this worker (→ running) unless another live worker holds it.

    `take_over`: the message that carries this job was redelivered, so whoever held it stopped
    heartbeating (JetStream only redelivers an unacked message after ack_wait): its lease is void.
    """
    t = now()
    live = [{"lease_owner": None}, {"lease_owner": WORKER_ID}, {"lease_until": {"$lt": t}}]
    return await _update(
        job_id, {"status": {"$in": _allowed(STATUS_FROM, RUNNING, None)}, **({} if take_over else {"$or": live})},
        {"$set": {"lease_owner": WORKER_ID, "lease_until": t + timedelta(seconds=lease_s), "status": RUNNING,
                  "waiting_for": []},
         "$inc": {"attempts": 1}}, "claim (status → running)")


async def renew(job_id: str, lease_s: float) -> bool:
    """Heartbeat: extend this worker's lease on its running job; returns whether a cancel was requested."""
    raw = await TuningJob.get_pymongo_collection().find_one_and_update(
        {"job_id": job_id, "lease_owner": WORKER_ID, "status": RUNNING},
        {"$set": {"lease_until": now() + timedelta(seconds=lease_s)}},
        projection={"cancel_requested": 1}, return_document=ReturnDocument.AFTER,
    )
    return bool(raw and raw.get("cancel_requested"))


async def waiting_on(key: str) -> list[TuningJob]:
    return await TuningJob.find(TuningJob.waiting_for == key, TuningJob.status == WAITING).to_list()


async def resolve(job_id: str, key: str) -> TuningJob | None:
    """Remove `key` from a waiting job; returns the job if nothing else is missing (waiting → queued)."""
    raw = await TuningJob.get_pymongo_collection().find_one_and_update(
        {"job_id": job_id, "status": WAITING, "waiting_for": key},
        {"$pull": {"waiting_for": key}, "$set": {"updated_at": now()}},
        return_document=ReturnDocument.AFTER,
    )
    if raw and not raw.get("waiting_for"):
        return await transition(job_id, QUEUED, where={"waiting_for": []})
    return None


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


STATUSES = (VALIDATING, QUEUED, WAITING, RUNNING, SUCCEEDED, FAILED, CANCELLED)


async def status_counts() -> dict[str, int]:
    """How many jobs are in each status now (every status, 0 included): one indexed count per status."""
    coll = TuningJob.get_pymongo_collection()
    counts = await asyncio.gather(*(coll.count_documents({"status": status}) for status in STATUSES))
    return dict(zip(STATUSES, counts, strict=True))
