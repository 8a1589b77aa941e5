"""Poison matrix on the real stack: every bad body is dead-lettered once, never redelivered, changes nothing."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import nats
import pytest

from events import subjects as sj
from events.client import connect_options
from events.streams import CONSUMERS, DEAD_LETTERS

pytestmark = pytest.mark.usefixtures("workers", "tuning_worker")

# every subject a stage consumes, commands and facts alike (one home: the durable consumers)
SUBJECTS = [c.subject for c in CONSUMERS]
# the object-key field of each consumed payload that has one, and the id field it names
KEY_FIELDS = {
    sj.DATASET_UPLOADED: ("dataset_id", "key"), sj.DATASET_VALIDATED: ("dataset_id", "key"),
    sj.MODEL_PULLED: ("repo_id", "prefix"), sj.TUNING_COMPLETED: ("job_id", "adapter_key"),
    sj.MODEL_EXPORTED: ("job_id", "model_key"),
}
UNSAFE_KEYS = {
    "key-absolute": ("/etc/hostname", "absolute key"),
    "key-dotdot": ("../../etc/hostname", "unsafe key part '..'"),
    "key-nul": ("datasets/a\x00b/x.jsonl", "unsafe key part"),
}


def _ce(**over: Any) -> bytes:
    ce = {"specversion": "1.0", "id": "ce-1", "source": "tests", "type": "io.codetune.x.v1", **over}
    return json.dumps(ce).encode()


BODIES: dict[str, tuple[bytes, str]] = {
    "not-json": (b"{not json", "invalid JSON"),
    "array": (b"[1, 2, 3]", "payload"),
    "wrong-schema": (b'{"hello": "world"}', "Field required"),
    "empty": (b"", "empty body"),
    "long-id": (json.dumps({"job_id": "j" * 10_000, "dataset_id": "d" * 10_000}).encode(), ""),
    "bad-base64": (_ce(data_base64="!!! not base64"), "data_base64"),
    "base64-number": (_ce(data_base64=5), "data_base64"),
    "base64-not-json": (_ce(data_base64=base64.b64encode(b"\xff\xfe").decode()), "data_base64"),
    "ce-missing-id": (json.dumps({"specversion": "1.0", "source": "s", "type": "t", "data": {}}).encode(), "id"),
}


async def _raw(settings: Any) -> Any:
    return await nats.connect(**connect_options(settings, "admin"))


async def test_poison_matrix(settings, client, workers, uid) -> None:
    nc = await _raw(settings)
    js = nc.jetstream()
    near_max = b"\xff" * (nc.max_payload - 512)  # non-UTF-8, a few hundred bytes under the limit
    cases: dict[int, tuple[str, str, str]] = {}
    try:
        sub = await nc.subscribe(f"{sj.DEAD_LETTER}.>")
        for subject in SUBJECTS:
            bodies = {**BODIES, "near-max": (near_max, "not UTF-8")}
            if subject in KEY_FIELDS:
                id_field, key_field = KEY_FIELDS[subject]
                for name, (key, expect) in UNSAFE_KEYS.items():
                    body = json.dumps({id_field: f"poison-{uid}", key_field: key}).encode()
                    bodies[name] = (body, f"{key_field}: Value error, unsafe key: {expect}")
            for name, (body, expect) in bodies.items():
                ack = await js.publish(subject, body, headers={"Nats-Msg-Id": f"{uid}-{subject}-{name}"})
                cases[ack.seq] = (subject, name, expect)
        letters: dict[int, dict[str, Any]] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while len(letters) < len(cases) and loop.time() < deadline:
            try:
                m = await sub.next_msg(timeout=max(0.1, deadline - loop.time()))
            except TimeoutError:
                break
            assert len(m.data) <= nc.max_payload
            d = json.loads(m.data)
            if d.get("stream_seq") in cases:
                assert d["stream_seq"] not in letters, f"two dead letters for {cases[d['stream_seq']]}"
                letters[d["stream_seq"]] = d
        missing = [cases[s] for s in cases if s not in letters]
        assert not missing, f"not dead-lettered: {missing}"
        for seq, d in letters.items():
            subject, name, expect = cases[seq]
            assert d["subject"] == subject
            assert d["reason"]["code"] == "invalid_payload", (subject, name, d["reason"])
            assert expect in d["reason"]["message"], (subject, name, d["reason"])
            assert d["num_delivered"] == 1, (subject, name)
            if name == "near-max":
                assert d["body_truncated"] and d["body_size"] == len(near_max)
                key = d["body_key"]
                assert key and await workers_store(settings).get_bytes(key) == near_max
        # nothing redelivered; the dead letters are kept
        assert (await client.js.stream_info(DEAD_LETTERS.name)).state.messages >= len(cases)
        # no document was created for any id a bad body named
        from storage.documents import BaseLLM, Dataset, TuningJob

        poison = f"poison-{uid}"
        assert await TuningJob.find_one({"job_id": poison}) is None
        assert await Dataset.find_one({"dataset_id": poison}) is None
        assert await BaseLLM.find_one({"repo_id": poison}) is None
        # the stages are alive: a redelivery would have shown up as a second letter within the wait
        print(f"poison matrix: {len(cases)} sent, {len(letters)} dead-lettered, 0 redelivered, "
              f"{len(cases) - len(letters)} lost")
    finally:
        await nc.close()


def workers_store(settings: Any) -> Any:
    from storage.objects import ObjectStore

    return ObjectStore(settings)


async def test_malformed_upload_does_not_fail_a_waiting_job(settings, client, workers, store, uid) -> None:
    from storage.documents import TuningJob
    from tests.conftest import TINY_REPO

    ds = f"ds-{uid}"
    job = TuningJob(job_id=f"job-{uid}", base_model=TINY_REPO, dataset_id=ds, status="waiting",
                    hyperparameters={"max_steps": 2, "validation_split": 0}, waiting_for=[f"dataset:{ds}"])
    await job.insert()
    async with client.subscribe([sj.DATASET_FAILED]) as q:
        await client.publish_raw(sj.DATASET_UPLOADED, json.dumps({"dataset_id": ds, "key": 5}).encode())
        with pytest.raises(TimeoutError):
            await client.wait_for(q, lambda _, d: d.get("dataset_id") == ds, 5)
    again = await TuningJob.find_one({"job_id": f"job-{uid}"})
    assert again is not None and again.status == "waiting" and again.error is None
    # the valid upload afterwards still validates, and the waiting job resumes and trains to the end
    key = f"datasets/{ds}/raw.txt"
    await store.put_bytes(key, "".join(f"line {i} of the poison test\n" for i in range(40)).encode())
    async with client.subscribe([sj.DATASET_VALIDATED, sj.TUNING_COMPLETED, sj.TUNING_FAILED]) as q:
        valid = {"dataset_id": ds, "key": key, "name": "raw.txt"}
        await client.publish_raw(sj.DATASET_UPLOADED, json.dumps(valid).encode())
        await client.wait_for(q, lambda subj, d: subj == sj.DATASET_VALIDATED and d.get("dataset_id") == ds, 30)
        _, done = await client.wait_for(q, lambda _, d: d.get("job_id") == f"job-{uid}", 180)
    final = await TuningJob.find_one({"job_id": f"job-{uid}"})
    assert final is not None and final.status == "succeeded", (final and final.error, done)


async def test_dlq_list_and_show(settings, client, workers, uid, capsys) -> None:
    from infra.console import console
    from infra.flows import list_dead_letters, show_dead_letter

    console.width = 250
    body = json.dumps({"dataset_id": f"ds-{uid}", "key": 5, "name": "x"}).encode()
    async with client.subscribe([f"{sj.DEAD_LETTER}.{sj.DATASET_UPLOADED}", sj.DATASET_FAILED]) as q:
        await client.publish_raw(sj.MODEL_PULL_REQUESTED, b"[]")
        ack = await client.publish_raw(sj.DATASET_UPLOADED, body)
        await client.wait_for(q, lambda s, d: s.startswith(sj.DEAD_LETTER) and d.get("stream_seq") == ack.seq, 15)
        _, failed = await client.wait_for(q, lambda s, d: s == sj.DATASET_FAILED and d["dataset_id"] == f"ds-{uid}", 15)
    await asyncio.sleep(1)
    info = await client.js.stream_info(DEAD_LETTERS.name)
    await list_dead_letters(settings, 1, sj.DATASET_UPLOADED)
    out = capsys.readouterr().out
    assert "dataset.uploaded" in out and "invalid_payload" in out
    await list_dead_letters(settings, 1, "")
    assert "more not shown" in capsys.readouterr().out
    seq = info.state.last_seq
    while json.loads((await client.js.get_msg(DEAD_LETTERS.name, seq)).data).get("stream_seq") != ack.seq:
        seq -= 1
    assert failed.error.dead_letter_seq == seq  # the failure names its letter: `codetune dlq show SEQ`
    await show_dead_letter(settings, seq)
    out = capsys.readouterr().out
    assert f"ds-{uid}" in out and "key" in out
