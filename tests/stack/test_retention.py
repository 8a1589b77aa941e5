"""Retention on the real stack: `codetune gc` lists (dry run) and removes what finished jobs no longer need.

The pipeline's own part (a published job leaves no local files and no checkpoints) is asserted by
tests/stack/test_pipeline_stack.py after a real run.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from storage import retention
from storage.documents import TuningJob

pytestmark = pytest.mark.usefixtures("db")


async def codetune(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "infra.cli", *args],
                                   env={**os.environ, **env, "COLUMNS": "250"}, capture_output=True, text=True,
                                   timeout=120)


async def finished_job(store, settings, job_id: str, status: str, age_days: float, steps: tuple[int, ...]) -> None:
    """A job document as the tuning stage leaves it, with checkpoints in the bucket and leftover local files."""
    t = datetime.now(UTC) - timedelta(days=age_days)
    await TuningJob(job_id=job_id, base_model="codetune-test/tiny-llama", dataset_id="ds-x", status=status,
                    adapter_key=f"jobs/{job_id}/adapter" if status == "succeeded" else None,
                    created_at=t, updated_at=t).insert()
    for step in steps:
        await store.put_bytes(f"jobs/{job_id}/checkpoints/step-{step:08d}/adapter_model.safetensors", b"w" * 1000)
    await store.put_bytes(f"jobs/{job_id}/adapter/adapter_model.safetensors", b"a" * 10)
    for folder in retention.job_dirs(settings, job_id):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "leftover.gguf").write_bytes(b"g" * 2000)


async def test_gc_lists_then_removes_what_the_policy_says(env, settings, store, uid) -> None:
    old, recent, done = f"ftjob-old{uid}", f"ftjob-new{uid}", f"ftjob-ok{uid}"
    await finished_job(store, settings, old, "failed", age_days=8, steps=(4, 8))
    await finished_job(store, settings, recent, "cancelled", age_days=1, steps=(4, 8))
    await finished_job(store, settings, done, "succeeded", age_days=0, steps=(8,))

    dry = await codetune(env, "gc", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert all(job in dry.stdout for job in (old, recent, done)) and "would be removed" in dry.stdout
    assert await store.list(f"jobs/{old}/checkpoints/")  # a dry run removes nothing
    assert all(d.exists() for d in retention.job_dirs(settings, old))

    run = await codetune(env, "gc")
    assert run.returncode == 0 and "removed" in run.stdout, run.stdout + run.stderr
    ckpts = {job: sorted({k.split("/")[3] for k, _ in await store.list(f"jobs/{job}/checkpoints/")})
             for job in (old, recent, done)}
    # failed 8 days ago: past the 7 days, nothing kept; cancelled yesterday: its newest checkpoint kept;
    # succeeded: the final adapter is what stays
    assert ckpts == {old: [], recent: ["step-00000008"], done: []}
    for job in (old, recent, done):
        assert await store.list(f"jobs/{job}/adapter/")
        assert not any(d.exists() for d in retention.job_dirs(settings, job))

    again = await codetune(env, "gc", "--dry-run")
    assert old not in again.stdout and done not in again.stdout and recent not in again.stdout


async def test_a_running_job_keeps_everything(settings, store, uid) -> None:
    job_id = f"ftjob-run{uid}"
    await finished_job(store, settings, job_id, "running", age_days=30, steps=(4, 8))
    assert [r for r in await retention.plan(store, settings) if job_id in r.path or job_id in r.reason] == []
