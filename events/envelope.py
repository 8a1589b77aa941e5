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
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from events.errors import InvalidPayloadError

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


def unwrap(body: bytes | str, headers: dict[str, str] | None = None) -> tuple[Any, EventMeta]:
    """Return `(data, meta)` for any accepted message shape."""
    data = parse_json(body)
    if isinstance(data, dict) and "specversion" in data and ("data" in data or "data_base64" in data):
        if "data_base64" in data:
            data_value = parse_json(base64.b64decode(data["data_base64"]))
        else:
            data_value = data["data"]
        return data_value, EventMeta(
            id=str(data.get("id")) if data.get("id") is not None else None,
            source=data.get("source"),
            type=data.get("type"),
            time=data.get("time"),
            structured=True,
        )
    h = {k.lower(): v for k, v in (headers or {}).items()}
    return data, EventMeta(
        id=h.get("ce-id") or h.get("nats-msg-id"), source=h.get("ce-source"), type=h.get("ce-type"),
        time=h.get("ce-time"),
    )


def body_text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return "b64:" + base64.b64encode(body).decode("ascii")
