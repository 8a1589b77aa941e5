"""The models stage's work (it owns hub access): snapshot a hub repo (revision pinned to its commit sha) into
the bucket, push a finished job's artifacts to a hub repo, search the hub's text-generation models.

Uses the real `huggingface_hub.snapshot_download`. The HF token comes from settings only; it is passed
to the hub client and never stored in a document or object, never logged.
"""

from __future__ import annotations

import asyncio
import re
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import errors as hf_errors
from huggingface_hub import snapshot_download

from core.errors import CodeTuneError, GatedRepoError, HubRefusedError, RepoNotFoundError, TransientError
from core.settings import Settings
from events.payloads import (
    ErrorInfo,
    ModelPulled,
    ModelPullFailed,
    ModelPullRequested,
    ModelPushed,
    ModelPushFailed,
    ModelPushRequested,
)
from storage import keys
from storage.documents import BaseLLM, HubPush, TuningJob
from storage.objects import ObjectStore

# What a causal LM needs to train and convert; skips duplicate weight formats (.bin, onnx, gguf, ...).
ALLOW = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja", "*.model"]


def download_snapshot(settings: Settings, repo_id: str, revision: str) -> Path:
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


async def pull(event: ModelPullRequested, store: ObjectStore, settings: Settings) -> ModelPulled | ModelPullFailed:
    existing = await BaseLLM.find_one(BaseLLM.repo_id == event.repo_id, BaseLLM.revision == event.revision)
    if existing and existing.status == "ready" and existing.sha and existing.prefix:
        return _pulled(existing)  # the same repo and revision again: a no-op that re-emits model.pulled
    key = {"repo_id": event.repo_id, "revision": event.revision}
    await BaseLLM.upsert_by(key, {"status": "pulling", "error": None})
    try:
        snapshot = await asyncio.to_thread(download_snapshot, settings, event.repo_id, event.revision)
    except CodeTuneError as e:
        if e.retryable:
            raise
        await BaseLLM.upsert_by(key, {"status": "failed", "error": e.as_dict()})
        return ModelPullFailed(repo_id=event.repo_id, revision=event.revision, error=ErrorInfo(**e.as_dict()))
    sha = snapshot.name
    prefix = keys.model_prefix(event.repo_id, sha)
    files, size = await store.upload_dir(prefix, snapshot)
    doc = await BaseLLM.upsert_by(key, {"status": "ready", "sha": sha, "prefix": prefix, "files": files,
                                          "bytes": size, "error": None})
    return _pulled(doc)


def _pulled(doc: BaseLLM) -> ModelPulled:
    return ModelPulled(repo_id=doc.repo_id, revision=doc.revision, sha=doc.sha or "", prefix=doc.prefix or "",
                       files=doc.files, bytes=doc.bytes)


# --------------------------------------------------------------------------- hub search (a read-only query)

SEARCH_FIELDS = ("id", "downloads", "task", "tags")


def search_hub(settings: Settings, limit: int = 50, search: str | None = None) -> list[dict[str, Any]]:
    """Blocking: the hub's text-generation models, most downloaded first, as `{id, downloads, task, tags}`.
    Raises on any hub or network error (the caller answers offline)."""
    from huggingface_hub import HfApi

    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    api = HfApi(endpoint=settings.hf_endpoint, token=token or False)
    models = api.list_models(pipeline_tag="text-generation", sort="downloads", limit=limit, search=search)
    return [{"id": m.id, "downloads": m.downloads, "task": m.pipeline_tag or "text-generation",
             "tags": list(m.tags or [])} for m in models]


# --------------------------------------------------------------------------- push to the hub
# `model.push.requested` → adapter + GGUFs + Modelfile + model card → one hub commit → `model.pushed`.
# The code `codetune pipeline --push` and the bridge's `POST /api/v1/models/push` share (both publish
# the command and wait for the answer). Idempotent per job and repo: a push already done is answered
# from its record, never uploaded twice.

_STOP_RE = re.compile(r'^PARAMETER\s+stop\s+"?(.*?)"?\s*$', re.MULTILINE | re.IGNORECASE)


def model_card(job: TuningJob, repo_id: str, mode: str, stop: list[str]) -> str:
    m = job.metrics or {}
    epochs = m.get("epochs")
    return "\n".join([
        "---", f"base_model: {job.base_model}", "library_name: peft", "tags: [codetune, lora, gguf, ollama]", "---",
        f"# {job.name or repo_id.rsplit('/', 1)[-1]}", "",
        f"LoRA fine-tune of [{job.base_model}](https://huggingface.co/{job.base_model}) (commit `{job.sha}`) "
        "made with CodeTune.", "",
        f"- steps: {m.get('steps')}, epochs: {epochs:.2f}, tokens: {m.get('tokens')}" if isinstance(epochs, float | int)
        else f"- steps: {m.get('steps')}, tokens: {m.get('tokens')}",
        f"- loss: {m.get('first_loss')} → {m.get('train_loss')}; eval loss: {m.get('eval_loss')}",
        f"- export: {mode}; Ollama stop tokens: {stop}", "",
        "Files: `adapter/` (peft), GGUF file(s) and a `Modelfile` for `ollama create`.", "",
    ])


def _failed(event: ModelPushRequested, code: str, message: str) -> ModelPushFailed:
    return ModelPushFailed(job_id=event.job_id, repo_id=event.repo_id, error=ErrorInfo(code=code, message=message))


def _pushed(doc: HubPush) -> ModelPushed:
    return ModelPushed(job_id=doc.job_id, repo_id=doc.repo_id, private=doc.private, commit_url=doc.commit_url,
                       files=doc.files)


def upload_to_hub(settings: Settings, token: str, repo_id: str, private: bool, root: Path, job_id: str) -> str | None:
    """Blocking: create the repo (if missing) and commit the folder. CodeTuneError with the hub's reason."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=settings.hf_endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(root), commit_message=f"CodeTune {job_id}")
    except hf_errors.HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None) if getattr(e, "response", None) is not None else None
        if status in (401, 403):
            raise HubRefusedError(f"the hub refused the push to {repo_id} (HTTP {status}): check the token's "
                                  f"write access ({_first_line(e)})") from None
        if status is not None and 400 <= status < 500:
            raise HubRefusedError(f"the hub refused the push to {repo_id} (HTTP {status}): {_first_line(e)}") from None
        raise TransientError(f"{repo_id}: hub error ({_first_line(e)})") from None
    return str(getattr(info, "commit_url", None) or "") or None


async def push(event: ModelPushRequested, store: ObjectStore, settings: Settings) -> ModelPushed | ModelPushFailed:
    key = {"job_id": event.job_id, "repo_id": event.repo_id}
    done = await HubPush.find_one(key)
    if done is not None and done.status == "pushed":
        return _pushed(done)  # the same job to the same repo again: answered from the record
    job = await TuningJob.find_one(TuningJob.job_id == event.job_id)
    if job is None:
        return _failed(event, "job_not_found", f"tuning job {event.job_id!r} not found")
    art = job.artifacts or {}
    if job.status != "succeeded" or not job.adapter_key or not art.get("modelfile") or not art.get("model_gguf"):
        return _failed(event, "not_exported", f"tuning job {event.job_id!r} has no exported artifacts yet "
                       f"(status {job.status}, stage {job.stage})")
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    if not token:
        return _failed(event, "no_credentials", "pushing to the hub needs HUGGINGFACE_TOKEN (or HF_TOKEN) in the "
                       "models stage's environment")
    await HubPush.upsert_by(key, {"status": "pushing", "private": event.private, "error": None})
    with tempfile.TemporaryDirectory(dir=_scratch(settings)) as tmp:
        root = Path(tmp)
        await store.download_prefix(job.adapter_key, root / "adapter")
        for k in filter(None, [art.get("model_gguf"), art.get("adapter_gguf"), art.get("modelfile")]):
            await store.download(k, root / Path(k).name)
        modelfile = (root / Path(art["modelfile"]).name).read_text(errors="replace")
        mode = (job.export or {}).get("mode", "adapter")
        (root / "README.md").write_text(model_card(job, event.repo_id, mode, _STOP_RE.findall(modelfile)))
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
        try:
            url = await asyncio.to_thread(upload_to_hub, settings, token, event.repo_id, event.private, root,
                                          event.job_id)
        except CodeTuneError as e:
            if e.retryable:
                raise
            await HubPush.upsert_by(key, {"status": "failed", "error": e.as_dict()})
            return _failed(event, e.code, e.message)
    doc = await HubPush.upsert_by(key, {"status": "pushed", "commit_url": url, "files": files, "error": None})
    return _pushed(doc)


def _scratch(settings: Settings) -> str:
    path = settings.scratch_dir / "push"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)
