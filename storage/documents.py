"""Beanie documents. Every field that is queried has an index; ids are ours (strings), not ObjectIds.

Writes that may race (two deliveries of one event) use one atomic upsert (`upsert_by`), never
find-then-insert.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

import pymongo
from beanie import Document
from pydantic import BaseModel as Model
from pydantic import Field
from pymongo import IndexModel, ReturnDocument

from events.payloads import DatasetLint, TrainEstimate


def now() -> datetime:
    return datetime.now(UTC)


class Timestamped(Document):
    created_at: datetime = Field(default_factory=now)
    updated_at: datetime = Field(default_factory=now)

    @classmethod
    async def upsert_by(cls, key: dict[str, Any], set_: dict[str, Any],
                        on_insert: dict[str, Any] | None = None, *, returning: bool = True) -> Any:
        """Atomic find_one_and_update(upsert=True); returns the document after the update (with
        `returning=False`: an update_one(upsert=True), nothing read back or validated, returns None)."""
        coll = cls.get_pymongo_collection()
        set_ = {**set_, "updated_at": now()}
        insert = {"created_at": now(), **(on_insert or {})}
        insert = {k: v for k, v in insert.items() if k not in set_ and k not in key}
        if not returning:
            await coll.update_one(key, {"$set": set_, "$setOnInsert": insert}, upsert=True)
            return None
        raw = await coll.find_one_and_update(
            key, {"$set": set_, "$setOnInsert": insert}, upsert=True, return_document=ReturnDocument.AFTER
        )
        return cls.model_validate(raw)


class ErrorDoc(Model):
    code: str
    message: str


class Dataset(Timestamped):
    dataset_id: str
    name: str
    key: str
    status: Literal["uploaded", "validated", "failed"] = "uploaded"
    format: str | None = None
    size: int | None = None
    profile: dict[str, Any] | None = None
    line_errors: list[dict[str, Any]] = Field(default_factory=list)
    error: ErrorDoc | None = None
    sha256: str | None = Field(None, description="of the stored file, as the upload computed it")
    aliases: list[str] = Field(default_factory=list, description="other names this same content was uploaded as")

    class Settings:
        name = "datasets"
        indexes = [
            IndexModel([("dataset_id", pymongo.ASCENDING)], unique=True),
            IndexModel([("created_at", pymongo.DESCENDING)]),
        ]


class DatasetContent(Document):
    """Which dataset holds a given content (`content` = `<sha256>:<requested format>`). Claimed with one
    atomic upsert on a unique index, so two uploads of the same bytes — even at the same moment — end as
    one dataset."""

    content: str
    dataset_id: str
    key: str
    name: str
    created_at: datetime = Field(default_factory=now)

    class Settings:
        name = "dataset_contents"
        indexes = [IndexModel([("content", pymongo.ASCENDING)], unique=True)]


class BaseLLM(Timestamped):
    """A base LLM snapshot pulled from the hub into the bucket (one per repo + revision). Named so it does
    not shadow pydantic's `BaseModel`; its collection keeps the name `base_models` so stored data stays found."""

    repo_id: str
    revision: str
    sha: str | None = None
    prefix: str | None = None
    files: int = 0
    bytes: int = 0
    status: Literal["pulling", "ready", "failed"] = "pulling"
    error: ErrorDoc | None = None

    class Settings:
        name = "base_models"
        indexes = [
            IndexModel([("repo_id", pymongo.ASCENDING), ("revision", pymongo.ASCENDING)], unique=True),
            IndexModel([("sha", pymongo.ASCENDING)]),
        ]


class HubPush(Timestamped):
    """A job's artifacts pushed to a hub repo by the models stage (one per job + repo)."""

    job_id: str
    repo_id: str
    private: bool = True
    status: Literal["pushing", "pushed", "failed"] = "pushing"
    commit_url: str | None = None
    files: list[str] = Field(default_factory=list)
    error: ErrorDoc | None = None

    class Settings:
        name = "hub_pushes"
        indexes = [IndexModel([("job_id", pymongo.ASCENDING), ("repo_id", pymongo.ASCENDING)], unique=True)]


class TuningJob(Timestamped):
    job_id: str
    base_model: str
    revision: str = "main"
    sha: str | None = None
    dataset_id: str
    eval_dataset_id: str | None = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    name: str | None = None
    export: dict[str, Any] | None = None
    status: str = "validating"
    stage: str | None = Field(None, description="after training: exporting, exported, publishing, published")
    error: ErrorDoc | None = None
    waiting_for: list[str] = Field(default_factory=list)
    step: int = 0
    max_steps: int = 0
    epoch: float = 0
    loss: float | None = None
    eval_loss: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    loss_history: list[dict[str, Any]] = Field(default_factory=list)
    checkpoint_key: str | None = None
    checkpoint_step: int | None = None
    adapter_key: str | None = None
    plot_key: str | None = None
    metrics: dict[str, Any] | None = None
    dataset_lint: DatasetLint | None = Field(None, description="the data as the job's tokenizer sees it")
    estimate: TrainEstimate | None = Field(None, description="training time from the first steps' speed")
    artifacts: dict[str, Any] = Field(default_factory=dict)
    report: dict[str, Any] | None = Field(None, description="the evaluation report (events.payloads."
                                                           "EvaluationReport): tuning writes it, export completes it")
    attempts: int = 0
    outcome_sent: bool = Field(False, description="the terminal outcome event was published")
    cancel_requested: bool = False
    traceparent: str | None = Field(None, description="the job's trace (README \"Tracing\"), when tracing was on")
    lease_owner: str | None = Field(None, description="worker running the job; renewed by its heartbeat")
    lease_until: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def progress(self) -> float:
        if self.status == "succeeded":
            return 1.0
        return min(1.0, self.step / self.max_steps) if self.max_steps else 0.0

    class Settings:
        name = "tuning_jobs"
        indexes = [
            IndexModel([("job_id", pymongo.ASCENDING)], unique=True),
            IndexModel([("status", pymongo.ASCENDING), ("created_at", pymongo.DESCENDING)]),
            IndexModel([("created_at", pymongo.DESCENDING)]),
            IndexModel([("dataset_id", pymongo.ASCENDING)]),
            IndexModel([("base_model", pymongo.ASCENDING), ("revision", pymongo.ASCENDING)]),
            IndexModel([("waiting_for", pymongo.ASCENDING)]),
        ]


class UserModel(Timestamped):
    """A finished job saved under a name (the seed's /user-models)."""

    model_id: str
    name: str
    job_id: str | None = None
    dataset_id: str | None = None
    base_model: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    result: dict[str, Any] | None = None
    artifacts: dict[str, Any] = Field(default_factory=dict)
    hf_repo_id: str | None = None

    class Settings:
        name = "user_models"
        indexes = [
            IndexModel([("model_id", pymongo.ASCENDING)], unique=True),
            IndexModel([("name", pymongo.ASCENDING)]),
            IndexModel([("created_at", pymongo.DESCENDING)]),
        ]


class ClientSettings(Timestamped):
    """The bridge's `/api/v1/settings`: the original web client's non-secret preferences (one document).
    Never a token: secrets come from the environment."""

    key: str = "default"
    local_model_dir: str | None = None
    dataset_dir: str | None = None
    hf_user: str | None = None

    class Settings:
        name = "client_settings"
        indexes = [IndexModel([("key", pymongo.ASCENDING)], unique=True)]


class ServedModel(Timestamped):
    """A model created in Ollama by the serving stage."""

    name: str
    job_id: str | None = None
    ollama_host: str
    files: dict[str, str] = Field(default_factory=dict)
    adapters: dict[str, str] = Field(default_factory=dict)
    quantize: str | None = None

    class Settings:
        name = "served_models"
        indexes = [
            IndexModel([("name", pymongo.ASCENDING)], unique=True),
            IndexModel([("job_id", pymongo.ASCENDING)]),
        ]


DOCUMENTS: list[type[Document]] = [Dataset, DatasetContent, BaseLLM, HubPush, TuningJob, UserModel, ServedModel,
                                   ClientSettings]
