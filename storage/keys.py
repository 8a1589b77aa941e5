"""The bucket's key layout. Every key is built here, from parts that user input cannot escape."""

from __future__ import annotations

import re
import unicodedata

from events.errors import UnsafeKeyError

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_KEY_LEN = 1024  # S3's limit on an object key (bytes; keys here are ASCII)
MAX_PART_LEN = 255


def safe_name(name: str, *, max_len: int = 128) -> str:
    """A file name reduced to `[A-Za-z0-9._-]`, never empty, never `.`/`..`, never hidden."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode()
    base = _SAFE.sub("_", base).strip("._-")[:max_len]
    return base or "file"


def _part(part: str) -> str:
    if not part or part in {".", ".."} or "/" in part or "\\" in part or "\x00" in part:
        raise UnsafeKeyError(f"unsafe key part {part[:80]!r}")
    if _SAFE.search(part):
        raise UnsafeKeyError(f"key part {part[:80]!r} has characters outside [A-Za-z0-9._-]")
    if len(part) > MAX_PART_LEN:
        raise UnsafeKeyError(f"key part of {len(part)} characters (at most {MAX_PART_LEN})")
    return part


def join(*parts: str) -> str:
    return "/".join(_part(p) for p in parts)


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
    return join(*key.split("/"))


def dataset_key(dataset_id: str, filename: str) -> str:
    return join("datasets", dataset_id, safe_name(filename))


def _repo_parts(repo_id: str) -> list[str]:
    return [p for p in repo_id.split("/", 1) if p]


def model_prefix(repo_id: str, sha: str) -> str:
    return join("models", *_repo_parts(repo_id), sha)


def job_prefix(job_id: str) -> str:
    return join("jobs", job_id)


# The file a training checkpoint writes last, and the tuning stage uploads last: a checkpoint (on disk or
# in the bucket) is complete exactly when it holds this file.
CHECKPOINT_STATE_FILE = "trainer_state.json"


def checkpoints_prefix(job_id: str) -> str:
    return join("jobs", job_id, "checkpoints")


def checkpoint_prefix(job_id: str, step: int) -> str:
    return join("jobs", job_id, "checkpoints", f"step-{step:08d}")


def adapter_prefix(job_id: str) -> str:
    return join("jobs", job_id, "adapter")


def plot_key(job_id: str) -> str:
    return join("jobs", job_id, "loss.png")


def report_json_key(job_id: str) -> str:
    return join("jobs", job_id, "report.json")


def report_markdown_key(job_id: str) -> str:
    return join("jobs", job_id, "report.md")


def base_gguf_key(repo_id: str, sha: str, outtype: str) -> str:
    return join("gguf", *_repo_parts(repo_id), sha, f"model-{outtype}.gguf")


def export_prefix(job_id: str) -> str:
    return join("jobs", job_id, "export")
