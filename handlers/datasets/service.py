"""The datasets stage's work, usable without a broker: store an upload, validate a stored upload."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import IO, Any

from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from core.errors import TransientError
from core.keys import check_key
from events.payloads import (
    DatasetFailed,
    DatasetProfile,
    DatasetUploaded,
    DatasetValidated,
    ErrorInfo,
    LineError,
)
from handlers.datasets.validate import validate_stream
from storage import keys
from storage.documents import Dataset, DatasetContent, now
from storage.objects import ObjectNotFoundError, ObjectStore

log = logging.getLogger("codetune.datasets")


def new_dataset_id() -> str:
    return f"ds-{uuid.uuid4().hex[:20]}"


@dataclass(frozen=True)
class StoredUpload:
    """A file in the bucket under a new dataset id, not announced yet."""

    event: DatasetUploaded
    size: int
    sha256: str


@dataclass(frozen=True)
class SettledUpload:
    """What an upload became: a new dataset (`reused` None), or the dataset that already held these bytes
    (`event` is then that dataset's own upload event; the new copy was removed)."""

    event: DatasetUploaded
    size: int
    sha256: str
    reused: Dataset | None = None


async def store_upload(store: ObjectStore, stream: IO[bytes], filename: str, *, dataset_id: str | None = None,
                       fmt: str = "auto") -> StoredUpload:
    """Stream a file of any size into the bucket (constant memory), hashing it on the way."""
    dataset_id = dataset_id or new_dataset_id()
    key = keys.dataset_key(dataset_id, filename)
    size, sha = await store.put_stream(key, stream, content_type="text/plain")
    event = DatasetUploaded.model_validate({"dataset_id": dataset_id, "key": key, "name": keys.safe_name(filename),
                                            "format": fmt})
    return StoredUpload(event=event, size=size, sha256=sha)


async def _claim(content: str, event: DatasetUploaded) -> DatasetContent:
    """The dataset that holds `content`: this upload's when it is the first, else the earlier one's."""
    coll = DatasetContent.get_pymongo_collection()
    fields = {"content": content, "dataset_id": event.dataset_id, "key": event.key, "name": event.name,
              "created_at": now()}
    for _ in range(3):
        try:
            raw = await coll.find_one_and_update({"content": content}, {"$setOnInsert": fields}, upsert=True,
                                                 return_document=ReturnDocument.AFTER)
            return DatasetContent.model_validate(raw)
        except DuplicateKeyError:  # a concurrent upload of the same bytes inserted first: read its claim
            continue
    raise TransientError(f"could not claim dataset content {content[:16]}")


async def settle_upload(store: ObjectStore, stored: StoredUpload,
                        publish: Callable[[DatasetUploaded], Awaitable[Any]], *, dedupe: bool = True
                        ) -> SettledUpload:
    """Announce and record a stored upload, unless the same bytes (with the same requested format) are
    already a dataset: then that dataset is the answer, with its validation result, and the new copy is
    removed; a different name for the same content is kept as an alias.

    `publish` announces `dataset.uploaded` with an event id derived from the dataset id, so announcing a
    dataset again (its validation still pending, or its uploader stopped between claim and record) is
    deduplicated by the stream. `dedupe=False` (MongoDB unreachable) announces the upload as new."""
    event = stored.event
    if not dedupe:
        await publish(event)
        return SettledUpload(event, stored.size, stored.sha256)
    owner = await _claim(f"{stored.sha256}:{event.format}", event)
    if owner.dataset_id == event.dataset_id:
        await publish(event)
        await record_upload(event, stored.size, stored.sha256)
        return SettledUpload(event, stored.size, stored.sha256)
    await store.remove_prefix(keys.join("datasets", event.dataset_id) + "/")
    original = event.model_copy(update={"dataset_id": owner.dataset_id, "key": owner.key, "name": owner.name})
    existing = await Dataset.find_one(Dataset.dataset_id == owner.dataset_id)
    if existing is None or existing.status == "uploaded":
        await publish(original)
        if existing is None:
            existing = await record_upload(original, stored.size, stored.sha256)
    if event.name != owner.name and event.name not in existing.aliases:
        await Dataset.get_pymongo_collection().update_one(
            {"dataset_id": owner.dataset_id}, {"$addToSet": {"aliases": event.name}, "$set": {"updated_at": now()}})
        existing = existing.model_copy(update={"aliases": [*existing.aliases, event.name]})
    log.info("upload %s has the same content as dataset %s (%s): reused", event.name, owner.dataset_id,
             existing.status)
    return SettledUpload(original, stored.size, stored.sha256, reused=existing)


def answer_of(doc: Dataset) -> DatasetValidated | DatasetFailed | None:
    """The datasets stage's answer for a dataset it already checked (None while it is `uploaded`)."""
    if doc.status == "validated" and doc.profile is not None:
        return DatasetValidated(dataset_id=doc.dataset_id, key=doc.key, name=doc.name,
                                profile=DatasetProfile.model_validate(doc.profile))
    if doc.status == "failed":
        error = ErrorInfo(code=doc.error.code, message=doc.error.message) if doc.error else ErrorInfo(
            code="invalid_dataset", message="the dataset failed validation")
        return DatasetFailed(dataset_id=doc.dataset_id, error=error,
                             line_errors=[LineError.model_validate(e) for e in doc.line_errors])
    return None


async def record_upload(event: DatasetUploaded, size: int | None = None, sha256: str | None = None) -> Dataset:
    """Record an upload as `uploaded` the moment its file is in the bucket, so a listing shows it at once.

    The datasets stage owns its documents; this is its record API for whoever stored the file and knows its
    id (the bridge's upload route calls it before it answers). The alternative — a consumer recording
    `dataset.uploaded` on its own durable — would still leave a window between the answer and the record,
    which the uploader would have to wait out; recording synchronously here has none and costs one write.
    It only ever inserts: a dataset the stage already validated or failed is left as it is, and
    `validate_upload` then moves an `uploaded` record to `validated` / `failed`.
    """
    t = now()
    fields = {"dataset_id": event.dataset_id, "name": event.name, "key": check_key(event.key),
              "status": "uploaded", "size": size, "sha256": sha256, "created_at": t, "updated_at": t}
    raw = await Dataset.get_pymongo_collection().find_one_and_update(
        {"dataset_id": event.dataset_id}, {"$setOnInsert": fields}, upsert=True,
        return_document=ReturnDocument.AFTER)
    return Dataset.model_validate(raw)


async def validate_upload(event: DatasetUploaded, store: ObjectStore, max_errors: int = 20
                          ) -> DatasetValidated | DatasetFailed:
    """Validate and profile the uploaded object; record the Dataset document; return the answer event."""
    key = check_key(event.key)
    try:
        report = await validate_stream(store.iter_chunks(key), event.format, max_errors)
    except ObjectNotFoundError as e:
        # The upload may still be in flight: retried with backoff, then dead-lettered as dataset.failed.
        raise TransientError(f"dataset object {key!r} not found: {e.message}") from e
    common = {"name": event.name, "key": key, "format": report.format}
    if report.ok:
        assert report.profile is not None
        await Dataset.upsert_by(
            {"dataset_id": event.dataset_id},
            {**common, "status": "validated", "size": report.profile.bytes,
             "profile": report.profile.model_dump(), "line_errors": [], "error": None},
            returning=False,
        )
        return DatasetValidated(dataset_id=event.dataset_id, key=key, name=event.name, profile=report.profile)
    error = ErrorInfo(code="invalid_dataset", message=report.summary)
    await Dataset.upsert_by(
        {"dataset_id": event.dataset_id},
        {**common, "status": "failed", "profile": report.profile.model_dump() if report.profile else None,
         "line_errors": [e.model_dump() for e in report.line_errors], "error": error.model_dump()},
        returning=False,
    )
    return DatasetFailed(dataset_id=event.dataset_id, error=error, line_errors=report.line_errors)
