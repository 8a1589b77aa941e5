"""Fast handler unit tests: FastStream's TestNatsBroker in place of NATS, S3 and MongoDB real (the stack).

A handler answers through the publisher its stage declares (handlers.common.Outputs), so the test reads
the answer off that publisher's mock, and off a subscriber on the answer's subject for its headers. The
end-to-end proof on real NATS is tests/stack/test_datasets_stack.py; this one only shows the wiring, fast.

Each check runs in its own interpreter: including a stage's module-level router in a test broker rebinds
its subscribers and publishers to that broker, which must not happen in the process whose `workers`
fixture runs them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

from tests.conftest import ROOT

DATASETS_HANDLER = r'''
import asyncio, sys

from faststream.nats import JStream, NatsBroker, NatsMessage, TestNatsBroker

from events import subjects as sj
from events.envelope import derived_id
from events.payloads import DatasetUploaded, DatasetValidated
from events.streams import DATASETS_UPLOADED, EVENTS
from handlers.common import Services
from handlers.datasets import router as stage
from core.settings import get_settings
from storage.db import init_db
from storage.objects import ObjectStore

DATASET_ID, PARENT = sys.argv[1], "upload-" + sys.argv[1]


async def main() -> None:
    settings = get_settings()
    store = ObjectStore(settings)
    await store.ensure_bucket()
    mongo = await init_db(settings)
    key = f"datasets/{DATASET_ID}/data.jsonl"
    await store.put_bytes(key, b'{"instruction": "Say 1", "input": "", "output": "1"}\n' * 3)

    broker = NatsBroker()
    broker.include_router(stage.router)
    broker.context.set_global("services", Services(settings=settings, store=store))
    headers: list[dict[str, str]] = []

    @broker.subscriber(sj.DATASET_VALIDATED, stream=JStream(EVENTS.name, declare=False))
    async def answered(body: dict, msg: NatsMessage) -> None:
        headers.append(dict(msg.headers))

    event = DatasetUploaded(dataset_id=DATASET_ID, key=key, name="data.jsonl")
    ce = {"ce-specversion": "1.0", "ce-id": PARENT, "ce-source": "/tests", "ce-type": "io.codetune.dataset.uploaded.v1"}
    # a JetStream delivery's reply subject: stream, durable, delivered count, sequences, timestamp, pending
    ack = f"$JS.ACK.{EVENTS.name}.{DATASETS_UPLOADED.durable}.1.7.7.1700000000000000000.0"
    async with TestNatsBroker(broker) as br:
        await br.publish(event.model_dump_json(), sj.DATASET_UPLOADED, headers=ce, reply_to=ack, stream=EVENTS.name)
        validated = stage.outputs.publishers[sj.DATASET_VALIDATED]
        validated.mock.assert_called_once()
        stage.outputs.publishers[sj.DATASET_FAILED].mock.assert_not_called()
        answer = DatasetValidated.model_validate(validated.mock.call_args.args[0])
        assert answer.dataset_id == DATASET_ID and answer.profile.rows == 3, answer
    # binary-mode CloudEvent; the id (and Nats-Msg-Id) derived from the upload it answers
    (h,) = headers
    assert h["Nats-Msg-Id"] == h["ce-id"] == derived_id(PARENT, sj.DATASET_VALIDATED), h
    assert h["ce-type"] == "io.codetune.dataset.validated.v1" and h["ce-source"] == "codetune/datasets", h
    await mongo.close()


asyncio.run(main())
'''


def test_the_datasets_handler_answers_through_its_declared_publisher(env: dict[str, str]) -> None:
    dataset_id = f"unit-{uuid.uuid4().hex[:8]}"
    child_env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", DATASETS_HANDLER, dataset_id], cwd=ROOT, env=child_env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-4000:]
