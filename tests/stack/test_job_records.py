"""Job documents are written only through storage.jobs: explicit transitions, never an upsert.

On the real MongoDB-wire server: an export or serving answer for a job that does not exist, or that is in
a status (stage) the transition table does not allow, creates no job document and changes no valid job.
"""

from __future__ import annotations

from typing import Any

import pytest

from core.errors import FactMismatchError, JobNotFoundError
from events.payloads import ExportOptions, ModelExported, TuningCompleted
from handlers.export.service import claim_export
from handlers.serving.service import publish
from storage import jobs
from storage.documents import TuningJob
from tests.conftest import TINY_REPO

pytestmark = pytest.mark.usefixtures("db")
SHA = "a" * 40


def completed(job_id: str) -> TuningCompleted:
    return TuningCompleted(job_id=job_id, base_model=TINY_REPO, sha=SHA, dataset_id="ds-records",
                           adapter_key=f"jobs/{job_id}/adapter", loss_history=[],
                           metrics={"steps": 1, "epochs": 1.0, "tokens": 1, "tokens_per_s": 1.0, "duration_s": 1.0,
                                    "train_loss": 1.0, "eval_loss": None}, export=ExportOptions())


def exported(job_id: str) -> ModelExported:
    return ModelExported(job_id=job_id, name=job_id.lower(), mode="adapter", model_key="gguf/x/base-f16.gguf",
                         adapter_key=f"exports/{job_id}/adapter-f16.gguf", modelfile_key=f"exports/{job_id}/Modelfile",
                         template="{{ .Prompt }}", stop=[])


async def raw(job_id: str) -> dict[str, Any] | None:
    return await TuningJob.get_pymongo_collection().find_one({"job_id": job_id}, {"_id": 0})


async def a_job(job_id: str, **fields: Any) -> dict[str, Any]:
    await TuningJob(job_id=job_id, base_model=TINY_REPO, dataset_id="ds-records", sha=SHA,
                    adapter_key=f"jobs/{job_id}/adapter", export=ExportOptions().model_dump(), **fields).insert()
    doc = await raw(job_id)
    assert doc is not None
    return doc


async def test_answers_for_an_unknown_job_create_no_document(settings, store, uid) -> None:
    ghost = f"ftjob-ghost-{uid}"
    with pytest.raises(JobNotFoundError):
        await claim_export(completed(ghost))
    with pytest.raises(JobNotFoundError):
        await publish(exported(ghost), store, settings)
    assert await jobs.transition(ghost, stage="exported", artifacts={"x": "y"}) is None
    assert await jobs.transition(ghost, jobs.SUCCEEDED) is None
    assert await jobs.set_fields(ghost, jobs.TERMINAL, outcome_sent=True) is None
    assert await jobs.claim(ghost, 10.0) is None
    with pytest.raises(jobs.TransitionRefusedError):
        await jobs.must_transition(ghost, stage="published")
    assert await raw(ghost) is None


async def test_answers_for_a_job_in_the_wrong_status_change_nothing(settings, store, uid) -> None:
    running = await a_job(f"ftjob-run-{uid}", status="running", step=3)
    with pytest.raises(FactMismatchError):  # tuning.completed for a job still running
        await claim_export(completed(running["job_id"]))
    assert await jobs.transition(running["job_id"], stage="exporting") is None  # no stage before succeeded
    assert await jobs.transition(running["job_id"], jobs.QUEUED) is None  # queued only from waiting
    assert await raw(running["job_id"]) == running

    done = await a_job(f"ftjob-done-{uid}", status="succeeded")
    with pytest.raises(FactMismatchError):  # model.exported before any export
        await publish(exported(done["job_id"]), store, settings)
    for stage in ("exported", "export_failed", "published", "publish_failed"):
        assert await jobs.transition(done["job_id"], stage=stage) is None, stage
    assert await jobs.transition(done["job_id"], jobs.FAILED) is None  # terminal stays terminal
    assert await jobs.transition(done["job_id"], jobs.RUNNING) is None
    assert await jobs.set_fields(done["job_id"], {jobs.RUNNING}, step=99) is None
    assert await raw(done["job_id"]) == done


async def test_the_table_moves_a_job_along_and_refuses_going_back(uid) -> None:
    job = await a_job(f"ftjob-move-{uid}", status="succeeded")
    job_id = job["job_id"]
    claimed = await claim_export(completed(job_id))
    assert claimed is not None and claimed.stage == "exporting"
    assert await claim_export(completed(job_id)) is None  # a duplicate fact: already exporting
    moved = await jobs.must_transition(job_id, stage="exported", artifacts={"modelfile": "m"})
    assert moved.stage == "exported" and moved.artifacts == {"modelfile": "m"}
    assert await jobs.transition(job_id, stage="exporting", only_from=[None, "export_failed"]) is None
    assert (await jobs.transition(job_id, stage="publishing")).stage == "publishing"
    assert (await jobs.transition(job_id, stage="published")).stage == "published"
    assert await jobs.transition(job_id, stage="exporting", only_from=[None, "export_failed"]) is None
    assert (await raw(job_id))["stage"] == "published"
    with pytest.raises(ValueError):  # a bug of the caller, not a refusal
        await jobs.transition(job_id, stage="exported", only_from=["published"])
    assert await TuningJob.get_pymongo_collection().count_documents({"job_id": job_id}) == 1
