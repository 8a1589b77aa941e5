"""Jobs are visible from submission: the intake stage records every `tuning.requested` as `queued` at once.

On the real stack: the bridge as a subprocess, the light stages (intake included) in-process, the single
tuning worker as a process. One job keeps the trainer busy while others are submitted through the bridge,
the CLI and a raw publish (as `nats pub` sends it); they are `queued`, with their positions, until the
trainer is free, and the next one then trains. Also: analytics from the job documents, datasets listed
right after the upload answer, unknown ids 404, bad bodies 422, and intake never imports torch.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from events import subjects as sj
from events.ids import job_id_for
from events.streams import EVENTS, INTAKE_REQUESTED, TUNING_REQUESTED
from storage.documents import TuningJob
from tests.conftest import TINY_REPO
from tests.stack.test_bridge import AUTH, TOKEN, published, serve_bridge, wait_until
from tests.stack.test_cli import codetune

pytestmark = [pytest.mark.usefixtures("workers", "tuning_worker"), pytest.mark.slow]


@pytest.fixture(scope="module")
async def http(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[httpx.AsyncClient]:
    log = tmp_path_factory.mktemp("bridge-intake") / "bridge.log"
    with serve_bridge(env, log, {"CODETUNE_BRIDGE_TOKEN": TOKEN}) as url:
        await wait_until(f"{url}/readyz")
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as c:
            yield c


@pytest.fixture(scope="module")
async def dataset_id(http: httpx.AsyncClient, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A chat dataset uploaded through the bridge; each upload is listed in the very next request."""
    from devkit.tinymodel import toy_dataset

    data = toy_dataset(tmp_path_factory.mktemp("intake-data") / "facts.jsonl", "chat", rows=48).read_bytes()
    ids = []
    for _ in range(3):  # the old lag (listed only once the datasets stage had validated it) shows in any of them
        r = await http.post("/api/v1/datasets/upload", files={"file": ("facts.jsonl", data)})
        assert r.status_code == 200, r.text
        ids.append(r.json()["dataset_id"])
        rows = {row["dataset_id"]: row for row in (await http.get("/api/v1/datasets/")).json()}
        assert ids[-1] in rows, "a just-uploaded dataset is missing from the list"
        row = rows[ids[-1]]
        assert row["status"] in ("uploaded", "validated") and row["size"] == len(data)
        assert row["path"] == r.json()["key"] and row["name"] == "facts.jsonl"
    deadline = time.monotonic() + 30
    while True:
        rows = {row["dataset_id"]: row for row in (await http.get("/api/v1/datasets/")).json()}
        if all(rows[i]["status"] == "validated" for i in ids):
            break
        assert time.monotonic() < deadline, [rows[i] for i in ids]
        await asyncio.sleep(0.2)
    assert rows[ids[0]]["rows"] == 48 and rows[ids[0]]["format"] == "chat"
    return ids[0]


async def job_view(http: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    r = await http.get(f"/api/v1/tuning/{job_id}")
    assert r.status_code == 200, (job_id, r.status_code, r.text)
    return r.json()


async def until(http: httpx.AsyncClient, job_id: str, done: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        view = await job_view(http, job_id)
        if done(view):
            return view
        assert time.monotonic() < deadline, view
        await asyncio.sleep(0.2)


def seed_params(steps: int, **extra: Any) -> dict[str, Any]:
    return {"repo_id": TINY_REPO, "trainingSteps": steps, "learningRate": 1e-2, "batch_size": 4, "eval_steps": 1000,
            "save_steps": 1000, "max_seq_len": 64, "lora_r": 4, **extra}


async def submit(http: httpx.AsyncClient, dataset_id: str, steps: int) -> dict[str, Any]:
    r = await http.post("/api/v1/tuning/", json={"dataset_id": dataset_id, "parameters": seed_params(steps)})
    assert r.status_code == 200, r.text
    return r.json()


def test_an_intake_worker_never_imports_torch() -> None:
    code = ("import sys; from handlers.app import build_app; "
            "build_app(['intake']); import handlers.intake.service, storage.jobs; "
            "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


async def test_jobs_are_queued_from_submission_while_the_trainer_is_busy(
    http: httpx.AsyncClient, client, env: dict[str, str], dataset_id: str
) -> None:
    # 1. a long job occupies the single tuning worker
    first = await submit(http, dataset_id, 100_000)
    assert first["recorded"] is True
    await until(http, first["id"], lambda v: v["job_status"] == "running" and v["progress"] > 0, 120)

    # 2. a second job through the bridge: the answer and the very first GET / progress are 200 `queued`
    second = await submit(http, dataset_id, 4)
    assert second["recorded"] is True and second["status"] == "queued" and second["job_status"] == "queued"
    position = second["queue_position"]
    assert isinstance(position, int) and position >= 1
    view = await job_view(http, second["id"])
    assert (view["status"], view["job_status"], view["progress"], view["queue_position"]) == (
        "queued", "queued", 0.0, position)
    r = await http.get(f"/api/v1/tuning/{second['id']}/progress")
    assert r.status_code == 200 and r.json()["status"] == "queued" and r.json()["queue_position"] == position
    assert r.json()["progress"] == 0.0

    # 3. more submitters, each behind the one before: the bridge, a raw publish (no job id, no headers:
    #    what `nats pub` sends), the CLI
    third = await submit(http, dataset_id, 4)
    assert third["queue_position"] == position + 1
    body = {"base_model": TINY_REPO, "dataset_id": dataset_id, "hyperparameters": {"max_steps": 2}, "export": None}
    ack = await client.publish_raw(sj.TUNING_REQUESTED, json.dumps(body).encode())
    raw_id = job_id_for(f"{EVENTS.name}-{ack.seq}")  # the id both stages derive for a request naming none
    assert await _recorded(raw_id, 5), "a raw publish was not recorded"
    raw = await job_view(http, raw_id)
    assert raw["job_status"] == "queued" and raw["queue_position"] == position + 2
    tune = await codetune(env, "tune", "--model", TINY_REPO, "--dataset", dataset_id, "--max-steps", "2",
                          "--no-export")
    assert tune.returncode == 0, tune.stdout + tune.stderr
    cli_id = tune.stdout.split("job ")[1].split()[0]
    assert f"queued, position {position + 3} in the queue" in tune.stdout, tune.stdout
    assert (await job_view(http, cli_id))["job_status"] == "queued"

    # 4. a malformed request is dead-lettered at once (by intake), not when a trainer gets to it
    async with client.subscribe([sj.dead_letter_subject(sj.TUNING_REQUESTED)]) as q:
        bad = await client.publish_raw(sj.TUNING_REQUESTED, b'{"base_model": "a/b"}')
        _, letter = await client.wait_for(q, lambda _, d: d.get("stream_seq") == bad.seq, 10)
    assert letter.reason.code == "invalid_payload" and "dataset_id" in letter.reason.message

    # 5. the second job stays queued, in place, for as long as the first one trains
    for _ in range(10):
        view = await job_view(http, second["id"])
        assert (view["job_status"], view["queue_position"]) == ("queued", position), view
        await asyncio.sleep(0.2)
    assert (await job_view(http, first["id"]))["job_status"] == "running"

    # 6. a queued job can be cancelled before any trainer saw it
    for job_id in (third["id"], raw_id, cli_id):
        assert (await http.post(f"/api/v1/tuning/{job_id}/cancel")).status_code == 202
    for job_id in (third["id"], raw_id, cli_id):
        await until(http, job_id, lambda v: v["job_status"] == "cancelled", 15)
    assert (await job_view(http, second["id"]))["queue_position"] == position

    # 7. the trainer is freed: the second job trains to the end, never 404 and never back to queued
    assert (await http.post(f"/api/v1/tuning/{first['id']}/cancel")).status_code == 202
    seen: list[str] = []
    deadline = time.monotonic() + 240
    while not seen or seen[-1] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, seen
        status = (await job_view(http, second["id"]))["job_status"]
        if not seen or seen[-1] != status:
            seen.append(status)
        await asyncio.sleep(0.1)
    assert seen[0] == "queued" and seen[-1] == "succeeded", seen
    assert set(seen) <= {"queued", "running", "succeeded"} and seen.count("queued") == 1, seen
    assert (await job_view(http, first["id"]))["job_status"] == "cancelled"
    done = await TuningJob.find_one(TuningJob.job_id == second["id"])
    assert done is not None and done.step == 4 and done.attempts == 1
    for job_id in (third["id"], raw_id, cli_id):  # cancelled while queued: never trained
        job = await TuningJob.find_one(TuningJob.job_id == job_id)
        assert job is not None and job.status == "cancelled" and job.attempts == 0 and job.step == 0


async def _recorded(job_id: str, timeout: float) -> bool:
    from storage.jobs import wait_recorded

    return await wait_recorded(job_id, timeout) is not None


async def drained(client, durable: str, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while True:
            info = await client.js.consumer_info(EVENTS.name, durable)
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return
            await asyncio.sleep(0.1)


async def test_intake_never_changes_a_recorded_job(client, uid: str) -> None:
    """A request for a job already recorded — finished by a trainer, running, or queued by an earlier
    request — changes nothing: not its status, its spec, nor even its `updated_at`."""
    from events.payloads import TuningRequested
    from handlers.intake.service import record_queued

    jobs = [TuningJob(job_id=f"ftjob-{status[:4]}-{uid}", base_model=TINY_REPO, dataset_id=f"ds-{uid}", status=status,
                      step=step, max_steps=4, outcome_sent=status != "running", attempts=1)
            for status, step in (("succeeded", 4), ("cancelled", 2), ("running", 2))]
    for job in jobs:
        await job.insert()
    before = {j.job_id: await TuningJob.find_one(TuningJob.job_id == j.job_id) for j in jobs}

    def other_spec(job_id: str) -> dict[str, Any]:
        return {"job_id": job_id, "base_model": "other/model", "dataset_id": f"ds-other-{uid}",
                "hyperparameters": {"max_steps": 99}}

    # the running one directly through intake's service (a trainer would also see a bus request for it)
    await record_queued(TuningRequested.model_validate(other_spec(jobs[2].job_id)), "ev-1")
    for job in jobs[:2]:  # the finished ones over the bus: intake and the trainer both see each request
        for _ in range(2):  # two messages (two stream sequences) for the same job
            await client.publish_raw(sj.TUNING_REQUESTED, json.dumps(other_spec(job.job_id)).encode())
    await drained(client, INTAKE_REQUESTED.durable)
    await drained(client, TUNING_REQUESTED.durable, 120)
    for job_id, old in before.items():
        now = await TuningJob.find_one(TuningJob.job_id == job_id)
        assert now is not None and old is not None
        assert (now.status, now.step, now.base_model, now.dataset_id, now.hyperparameters, now.updated_at) == (
            old.status, old.step, old.base_model, old.dataset_id, old.hyperparameters, old.updated_at)
    # and a new job requested twice is recorded once, as first requested
    job_id = f"ftjob-new-{uid}"
    first = await record_queued(TuningRequested.model_validate({**other_spec(job_id), "base_model": TINY_REPO}), "a")
    again = await record_queued(TuningRequested.model_validate(other_spec(job_id)), "b")
    assert first.status == again.status == "queued" and again.base_model == TINY_REPO
    assert again.updated_at == first.updated_at and again.created_at == first.created_at
    await again.delete()  # no request for it is on the bus: leave no queued job behind


async def test_analytics_match_the_job_documents(http: httpx.AsyncClient, uid: str) -> None:
    for i, (status, step, max_steps) in enumerate([("succeeded", 10, 10), ("running", 3, 12), ("queued", 0, 0)]):
        await TuningJob(job_id=f"ftjob-an{i}-{uid}", base_model=TINY_REPO, dataset_id=f"ds-{uid}", status=status,
                        step=step, max_steps=max_steps).insert()

    async def from_documents() -> tuple[int, float]:
        jobs = await TuningJob.find_all().to_list()
        return len(jobs), sum(j.progress for j in jobs) / len(jobs)

    for _ in range(50):  # other work may still be moving a job along: compare against a settled reading
        expected = await from_documents()
        r = await http.get("/api/v1/analytics/")
        if await from_documents() == expected:
            break
        await asyncio.sleep(0.2)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"total_tasks", "average_progress"}
    assert body["total_tasks"] == expected[0] >= 3
    assert body["average_progress"] == pytest.approx(expected[1])
    async with httpx.AsyncClient(base_url=str(http.base_url), timeout=10) as anonymous:
        assert (await anonymous.get("/api/v1/analytics/")).status_code == 401


async def test_unknown_ids_are_404_and_bad_bodies_422(http: httpx.AsyncClient, client, uid: str) -> None:
    for path in (f"/api/v1/tuning/ftjob-never-{uid}", f"/api/v1/tuning/ftjob-never-{uid}/progress"):
        r = await http.get(path)
        assert r.status_code == 404 and "not found" in r.json()["detail"]
    assert (await http.get("/api/v1/tuning/bad%20id")).status_code == 422
    before = await published(client)
    for body in ({"parameters": {"repo_id": TINY_REPO}}, {"dataset_id": "ds-x", "parameters": {"learningRate": 1}},
                 {"dataset_id": "ds-x", "parameters": {"repo_id": "../etc"}}):
        r = await http.post("/api/v1/tuning/", json=body)
        assert r.status_code == 422, (body, r.text)
    assert await published(client) == before  # nothing requested, so nothing recorded


def test_the_intake_stage_is_in_every_default_worker() -> None:
    from handlers.app import STAGES, available_stages
    from infra.natsauth import consumes, emits

    assert "intake" in STAGES and "intake" in available_stages()
    assert consumes("intake") == [sj.TUNING_REQUESTED]
    assert emits("intake") == sorted(["dlq.>", sj.TUNING_FAILED])  # dead letters; a malformed job's failure
