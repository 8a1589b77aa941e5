"""A tuning job over 2 training ranks (gloo) through a real worker: kill -9 of the worker mid-training takes
its ranks with it, and the next delivery resumes the job from its last checkpoint and completes it once."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from resume import assert_resumed_once, past_a_checkpoint  # tests/resume.py

from events import subjects as sj
from events.payloads import TuningRequested
from infra.flows import upload_dataset
from tests.conftest import TINY_REPO

pytestmark = [pytest.mark.usefixtures("workers", "tuning_worker"), pytest.mark.slow]
TERMINAL = [sj.TUNING_COMPLETED, sj.TUNING_FAILED, sj.TUNING_CANCELLED]
MAX = 120  # a 2-rank tiny-model step takes tens of milliseconds: the kill lands mid-training


@pytest.fixture(scope="module")
async def dataset_id(settings, tmp_path_factory) -> str:
    from devkit.tinymodel import toy_dataset

    path = toy_dataset(tmp_path_factory.mktemp("data") / "facts.jsonl", "chat", rows=48)
    subject, answer = await upload_dataset(settings, path, "facts.jsonl", "auto", True, 30)
    assert subject == sj.DATASET_VALIDATED
    return answer.dataset_id


def ranks_of(worker_pid: int) -> list[int]:
    """Live (not zombie) training ranks whose parent is `worker_pid`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == worker_pid and fields[0] != "Z" and b"handlers.tuning.distributed" in cmd:
            found.append(int(proc.name))
    return found


def alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


async def test_kill_9_of_a_two_rank_worker_leaves_no_rank_and_the_job_resumes_once(
    client, dataset_id, tuning_worker
) -> None:
    req = TuningRequested(job_id=f"ftjob-{uuid.uuid4().hex[:12]}", base_model=TINY_REPO, dataset_id=dataset_id,
                          hyperparameters={"max_steps": MAX, "learning_rate": 1e-2, "batch_size": 4,
                                           "eval_steps": 100, "save_steps": 10, "max_seq_len": 128, "devices": 2})
    async with client.subscribe([*TERMINAL, sj.progress_subject(req.job_id)]) as q:
        await client.publish(req)
        doc = await past_a_checkpoint(req.job_id, 900)
        ckpt_step = doc.checkpoint_step
        ranks = ranks_of(tuning_worker.proc.pid)
        assert len(ranks) == 2, "the job does not train in 2 ranks"

        tuning_worker.kill9()  # no ack, no goodbye: the ranks get SIGKILL from the kernel (PR_SET_PDEATHSIG)
        for _ in range(100):  # 10 s at most; the kernel kills them at once
            if not any(alive(p) for p in ranks):
                break
            await asyncio.sleep(0.1)
        assert not any(alive(p) for p in ranks), "a training rank outlived its worker"

        tuning_worker.start()  # JetStream redelivers after ack_wait; this worker resumes in 2 new ranks
        subject, done = await client.wait_for(q, lambda s, d: s in TERMINAL and d["job_id"] == req.job_id, 240)
        await asyncio.sleep(1)
        repeats = [d for s, d in list(q._queue) if s in TERMINAL]
    await assert_resumed_once(subject, done, repeats, req.job_id, ckpt_step, MAX)
    assert ranks_of(tuning_worker.proc.pid) == []  # the second attempt's ranks are gone too
