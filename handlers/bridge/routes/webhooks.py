"""`POST /events/{subject}`: a webhook becomes an event on the contract's subject.

Accepted bodies: plain JSON (the payload), structured CloudEvents (`application/cloudevents+json`, the
payload in `data`/`data_base64`) and binary CloudEvents (`ce-*` headers, the payload as the body).
A CloudEvent in either mode needs `id`, `source`, `type` and `specversion` "1.0" (422 otherwise), and a bad
`data_base64` is a 422, never a 500.
Order of checks, none of which publishes anything when it fails: body size (413, enforced while the body
is read) → signature or bearer token (401) → payload against the subject's schema (422, field errors) →
idempotency receipt (a replay returns the first answer with `Idempotent-Replayed: true`; 409 while the
first is in flight; 422 if the key was used for a different request) → publish → 202 `{id, ...}`.

The event id (and `Nats-Msg-Id`) is the sender's delivery id: `webhook-id`, `X-GitHub-Delivery`,
`Idempotency-Key`, or the CloudEvent's `id`, in that order; a fresh id when none is given.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from core.errors import InvalidPayloadError
from events import subjects as s
from events.client import CodeTuneClient, Published
from events.envelope import SPECVERSION, derived_id, new_event_id, parse_json, unwrap
from handlers.bridge.auth import bearer, check_token, secret
from handlers.bridge.errors import field_errors, invalid_field
from handlers.bridge.receipts import fingerprint
from handlers.bridge.services import Services
from handlers.bridge.signatures import SignatureError, verify

router = APIRouter(prefix="/events", tags=["webhooks"])

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
CLOUDEVENTS_JSON = "application/cloudevents+json"
REQUIRED_ATTRIBUTES = ("id", "source", "type")


class Subject(StrEnum):
    """The contract's subjects a client may publish (commands and the upload fact)."""

    dataset_uploaded = s.DATASET_UPLOADED
    model_pull_requested = s.MODEL_PULL_REQUESTED
    tuning_requested = s.TUNING_REQUESTED
    tuning_cancel_requested = s.TUNING_CANCEL_REQUESTED


@dataclass(frozen=True)
class Webhook:
    """An authenticated request: its raw body, headers, the sender's delivery id, if any, and the bridge's
    connections."""

    body: bytes
    headers: dict[str, str]
    delivery_id: str | None
    services: Services


async def authenticated_webhook(request: Request) -> Webhook:
    """The request's body and sender, authenticated (401 otherwise). The bearer token is read here only when
    no webhook secret is set."""
    services: Services = request.app.state.services
    settings = services.settings
    body = await request.body()  # over webhook_max_bytes → 413 while reading (limits.BodyLimit)
    headers = dict(request.headers.items())  # Starlette's header names are lower-case already
    delivery_id = None
    webhook_secret = secret(settings.webhook_secret)
    if webhook_secret is not None:
        try:
            delivery_id = verify(headers, body, webhook_secret, settings.webhook_tolerance_s)
        except SignatureError as e:
            raise HTTPException(401, str(e)) from None
    else:
        check_token(request, settings, await bearer(request))
    return Webhook(body, headers, delivery_id or headers.get("idempotency-key"), services)


def decode(subject: str, hook: Webhook) -> tuple[BaseModel, str | None]:
    """The typed payload and the CloudEvent id, if any; 422 with field errors otherwise."""
    structured = hook.headers.get("content-type", "").startswith(CLOUDEVENTS_JSON)
    try:
        raw = parse_json(hook.body)
    except InvalidPayloadError as e:
        raise invalid_field(["body"], e.message, "json_invalid") from None
    if structured or (isinstance(raw, dict) and "specversion" in raw):
        check_structured(raw)
    elif any(k.startswith("ce-") for k in hook.headers):
        check_binary(hook.headers)
    try:
        data, meta = unwrap(hook.body, hook.headers)
    except InvalidPayloadError as e:
        raise invalid_field(["body"], e.message, "json_invalid") from None
    except (ValueError, TypeError) as e:  # a bad encoding is a bad payload, whatever raised it
        raise invalid_field(["body"], f"invalid payload encoding: {type(e).__name__}") from None
    if structured and not meta.structured:
        raise invalid_field(["body"], "a structured CloudEvent needs 'specversion' and 'data' (or 'data_base64')")
    try:
        payload = s.payload_for(subject).model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(field_errors(e, ["body", "data"] if meta.structured else ["body"])) from None
    return payload, meta.id


def check_structured(event: Any) -> None:
    """A structured CloudEvent has `specversion` "1.0", non-empty string `id`, `source`, `type`, and a valid
    `data_base64` when it has one (422 naming the attribute otherwise)."""
    if not isinstance(event, dict):
        raise invalid_field(["body"], "a structured CloudEvent is a JSON object")
    if event.get("specversion") != SPECVERSION:
        raise invalid_field(["body", "specversion"], f"CloudEvents specversion must be {SPECVERSION!r}")
    for name in REQUIRED_ATTRIBUTES:
        if not isinstance(event.get(name), str) or not event[name]:
            raise invalid_field(["body", name], f"the CloudEvent attribute {name!r} is required (a non-empty string)")
    if "data" in event and "data_base64" in event:
        raise invalid_field(["body"], "a CloudEvent has 'data' or 'data_base64', not both")
    if "data_base64" in event:
        value = event["data_base64"]
        try:
            if not isinstance(value, str):
                raise ValueError
            base64.b64decode(value, validate=True)
        except (ValueError, binascii.Error):
            raise invalid_field(["body", "data_base64"], "data_base64 is not a base64 string") from None


def check_binary(headers: dict[str, str]) -> None:
    """A binary-mode CloudEvent (any `ce-*` header) has ce-specversion "1.0", ce-id, ce-source and ce-type."""
    if headers.get("ce-specversion") != SPECVERSION:
        raise invalid_field(["header", "ce-specversion"], f"CloudEvents ce-specversion must be {SPECVERSION!r}")
    for name in REQUIRED_ATTRIBUTES:
        if not headers.get(f"ce-{name}", "").strip():
            raise invalid_field(["header", f"ce-{name}"], f"the CloudEvent header ce-{name} is required")


def event_id_for(key: str | None, subject: str) -> str:
    if key is None:
        return new_event_id()
    return key if _SAFE_ID.match(key) else derived_id(key, subject)


async def publish(client: CodeTuneClient, payload: BaseModel, subject: str, event_id: str
                  ) -> tuple[int, dict[str, Any]]:
    published = await client.publish(payload, subject=subject, event_id=event_id)
    return 202, published.model_dump()


_SUBJECTS = {subject.value: subject for subject in Subject}
# The route reads its request itself (FastAPI solves nothing per request: no dependency, no path parameter
# model; bench/bench_bridge.py), so its OpenAPI entry is declared here: the path parameter and the body.
_OPENAPI = {
    "security": [{"HTTPBearer": []}],  # the token, when no webhook secret is set
    "parameters": [{"name": "subject", "in": "path", "required": True,
                    "schema": {"type": "string", "enum": list(_SUBJECTS), "title": "Subject"}}],
    "requestBody": {"required": True, "description": "the subject's payload (plain JSON), or a CloudEvent "
                    "carrying it (structured `application/cloudevents+json`, or binary with `ce-*` headers)",
                    "content": {"application/json": {"schema": {"type": "object"}},
                                CLOUDEVENTS_JSON: {"schema": {"type": "object"}}}},
}


def subject_of(request: Request) -> Subject:
    """The path's subject, one a client may publish (422 naming `path.subject` otherwise)."""
    value = request.path_params.get("subject", "")
    subject = _SUBJECTS.get(value)
    if subject is None:
        choices = ", ".join(f"'{v}'" for v in _SUBJECTS)
        raise RequestValidationError([{"type": "enum", "loc": ["path", "subject"], "msg": f"Input should be {choices}",
                                       "input": value[:200], "ctx": {"expected": choices}}])
    return subject


@router.post("/{subject}", status_code=202, response_model=Published, responses={
    401: {"description": "missing or bad signature / token"}, 409: {"description": "same key in flight"},
    413: {"description": "body over webhook_max_bytes"}, 422: {"description": "bad payload (field errors)"}},
    openapi_extra=_OPENAPI)
async def receive_event(request: Request) -> JSONResponse:
    """Publish the webhook's payload on `subject` (plain JSON or CloudEvents; signed)."""
    hook = await authenticated_webhook(request)  # first: an unsigned request is a 401 whatever its subject
    subject = subject_of(request).value
    client, receipts = hook.services.client, hook.services.receipts
    payload, ce_id = decode(subject, hook)
    key = hook.delivery_id or ce_id
    event_id = event_id_for(key, subject)
    if key is None:
        status, answer = await publish(client, payload, subject, event_id)
        return JSONResponse(answer, status)
    status, answer, replayed = await receipts.once(
        key, fingerprint(subject, hook.body), lambda: publish(client, payload, subject, event_id))
    return JSONResponse(answer, status, headers={"Idempotent-Replayed": "true"} if replayed else None)
