"""A clustered NATS: the pipeline on a 3-node JetStream cluster (R3 streams and consumers) loses one node
(kill -9) while training and another while exporting, and the job still completes exactly once.

The cluster is this module's own (`LocalStack(only=("nats",))` on three loopback nodes, as `codetune stack
start --nats-cluster 3` runs it); MongoDB, the bucket and the Ollama endpoint are the session's. Every
stage runs in `codetune worker` processes that know all three URLs (`CODETUNE_NATS_URL`, comma-separated).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest

from events import subjects as sj
from events.payloads import TuningRequested
from events.streams import DEAD_LETTERS, EVENTS, EXPORT_ON_COMPLETED, PROGRESS, TUNING_REQUESTED
from tests.conftest import TINY_REPO, WorkerProcess, settings_from

pytestmark = pytest.mark.slow
NODES = 3


def _free_runs(count: int, length: int) -> list[int]:
    """`count` first ports of `length` consecutive free loopback ports each."""
    out: list[int] = []
    while len(out) < count:
        base = random.randrange(30000, 40000, 10)
        if any(abs(base - o) < 10 for o in out):
            continue
        with socket.socket() as probe:
            if all(probe.connect_ex(("127.0.0.1", base + i)) != 0 for i in range(length)):
                out.append(base)
    return out


@pytest.fixture(scope="module")
async def cluster(env: dict[str, str], db, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SimpleNamespace]:
    from events.client import CodeTuneClient
    from infra.stack import LocalStack

    home = tmp_path_factory.mktemp("nats-cluster")
    port, monitor, route = _free_runs(3, NODES)
    cenv = env | {
        "CODETUNE_HOME": str(home), "CODETUNE_WORK_DIR": str(home / "work"),
        "CODETUNE_STACK_NATS_CLUSTER": str(NODES), "CODETUNE_NATS_REPLICAS": str(NODES),
        "CODETUNE_STACK_NATS_PORT": str(port), "CODETUNE_STACK_NATS_MONITOR_PORT": str(monitor),
        "CODETUNE_STACK_NATS_ROUTE_PORT": str(route),
        "CODETUNE_NATS_URL": ",".join(f"nats://127.0.0.1:{port + i}" for i in range(NODES)),
    }
    s = settings_from(cenv)
    st = LocalStack(s, only=("nats",))
    await asyncio.to_thread(st.start, log=lambda _: None)  # provisions the streams as R3
    c = None
    try:
        c = await CodeTuneClient.connect(s, source="codetune/tests", role="admin", max_reconnect_attempts=-1)
        yield SimpleNamespace(env=cenv, settings=settings_from(cenv), stack=st, client=c, home=home)
    finally:
        if c is not None:
            await c.close()
        await asyncio.to_thread(st.stop, log=lambda _: None)


async def test_streams_consumers_and_receipts_get_the_replicas_of_settings(cluster) -> None:
    """Provisioning reads `CODETUNE_NATS_REPLICAS`; an R1 stream provisioned again as R3 is updated in place,
    its messages kept."""
    from events.streams import RetryPolicy, provision
    from handlers.bridge.receipts import BUCKET, Receipts

    js, retry = cluster.client.js, RetryPolicy.from_settings(cluster.settings)
    assert cluster.settings.nats_replicas == NODES
    for cfg in (EVENTS, PROGRESS, DEAD_LETTERS):
        info = await js.stream_info(cfg.name)
        assert info.config.num_replicas == NODES and len(info.cluster.replicas) == NODES - 1, cfg.name
    assert (await js.consumer_info(EVENTS.name, TUNING_REQUESTED.durable)).config.num_replicas == NODES

    await provision(js, retry, replicas=1)  # what a single-server deployment has
    assert (await js.stream_info(PROGRESS.name)).config.num_replicas == 1
    probe = sj.progress_subject(f"ftjob-probe-{uuid.uuid4().hex[:8]}")
    await js.publish(probe, b"{}")
    await provision(js, retry, replicas=NODES)
    info = await js.stream_info(PROGRESS.name, subjects_filter=probe)
    assert info.config.num_replicas == NODES and info.state.subjects == {probe: 1}
    assert (await js.consumer_info(EVENTS.name, TUNING_REQUESTED.durable)).config.num_replicas == NODES

    await Receipts.open(js, replicas=cluster.settings.nats_replicas)  # the bridge's idempotency bucket
    assert (await js.stream_info(f"KV_{BUCKET}")).config.num_replicas == NODES


def _node(cluster, server_name: str):
    """The stack's service of the node that calls itself `server_name` (`codetune-n2` → `nats-2`)."""
    return next(svc for svc in cluster.stack.nats_nodes() if svc.name == "nats-" + server_name.rsplit("n", 1)[1])


async def _kill_leader(cluster, spare: str | None = None) -> str:
    """kill -9 the node leading the events stream (else, when that is `spare`, the one leading the export
    stage's consumer, else any node but `spare`); returns its name."""
    js = cluster.client.js
    leaders = [(await js.stream_info(EVENTS.name)).cluster.leader,
               (await js.consumer_info(EVENTS.name, EXPORT_ON_COMPLETED.durable)).cluster.leader,
               *(f"codetune-n{i + 1}" for i in range(NODES))]
    victim = next(name for name in leaders if name and name != spare)
    pid = cluster.stack.pid(_node(cluster, victim))
    assert pid
    os.kill(pid, signal.SIGKILL)
    await asyncio.to_thread(os.waitpid, pid, 0)
    return victim


async def _writable(cluster, since: float) -> float:
    """Seconds from `since` until the events stream takes a publish again on the survivors (a new leader
    elected, the test's connection moved if it was on the dead node)."""
    probe = f"model.probe.{uuid.uuid4().hex[:8]}"  # a subject of the events stream no stage consumes
    while True:
        try:
            await cluster.client.js.publish(probe, b"{}", timeout=1)
            return time.monotonic() - since
        except Exception:  # no leader yet, or this connection is moving to a survivor
            assert time.monotonic() - since < 30, "the cluster did not take a write within 30 s of losing a node"
            await asyncio.sleep(0.1)


async def _job(job_id: str):
    from storage.documents import TuningJob

    return await TuningJob.find_one(TuningJob.job_id == job_id)


async def _wait(job_id: str, ok, what: str, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        doc = await _job(job_id)
        if doc is not None and ok(doc):
            return doc
        assert time.monotonic() < deadline, f"job never {what}: {doc and (doc.status, doc.stage, doc.step)}"
        await asyncio.sleep(0.05)


async def _events(js, subject: str, job_id: str | None = None) -> list[tuple[str, dict]]:
    """(event id, body) of every message the events stream holds on `subject` (for `job_id`)."""
    from events.envelope import unwrap

    total = (await js.stream_info(EVENTS.name, subjects_filter=subject)).state.subjects or {}
    sub = await js.subscribe(subject, ordered_consumer=True)
    out = []
    try:
        for _ in range(sum(total.values())):
            msg = await sub.next_msg(timeout=5)
            data, meta = unwrap(msg.data, dict(msg.headers or {}))
            if job_id is None or data.get("job_id") == job_id:
                out.append((meta.id, data))
    finally:
        await sub.unsubscribe()
    return out


async def test_a_job_completes_once_while_nodes_die_during_training_and_export(cluster, tmp_path, capsys) -> None:
    from devkit.tinymodel import toy_dataset
    from infra.flows import upload_dataset
    from storage.documents import ServedModel

    light = WorkerProcess(cluster.env, ["datasets", "intake", "models", "export", "serving"],
                          cluster.home / "stages.log")
    tuning = WorkerProcess(cluster.env, ["tuning"], cluster.home / "tuning.log")
    t0 = time.monotonic()
    await asyncio.gather(asyncio.to_thread(light.start), asyncio.to_thread(tuning.start))
    phases = {"workers up": time.monotonic() - t0}
    try:
        path = toy_dataset(tmp_path / "facts.jsonl", "chat", rows=32, seed=random.randrange(1 << 30))
        subject, answer = await upload_dataset(cluster.settings, path, "facts.jsonl", "auto", True, 60)
        assert subject == sj.DATASET_VALIDATED
        job_id = f"ftjob-{uuid.uuid4().hex[:12]}"
        req = TuningRequested(job_id=job_id, base_model=TINY_REPO, dataset_id=answer.dataset_id,
                              name=f"tiny-{job_id[6:]}",
                              hyperparameters={"max_steps": 20, "learning_rate": 3e-2, "eval_steps": 10,
                                               "batch_size": 2, "save_steps": 5, "max_seq_len": 128,
                                               "eval_samples": 1},
                              export={"gate": False})  # what is tested is the bus: a random dataset may not pass it
        await cluster.client.publish(req)

        await _wait(job_id, lambda d: d.status == "running" and 0 < d.step < d.max_steps, "trained", 90)
        phases["training"] = time.monotonic() - t0
        killed1, at = await _kill_leader(cluster), time.monotonic()
        assert (await _job(job_id)).status == "running"  # the node died mid-training
        recovered1 = await _writable(cluster, at)
        await asyncio.to_thread(cluster.stack.start, log=lambda _: None)  # the node comes back and catches up

        await _wait(job_id, lambda d: d.stage == "exporting", "exported", 120)
        phases["exporting"] = time.monotonic() - t0
        killed2, at = await _kill_leader(cluster, spare=killed1), time.monotonic()
        assert (await _job(job_id)).stage == "exporting" and killed2 != killed1  # another node, mid-export
        recovered2 = await _writable(cluster, at)

        doc = await _wait(job_id, lambda d: d.stage in ("published", "publish_failed", "export_failed")
                          or d.status in ("failed", "cancelled"), "finished", 150)
        phases["published"] = time.monotonic() - t0
        assert (doc.status, doc.stage) == ("succeeded", "published"), doc.error
        js = cluster.client.js
        for subj in (sj.TUNING_COMPLETED, sj.MODEL_EXPORTED, sj.MODEL_PUBLISHED):
            assert len(await _events(js, subj, job_id)) == 1, subj  # nothing lost, nothing duplicated
        for subj in (sj.TUNING_FAILED, sj.MODEL_EXPORT_FAILED, sj.MODEL_PUBLISH_FAILED):
            assert await _events(js, subj, job_id) == [], subj
        # the request, plus the tuning stage's own once the job's model was pulled (the job waited for it)
        requested = await _events(js, sj.TUNING_REQUESTED, job_id)
        waited = len(await _events(js, sj.MODEL_PULL_REQUESTED))  # (this cluster's only job)
        assert len(requested) == 1 + min(waited, 1) and len({i for i, _ in requested}) == len(requested)
        assert (await js.stream_info(DEAD_LETTERS.name)).state.messages == 0
        assert await ServedModel.find(ServedModel.job_id == job_id).count() == 1
        for durable in ("tuning-requested", "export-on-completed", "serving-on-exported"):
            info = await js.consumer_info(EVENTS.name, durable)
            assert info.num_pending == 0 and info.num_ack_pending == 0, durable
        with capsys.disabled():
            print(f"\n[nats-cluster] killed {killed1} mid-training (writes again after {recovered1:.2f} s), "
                  f"{killed2} mid-export ({recovered2:.2f} s); job attempts {doc.attempts}; at "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()))
    finally:
        await asyncio.gather(*(asyncio.to_thread(w.stop) for w in (light, tuning)))
