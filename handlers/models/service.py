"""The models stage's work: snapshot a hub repo (revision pinned to its commit sha) into the bucket.

Uses the real `huggingface_hub.snapshot_download`. The HF token comes from settings only; it is passed
to the hub client and never stored in a document or object, never logged.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from huggingface_hub import errors as hf_errors
from huggingface_hub import snapshot_download

from events.errors import CodeTuneError, GatedRepoError, RepoNotFoundError, TransientError
from events.payloads import ErrorInfo, ModelPulled, ModelPullFailed, ModelPullRequested
from storage import keys
from storage.documents import BaseModel
from storage.objects import ObjectStore

# What a causal LM needs to train and convert; skips duplicate weight formats (.bin, onnx, gguf, ...).
ALLOW = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja", "*.model"]


def download_snapshot(settings: Any, repo_id: str, revision: str) -> Path:
    """Blocking: the hub snapshot in the local cache. Raises CodeTuneError subclasses with the hub's reason."""
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    try:
        path = snapshot_download(
            repo_id, revision=revision, token=token or False, cache_dir=settings.hf_cache_dir,
            endpoint=settings.hf_endpoint, local_files_only=settings.hf_offline, allow_patterns=ALLOW,
        )
    except hf_errors.GatedRepoError as e:
        raise GatedRepoError(f"{repo_id} is gated: accept its terms on the hub and set HUGGINGFACE_TOKEN "
                             f"({_first_line(e)})") from None
    except hf_errors.RepositoryNotFoundError as e:
        raise RepoNotFoundError(f"{repo_id}: repository not found or not accessible ({_first_line(e)})") from None
    except hf_errors.RevisionNotFoundError as e:
        raise RepoNotFoundError(f"{repo_id}@{revision}: revision not found ({_first_line(e)})") from None
    except hf_errors.LocalEntryNotFoundError as e:
        where = "offline mode: not in the hub cache" if settings.hf_offline else "hub unreachable and not cached"
        raise RepoNotFoundError(f"{repo_id}@{revision}: {where} ({_first_line(e)})") from None
    except hf_errors.HfHubHTTPError as e:
        raise TransientError(f"{repo_id}: hub error ({_first_line(e)})") from None
    return Path(str(path))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


async def pull(event: ModelPullRequested, store: ObjectStore, settings: Any) -> ModelPulled | ModelPullFailed:
    existing = await BaseModel.find_one(BaseModel.repo_id == event.repo_id, BaseModel.revision == event.revision)
    if existing and existing.status == "ready" and existing.sha and existing.prefix:
        return _pulled(existing)  # the same repo and revision again: a no-op that re-emits model.pulled
    key = {"repo_id": event.repo_id, "revision": event.revision}
    await BaseModel.upsert_by(key, {"status": "pulling", "error": None})
    try:
        snapshot = await asyncio.to_thread(download_snapshot, settings, event.repo_id, event.revision)
    except CodeTuneError as e:
        if e.retryable:
            raise
        await BaseModel.upsert_by(key, {"status": "failed", "error": e.as_dict()})
        return ModelPullFailed(repo_id=event.repo_id, revision=event.revision, error=ErrorInfo(**e.as_dict()))
    sha = snapshot.name
    prefix = keys.model_prefix(event.repo_id, sha)
    files, size = await store.upload_dir(prefix, snapshot)
    doc = await BaseModel.upsert_by(key, {"status": "ready", "sha": sha, "prefix": prefix, "files": files,
                                          "bytes": size, "error": None})
    return _pulled(doc)


def _pulled(doc: BaseModel) -> ModelPulled:
    return ModelPulled(repo_id=doc.repo_id, revision=doc.revision, sha=doc.sha or "", prefix=doc.prefix or "",
                       files=doc.files, bytes=doc.bytes)
