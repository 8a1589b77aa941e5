"""Datasets: upload (multipart, streamed to S3 → `dataset.uploaded`) and list (the datasets stage's documents)."""

from __future__ import annotations

from typing import IO, Any, get_args

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, TypeAdapter, ValidationError

from events.envelope import derived_id
from events.payloads import DatasetUploaded, UploadFormat
from events.subjects import DATASET_UPLOADED
from handlers.bridge.errors import field_errors, invalid
from handlers.bridge.seed import dataset_view
from handlers.bridge.services import ClientDep, MongoDB, ServicesDep, StoreDep
from handlers.bridge.upload import receive_file
from handlers.datasets.service import StoredUpload, new_dataset_id, settle_upload, store_upload
from storage.documents import Dataset

router = APIRouter(prefix="/api/v1/datasets", tags=["datasets"])

MULTIPART = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "the dataset (.jsonl / .txt), any size"},
        "format": {"type": "string", "enum": list(get_args(UploadFormat)), "default": "auto"},
        "name": {"type": "string", "description": "name to record (default: the file name)"}}}}}}}


class Uploaded(BaseModel):
    dataset_id: str
    key: str
    name: str
    size: int
    format: UploadFormat
    event_id: str
    sha256: str
    reused: bool = False  # the same bytes (same format) were already a dataset: this is that dataset
    status: str = "uploaded"  # the dataset's status now (a reused one may already be validated or failed)
    aliases: list[str] = []


def form_options(fields: dict[str, str]) -> tuple[UploadFormat, str | None]:
    try:
        fmt = TypeAdapter(UploadFormat).validate_python(fields.get("format") or "auto")
    except ValidationError as e:
        raise invalid(field_errors(e, ("body", "format"))) from None
    return fmt, fields.get("name") or None


@router.post("/upload", response_model=Uploaded, openapi_extra=MULTIPART)
async def upload_dataset(request: Request, store: StoreDep, client: ClientDep, services: ServicesDep) -> Uploaded:
    """Stream the `file` field into the bucket (constant memory), publish `dataset.uploaded`, and record the
    dataset as `uploaded` before answering, so `GET /api/v1/datasets/` lists it at once. The same bytes
    uploaded again (same format) answer the dataset that already holds them (`reused`), not a copy."""
    dataset_id = new_dataset_id()

    def into_bucket(filename: str, stream: IO[bytes]) -> Any:
        return store_upload(store, stream, filename, dataset_id=dataset_id)

    received = await receive_file(request.stream(), request.headers.get("content-type"), "file", into_bucket)
    try:
        fmt, name = form_options(received.fields)
    except RequestValidationError:
        await store.remove_prefix(f"datasets/{dataset_id}/")
        raise
    first: StoredUpload = received.result
    event = first.event.model_copy(update={"format": fmt, "name": name or first.event.name})

    async def announce(ev: DatasetUploaded) -> str:
        return (await client.publish(ev, event_id=derived_id(ev.dataset_id, DATASET_UPLOADED))).id

    # Without MongoDB the upload still succeeds (announced as new): the datasets stage records it when it
    # validates it, a moment later. A failed publish leaves no record of an upload nobody will validate.
    settled = await settle_upload(store, StoredUpload(event, first.size, first.sha256), announce,
                                  dedupe=services.mongodb.ready.is_set())
    ds = settled.reused
    return Uploaded(dataset_id=settled.event.dataset_id, key=settled.event.key, name=settled.event.name,
                    size=received.size, format=fmt, event_id=derived_id(settled.event.dataset_id, DATASET_UPLOADED),
                    sha256=settled.sha256, reused=ds is not None, status=ds.status if ds else "uploaded",
                    aliases=ds.aliases if ds else [])


@router.get("/", dependencies=[MongoDB])
async def list_datasets(limit: int = Query(200, ge=1, le=1000)) -> list[dict[str, Any]]:
    """Datasets, newest first: `[{name, path, size, status, ...}]` — `uploaded` from the upload's answer on,
    then `validated` or `failed` once the datasets stage checked the file."""
    docs = await Dataset.find_all().sort("-created_at").limit(limit).to_list()
    return [dataset_view(d) for d in docs]
