"""Bearer-token guard for every route but health and the docs pages.

Choice for an unset `CODETUNE_BRIDGE_TOKEN`: development mode on loopback only. `python -m
handlers.bridge` refuses to start on a non-loopback host without a token (`check_binding`), and as a
second line, a request that arrives on a non-loopback server address is refused when no token is set
(covers `uvicorn --host 0.0.0.0 --factory ...`, which bypasses the entry point), and so is one whose
`Host` is not a loopback name (a page on a domain that resolves to 127.0.0.1: DNS rebinding, which the
Origin guard's same-origin rule alone would let through).
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, HTTPException, Request
from fastapi.requests import HTTPConnection
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from core.settings import Settings
from handlers.bridge.services import SettingsDep

bearer = HTTPBearer(auto_error=False, description="CODETUNE_BRIDGE_TOKEN")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
CHALLENGE = {"WWW-Authenticate": "Bearer"}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def secret(value: SecretStr | None) -> str | None:
    """A configured secret's value; an empty one (`CODETUNE_BRIDGE_TOKEN=`) counts as unset."""
    return value.get_secret_value() or None if value is not None else None


def check_binding(settings: Settings, host: str | None = None) -> None:
    """Refuse to serve without a bearer token anywhere but loopback."""
    host = host or settings.bridge_host
    if secret(settings.bridge_token) is None and not is_loopback(host):
        raise SystemExit(
            f"refusing to serve the bridge on {host} without a bearer token: set CODETUNE_BRIDGE_TOKEN, "
            "or bind 127.0.0.1 (CODETUNE_BRIDGE_HOST) for local development"
        )


def check_token(request: HTTPConnection, settings: Settings, credentials: HTTPAuthorizationCredentials | None) -> None:
    token = secret(settings.bridge_token)
    if token is None:
        server = request.scope.get("server") or ("127.0.0.1", 0)
        if not is_loopback(str(server[0])):
            raise HTTPException(401, "the bridge has no CODETUNE_BRIDGE_TOKEN and only serves loopback",
                                headers=CHALLENGE)
        host = urlsplit("//" + request.headers.get("host", "127.0.0.1")).hostname or ""
        if not is_loopback(host):  # a page whose own name resolves to 127.0.0.1 (DNS rebinding)
            raise HTTPException(401, f"the bridge has no CODETUNE_BRIDGE_TOKEN and only answers loopback host "
                                f"names, not {host[:100]!r}", headers=CHALLENGE)
        return
    if credentials is None:
        raise HTTPException(401, "missing bearer token (Authorization: Bearer <token>)", headers=CHALLENGE)
    if not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
        raise HTTPException(401, "invalid bearer token", headers=CHALLENGE)


async def require_token(request: Request, settings: SettingsDep, credentials: Credentials) -> None:
    check_token(request, settings, credentials)


Authenticated = Depends(require_token)
