"""Model pull and the crash-safe tuning stage on the real stack, with a tiny real Llama."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from resume import assert_resumed_once, past_a_checkpoint  # tests/resume.py

from events import subjects as sj
from events.payloads import ModelPullRequested, TuningCancelRequested, TuningRequested
from infra.flows import upload_dataset
from storage.documents import BaseLLM, TuningJob
from tests.conftest import TINY_REPO

pytestmark = [pytest.mark.usefixtures("workers", "tuning_worker"), pytest.mark.slow]
TERMINAL = [sj.TUNING_COMPLETED, sj.TUNING_FAILED, sj.TUNING_CANCELLED]


@pytest.fixture(scope="module")
async def dataset_id(settings, tmp_path_factory) -> str:
    from devkit.tinymodel import toy_dataset

    path = toy_dataset(tmp_path_factory.mktemp("data") / "facts.jsonl", "chat", rows=48)
    subject, answer = await upload_dataset(settings, path, "facts.jsonl", "auto", True, 30)
    assert subject == sj.DATASET_VALIDATED
    return answer.dataset_id


def job(dataset_id: str, **hp) -> TuningRequested:
    return TuningRequested(job_id=f"ftjob-{uuid.uuid4().hex[:12]}", base_model=TINY_REPO, dataset_id=dataset_id,
                           hyperparameters={"max_steps": 30, "learning_rate": 1e-2, "batch_size": 4,
                                            "eval_steps": 10, "save_steps": 10, "lora_r": 8,
                                            "max_seq_len": 128} | hp)


async def test_pull_is_idempotent_and_lands_in_the_bucket(client, store) -> None:
    async with client.subscribe([sj.MODEL_PULLED, sj.MODEL_PULL_FAILED]) as q:
        await client.publish(ModelPullRequested(repo_id=TINY_REPO))
        subject, first = await client.wait_for(q, lambda _, d: d["repo_id"] == TINY_REPO, 60)
        assert subject == sj.MODEL_PULLED and len(first.sha) == 40
        objects = dict(await store.list(first.prefix + "/"))
        assert any(k.endswith("model.safetensors") for k in objects) and any(k.endswith("tokenizer.model")
                                                                           for k in objects)
        await client.publish(ModelPullRequested(repo_id=TINY_REPO))  # again: a no-op that re-emits
        subject, second = await client.wait_for(q, lambda _, d: d["repo_id"] == TINY_REPO, 30)
    assert subject == sj.MODEL_PULLED and second.sha == first.sha and second.prefix == first.prefix
    docs = await BaseLLM.find(BaseLLM.repo_id == TINY_REPO).to_list()
    assert len(docs) == 1 and docs[0].status == "ready"


async def test_a_missing_repo_fails_with_the_hubs_reason(client) -> None:
    async with client.subscribe([sj.MODEL_PULLED, sj.MODEL_PULL_FAILED]) as q:
        await client.publish(ModelPullRequested(repo_id="nobody/does-not-exist"))
        subject, failed = await client.wait_for(q, lambda _, d: d["repo_id"] == "nobody/does-not-exist", 30)
    assert subject == sj.MODEL_PULL_FAILED and failed.error.code == "model_not_found"
    assert "nobody/does-not-exist" in failed.error.message


async def test_tune_completes_and_the_loss_goes_down(client, store, dataset_id) -> None:
    req = job(dataset_id)
    async with client.subscribe([*TERMINAL, sj.progress_subject(req.job_id)]) as q:
        await client.publish(req)
        subject, done = await client.wait_for(q, lambda s, d: s in TERMINAL and d["job_id"] == req.job_id, 240)
        progress = []
        while not q.empty():
            progress.append(q.get_nowait())
    assert subject == sj.TUNING_COMPLETED, done
    m = done.metrics
    assert m.steps == 30 and m.train_loss is not None and m.first_loss is not None
    assert m.train_loss < 0.75 * m.first_loss, (m.first_loss, m.train_loss)
    assert m.eval_loss is not None and m.tokens > 0 and m.tokens_per_s > 0
    assert [p.step for p in done.loss_history if p.loss is not None][-1] == 30
    adapter = dict(await store.list(done.adapter_key + "/"))
    assert any(k.endswith("adapter_model.safetensors") for k in adapter)
    assert (await store.get_bytes(done.plot_key)).startswith(b"\x89PNG")
    doc = await TuningJob.find_one(TuningJob.job_id == req.job_id)
    assert doc.status == "succeeded" and doc.progress == 1.0 and doc.metrics["steps"] == 30


async def test_bad_hyperparameters_fail_naming_the_field(client) -> None:
    job_id = f"ftjob-{uuid.uuid4().hex[:12]}"
    body = (f'{{"job_id": "{job_id}", "base_model": "{TINY_REPO}", "dataset_id": "ds-x", '
            '"hyperparameters": {"learning_rate": -1, "lora_r": 8}}').encode()
    async with client.subscribe([sj.TUNING_FAILED]) as q:
        await client.publish_raw(sj.TUNING_REQUESTED, body)  # as `nats pub` would
        _, failed = await client.wait_for(q, lambda _, d: d["job_id"] == job_id, 30)
    assert failed.error.code == "invalid_payload"
    assert "hyperparameters.learning_rate" in failed.error.message and "greater than 0" in failed.error.message


async def test_unknown_dataset_fails(client) -> None:
    req = TuningRequested(job_id=f"ftjob-{uuid.uuid4().hex[:12]}", base_model=TINY_REPO, dataset_id="ds-nope")
    async with client.subscribe([sj.TUNING_FAILED]) as q:
        await client.publish(req)
        _, failed = await client.wait_for(q, lambda _, d: d["job_id"] == req.job_id, 30)
    assert failed.error.code == "dataset_not_found" and "ds-nope" in failed.error.message


async def test_a_job_waits_for_its_model_then_runs(client, dataset_id, hub_cache: Path) -> None:
    from devkit.tinymodel import build_tiny_llama
    from infra.hubcache import install_in_hub_cache

    repo = f"codetune-test/late-{uuid.uuid4().hex[:6]}"
    req = job(dataset_id, max_steps=4, eval_steps=2, save_steps=2).model_copy(update={"base_model": repo})
    async with client.subscribe([*TERMINAL, sj.progress_subject(req.job_id), sj.MODEL_PULL_FAILED]) as q:
        # not in the hub cache yet: the job waits, its pull fails, so it fails... unless the model appears.
        # Put it in the cache first, then request: the job must record 'waiting' and request the pull itself.
        install_in_hub_cache(build_tiny_llama(hub_cache.parent / repo.split("/")[1], seed=1), hub_cache, repo)
        await client.publish(req)
        _, waiting = await client.wait_for(q, lambda s, d: s.startswith("tuning.progress"), 30)
        assert waiting.status == "waiting" and f"model:{repo}@main" in (waiting.message or "")
        subject, done = await client.wait_for(q, lambda s, d: s in TERMINAL and d.get("job_id") == req.job_id, 120)
    assert subject == sj.TUNING_COMPLETED and done.metrics.steps == 4
    assert (await BaseLLM.find_one(BaseLLM.repo_id == repo)).status == "ready"


async def test_a_job_whose_model_cannot_be_pulled_fails_with_the_reason(client, dataset_id) -> None:
    req = job(dataset_id).model_copy(update={"base_model": "nobody/missing-model"})
    async with client.subscribe([*TERMINAL]) as q:
        await client.publish(req)
        subject, failed = await client.wait_for(q, lambda s, d: d.get("job_id") == req.job_id, 60)
    assert subject == sj.TUNING_FAILED and failed.error.code == "model_not_found"


async def test_cancel_stops_a_running_job(client, dataset_id) -> None:
    req = job(dataset_id, max_steps=2000, save_steps=1000, eval_steps=1000)
    async with client.subscribe([*TERMINAL, sj.progress_subject(req.job_id)]) as q:
        await client.publish(req)
        await client.wait_for(q, lambda s, d: s.startswith("tuning.progress") and d.get("step", 0) >= 3, 120)
        await client.publish(TuningCancelRequested(job_id=req.job_id))
        subject, cancelled = await client.wait_for(q, lambda s, d: s in TERMINAL and d["job_id"] == req.job_id, 60)
    assert subject == sj.TUNING_CANCELLED and 3 <= cancelled.step < 2000
    doc = await TuningJob.find_one(TuningJob.job_id == req.job_id)
    assert doc.status == "cancelled"


MAX = 400


async def test_kill_9_mid_training_resumes_from_the_checkpoint_and_completes_once(
    client, dataset_id, tuning_worker
) -> None:
    # long enough that the kill lands mid-training on any machine (a tiny-model step takes milliseconds)
    req = job(dataset_id, max_steps=MAX, save_steps=10, eval_steps=100)
    async with client.subscribe([*TERMINAL, sj.progress_subject(req.job_id)]) as q:
        await client.publish(req)
        ckpt_step = (await past_a_checkpoint(req.job_id, 600)).checkpoint_step
        tuning_worker.kill9()  # no ack, no goodbye
        tuning_worker.start()  # JetStream redelivers after ack_wait; this worker resumes
        subject, done = await client.wait_for(q, lambda s, d: s in TERMINAL and d["job_id"] == req.job_id, 240)
        await asyncio.sleep(2)
        repeats = [d for s, d in list(q._queue) if s in TERMINAL]
    await assert_resumed_once(subject, done, repeats, req.job_id, ckpt_step, MAX)
