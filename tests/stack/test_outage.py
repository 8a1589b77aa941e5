"""Outages longer than the old backoff: an unreachable store is retried for the whole retry window.

A stack of its own (one store is stopped mid-test), a datasets worker process configured with a short
window (40 s, delays capped at 2 s): S3 is stopped before an upload is announced and started again only
after the worker has failed more deliveries than the old five-delivery policy allowed. The upload is then
validated, exactly once, and nothing is dead-lettered.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

from events import subjects as sj
from events.payloads import DatasetUploaded
from tests.conftest import WorkerProcess, settings_from, stack_env

OLD_MAX_DELIVER = 5  # the policy before: 5 deliveries, then dead-lettered whatever the error


def _stop_service(stack, name: str) -> None:
    svc = next(s for s in stack.services if s.name == name)
    pid = stack.pid(svc)
    assert pid, f"{name} is not running"
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while stack.pid(svc) and time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    if stack.pid(svc):
        os.killpg(pid, signal.SIGKILL)
    stack._pidfile(svc).unlink(missing_ok=True)


def _failed_deliveries(log: Path, subject: str) -> int:
    text = log.read_text(errors="replace")
    found = re.findall(rf"{re.escape(subject)} failed \(delivery (\d+), store unreachable\)", text)
    return max((int(n) for n in found), default=0)


async def test_an_s3_outage_longer_than_the_old_backoff_loses_nothing(tmp_path: Path) -> None:
    from events.client import CodeTuneClient
    from infra.stack import LocalStack
    from storage.objects import ObjectStore

    env = {**stack_env(tmp_path / "home"), "CODETUNE_RETRY_WINDOW_S": "40", "CODETUNE_RETRY_CAP_S": "2"}
    s = settings_from(env)
    st = LocalStack(s)
    await asyncio.to_thread(st.start, log=lambda _: None)
    worker = None
    c = None
    try:
        store = ObjectStore(s)
        await store.ensure_bucket()
        await store.put_bytes("datasets/ds-outage/o.txt", b"one\ntwo\nthree\n")
        log = tmp_path / "worker.log"
        worker = await asyncio.to_thread(WorkerProcess(env, ["datasets"], log).start)
        c = await CodeTuneClient.connect(s, role="admin")
        info = await c.js.consumer_info("CODETUNE", "datasets-uploaded")
        assert info.config.max_deliver >= 17  # provisioned from the policy: the window, not 5 deliveries

        await asyncio.to_thread(_stop_service, st, "s3")
        async with c.subscribe([sj.DATASET_VALIDATED, sj.DATASET_FAILED, "dlq.>"]) as q:
            await c.publish(DatasetUploaded(dataset_id="ds-outage", key="datasets/ds-outage/o.txt", name="o.txt"))
            deadline = time.monotonic() + 45
            while _failed_deliveries(log, sj.DATASET_UPLOADED) <= OLD_MAX_DELIVER:  # past the old policy's end
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                await asyncio.sleep(0.3)
            down_for = time.monotonic() - (deadline - 45)
            await asyncio.to_thread(st.start, log=lambda _: None)  # S3 back, same data

            subject, done = await c.wait_for(q, lambda _, d: d.get("dataset_id") == "ds-outage"
                                             or "ds-outage" in str(d.get("body", "")), 40)
            await asyncio.sleep(3.0)  # anything else that would come (a second answer, a letter)
            rest = [(sub, d) for sub, d in list(q._queue)
                    if d.get("dataset_id") == "ds-outage" or "ds-outage" in str(d.get("body", ""))]
        assert subject == sj.DATASET_VALIDATED, (subject, done)
        assert done.profile.rows == 3
        assert rest == [], rest  # validated once, nothing dead-lettered
        assert down_for > 7  # longer than the old policy's delays (1 + 2 + 2 + 2 s) with the same cap
    finally:
        if c is not None:
            await c.close()
        if worker is not None:
            await asyncio.to_thread(worker.stop)
        await asyncio.to_thread(st.stop, log=lambda _: None)
