"""Which browser origins may call the bridge: CORS (Starlette's CORSMiddleware) and an Origin guard.

`CODETUNE_CORS_ORIGINS` (comma-separated; `*` for any origin, empty for none) names them. Unset, the
default follows the bearer token:
- no `CODETUNE_BRIDGE_TOKEN` (development: the bridge only serves loopback) → the loopback origins
  (`http(s)://localhost|127.0.0.1|[::1]` on any port), so a dev server or the original frontend on this
  machine works as it did, while a page from any other site cannot read a single answer;
- a token → no cross-origin browser access until origins are named: a token-protected bridge is reachable
  from the network, and which web apps may hold its token is the operator's decision.

CORS only stops a page from *reading* an answer; a "simple" cross-site request (a form POST, a WebSocket)
is still *sent*. So the guard also refuses (403) any request — WebSocket handshakes included, which CORS
does not cover at all — whose `Origin` header names an origin that is neither allowed nor the bridge's own
(same-origin, e.g. the `/docs` page); `Origin: null` (sandboxed frames, files) is refused unless allowed
by `*`. Requests without an Origin (curl, webhooks, servers) pass.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from core.settings import Settings

LOOPBACK_ORIGIN = r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:[0-9]{1,5})?$"
ALLOW_HEADERS = ["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"]
EXPOSE_HEADERS = ["X-CodeTune-Hub", "X-CodeTune-Hub-Reason", "Idempotent-Replayed", "Retry-After"]


def has_token(settings: Settings) -> bool:
    return settings.bridge_token is not None and bool(settings.bridge_token.get_secret_value())


def cors_options(settings: Settings) -> dict[str, Any]:
    """CORSMiddleware's keyword arguments for these settings (no credentials: the client sends a bearer
    token, never cookies)."""
    common: dict[str, Any] = {"allow_methods": ["GET", "POST", "DELETE", "OPTIONS"], "allow_headers": ALLOW_HEADERS,
                              "expose_headers": EXPOSE_HEADERS, "allow_credentials": False, "max_age": 600}
    if settings.cors_origins is None:
        if has_token(settings):
            return {"allow_origins": [], **common}
        return {"allow_origin_regex": LOOPBACK_ORIGIN, **common}
    return {"allow_origins": list(settings.cors_origins), **common}


class Origins:
    """The allowed origins, as one predicate shared by the HTTP guard and `WS /ws`."""

    def __init__(self, settings: Settings) -> None:
        opts = cors_options(settings)
        self.any = "*" in opts.get("allow_origins", [])
        self.exact = set(opts.get("allow_origins", []))
        self.regex = re.compile(opts["allow_origin_regex"]) if "allow_origin_regex" in opts else None

    def allowed(self, origin: str, host: str | None) -> bool:
        if self.any or origin in self.exact or (self.regex is not None and self.regex.fullmatch(origin)):
            return True
        netloc = urlsplit(origin).netloc
        return bool(host) and netloc.lower() == (host or "").lower()  # same-origin (the bridge's own pages)


class OriginGuard:
    """403 for a request (or WebSocket handshake) from a browser origin that is not allowed."""

    def __init__(self, app: ASGIApp, origins: Origins) -> None:
        self.app = app
        self.origins = origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = dict(scope["headers"])
            origin = headers.get(b"origin", b"").decode("latin-1")
            host = headers.get(b"host", b"").decode("latin-1") or None
            if origin and not self.origins.allowed(origin, host):
                detail = f"origin {origin[:200]!r} is not allowed (CODETUNE_CORS_ORIGINS)"
                if scope["type"] == "websocket":  # closed before accept: the handshake is answered 403
                    await receive()  # websocket.connect
                    await send({"type": "websocket.close", "code": 1008, "reason": detail[:120]})
                    return
                await JSONResponse({"detail": detail}, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)
