"""The one rule for bucket keys that come from outside (an event, a request, a Modelfile).

It lives in the base layer because both the contract (events/payloads.py validates every key field with
it) and the object store (storage/objects.py applies it to every key it touches) need it, and events/
must not import storage/. The key *layout* (which keys CodeTune builds) is storage/keys.py.
"""

from __future__ import annotations

import re

from core.errors import UnsafeKeyError

UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
MAX_KEY_LEN = 1024  # S3's limit on an object key (bytes; keys here are ASCII)
MAX_PART_LEN = 255


def check_part(part: str) -> str:
    """One `/`-free part of a key: not empty, not `.`/`..`, only `[A-Za-z0-9._-]`, at most MAX_PART_LEN."""
    if not part or part in {".", ".."} or "/" in part or "\\" in part or "\x00" in part:
        raise UnsafeKeyError(f"unsafe key part {part[:80]!r}")
    if UNSAFE_CHARS.search(part):
        raise UnsafeKeyError(f"key part {part[:80]!r} has characters outside [A-Za-z0-9._-]")
    if len(part) > MAX_PART_LEN:
        raise UnsafeKeyError(f"key part of {len(part)} characters (at most {MAX_PART_LEN})")
    return part


def check_key(key: str) -> str:
    """Validate a key that came from outside (an event): bucket-relative (no leading `/`), no `.`/`..`
    or empty parts, no NUL, only `[A-Za-z0-9._-]` per part, at most MAX_KEY_LEN characters.

    The one rule for keys: the payload models (events/payloads.py) and the object store both apply it."""
    if not isinstance(key, str) or not key:
        raise UnsafeKeyError("empty key")
    if len(key) > MAX_KEY_LEN:
        raise UnsafeKeyError(f"key of {len(key)} characters (at most {MAX_KEY_LEN})")
    if key.startswith("/"):
        raise UnsafeKeyError(f"absolute key {key[:80]!r}")
    return "/".join(check_part(p) for p in key.split("/"))
