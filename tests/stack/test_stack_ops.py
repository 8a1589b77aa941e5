"""The local stack itself, and scale-out: stop/start keeps data; two workers share one durable consumer."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from events import subjects as sj
from events.payloads import DatasetUploaded
from tests.conftest import WorkerProcess, settings_from, stack_env


async def test_stop_and_start_keeps_documents_objects_and_streams(tmp_path: Path) -> None:
    from pymongo import AsyncMongoClient

    from events.client import CodeTuneClient
    from events.streams import EVENTS, provision
    from infra.stack import LocalStack
    from storage.objects import ObjectStore

    env = stack_env(tmp_path / "home")
    s = settings_from(env)
    st = LocalStack(s)
    await asyncio.to_thread(st.start, log=lambda _: None)
    worker = None
    try:
        store = ObjectStore(s)
        await store.ensure_bucket()
        await store.put_bytes("datasets/ds-keep/k.txt", b"kept\n")
        # raw pymongo: re-initialising Beanie here would rebind the session's documents to this stack
        mongo: AsyncMongoClient = AsyncMongoClient(s.mongodb_uri)
        await mongo[s.mongodb_db].datasets.insert_one({"dataset_id": "ds-keep", "name": "k.txt"})
        await mongo.close()
        c = await CodeTuneClient.connect(s)
        await provision(c.js)
        ack = await c.publish(DatasetUploaded(dataset_id="ds-keep", key="datasets/ds-keep/k.txt", name="k.txt"))
        await c.close()
        worker = await asyncio.to_thread(WorkerProcess(env, ["datasets"], tmp_path / "worker.log").start)

        await asyncio.to_thread(st.stop, log=lambda _: None)
        assert not any(v["pid"] for v in st.status().values())
        await asyncio.to_thread(st.start, log=lambda _: None)  # same folder, same ports

        assert await ObjectStore(s).get_bytes("datasets/ds-keep/k.txt") == b"kept\n"
        mongo = AsyncMongoClient(s.mongodb_uri)
        doc = await mongo[s.mongodb_db].datasets.find_one({"dataset_id": "ds-keep"})
        assert doc is not None and doc["name"] == "k.txt"
        await mongo.close()
        c = await CodeTuneClient.connect(s)
        msg = await c.js.get_msg(EVENTS.name, ack.seq)
        assert json.loads(msg.data)["dataset_id"] == "ds-keep"
        # the worker lived through the restart: it reconnects and handles new work
        await store.put_bytes("datasets/ds-after/a.txt", b"after\nrestart\n")
        async with c.subscribe(["dataset.validated"]) as q:
            await c.publish(DatasetUploaded(dataset_id="ds-after", key="datasets/ds-after/a.txt", name="a.txt"))
            _, ok = await c.wait_for(q, lambda _, d: d["dataset_id"] == "ds-after", 60)
        assert ok.profile.rows == 2
        await c.close()
        # start is idempotent: a second start leaves the running services alone
        pids = {k: v["pid"] for k, v in st.status().items()}
        await asyncio.to_thread(st.start, log=lambda _: None)
        assert {k: v["pid"] for k, v in st.status().items()} == pids
    finally:
        if worker is not None:
            await asyncio.to_thread(worker.stop)
        await asyncio.to_thread(st.stop, log=lambda _: None)


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "Received":
            self.n += 1


def _spawn_worker(env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "infra.cli", "worker", "datasets", "--access-log"],
        env={**os.environ, **env}, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
    )


def _wait_ready(log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while "started successfully" not in log.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise TimeoutError(log.read_text())
        time.sleep(0.1)


@pytest.mark.usefixtures("workers")
async def test_two_worker_processes_share_the_durable_and_handle_each_message_once(
    env, client, store, tmp_path, uid
) -> None:
    counter = _Count()
    logging.getLogger("faststream.access.nats").addHandler(counter)
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    procs = [_spawn_worker(env, log) for log in logs]
    try:
        for log in logs:
            await asyncio.to_thread(_wait_ready, log)
        n = 40
        ids = [f"ds-{uid}-{i}" for i in range(n)]
        for ds in ids:
            await store.put_bytes(f"datasets/{ds}/f.txt", b"x\ny\n")
        async with client.subscribe([sj.DATASET_VALIDATED]) as q:
            for ds in ids:
                await client.publish(DatasetUploaded(dataset_id=ds, key=f"datasets/{ds}/f.txt", name="f.txt"))
            seen = [await client.wait_for(q, lambda _, d: d["dataset_id"].startswith(f"ds-{uid}-"), 30)
                    for _ in range(n)]
            await asyncio.sleep(1.0)
            assert q.empty(), "some message was handled twice"
        assert sorted(e.dataset_id for _, e in seen) == sorted(ids)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        logging.getLogger("faststream.access.nats").removeHandler(counter)
    per_worker = [log.read_text().count("- Received") for log in logs]
    assert all(c > 0 for c in per_worker), per_worker  # both processes took a share
    assert sum(per_worker) + counter.n == n
