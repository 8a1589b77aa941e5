"""The envelope: CloudEvents attributes around a payload, in both directions.

Outgoing events are CloudEvents in *binary* mode: the body is the payload JSON and the attributes are
`ce-*` headers; `Nats-Msg-Id` repeats the id so JetStream drops a duplicate publish.

Incoming messages may be any of:
- bare JSON with no headers (what `nats pub SUBJECT '{...}'` sends),
- binary-mode CloudEvents (`ce-*` headers),
- structured-mode CloudEvents (`{"specversion": "1.0", "id": ..., "data": {...}}`).
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from core.errors import InvalidPayloadError

SPECVERSION = "1.0"
TYPE_PREFIX = "io.codetune."


def event_type(subject: str, version: int = 1) -> str:
    base = subject.split(".<", 1)[0]
    if base.startswith("tuning.progress."):
        base = "tuning.progress"
    return f"{TYPE_PREFIX}{base}.v{version}"


def new_event_id() -> str:
    return uuid.uuid4().hex


def derived_id(parent_id: str, subject: str) -> str:
    """A stable id for the event a handler emits in answer to `parent_id`.

    Re-processing the same incoming event yields the same outgoing id, so JetStream's duplicate window
    drops the second publish.
    """
    return uuid.uuid5(uuid.NAMESPACE_URL, f"codetune:{parent_id}:{subject}").hex


def ce_headers(subject: str, event_id: str, source: str, *, version: int = 1) -> dict[str, str]:
    return {
        "ce-specversion": SPECVERSION,
        "ce-id": event_id,
        "ce-source": source,
        "ce-type": event_type(subject, version),
        "ce-time": datetime.now(UTC).isoformat(),
        "content-type": "application/json",
        "Nats-Msg-Id": event_id,
    }


@dataclass(frozen=True)
class EventMeta:
    id: str | None
    source: str | None = None
    type: str | None = None
    time: str | None = None
    structured: bool = False


def parse_json(body: bytes | str) -> Any:
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidPayloadError(f"invalid JSON: body is not UTF-8 ({e.reason} at byte {e.start})") from e
    if not body.strip():
        raise InvalidPayloadError("invalid JSON: empty body")
    try:
        return json.loads(body)
    except json.JSONDecodeError as e:
        raise InvalidPayloadError(f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e


def _decode_data_base64(value: Any) -> Any:
    if not isinstance(value, str):
        raise InvalidPayloadError(f"data_base64: must be a base64 string, not {type(value).__name__}")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidPayloadError(f"data_base64: not valid base64 ({e})") from e
    try:
        return parse_json(raw)
    except InvalidPayloadError as e:
        raise InvalidPayloadError(f"data_base64: {e.message}") from e


def _require_attributes(attrs: dict[str, Any], prefix: str, mode: str) -> None:
    """CloudEvents required attributes: `id`, `source`, `type` non-empty strings, specversion "1.0"."""
    for name in ("id", "source", "type", "specversion"):
        value = attrs.get(prefix + name)
        if not isinstance(value, str) or not value.strip():
            raise InvalidPayloadError(f"CloudEvents ({mode}): {prefix}{name} is required (a non-empty string)")
    if attrs[prefix + "specversion"] != SPECVERSION:
        raise InvalidPayloadError(
            f"CloudEvents ({mode}): {prefix}specversion must be {SPECVERSION!r}, "
            f"not {attrs[prefix + 'specversion']!r}"
        )


def unwrap(body: bytes | str, headers: dict[str, str] | None = None) -> tuple[Any, EventMeta]:
    """Return `(data, meta)` for any accepted message shape; raise `InvalidPayloadError` otherwise.

    One rule for every consumer (stages and the bridge): a structured CloudEvent (a JSON object with
    `specversion`) and a binary one (any `ce-*` header) must carry `id`, `source`, `type` as non-empty
    strings and specversion "1.0"; `data_base64` must be base64 of JSON. Bare JSON with no `ce-*`
    headers is accepted as is.
    """
    data = parse_json(body)
    if isinstance(data, dict) and "specversion" in data:
        _require_attributes(data, "", "structured")
        if "data_base64" in data:
            if "data" in data:
                raise InvalidPayloadError("CloudEvents (structured): both data and data_base64 given")
            data_value = _decode_data_base64(data["data_base64"])
        elif "data" in data:
            data_value = data["data"]
        else:
            raise InvalidPayloadError("CloudEvents (structured): no data or data_base64")
        return data_value, EventMeta(
            id=data["id"], source=data["source"], type=data["type"],
            time=data.get("time") if isinstance(data.get("time"), str) else None, structured=True,
        )
    h = {k.lower(): v for k, v in (headers or {}).items()}
    if any(k.startswith("ce-") for k in h):
        _require_attributes(h, "ce-", "binary")
    return data, EventMeta(
        id=h.get("ce-id") or h.get("nats-msg-id"), source=h.get("ce-source"), type=h.get("ce-type"),
        time=h.get("ce-time"),
    )


def body_text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return "b64:" + base64.b64encode(body).decode("ascii")
