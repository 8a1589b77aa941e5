"""HMAC-SHA256 webhook signatures: Standard Webhooks and GitHub. Plain functions, no HTTP framework.

Standard Webhooks (https://www.standardwebhooks.com, also Svix):
    webhook-id: msg_123            webhook-timestamp: 1700000000 (unix seconds)
    webhook-signature: v1,<base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}"))> [v1,<...> ...]
  `key` is the base64-decoded part of a `whsec_...` secret, or the secret's UTF-8 bytes otherwise. A
  timestamp further than `tolerance_s` from now (either way) is refused: a captured request cannot be
  replayed later, and within the window the webhook id makes a replay return the first answer.

GitHub:
    X-Hub-Signature-256: sha256=<hex(HMAC-SHA256(secret, body))>     (+ X-GitHub-Delivery: <guid>)
  GitHub signs no timestamp: replays are caught by the delivery id (idempotency receipt) only.

Comparisons are constant-time (`hmac.compare_digest`).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import time
from collections.abc import Mapping

WHSEC_PREFIX = "whsec_"


class SignatureError(Exception):
    """The request is not signed, or not by the holder of the secret: answer 401."""


@functools.lru_cache(maxsize=8)
def standard_key(secret: str) -> bytes:
    """The HMAC key of a secret (parsed once per secret). Raises ValueError, never echoing the secret.

    An unpadded `whsec_` secret is padded first, as senders' libraries accept it.
    """
    if secret.startswith(WHSEC_PREFIX):
        b64 = secret[len(WHSEC_PREFIX):].strip()
        try:
            key = base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the webhook secret starts with whsec_ but the rest is not base64") from None
        if not key:
            raise ValueError("the webhook secret is whsec_ with an empty key")
        return key
    if not secret:
        raise ValueError("the webhook secret is empty")
    return secret.encode()


def sign_standard(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for a request (what a sender computes)."""
    mac = hmac.new(standard_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def sign_github(secret: str, body: bytes) -> str:
    """The `X-Hub-Signature-256` header value for a request (what GitHub computes)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(headers: Mapping[str, str], body: bytes, secret: str, tolerance_s: float,
           now: float | None = None) -> str | None:
    """Check the request's signature; return the sender's delivery id (or None). Raises SignatureError."""
    h = {k.lower(): v for k, v in headers.items()}
    if "webhook-signature" in h or "webhook-id" in h:
        return _verify_standard(h, body, secret, tolerance_s, time.time() if now is None else now)
    if "x-hub-signature-256" in h:
        expected = sign_github(secret, body)
        if not hmac.compare_digest(h["x-hub-signature-256"].strip().encode(), expected.encode()):
            raise SignatureError("X-Hub-Signature-256 does not match the body")
        return h.get("x-github-delivery") or None
    raise SignatureError("missing signature: send webhook-id/webhook-timestamp/webhook-signature "
                         "(Standard Webhooks) or X-Hub-Signature-256 (GitHub)")


def _verify_standard(h: dict[str, str], body: bytes, secret: str, tolerance_s: float, now: float) -> str:
    msg_id, ts, sigs = h.get("webhook-id", ""), h.get("webhook-timestamp", ""), h.get("webhook-signature", "")
    if not (msg_id and ts and sigs):
        raise SignatureError("Standard Webhooks needs webhook-id, webhook-timestamp and webhook-signature")
    try:
        timestamp = int(ts)
    except ValueError:
        raise SignatureError("webhook-timestamp is not an integer (unix seconds)") from None
    if abs(now - timestamp) > tolerance_s:
        raise SignatureError(f"webhook-timestamp is outside the {tolerance_s:.0f}s tolerance window")
    expected = sign_standard(secret, msg_id, timestamp, body).encode()
    if not any(hmac.compare_digest(sig.encode(), expected) for sig in sigs.split() if sig.startswith("v1,")):
        raise SignatureError("webhook-signature does not match")
    return msg_id
