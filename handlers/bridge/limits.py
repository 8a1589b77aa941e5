"""Request body limit, enforced while the body is read: 413 `{"detail": ...}` and nothing handled.

A declared `Content-Length` over the limit is refused before any byte is read; a chunked body is counted
as it streams in and refused as soon as it passes the limit. (Starlette's own limiter answers a plain-text
413 when Content-Length is set, not the `{"detail"}` shape the web client reads.)
"""

from __future__ import annotations

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, exempt: tuple[str, ...] = ()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt
        self.detail = f"request body is over the {max_bytes}-byte limit (CODETUNE_WEBHOOK_MAX_BYTES)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await JSONResponse({"detail": self.detail}, status_code=413)(scope, receive, send)
            return
        total = 0

        async def limited() -> Message:
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.max_bytes:
                    raise HTTPException(413, self.detail)
            return message

        await self.app(scope, limited, send)
