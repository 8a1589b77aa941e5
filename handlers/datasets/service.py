"""The datasets stage's work, usable without a broker: store an upload, validate a stored upload."""

from __future__ import annotations

import uuid
from typing import IO

from pymongo import ReturnDocument

from core.errors import TransientError
from core.keys import check_key
from events.payloads import DatasetFailed, DatasetUploaded, DatasetValidated, ErrorInfo
from handlers.datasets.validate import validate_stream
from storage import keys
from storage.documents import Dataset, now
from storage.objects import ObjectNotFoundError, ObjectStore


def new_dataset_id() -> str:
    return f"ds-{uuid.uuid4().hex[:20]}"


async def store_upload(store: ObjectStore, stream: IO[bytes], filename: str, *, dataset_id: str | None = None,
                       fmt: str = "auto") -> DatasetUploaded:
    """Stream a file of any size into the bucket (constant memory) and describe it as an event."""
    dataset_id = dataset_id or new_dataset_id()
    key = keys.dataset_key(dataset_id, filename)
    await store.put_stream(key, stream, content_type="text/plain")
    return DatasetUploaded(dataset_id=dataset_id, key=key, name=keys.safe_name(filename), format=fmt)


async def record_upload(event: DatasetUploaded, size: int | None = None) -> Dataset:
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
              "status": "uploaded", "size": size, "created_at": t, "updated_at": t}
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
