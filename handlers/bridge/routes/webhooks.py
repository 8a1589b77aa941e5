"""`POST /events/{subject}`: a webhook becomes an event on the contract's subject.

Accepted bodies: plain JSON (the payload), structured CloudEvents (`application/cloudevents+json`, the
payload in `data`/`data_base64`) and binary CloudEvents (`ce-*` headers, the payload as the body).
Order of checks, none of which publishes anything when it fails: body size (413, enforced while the body
is read) → signature or bearer token (401) → payload against the subject's schema (422, field errors) →
idempotency receipt (a replay returns the first answer with `Idempotent-Replayed: true`; 409 while the
first is in flight; 422 if the key was used for a different request) → publish → 202 `{id, ...}`.

The event id (and `Nats-Msg-Id`) is the sender's delivery id: `webhook-id`, `X-GitHub-Delivery`,
`Idempotency-Key`, or the CloudEvent's `id`, in that order; a fresh id when none is given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from events import subjects as s
from events.client import CodeTuneClient, Published
from events.envelope import derived_id, new_event_id, unwrap
from events.errors import InvalidPayloadError
from handlers.bridge.auth import Credentials, check_token, secret
from handlers.bridge.errors import field_errors, invalid_field
from handlers.bridge.receipts import fingerprint
from handlers.bridge.services import ClientDep, ReceiptsDep, SettingsDep
from handlers.bridge.signatures import SignatureError, verify

router = APIRouter(prefix="/events", tags=["webhooks"])

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
CLOUDEVENTS_JSON = "application/cloudevents+json"


class Subject(StrEnum):
    """The contract's subjects a client may publish (commands and the upload fact)."""

    dataset_uploaded = s.DATASET_UPLOADED
    model_pull_requested = s.MODEL_PULL_REQUESTED
    tuning_requested = s.TUNING_REQUESTED
    tuning_cancel_requested = s.TUNING_CANCEL_REQUESTED


@dataclass(frozen=True)
class Webhook:
    """An authenticated request: its raw body, headers and the sender's delivery id, if any."""

    body: bytes
    headers: dict[str, str]
    delivery_id: str | None


async def authenticated_webhook(request: Request, settings: SettingsDep, credentials: Credentials) -> Webhook:
    body = await request.body()  # over webhook_max_bytes → 413 while reading (limits.BodyLimit)
    headers = {k.lower(): v for k, v in request.headers.items()}
    delivery_id = None
    webhook_secret = secret(settings.webhook_secret)
    if webhook_secret is not None:
        try:
            delivery_id = verify(headers, body, webhook_secret, settings.webhook_tolerance_s)
        except SignatureError as e:
            raise HTTPException(401, str(e)) from None
    else:
        check_token(request, settings, credentials)
    return Webhook(body, headers, delivery_id or headers.get("idempotency-key"))


def decode(subject: str, hook: Webhook) -> tuple[BaseModel, str | None]:
    """The typed payload and the CloudEvent id, if any; 422 with field errors otherwise."""
    structured = hook.headers.get("content-type", "").startswith(CLOUDEVENTS_JSON)
    try:
        data, meta = unwrap(hook.body, hook.headers)
    except InvalidPayloadError as e:
        raise invalid_field(["body"], e.message, "json_invalid") from None
    if structured and not meta.structured:
        raise invalid_field(["body"], "a structured CloudEvent needs 'specversion' and 'data' (or 'data_base64')")
    try:
        payload = s.payload_for(subject).model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(field_errors(e, ["body", "data"] if meta.structured else ["body"])) from None
    return payload, meta.id


def event_id_for(key: str | None, subject: str) -> str:
    if key is None:
        return new_event_id()
    return key if _SAFE_ID.match(key) else derived_id(key, subject)


async def publish(client: CodeTuneClient, payload: BaseModel, subject: str, event_id: str
                  ) -> tuple[int, dict[str, Any]]:
    published = await client.publish(payload, subject=subject, event_id=event_id)
    return 202, published.model_dump()


WebhookDep = Annotated[Webhook, Depends(authenticated_webhook)]


@router.post("/{subject}", status_code=202, response_model=Published, responses={
    401: {"description": "missing or bad signature / token"}, 409: {"description": "same key in flight"},
    413: {"description": "body over webhook_max_bytes"}, 422: {"description": "bad payload (field errors)"}})
async def receive_event(subject: Subject, hook: WebhookDep, client: ClientDep, receipts: ReceiptsDep) -> JSONResponse:
    """Publish the webhook's payload on `subject` (plain JSON or CloudEvents; signed)."""
    payload, ce_id = decode(subject.value, hook)
    key = hook.delivery_id or ce_id
    event_id = event_id_for(key, subject.value)
    if key is None:
        status, answer = await publish(client, payload, subject.value, event_id)
        return JSONResponse(answer, status)
    status, answer, replayed = await receipts.once(
        key, fingerprint(subject.value, hook.body), lambda: publish(client, payload, subject.value, event_id))
    return JSONResponse(answer, status, headers={"Idempotent-Replayed": "true"} if replayed else None)

