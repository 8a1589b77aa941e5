"""`GET`/`POST /api/v1/settings`: the original web client's settings page, non-secrets only.

`{local_model_dir, dataset_dir, hf_user, hf_token_set}`. The HF token is never returned (`hf_token_set`
says whether the models stage's environment has one, as far as this bridge's settings know) and never
taken from a request: a POST carrying a non-empty `hf_token` is a 422 naming the environment variable to
set instead, and nothing is stored. POST stores the other fields in one small document (the bridge's
`ClientSettings`) and answers what GET then answers: `hf_user` is the namespace a push goes to when its
`repo_name` has none; `local_model_dir` and `dataset_dir` are kept as the client's preferences only —
CodeTune keeps datasets and models in the bucket and never reads them as server paths.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from core.settings import Settings
from handlers.bridge.errors import invalid_field
from handlers.bridge.services import MongoDB, SettingsDep
from storage.documents import ClientSettings

router = APIRouter(prefix="/api/v1/settings", tags=["settings"], dependencies=[MongoDB])

TOKEN_ENV = "HUGGINGFACE_TOKEN (or HF_TOKEN)"


class SettingsView(BaseModel):
    local_model_dir: str | None = None
    dataset_dir: str | None = None
    hf_user: str | None = None
    hf_token_set: bool


class SettingsBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    local_model_dir: str | None = Field(None, max_length=512)
    dataset_dir: str | None = Field(None, max_length=512)
    hf_user: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
    # typed Any so that no validation error can ever echo a token back in a 422
    hf_token: Any = Field(None, description=f"refused: set {TOKEN_ENV} in the environment instead")


async def current(settings: Settings) -> SettingsView:
    stored = await ClientSettings.find_one(ClientSettings.key == "default")
    token = settings.hf_token is not None and bool(settings.hf_token.get_secret_value())
    return SettingsView(local_model_dir=stored.local_model_dir if stored else None,
                        dataset_dir=stored.dataset_dir if stored else None,
                        hf_user=(stored.hf_user if stored else None) or settings.hf_user, hf_token_set=token)


@router.get("", response_model=SettingsView)
async def get_settings(settings: SettingsDep) -> SettingsView:
    return await current(settings)


@router.post("", response_model=SettingsView, responses={422: {"description": "hf_token given, or a bad field"}})
async def save_settings(body: SettingsBody, settings: SettingsDep) -> SettingsView:
    """Store the non-secret fields; a token is refused (422) and nothing is stored."""
    if body.hf_token not in (None, ""):
        raise invalid_field(["body", "hf_token"], f"the HF token is never taken over HTTP nor stored: set {TOKEN_ENV} "
                            "in the environment of the models stage (and the bridge, for hf_token_set)")
    given = body.model_dump(exclude_none=True, exclude={"hf_token"})
    if given:
        await ClientSettings.upsert_by({"key": "default"}, given)
    return await current(settings)
