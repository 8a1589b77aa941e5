"""Facts are public inputs too: unsafe keys, facts about unknown or other jobs, and duplicates change nothing.

One real tiny job runs end to end (requested twice, with two message ids); then raw facts are published
against it, as `nats pub` would, and the job, the cache folder and the bus are checked.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest

from events import subjects as sj
from events.payloads import TuningRequested
from events.streams import EVENTS, EXPORT_ON_COMPLETED, SERVING_ON_EXPORTED, TUNING_REQUESTED, Consumer
from infra.flows import upload_dataset
from storage.documents import TuningJob
from tests.conftest import TINY_REPO

pytestmark = [pytest.mark.usefixtures("workers", "tuning_worker"), pytest.mark.slow]
WATCH = [sj.TUNING_COMPLETED, sj.TUNING_FAILED, sj.MODEL_EXPORTED, sj.MODEL_EXPORT_FAILED, sj.MODEL_PUBLISHED,
         sj.MODEL_PUBLISH_FAILED]


async def drained(client, consumer: Consumer, timeout: float = 60) -> None:
    """Wait until the stage's consumer has acked everything published to it so far."""
    async with asyncio.timeout(timeout):
        while True:
            info = await client.js.consumer_info(EVENTS.name, consumer.durable)
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return
            await asyncio.sleep(0.2)


def events_for(q: asyncio.Queue, job_id: str) -> list[tuple[str, Any]]:
    out = []
    while not q.empty():
        subject, data = q.get_nowait()
        if isinstance(data, dict) and data.get("job_id") == job_id:
            out.append((subject, data))
    return out


@pytest.fixture(scope="module")
async def published(client, settings, tmp_path_factory) -> dict[str, Any]:
    """A tiny job requested twice (two Nats-Msg-Ids) and run to `model.published`."""
    from devkit.tinymodel import toy_dataset

    path = toy_dataset(tmp_path_factory.mktemp("data") / "facts.jsonl", "chat", rows=16)
    _, answer = await upload_dataset(settings, path, "facts.jsonl", "auto", True, 30)
    job_id = f"ftjob-{uuid.uuid4().hex[:12]}"
    req = TuningRequested(job_id=job_id, base_model=TINY_REPO, dataset_id=answer.dataset_id,
                          name=f"trust-{job_id[6:]}",
                          hyperparameters={"max_steps": 16, "learning_rate": 3e-2, "eval_steps": 8, "save_steps": 8,
                                           "max_seq_len": 64})
    async with client.subscribe(WATCH) as q:
        first = await client.publish(req)
        second = await client.publish(req)  # the same job, another message id
        assert first.id != second.id and not second.duplicate
        seen: dict[str, Any] = {}
        async with asyncio.timeout(300):
            while sj.MODEL_PUBLISHED not in seen:
                subject, data = await q.get()
                if data.get("job_id") == job_id:
                    assert subject not in seen, f"{subject} twice"
                    assert not subject.endswith(".failed"), data
                    seen[subject] = data
        await drained(client, TUNING_REQUESTED)
        await drained(client, EXPORT_ON_COMPLETED)
        await drained(client, SERVING_ON_EXPORTED)
        await asyncio.sleep(1)
        late = events_for(q, job_id)
    job = await TuningJob.find_one(TuningJob.job_id == job_id)
    return {"job_id": job_id, "events": seen, "late": late, "job": job}


async def dead_letter_for(client, subject: str, body: dict[str, Any], marker: str) -> Any:
    async with client.subscribe([sj.dead_letter_subject(subject)]) as q:
        await client.publish_raw(subject, json.dumps(body).encode())  # as `nats pub` would
        _, letter = await client.wait_for(q, lambda _, d: marker in d["body"], 30)
    return letter


async def unchanged(job_id: str, before: TuningJob) -> None:
    after = await TuningJob.find_one(TuningJob.job_id == job_id)
    assert after is not None
    assert (after.stage, after.status, after.artifacts, after.updated_at) == (
        before.stage, before.status, before.artifacts, before.updated_at)


async def test_a_second_request_with_another_msg_id_trains_and_completes_once(published) -> None:
    ev = published["events"]
    assert set(ev) == {sj.TUNING_COMPLETED, sj.MODEL_EXPORTED, sj.MODEL_PUBLISHED}
    assert published["late"] == [], "the duplicate request produced more events"
    job = published["job"]
    assert job.status == "succeeded" and job.stage == "published" and job.attempts == 1


@pytest.mark.parametrize("bad_key", ["/etc/hostname", "../../escape-{uid}/model.gguf", "gguf/a\u0000b.gguf",
                                     "gguf/" + "x" * 2000])
async def test_model_exported_with_an_unsafe_key_is_invalid_and_touches_nothing(
    client, settings, published, uid, bad_key
) -> None:
    job_id, before = published["job_id"], published["job"]
    key = bad_key.format(uid=uid)
    body = {**published["events"][sj.MODEL_EXPORTED], "model_key": key, "template": f"marker-{uid}"}
    letter = await dead_letter_for(client, sj.MODEL_EXPORTED, body, f"marker-{uid}")
    assert letter.reason.code == "invalid_payload" and "model_key" in letter.reason.message
    assert "unsafe key" in letter.reason.message
    escaped = (settings.scratch_dir / "gguf" / "../../").resolve() / f"escape-{uid}"
    assert not escaped.exists(), "a file was written outside the cache"
    await unchanged(job_id, before)


async def test_facts_about_an_unknown_job_are_dead_lettered_and_create_no_job(client, published, uid) -> None:
    ghost = f"ftjob-ghost-{uid}"
    exported = {**published["events"][sj.MODEL_EXPORTED], "job_id": ghost}
    letter = await dead_letter_for(client, sj.MODEL_EXPORTED, exported, ghost)
    assert letter.reason.code == "job_not_found" and ghost in letter.reason.message
    completed = {**published["events"][sj.TUNING_COMPLETED], "job_id": ghost}
    letter = await dead_letter_for(client, sj.TUNING_COMPLETED, completed, ghost)
    assert letter.reason.code == "job_not_found" and ghost in letter.reason.message
    await drained(client, EXPORT_ON_COMPLETED)
    await drained(client, SERVING_ON_EXPORTED)
    assert await TuningJob.find_one(TuningJob.job_id == ghost) is None


async def test_facts_that_contradict_the_job_are_dead_lettered_and_change_nothing(client, published) -> None:
    job_id, before = published["job_id"], published["job"]
    other_sha = {**published["events"][sj.TUNING_COMPLETED], "sha": "0" * 40}
    letter = await dead_letter_for(client, sj.TUNING_COMPLETED, other_sha, '"sha": "' + "0" * 40)
    assert letter.reason.code == "fact_mismatch" and "sha" in letter.reason.message
    other_key = {**published["events"][sj.MODEL_EXPORTED], "model_key": f"gguf/other/{job_id}.gguf"}
    letter = await dead_letter_for(client, sj.MODEL_EXPORTED, other_key, f"gguf/other/{job_id}.gguf")
    assert letter.reason.code == "fact_mismatch" and "model_key" in letter.reason.message
    await unchanged(job_id, before)


async def test_a_repeated_completed_or_exported_fact_does_not_export_or_publish_again(client, published) -> None:
    job_id, before = published["job_id"], published["job"]
    async with client.subscribe([*WATCH, "dlq.>"]) as q:
        await client.publish_raw(sj.TUNING_COMPLETED, json.dumps(published["events"][sj.TUNING_COMPLETED]).encode())
        await client.publish_raw(sj.MODEL_EXPORTED, json.dumps(published["events"][sj.MODEL_EXPORTED]).encode())
        await drained(client, EXPORT_ON_COMPLETED)
        await drained(client, SERVING_ON_EXPORTED)
        await asyncio.sleep(1)
        answers = [q.get_nowait() for _ in range(q.qsize())]
    # only the two facts this test published itself: no second export, publish or dead letter
    assert sorted(s for s, _ in answers) == [sj.MODEL_EXPORTED, sj.TUNING_COMPLETED], answers
    await unchanged(job_id, before)


async def test_the_object_store_writes_only_inside_the_cache(store, tmp_path, uid) -> None:
    from core.errors import UnsafeKeyError

    cache, outside = tmp_path / "cache", tmp_path / "outside"
    cache.mkdir()
    outside.mkdir()
    for key in ["../outside/x.gguf", "/etc/hostname", "gguf/../../outside/x.gguf"]:
        with pytest.raises(UnsafeKeyError):
            await store.fetch(key, cache)
    (cache / "link").symlink_to(outside)  # a link inside the cache must not lead out of it
    await store.put_bytes(f"link/{uid}.gguf", b"GGUF")
    with pytest.raises(UnsafeKeyError, match="outside the cache"):
        await store.fetch(f"link/{uid}.gguf", cache)
    assert list(outside.iterdir()) == [] and list(cache.iterdir()) == [cache / "link"]
    await store.put_bytes(f"gguf/{uid}/m.gguf", b"GGUF")
    assert (await store.fetch(f"gguf/{uid}/m.gguf", cache)).read_bytes() == b"GGUF"
