"""NATS permissions on the real stack: the `client` user publishes commands only, stages publish their facts.

The session's stack runs nats-server with the users of infra/natsauth.py. The `client` fixture logs in as
`admin` (it observes everything); the connections under test log in as the users a real process would.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.errors import Error as NatsError

from events import subjects as sj
from events.client import CodeTuneClient
from events.payloads import DatasetUploaded, TuningCancelRequested, TuningRequested
from events.streams import EVENTS
from infra import natsauth
from storage.documents import ServedModel, TuningJob
from tests.conftest import TINY_REPO, free_port

ROOT = Path(__file__).resolve().parents[2]


class Violations:
    """The asynchronous errors the server sent this connection (a refused publish is one)."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    async def record(self, e: Exception) -> None:
        self.errors.append(str(e))


async def _connect(settings: Any, role: str, violations: Violations) -> CodeTuneClient:
    return await CodeTuneClient.connect(settings, source=f"codetune/tests-{role}", role=role,
                                        error_cb=violations.record)


@pytest.fixture
async def as_client(settings) -> AsyncIterator[tuple[CodeTuneClient, Violations]]:
    v = Violations()
    c = await _connect(settings, "client", v)
    yield c, v
    await c.close()


async def _count(client: CodeTuneClient, subject: str) -> int:
    info = await client.js.stream_info(EVENTS.name, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


def test_the_stack_has_auth_and_settings_hold_the_passwords_as_secrets(settings) -> None:
    for role in natsauth.ROLES:
        secret = settings.nats_password_for(role)
        assert secret is not None, role
        assert secret.get_secret_value() not in repr(settings)
    users = settings.nats_users_file
    assert users.stat().st_mode & 0o777 == 0o600
    assert (settings.data_dir / "nats.conf").stat().st_mode & 0o777 == 0o600


async def test_wrong_password_or_no_credentials_are_refused(settings) -> None:
    with pytest.raises(NatsError, match="Authorization Violation"):
        await nats.connect(settings.nats_url, user="client", password="not-the-password", connect_timeout=2,
                           max_reconnect_attempts=0, allow_reconnect=False)
    with pytest.raises(NatsError, match="Authorization Violation"):
        await nats.connect(settings.nats_url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False)


@pytest.mark.parametrize("subject", [sj.MODEL_EXPORTED, sj.TUNING_COMPLETED])
async def test_client_cannot_publish_facts_and_no_stage_reacts(
    as_client, client, workers, db, uid, subject: str
) -> None:
    c, violations = as_client
    job_id = f"ftjob-perm-{uid}"
    body = {"job_id": job_id, "name": f"perm-{uid}", "mode": "merged", "model_key": "/etc/passwd",
            "modelfile_key": f"exports/{job_id}/Modelfile", "template": "{{ .Prompt }}", "stop": [],
            "base_model": TINY_REPO, "sha": "0" * 40, "dataset_id": f"ds-{uid}", "adapter_key": "x",
            "metrics": {}, "loss_history": []}
    before = await _count(client, subject)
    async with client.subscribe(["model.>", "tuning.>", "dlq.>"],
                                accept=lambda _, d: job_id in json.dumps(d)) as seen:
        with pytest.raises((asyncio.TimeoutError, NatsError)):
            await c.js.publish(subject, json.dumps(body).encode(), timeout=2)
        await asyncio.sleep(2)
        assert seen.empty(), f"a stage reacted: {seen.get_nowait()}"
    assert any("permissions violation" in e.lower() and subject in e for e in violations.errors), violations.errors
    assert await _count(client, subject) == before  # nothing reached the stream
    assert await TuningJob.find_one(TuningJob.job_id == job_id) is None
    assert await ServedModel.find_one(ServedModel.name == f"perm-{uid}") is None
    # the connection survives a refused publish: the client can still publish a command
    cancel = await c.publish(TuningCancelRequested(job_id=job_id))
    assert cancel.seq


async def test_client_publishes_commands_and_the_stages_answer(as_client, client, workers, store, uid) -> None:
    c, violations = as_client
    key = f"datasets/ds-{uid}/perm.txt"
    await store.put_bytes(key, b"hello\nworld\n")
    async with c.subscribe([sj.DATASET_VALIDATED, sj.DATASET_FAILED],
                           accept=lambda _, d: d.get("dataset_id") == f"ds-{uid}") as q:
        pub = await c.publish(DatasetUploaded(dataset_id=f"ds-{uid}", key=key, name="perm.txt"))
        assert pub.seq
        subject, _ = await c.wait_for(q, lambda *_: True, 60)
    assert subject == sj.DATASET_VALIDATED  # the datasets stage (user `stages`) published its fact
    job = TuningRequested(job_id=f"ftjob-perm-{uid}", base_model=TINY_REPO, dataset_id=f"ds-{uid}", export=None)
    assert (await c.publish(job)).seq
    assert (await c.publish(TuningCancelRequested(job_id=job.job_id or ""))).seq
    assert not violations.errors


async def test_a_stage_user_publishes_only_its_own_facts(settings, client, uid) -> None:
    v = Violations()
    datasets = await _connect(settings, "datasets", v)
    try:
        before = await _count(client, sj.MODEL_EXPORTED)
        with pytest.raises((asyncio.TimeoutError, NatsError)):
            await datasets.js.publish(sj.MODEL_EXPORTED, b"{}", timeout=2)
        with pytest.raises((asyncio.TimeoutError, NatsError)):
            await datasets.js.publish(sj.TUNING_REQUESTED, b"{}", timeout=2)
        assert await _count(client, sj.MODEL_EXPORTED) == before
        assert sum("permissions violation" in e.lower() for e in v.errors) == 2, v.errors
        # nor may it reconfigure or delete a stream
        with pytest.raises((asyncio.TimeoutError, NatsError)):
            await datasets.js.purge_stream(EVENTS.name)
        assert (await client.js.stream_info(EVENTS.name)).config.name == EVENTS.name
    finally:
        await datasets.close()


def test_the_permission_model_follows_the_contract() -> None:
    assert natsauth.emits("client") == sorted(
        [sj.DATASET_UPLOADED, sj.MODEL_PULL_REQUESTED, sj.MODEL_PUSH_REQUESTED, sj.TUNING_REQUESTED,
         sj.TUNING_CANCEL_REQUESTED,
         sj.OLLAMA_MODELS, sj.OLLAMA_PULL, sj.OLLAMA_SHOW, sj.OLLAMA_DELETE, sj.OLLAMA_CHAT, sj.OLLAMA_CREATE])
    assert natsauth.emits("export") == sorted([sj.MODEL_EVALUATED, sj.MODEL_EXPORTED, sj.MODEL_EXPORT_FAILED, "dlq.>"])
    assert sj.TUNING_EVALUATED in natsauth.emits("tuning") and sj.MODEL_EVALUATED not in natsauth.emits("client")
    assert sj.MODEL_EXPORTED not in natsauth.permissions("client")["publish"]["allow"]
    assert sj.TUNING_COMPLETED not in natsauth.permissions("client")["publish"]["allow"]
    # the ollama stage answers the ollama.* requests and publishes only its replies (no fact, no ack);
    # serving no longer listens to them
    ollama = natsauth.permissions("ollama")
    assert ollama["publish"]["allow"] == [natsauth.JS_API, natsauth.INBOX]
    assert ollama["subscribe"]["allow"] == [
        *sorted([sj.OLLAMA_CHAT, sj.OLLAMA_CREATE, sj.OLLAMA_DELETE, sj.OLLAMA_MODELS, sj.OLLAMA_PULL, sj.OLLAMA_SHOW]),
        natsauth.INBOX]
    assert natsauth.permissions("serving")["subscribe"]["allow"] == [sj.MODEL_EXPORTED, natsauth.INBOX]


def test_deploy_manifests_carry_the_same_permission_model() -> None:
    conf = natsauth.render_conf()
    assert (ROOT / "infra/deploy/nats-auth.conf").read_text() == conf, "run: python -m infra.natsauth"
    k8s = (ROOT / "infra/deploy/k8s/nats.yaml").read_text()
    assert "\n".join("    " + line if line else "" for line in conf.splitlines()) in k8s
    for role in natsauth.ROLES:
        assert natsauth.password_env(role) in k8s


async def test_a_nats_without_auth_still_works(settings, tmp_path) -> None:
    """An external NATS with no users accepts the role credentials a process sends."""
    from infra.stack import _bin

    port = free_port()
    proc = await asyncio.create_subprocess_exec(_bin("nats-server"), "-a", "127.0.0.1", "-p", str(port),
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        other = settings.model_copy(update={"nats_url": f"nats://127.0.0.1:{port}"})
        for _ in range(50):
            try:
                c = await CodeTuneClient.connect(other, role="tuning")
                break
            except Exception:
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("bare nats-server did not start")
        sub = await c.nc.subscribe("model.exported")
        await c.nc.publish("model.exported", b"{}")
        msg = await sub.next_msg(timeout=2)
        assert msg.data == b"{}"
        await c.close()
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


async def test_client_cannot_touch_streams_or_stage_consumers_but_reads_them(as_client, client) -> None:
    from nats.js.api import ConsumerConfig

    from events.streams import DEAD_LETTERS, TUNING_REQUESTED

    c, violations = as_client
    with pytest.raises((asyncio.TimeoutError, NatsError)):
        await c.js.delete_stream(EVENTS.name)
    with pytest.raises((asyncio.TimeoutError, NatsError)):  # hijack a stage's durable with another filter
        await c.js.add_consumer(EVENTS.name, ConsumerConfig(durable_name=TUNING_REQUESTED.durable,
                                                            filter_subject=sj.MODEL_EXPORTED))
    assert sum("permissions violation" in e.lower() for e in violations.errors) == 2, violations.errors
    info = await client.js.consumer_info(EVENTS.name, TUNING_REQUESTED.durable)
    assert info.config.filter_subject == sj.TUNING_REQUESTED
    # reading is allowed: what `codetune dlq list` does
    assert (await c.js.stream_info(DEAD_LETTERS.name)).config.name == DEAD_LETTERS.name


def test_the_stacks_passwords_are_never_offered_to_another_server(env) -> None:
    from tests.conftest import settings_from

    local = settings_from(env)
    remote = settings_from({**env, "CODETUNE_NATS_URL": "nats://nats.example.org:4222"})
    assert local.nats_password_for("client") is not None
    assert all(remote.nats_password_for(role) is None for role in natsauth.ROLES)
