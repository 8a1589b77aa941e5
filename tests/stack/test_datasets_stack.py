"""The datasets stage end to end on the real stack: S3 → dataset.uploaded → handler → Mongo → answer."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from events import subjects as sj
from events.payloads import DatasetUploaded
from events.streams import CONSUMERS, DATASETS_UPLOADED, DEAD_LETTERS
from infra.flows import upload_dataset
from storage.documents import Dataset

pytestmark = pytest.mark.usefixtures("workers")


def write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def chat_line(q: str, a: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})


@pytest.mark.parametrize(
    ("fmt", "lines", "rows", "roles"),
    [
        ("text", ["the sky is blue", "grass is green", "", "snow is white"], 3, {}),
        ("alpaca", [json.dumps({"instruction": f"Say {i}", "input": "", "output": str(i)}) for i in range(5)], 5, {}),
        ("chat", [chat_line(f"q{i}", f"a{i}") for i in range(4)], 4, {"user": 4, "assistant": 4}),
    ],
)
async def test_upload_each_format_gives_a_validated_document(settings, tmp_path, fmt, lines, rows, roles) -> None:
    path = write(tmp_path, f"data-{fmt}.jsonl", lines)
    subject, answer = await upload_dataset(settings, path, None, "auto", True, 30)
    assert subject == sj.DATASET_VALIDATED
    assert answer.profile.format == fmt and answer.profile.rows == rows and answer.profile.roles == roles
    doc = await Dataset.find_one(Dataset.dataset_id == answer.dataset_id)
    assert doc is not None and doc.status == "validated"
    assert doc.profile["rows"] == rows and doc.profile["bytes"] == path.stat().st_size
    assert doc.profile["tokens_estimate"] > 0 and doc.format == fmt


async def test_bad_lines_fail_the_dataset_naming_the_lines(settings, tmp_path) -> None:
    path = write(tmp_path, "bad.jsonl", [chat_line("q", "a"), "{oops", chat_line("q2", "a2"),
                                         json.dumps({"messages": [{"role": "user", "content": "no answer"}]})])
    subject, answer = await upload_dataset(settings, path, "bad", "auto", True, 30)
    assert subject == sj.DATASET_FAILED
    assert [(e.line, e.message.split(":")[0]) for e in answer.line_errors] == [
        (2, "invalid JSON"), (4, "no assistant message")]
    assert answer.error.code == "invalid_dataset" and "2 of 4 lines are invalid" in answer.error.message
    doc = await Dataset.find_one(Dataset.dataset_id == answer.dataset_id)
    assert doc.status == "failed" and [e["line"] for e in doc.line_errors] == [2, 4]


async def _consumer_state(client, durable: str):
    return await client.js.consumer_info(DATASETS_UPLOADED.stream, durable)


async def test_malformed_messages_are_dead_lettered_once_with_reason(client, uid) -> None:
    bodies = [b"{this is not json " + uid.encode(), json.dumps({"dataset_id": "x", "uid": uid}).encode()]
    async with client.subscribe([sj.dead_letter_subject(sj.DATASET_UPLOADED)]) as q:
        for body in bodies:
            await client.publish_raw(sj.DATASET_UPLOADED, body)  # exactly what `nats pub` sends
        letters = [await client.wait_for(q, lambda _, d: uid in d["body"], 10) for _ in bodies]
        await asyncio.sleep(DATASETS_UPLOADED.ack_wait_s / 10)
        assert q.empty(), "a malformed message was dead-lettered twice"
    reasons = {letter.reason.message.split(":")[0] for _, letter in letters}
    assert reasons == {"invalid JSON", "dataset_id"}
    schema = next(letter for _, letter in letters if letter.reason.code == "invalid_payload"
                  and "dataset_id" in letter.reason.message)
    assert "key: Field required" in schema.reason.message and schema.num_delivered == 1
    info = await _consumer_state(client, DATASETS_UPLOADED.durable)
    assert info.num_ack_pending == 0 and info.num_redelivered == 0
    # the dead letters themselves are kept in their own stream
    dlq = await client.js.stream_info(DEAD_LETTERS.name)
    assert dlq.state.messages >= 2


async def test_schema_invalid_upload_that_names_its_dataset_gets_dataset_failed(client, uid) -> None:
    async with client.subscribe([sj.DATASET_FAILED]) as q:
        await client.publish_raw(sj.DATASET_UPLOADED, json.dumps({"dataset_id": f"ds-{uid}", "name": "x"}).encode())
        _, failed = await client.wait_for(q, lambda _, d: d["dataset_id"] == f"ds-{uid}", 10)
    assert failed.error.code == "invalid_payload" and "key" in failed.error.message


async def test_raw_headerless_publish_is_handled(client, store, uid) -> None:
    key = f"datasets/ds-{uid}/raw.txt"
    await store.put_bytes(key, b"one\ntwo\n")
    async with client.subscribe([sj.DATASET_VALIDATED]) as q:
        body = json.dumps({"dataset_id": f"ds-{uid}", "key": key, "name": "raw.txt"}).encode()
        ack = await client.publish_raw(sj.DATASET_UPLOADED, body)  # no headers at all
        _, ok = await client.wait_for(q, lambda _, d: d["dataset_id"] == f"ds-{uid}", 10)
    assert ok.profile.rows == 2 and ack.seq > 0


async def test_the_same_event_twice_changes_nothing(client, store, uid) -> None:
    key = f"datasets/ds-{uid}/twice.txt"
    await store.put_bytes(key, b"a\nb\nc\n")
    event = DatasetUploaded(dataset_id=f"ds-{uid}", key=key, name="twice.txt")
    async with client.subscribe([sj.DATASET_VALIDATED]) as q:
        first = await client.publish(event, event_id=f"evt-{uid}")
        second = await client.publish(event, event_id=f"evt-{uid}")  # same id: JetStream drops it
        third = await client.publish(event)  # a new id for the same upload: handled, still one document
        answers = [await client.wait_for(q, lambda _, d: d["dataset_id"] == f"ds-{uid}", 10) for _ in range(2)]
    assert not first.duplicate and second.duplicate and not third.duplicate
    assert len(await Dataset.find(Dataset.dataset_id == f"ds-{uid}").to_list()) == 1
    assert all(a.profile.rows == 3 for _, a in answers)


async def test_missing_object_is_retried_then_succeeds_when_it_appears(client, store, uid) -> None:
    key = f"datasets/ds-{uid}/late.txt"
    async with client.subscribe([sj.DATASET_VALIDATED]) as q:
        await client.publish(DatasetUploaded(dataset_id=f"ds-{uid}", key=key, name="late.txt"))
        await asyncio.sleep(0.5)
        await store.put_bytes(key, b"finally here\n")  # arrives after the event: nak + redelivery
        _, ok = await client.wait_for(q, lambda _, d: d["dataset_id"] == f"ds-{uid}", 20)
    assert ok.profile.rows == 1


def test_every_consumer_subject_is_in_a_stream() -> None:
    from events.streams import STREAMS

    for c in CONSUMERS:
        stream = next(s for s in STREAMS if s.name == c.stream)
        assert any(c.subject == subj or (subj.endswith(">") and c.subject.startswith(subj[:-1]))
                   for subj in stream.subjects)
