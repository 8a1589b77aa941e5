"""The bucket's key layout. Every key is built here, from parts that user input cannot escape
(each part passes the one key rule, core.keys; keys from outside are checked with core.keys.check_key)."""

from __future__ import annotations

import unicodedata

from core.keys import UNSAFE_CHARS, check_part


def safe_name(name: str, *, max_len: int = 128) -> str:
    """A file name reduced to `[A-Za-z0-9._-]`, never empty, never `.`/`..`, never hidden."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode()
    base = UNSAFE_CHARS.sub("_", base).strip("._-")[:max_len]
    return base or "file"


def join(*parts: str) -> str:
    """A key built from parts, each checked by the one key rule (core.keys)."""
    return "/".join(check_part(p) for p in parts)


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
