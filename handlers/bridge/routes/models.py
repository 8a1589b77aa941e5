"""Base models: the model picker (`GET /api/v1/models/`), pull (→ `model.pull.requested`) and push of a
finished job to a hub repo (→ `model.push.requested`, answered by the models stage).

`GET /api/v1/models/` answers the hub's text-generation models (`huggingface_hub.list_models`, most
downloaded first, `{id, downloads, task, tags}`) merged with the base models already pulled (each row
says `pulled` and `source`: "hub" or "pulled"). Offline (`HF_HUB_OFFLINE`), or when the hub does not
answer within `CODETUNE_HUB_TIMEOUT_S`, it answers the pulled models alone — not an error — and says so
in the `X-CodeTune-Hub: offline` header (`X-CodeTune-Hub-Reason` says why). The search is a read-only
query over the models stage's own hub code; the hub answer (or its failure) is kept for `CACHE_S`.

`POST /api/v1/models/push` `{local_dir, repo_name, private=true}`: `local_dir` names the job whose artifacts
go (never a server path): a saved model's `local_path` (`jobs/<job_id>`), a saved model id (`um-…`) or a job
id. `repo_name` without a namespace goes under `hf_user` (`/api/v1/settings`, else `CODETUNE_HF_USER`).
The models stage holds the HF token; the answer is `{status: "ok", repo_id, commit_url, files}` once it
pushed, 400 when it has no token, 404 for an unknown job, 409 for a job not exported yet, 502 when the hub
refused, and 202 `{status: "pending"}` when the push outlasts `PUSH_WAIT_S` (it continues).
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.settings import Settings
from events import subjects as s
from events.ids import ID_PATTERN
from events.payloads import ModelPullRequested, ModelPushed, ModelPushFailed, ModelPushRequested
from handlers.bridge.errors import field_errors, invalid, invalid_field
from handlers.bridge.services import ClientDep, MongoDB, SettingsDep
from storage.documents import BaseLLM, ClientSettings, TuningJob, UserModel

router = APIRouter(prefix="/api/v1/models", tags=["models"])

CACHE_S = 60.0
PUSH_WAIT_S = 600.0
_ID = re.compile(ID_PATTERN)
_cache: dict[tuple[str | None, int, str | None], tuple[float, list[dict[str, Any]] | None, str | None]] = {}


class PullBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    repo_id: str
    revision: str = "main"
    local_dir: str | None = Field(None, description="ignored: snapshots live in the bucket")


class PullAnswer(BaseModel):
    status: str = "ok"
    local_dir: str = Field(description="the repo id: what tuning's parameters.repo_id takes to use the snapshot")
    repo_id: str
    revision: str
    event_id: str


async def hub_models(settings: Settings, limit: int, search: str | None) -> tuple[list[dict[str, Any]] | None, str]:
    """The hub's answer, or None and why not (offline, unreachable, too slow)."""
    if settings.hf_offline:
        return None, "offline mode (HF_HUB_OFFLINE)"
    key = (settings.hf_endpoint, limit, search)
    hit = _cache.get(key)
    if hit and time.monotonic() - hit[0] < CACHE_S:
        return hit[1], hit[2] or ""
    from handlers.models.service import search_hub  # lazily: huggingface_hub costs ~0.2 s at bridge start

    models: list[dict[str, Any]] | None = None
    why = ""
    try:
        models = await asyncio.wait_for(asyncio.to_thread(search_hub, settings, limit, search), settings.hub_timeout_s)
    except TimeoutError:
        why = f"the hub did not answer in {settings.hub_timeout_s:g}s"
    except Exception as e:  # unreachable, DNS, an HTTP error: the picker still gets the pulled models
        why = f"the hub is unreachable ({type(e).__name__})"
    _cache[key] = (time.monotonic(), models, why)
    return models, why


def pulled_row(doc: BaseLLM) -> dict[str, Any]:
    return {"id": doc.repo_id, "downloads": None, "task": "text-generation", "tags": [], "pulled": True,
            "source": "pulled", "revision": doc.revision, "sha": doc.sha}


@router.get("/", dependencies=[MongoDB], responses={200: {"headers": {
    "X-CodeTune-Hub": {"description": "online | offline", "schema": {"type": "string"}}}}})
async def list_models(response: Response, settings: SettingsDep, limit: int = Query(50, ge=1, le=500),
                      search: str | None = Query(None, max_length=128)) -> list[dict[str, Any]]:
    """Hub text-generation models merged with the pulled base models; offline: the pulled ones."""
    pulled = await BaseLLM.find(BaseLLM.status == "ready").sort("-updated_at").to_list()
    by_repo = {d.repo_id: d for d in pulled}
    hub, why = await hub_models(settings, limit, search)
    response.headers["X-CodeTune-Hub"] = "online" if hub is not None else "offline"
    if hub is None:
        response.headers["X-CodeTune-Hub-Reason"] = why
        return [pulled_row(d) for d in pulled]
    rows = [{**m, "pulled": m["id"] in by_repo, "source": "hub",
             "sha": by_repo[m["id"]].sha if m["id"] in by_repo else None} for m in hub]
    listed = {m["id"] for m in hub}
    return [pulled_row(d) for d in pulled if d.repo_id not in listed] + rows


@router.post("/pull", response_model=PullAnswer)
async def pull_model(body: PullBody, client: ClientDep) -> PullAnswer:
    """Ask the models stage to snapshot `repo_id` at `revision` into the bucket."""
    try:
        command = ModelPullRequested(repo_id=body.repo_id, revision=body.revision)
    except ValidationError as e:
        raise invalid(field_errors(e)) from None
    published = await client.publish(command)
    return PullAnswer(local_dir=command.repo_id, repo_id=command.repo_id, revision=command.revision,
                      event_id=published.id)


class PushBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    local_dir: str = Field(min_length=1, max_length=256,
                           description="the job to push: a saved model's local_path (jobs/<job_id>), a saved model "
                                       "id or a job id — never a server path")
    repo_name: str = Field(min_length=1, max_length=200, description="'user/name', or 'name' under hf_user")
    private: bool = True


class PushAnswer(BaseModel):
    status: str
    repo_id: str
    job_id: str
    private: bool
    commit_url: str | None = None
    files: list[str] = Field(default_factory=list)


async def job_for(local_dir: str) -> str:
    """The job id `local_dir` names (404 when nothing by that name exists, 422 for a path)."""
    value = local_dir.strip().rstrip("/")
    parts = value.split("/")
    if len(parts) == 2 and parts[0] == "jobs":
        value = parts[1]
    elif len(parts) != 1:
        raise invalid_field(["body", "local_dir"], "local_dir names a job (jobs/<job_id>, a saved model id or a "
                            "job id), never a path on the server")
    if not _ID.match(value):
        raise invalid_field(["body", "local_dir"], "not a job id or saved model id (3-64 of [A-Za-z0-9_-])")
    saved = await UserModel.find_one(UserModel.model_id == value)
    if saved is not None:
        if not saved.job_id:
            raise HTTPException(409, f"saved model {value!r} has no tuning job to push")
        return saved.job_id
    if await TuningJob.find_one(TuningJob.job_id == value) is None:
        raise HTTPException(404, f"no tuning job or saved model {value!r}")
    return value


async def namespaced(repo_name: str, settings: Settings) -> str:
    if "/" in repo_name:
        return repo_name
    stored = await ClientSettings.find_one(ClientSettings.key == "default")
    user = (stored.hf_user if stored else None) or settings.hf_user
    if not user:
        raise invalid_field(["body", "repo_name"], "repo_name needs a namespace ('user/name'), or set hf_user "
                            "(POST /api/v1/settings or CODETUNE_HF_USER)")
    return f"{user}/{repo_name}"


PUSH_STATUS = {"no_credentials": 400, "job_not_found": 404, "not_exported": 409, "hub_refused": 502}


@router.post("/push", response_model=PushAnswer, dependencies=[MongoDB], responses={
    202: {"description": "still pushing"}, 400: {"description": "the models stage has no HF token"},
    404: {"description": "unknown job"}, 409: {"description": "job not exported yet"},
    502: {"description": "the hub refused"}})
async def push_model(body: PushBody, client: ClientDep, settings: SettingsDep) -> Any:
    """Push a finished job's adapter, GGUFs, Modelfile and model card to a hub repo (over `model.push.requested`)."""
    job_id = await job_for(body.local_dir)
    try:
        command = ModelPushRequested(job_id=job_id, repo_id=await namespaced(body.repo_name, settings),
                                     private=body.private)
    except ValidationError as e:
        raise invalid(field_errors(e, ("body",), {("repo_id",): ("repo_name",)})) from None
    try:
        subject, answer = await client.publish_and_wait(
            command, [s.MODEL_PUSHED, s.MODEL_PUSH_FAILED],
            lambda _, d: d.get("job_id") == job_id and d.get("repo_id") == command.repo_id, PUSH_WAIT_S)
    except TimeoutError:
        return JSONResponse(PushAnswer(status="pending", repo_id=command.repo_id, job_id=job_id,
                                       private=command.private).model_dump(), status_code=202)
    if isinstance(answer, ModelPushFailed):
        error = answer.error
        raise HTTPException(PUSH_STATUS.get(error.code, 502), f"{error.code}: {error.message}")
    assert isinstance(answer, ModelPushed), subject  # publish_and_wait parses each subject's own payload
    return PushAnswer(status="ok", repo_id=command.repo_id, job_id=job_id, private=command.private,
                      commit_url=answer.commit_url, files=answer.files)
