"""What the kill-and-resume stack tests share: wait until a job trains past a durable checkpoint, and check
that the redelivered job resumed from it and completed once with an unbroken history."""

from __future__ import annotations

import asyncio
from typing import Any

from events import subjects as sj
from storage.documents import TuningJob


async def past_a_checkpoint(job_id: str, tries: int) -> TuningJob:
    """The job's record once it has trained past its first checkpoint (every 0.1 s, `tries` times)."""
    doc = None
    for _ in range(tries):
        doc = await TuningJob.find_one(TuningJob.job_id == job_id)
        if doc and doc.checkpoint_step and doc.step > doc.checkpoint_step:
            break
        await asyncio.sleep(0.1)
    assert doc is not None and doc.checkpoint_step and doc.status == "running"
    return doc


async def assert_resumed_once(subject: str, done: Any, repeats: list[Any], job_id: str, ckpt_step: int,
                              max_steps: int) -> None:
    """Completed once, resumed at or after `ckpt_step`, every step trained once in order, two attempts."""
    assert subject == sj.TUNING_COMPLETED and not repeats, "completed more than once"
    assert done.metrics.resumed_from_step is not None and done.metrics.resumed_from_step >= ckpt_step
    assert done.metrics.steps == max_steps
    steps = [p.step for p in done.loss_history if p.loss is not None]
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == max_steps  # history continues
    doc = await TuningJob.find_one(TuningJob.job_id == job_id)
    assert doc is not None and doc.attempts == 2 and doc.status == "succeeded"
