"""`GET /` (a small service description, public) and `WS /ws?clientId=…&job_id=…` (a job's live events).

The original's `/ws` echoed text frames; here it streams the job's events — the same ones, from the same
code (`tuning.job_stream`), as `GET /api/v1/tuning/{id}/events` — as JSON text frames
`{"event": "snapshot" | "progress" | "completed" | "failed" | "cancelled", "data": {...}, "id": …}`, then
closes normally (1000) after the terminal one. `clientId` is accepted and ignored; frames the client
sends are ignored. Refusals (after the handshake, with a close code and reason): a bearer token is configured and the
handshake has no valid `Authorization: Bearer` header → 4401 (CodeTune takes tokens only in that header); no or a bad
`job_id` → 4400; a job not recorded within the SSE route's grace → 4404; MongoDB not ready → 1013. A
browser origin that is not allowed is refused before the handshake (403, `origins.OriginGuard`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any

from fastapi import APIRouter, HTTPException, WebSocket, WebSocketDisconnect
from fastapi.encoders import jsonable_encoder
from fastapi.security.utils import get_authorization_scheme_param

from events.ids import ID_PATTERN
from handlers.bridge.auth import check_token
from handlers.bridge.routes.health import VERSION
from handlers.bridge.routes.tuning import job_recorded, job_stream
from handlers.bridge.services import Services

router = APIRouter(tags=["root"])
_JOB_ID = re.compile(ID_PATTERN)


@router.get("/")
async def root() -> dict[str, Any]:
    """What this service is and where to look next."""
    return {"message": "CodeTune backend running", "service": "codetune-bridge", "version": VERSION,
            "api": "/api/v1", "docs": "/docs", "asyncapi": "/asyncapi", "health": "/api/v1/health/status",
            "websocket": "/ws?job_id=<job id>"}


def _authorized(websocket: WebSocket, services: Services) -> bool:
    from fastapi.security import HTTPAuthorizationCredentials

    scheme, token = get_authorization_scheme_param(websocket.headers.get("authorization"))
    credentials = HTTPAuthorizationCredentials(scheme=scheme, credentials=token) if scheme.lower() == "bearer" \
        and token else None
    try:
        check_token(websocket, services.settings, credentials)
    except HTTPException:
        return False
    return True


@router.websocket("/ws")
async def job_socket(websocket: WebSocket) -> None:
    services: Services = websocket.app.state.services
    await websocket.accept()
    if not _authorized(websocket, services):
        await websocket.close(4401, "missing or invalid bearer token (Authorization header)")
        return
    job_id = websocket.query_params.get("job_id") or ""
    if not _JOB_ID.match(job_id):
        await websocket.close(4400, "job_id is required: /ws?job_id=<job id>")
        return
    if not services.mongodb.ready.is_set():
        await websocket.close(1013, "MongoDB is not ready")
        return
    if not await job_recorded(job_id):
        await websocket.close(4404, f"tuning job {job_id!r} not found")
        return

    async def send_events() -> None:
        async for kind, data, event_id in job_stream(services, job_id):
            await websocket.send_json(jsonable_encoder({"event": kind, "data": data, "id": event_id}))
        await websocket.close(1000, "done")

    async def until_disconnected() -> None:  # frames from the client are ignored; a disconnect ends the stream
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass

    tasks = [asyncio.create_task(send_events()), asyncio.create_task(until_disconnected())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                task.result()
    finally:
        for task in tasks:
            task.cancel()
