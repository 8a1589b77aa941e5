"""A checkpoint in the bucket is found on resume even when the job's record never named it.

A MongoDB outage while a checkpoint is recorded used to make the redelivered job start again from step 0;
the trainer now lists the job's checkpoint prefix and takes the newest complete checkpoint there.
"""

from __future__ import annotations

import uuid

import pytest
from resume import past_a_checkpoint  # tests/resume.py

from events import subjects as sj
from events.payloads import TuningRequested
from handlers.tuning.runner import latest_checkpoint
from infra.flows import upload_dataset
from storage import keys
from storage.documents import TuningJob
from tests.conftest import TINY_REPO

TERMINAL = [sj.TUNING_COMPLETED, sj.TUNING_FAILED, sj.TUNING_CANCELLED]
MAX = 150  # long enough that the kill lands mid-training (a tiny-model step takes milliseconds idle)


async def test_only_complete_checkpoints_are_found_newest_first(store, uid) -> None:
    job_id = f"ftjob-ck-{uid}"
    assert await latest_checkpoint(store, job_id) is None
    for step in (10, 20):
        await store.put_bytes(f"{keys.checkpoint_prefix(job_id, step)}/adapter_model.safetensors", b"w")
        await store.put_bytes(f"{keys.checkpoint_prefix(job_id, step)}/{keys.CHECKPOINT_STATE_FILE}", b"{}")
    # step 30's upload was cut short: its state file (uploaded last) is missing
    await store.put_bytes(f"{keys.checkpoint_prefix(job_id, 30)}/adapter_model.safetensors", b"w")
    assert await latest_checkpoint(store, job_id) == (keys.checkpoint_prefix(job_id, 20), 20)


@pytest.mark.slow
@pytest.mark.usefixtures("workers")
async def test_a_checkpoint_whose_record_was_never_written_is_resumed_from(
    client, settings, store, tuning_worker, tmp_path
) -> None:
    from devkit.tinymodel import toy_dataset

    path = toy_dataset(tmp_path / "facts.jsonl", "chat", rows=48)
    subject, answer = await upload_dataset(settings, path, "facts.jsonl", "auto", True, 30)
    assert subject == sj.DATASET_VALIDATED
    req = TuningRequested(job_id=f"ftjob-{uuid.uuid4().hex[:12]}", base_model=TINY_REPO, dataset_id=answer.dataset_id,
                          hyperparameters={"max_steps": MAX, "learning_rate": 1e-2, "batch_size": 4,
                                           "eval_steps": 100, "save_steps": 10, "lora_r": 8, "max_seq_len": 128})
    async with client.subscribe([*TERMINAL, sj.progress_subject(req.job_id)]) as q:
        await client.publish(req)
        doc = await past_a_checkpoint(req.job_id, 600)
        tuning_worker.kill9()  # no ack, no goodbye
        in_bucket = await latest_checkpoint(store, req.job_id)
        assert in_bucket is not None and in_bucket[1] >= doc.checkpoint_step
        # the record of every checkpoint was lost (as when MongoDB was down each time one was recorded)
        await TuningJob.get_pymongo_collection().update_one(
            {"job_id": req.job_id}, {"$set": {"checkpoint_key": None, "checkpoint_step": None}})
        tuning_worker.start()  # JetStream redelivers after ack_wait; this worker resumes
        resumed: list[int] = []

        def seen(s: str, d: dict) -> bool:
            if s.startswith(sj.TUNING_PROGRESS) and d.get("message") == "resumed":
                resumed.append(d["step"])
            return s in TERMINAL and d["job_id"] == req.job_id

        subject, done = await client.wait_for(q, seen, 600)  # slow when the machine is shared
    assert subject == sj.TUNING_COMPLETED, done
    assert done.metrics.resumed_from_step == in_bucket[1]  # not from step 0
    assert resumed == [in_bucket[1]]
    steps = [p.step for p in done.loss_history if p.loss is not None]
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == MAX  # history continues, no restart
