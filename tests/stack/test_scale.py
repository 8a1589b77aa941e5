"""Scale to zero on the real stack: `codetune worker --exit-when-idle SECONDS` as a real process.

A stack of its own (the session's in-process workers would otherwise take the messages): the datasets
stage has no worker at all until the test starts one; likewise serving and the always-on ollama stage,
each run alone to show the request-reply subjects are the ollama stage's and `model.exported` serving's.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from core.errors import CodeTuneError
from events import subjects as sj
from events.payloads import ChatMessage, DatasetUploaded, ModelExported, OllamaChatRequest, OllamaListRequest
from events.streams import DATASETS_UPLOADED, SERVING_ON_EXPORTED
from tests.conftest import WorkerProcess, settings_from, stack_env

IDLE_S = 3.0


@pytest.fixture(scope="module")
async def own_stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SimpleNamespace]:
    from events.client import CodeTuneClient
    from events.streams import provision
    from infra.stack import LocalStack
    from storage.objects import ObjectStore

    home = tmp_path_factory.mktemp("scale-stack")
    env = stack_env(home) | {"CODETUNE_WORK_DIR": str(home / "work")}
    s = settings_from(env)
    st = LocalStack(s)
    await asyncio.to_thread(st.start, log=lambda _: None)
    try:
        store = ObjectStore(s)
        await store.ensure_bucket()
        c = await CodeTuneClient.connect(s, source="codetune/tests", role="admin")
        await provision(c.js)
        yield SimpleNamespace(env=env, settings=s, store=store, client=c, home=home)
        await c.close()
    finally:
        await asyncio.to_thread(st.stop, log=lambda _: None)


def _spawn(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "infra.cli", "worker", "datasets", "--access-log", *args],
                            env={**os.environ, **env}, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


async def _documents(settings, dataset_id: str) -> int:
    # raw pymongo: initialising Beanie here would rebind the session's documents to this stack
    from pymongo import AsyncMongoClient

    mongo: AsyncMongoClient = AsyncMongoClient(settings.mongodb_uri)
    try:
        return await mongo[settings.mongodb_db].datasets.count_documents({"dataset_id": dataset_id})
    finally:
        await mongo.close()


async def _upload(stack: SimpleNamespace, dataset_id: str, body: bytes) -> None:
    key = f"datasets/{dataset_id}/f.txt"
    await stack.store.put_bytes(key, body)
    await stack.client.publish(DatasetUploaded(dataset_id=dataset_id, key=key, name="f.txt"))


async def test_a_message_published_with_no_worker_is_handled_once_by_a_worker_started_later_which_then_exits(
    own_stack: SimpleNamespace, uid: str, tmp_path: Path
) -> None:
    c = own_stack.client
    first, second = f"ds-{uid}-a", f"ds-{uid}-b"
    async with c.subscribe([sj.DATASET_VALIDATED]) as q:
        await _upload(own_stack, first, b"one\ntwo\n")  # nobody consumes datasets.uploaded yet
        await asyncio.sleep(0.5)
        info = await c.js.consumer_info(DATASETS_UPLOADED.stream, DATASETS_UPLOADED.durable)
        assert info.num_pending == 1 and info.delivered.consumer_seq == 0  # it waits in JetStream
        assert q.empty()

        log = tmp_path / "worker.log"
        proc = _spawn(own_stack.env, log, "--exit-when-idle", str(IDLE_S))
        try:
            _, ok = await c.wait_for(q, lambda _, d: d["dataset_id"] == first, 60)
            assert ok.profile.rows == 2
            # activity inside the quiet period restarts it: this one is handled too, by the same worker
            await asyncio.sleep(IDLE_S / 2)
            assert proc.poll() is None
            await _upload(own_stack, second, b"x\ny\nz\n")
            _, ok2 = await c.wait_for(q, lambda _, d: d["dataset_id"] == second, 30)
            handled_at = time.monotonic()
            assert ok2.profile.rows == 3
            rc = await asyncio.to_thread(proc.wait, 60)
            quiet = time.monotonic() - handled_at
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        await asyncio.sleep(0.5)
        assert q.empty(), "an upload was answered twice"
    text = log.read_text(errors="replace")
    assert rc == 0, text[-3000:]
    assert quiet >= IDLE_S - 0.5, f"exited {quiet:.1f}s after its last message (idle period {IDLE_S}s)"
    assert "exiting" in text and "2 message(s) handled" in text, text[-3000:]
    assert text.count("- Received") == 2  # each message delivered to it once
    # nothing held, nothing pending, nothing redelivered: the consumer is exactly where a clean stop leaves it
    info = await c.js.consumer_info(DATASETS_UPLOADED.stream, DATASETS_UPLOADED.durable)
    assert (info.num_pending, info.num_ack_pending, info.num_redelivered) == (0, 0, 0)
    assert info.delivered.consumer_seq == 2
    assert [await _documents(own_stack.settings, d) for d in (first, second)] == [1, 1]

    # at zero again: the next upload waits until a worker is started, and that worker handles it
    third = f"ds-{uid}-c"
    async with c.subscribe([sj.DATASET_VALIDATED]) as q:
        await _upload(own_stack, third, b"later\n")
        proc = _spawn(own_stack.env, tmp_path / "worker2.log", "--exit-when-idle", "1")
        try:
            _, ok3 = await c.wait_for(q, lambda _, d: d["dataset_id"] == third, 60)
            assert ok3.profile.rows == 1
            assert await asyncio.to_thread(proc.wait, 60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    info = await c.js.consumer_info(DATASETS_UPLOADED.stream, DATASETS_UPLOADED.durable)
    assert (info.num_pending, info.num_ack_pending, info.num_redelivered) == (0, 0, 0)


def _exported(job_id: str) -> ModelExported:
    return ModelExported(job_id=job_id, name=job_id.lower(), mode="adapter", model_key=f"exports/{job_id}/base.gguf",
                         modelfile_key=f"exports/{job_id}/Modelfile", template="{{ .Prompt }}", stop=[])


async def test_the_ollama_requests_are_the_always_on_stage_s_and_serving_only_handles_model_exported(
    own_stack: SimpleNamespace, ollama_host: str, uid: str, tmp_path: Path
) -> None:
    """The split is real: the ollama stage alone answers ollama.* (from Ollama) and leaves `model.exported`
    waiting in JetStream; serving alone handles that `model.exported` and nobody answers ollama.*, so
    serving can sit at zero pods while list/chat keep working."""
    from nats.errors import NoRespondersError

    c, env = own_stack.client, own_stack.env | {"CODETUNE_OLLAMA_HOST": ollama_host}
    job = f"job-{uid}"
    ollama = await asyncio.to_thread(WorkerProcess(env, ["ollama"], tmp_path / "ollama.log").start)
    try:
        assert isinstance(await c.request(sj.OLLAMA_MODELS, OllamaListRequest(), timeout=30), list)
        with pytest.raises(CodeTuneError) as chat:  # Ollama's own answer, relayed: there is no such model
            await c.request(sj.OLLAMA_CHAT, OllamaChatRequest(
                model=f"nosuch-{uid}", messages=[ChatMessage(role="user", content="hi")]), timeout=30)
        assert chat.value.code == "ollama_model_not_found" and "not found" in chat.value.message
        await c.publish(_exported(job))  # no serving worker: it waits in serving's durable
        await asyncio.sleep(1.0)
        info = await c.js.consumer_info(SERVING_ON_EXPORTED.stream, SERVING_ON_EXPORTED.durable)
        assert (info.num_pending, info.num_ack_pending) == (1, 0)
    finally:
        ollama.stop()

    async with c.subscribe([sj.dead_letter_subject(sj.MODEL_EXPORTED)], accept=lambda _, d: job in str(d)) as q:
        serving = await asyncio.to_thread(WorkerProcess(env, ["serving"], tmp_path / "serving.log").start)
        try:
            _, letter = await c.wait_for(q, lambda *_: True, 30)  # an unknown job: dead-lettered, nothing else
            assert letter.reason.code == "job_not_found" and letter.subject == sj.MODEL_EXPORTED
            with pytest.raises(NoRespondersError):
                await c.nc.request(sj.OLLAMA_MODELS, b"{}", timeout=5)
        finally:
            serving.stop()
    info = await c.js.consumer_info(SERVING_ON_EXPORTED.stream, SERVING_ON_EXPORTED.durable)
    assert (info.num_pending, info.num_ack_pending, info.num_redelivered) == (0, 0, 0)


def test_exit_when_idle_rejects_a_non_positive_period(own_stack: SimpleNamespace) -> None:
    out = subprocess.run([sys.executable, "-m", "infra.cli", "worker", "datasets", "--exit-when-idle", "0"],
                         env={**os.environ, **own_stack.env}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "exit-when-idle" in (out.stdout + out.stderr)


class _Msg:
    """The few attributes of a FastStream NatsMessage the drain path reads (no broker involved)."""

    def __init__(self, reply: str) -> None:
        self.raw_message = SimpleNamespace(reply=reply, subject=sj.DATASET_UPLOADED)
        self.nacked = 0

    async def nack(self) -> None:
        self.nacked += 1


async def test_a_message_fetched_while_stopping_is_handed_back_not_held() -> None:
    from handlers.idle import IdleTracker

    tracker = IdleTracker(1.0)
    handled: list[object] = []

    async def handler(msg: object) -> str:
        handled.append(msg)
        return "done"

    js_msg, core_msg = _Msg("$JS.ACK.CODETUNE.datasets-uploaded.1.1.1.0.0"), _Msg("_INBOX.abc")
    mw = tracker.middleware(js_msg.raw_message, context=None)
    assert await mw.consume_scope(handler, js_msg) == "done"  # running: handled as usual
    tracker.draining = True
    assert await mw.consume_scope(handler, js_msg) is None and js_msg.nacked == 1  # stopping: nak'ed at once
    assert await mw.consume_scope(handler, core_msg) == "done"  # a request-reply is answered, not dropped
    assert handled == [js_msg, core_msg]


INDEXES = """import asyncio, json, sys
from core.settings import Settings
from storage.db import META_COLLECTION, init_db

async def main():
    s = Settings(_env_file=None)
    mode = sys.argv[1]
    db_ = (await init_db(s, sync_indexes={"auto": None, "sync": True}[mode]))[s.mongodb_db]
    if len(sys.argv) > 2:  # tamper, then report
        await db_.datasets.drop_index(sys.argv[2])
    names = sorted((await db_.datasets.index_information()).keys())
    marker = await db_[META_COLLECTION].find_one({"_id": "indexes"})
    print(json.dumps({"names": names, "digest": marker and marker["digest"]}))

asyncio.run(main())
"""


def _indexes(env: dict[str, str], *args: str) -> dict:
    import json

    out = subprocess.run([sys.executable, "-c", INDEXES, *args], env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_indexes_are_synced_once_per_document_definition_not_on_every_start(own_stack: SimpleNamespace) -> None:
    from storage.db import documents_digest

    env = own_stack.env | {"CODETUNE_MONGODB_DB": "codetune_indexes"}  # a database no worker has touched
    first = _indexes(env, "auto")
    assert first["digest"] == documents_digest()
    unique = [n for n in first["names"] if n != "_id_"]
    assert unique, first  # the documents' own indexes exist after the first start
    # a later start with the same definitions skips the sync: an index dropped behind its back stays dropped
    dropped = unique[0]
    assert dropped not in _indexes(env, "auto", dropped)["names"]
    assert dropped not in _indexes(env, "auto")["names"]
    # `sync_indexes=True` forces a sync; and a stale digest (other document definitions) syncs on the next start
    assert _indexes(env, "sync")["names"] == first["names"]
    _indexes(env, "auto", dropped)
    from pymongo import MongoClient

    with MongoClient(own_stack.settings.mongodb_uri) as mc:
        mc["codetune_indexes"]["codetune_meta"].update_one({"_id": "indexes"}, {"$set": {"digest": "older"}})
    assert _indexes(env, "auto")["names"] == first["names"]
