"""Versioned pydantic payloads for every subject of the contract.

Commands (`*.requested`, request-reply) forbid unknown fields, so a typo such as `learning_rte` is an
error that names the field instead of a silently ignored value. Facts ignore unknown fields so that an
older consumer keeps working when a newer producer adds one.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 1

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
_OLLAMA_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._/-]{0,127}(:[A-Za-z0-9._-]{1,64})?$")


class Payload(BaseModel):
    """Base of every payload. `v` is the schema version of the payload."""

    model_config = ConfigDict(extra="ignore")
    v: int = SCHEMA_VERSION
    # Each fact/command declares the subject that reports its failure, if any (see `failure_for`).
    failure_subject: ClassVar[str | None] = None


class Command(Payload):
    model_config = ConfigDict(extra="forbid")


class ErrorInfo(BaseModel):
    code: str
    message: str


# --------------------------------------------------------------------------- datasets

DatasetFormat = Literal["text", "alpaca", "chat"]


class LineError(BaseModel):
    line: int = Field(description="1-based line number in the uploaded file")
    message: str


class DatasetProfile(BaseModel):
    format: DatasetFormat
    rows: int
    bytes: int
    chars: int
    tokens_estimate: int = Field(description="approximate tokens (chars / 4, as OpenAI's estimator)")
    min_chars: int
    max_chars: int
    mean_chars: float
    roles: dict[str, int] = Field(default_factory=dict, description="chat only: messages per role")
    sha256: str


class DatasetUploaded(Payload):
    dataset_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{2,63}$")
    key: str = Field(description="object key in the bucket")
    name: str
    format: Literal["auto", "text", "alpaca", "chat"] = "auto"
    failure_subject: ClassVar[str | None] = "dataset.failed"


class DatasetValidated(Payload):
    dataset_id: str
    key: str
    name: str
    profile: DatasetProfile


class DatasetFailed(Payload):
    dataset_id: str
    error: ErrorInfo
    line_errors: list[LineError] = Field(default_factory=list)


# --------------------------------------------------------------------------- base models


class ModelPullRequested(Command):
    repo_id: str
    revision: str = "main"
    failure_subject: ClassVar[str | None] = "model.pull.failed"

    @field_validator("repo_id")
    @classmethod
    def _repo(cls, v: str) -> str:
        if not _REPO_RE.match(v) or ".." in v:
            raise ValueError("must look like 'org/name' (letters, digits, '.', '_', '-')")
        return v


class ModelPulled(Payload):
    repo_id: str
    revision: str
    sha: str = Field(description="resolved commit sha on the hub")
    prefix: str = Field(description="bucket prefix holding the snapshot")
    files: int
    bytes: int


class ModelPullFailed(Payload):
    repo_id: str
    revision: str = "main"
    error: ErrorInfo


# --------------------------------------------------------------------------- tuning


class Hyperparameters(BaseModel):
    """Typed training hyperparameters, validated up front (a bad value names its field)."""

    model_config = ConfigDict(extra="forbid")

    epochs: float | None = Field(None, gt=0, le=100)
    max_steps: int | None = Field(None, ge=1, le=10_000_000)
    learning_rate: float = Field(2e-4, gt=0, le=1)
    batch_size: int = Field(4, ge=1, le=1024)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    max_seq_len: int = Field(512, ge=8, le=131_072)
    lora_r: int = Field(8, ge=1, le=1024)
    lora_alpha: float = Field(16, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    validation_split: float = Field(0.1, ge=0, le=0.5)
    eval_steps: int = Field(50, ge=1)
    save_steps: int = Field(50, ge=1, description="checkpoint to the bucket every N optimizer steps")
    early_stopping_patience: int | None = Field(None, ge=1)
    seed: int = 42
    packing: bool = True
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"

    @model_validator(mode="after")
    def _length(self) -> Hyperparameters:
        if self.epochs is None and self.max_steps is None:
            self.epochs = 1
        return self


class ExportOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["adapter", "merged"] = "adapter"
    outtype: Literal["f16", "bf16", "q8_0"] = "f16"
    quantize: str | None = Field(None, description="Ollama create-time quantization, e.g. q4_K_M")
    system: str | None = None


# The original CodeTune's "quantization" presets were not llama.cpp types; these are the real ones.
SEED_QUANTIZATION: dict[str, ExportOptions] = {
    "none": ExportOptions(outtype="f16"),
    "int8": ExportOptions(outtype="q8_0"),  # llama.cpp's converter writes q8_0 directly
    "int4": ExportOptions(outtype="f16", quantize="q4_K_M"),  # Ollama quantizes f16 → q4_K_M at create time
}


class TuningRequested(Command):
    job_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{2,63}$")
    base_model: str
    revision: str = "main"
    dataset_id: str
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    name: str | None = Field(None, description="Ollama model name to publish as")
    export: ExportOptions | None = Field(default_factory=ExportOptions, description="null: do not export")
    failure_subject: ClassVar[str | None] = "tuning.failed"

    @field_validator("base_model")
    @classmethod
    def _repo(cls, v: str) -> str:
        return ModelPullRequested._repo(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _OLLAMA_NAME_RE.match(v):
            raise ValueError("must be a lowercase Ollama model name such as 'my-model' or 'me/model:tag'")
        return v


JobStatus = Literal["validating", "waiting", "queued", "running", "succeeded", "failed", "cancelled"]


class TuningProgress(Payload):
    job_id: str
    status: JobStatus
    step: int
    max_steps: int
    epoch: float = 0
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    message: str | None = None

    @property
    def progress(self) -> float:
        return min(1.0, self.step / self.max_steps) if self.max_steps else 0.0


class TuningCancelRequested(Command):
    job_id: str


class LossPoint(BaseModel):
    step: int
    loss: float | None = None
    eval_loss: float | None = None


class TrainMetrics(BaseModel):
    steps: int
    epochs: float
    train_loss: float | None
    eval_loss: float | None
    first_loss: float | None = None
    tokens: int
    tokens_per_s: float
    duration_s: float
    resumed_from_step: int | None = None


class TuningCompleted(Payload):
    job_id: str
    base_model: str
    sha: str
    dataset_id: str
    adapter_key: str = Field(description="bucket prefix of the saved LoRA adapter")
    plot_key: str | None = None
    metrics: TrainMetrics
    loss_history: list[LossPoint]
    name: str | None = None
    export: ExportOptions | None = None
    failure_subject: ClassVar[str | None] = "model.export.failed"


class TuningFailed(Payload):
    job_id: str
    error: ErrorInfo


class TuningCancelled(Payload):
    job_id: str
    step: int


# --------------------------------------------------------------------------- export and serving


class ModelExported(Payload):
    job_id: str
    name: str
    mode: Literal["adapter", "merged"]
    model_key: str = Field(description="GGUF of the base (adapter mode) or merged model")
    adapter_key: str | None = None
    modelfile_key: str
    template: str
    stop: list[str]
    system: str | None = None
    quantize: str | None = None
    failure_subject: ClassVar[str | None] = "model.publish.failed"


class ModelExportFailed(Payload):
    job_id: str
    error: ErrorInfo


class ModelPublished(Payload):
    job_id: str
    name: str
    ollama_host: str


class ModelPublishFailed(Payload):
    job_id: str
    name: str | None = None
    error: ErrorInfo


# --------------------------------------------------------------------------- Ollama request-reply


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class OllamaListRequest(Command):
    pass


class OllamaModelRef(Command):
    model: str


class OllamaChatRequest(Command):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    options: dict[str, Any] | None = None


class OllamaCreateRequest(Command):
    """Create a model from a Modelfile (the original's /ollama/create). `FROM` names a GGUF in the bucket
    (`gguf_key`, or a bucket key in FROM itself) or a model Ollama already has; `ADAPTER` a bucket key."""

    name: str
    modelfile: str = Field(min_length=4)
    gguf_key: str | None = Field(None, description="bucket key of the GGUF that FROM refers to")


class OllamaReply(BaseModel):
    ok: bool = True
    result: Any = None
    error: ErrorInfo | None = None


# --------------------------------------------------------------------------- dead letters


class DeadLetter(Payload):
    subject: str
    reason: ErrorInfo
    body: str = Field(description="the original body, as text (base64 with 'b64:' prefix if not UTF-8)")
    headers: dict[str, str] = Field(default_factory=dict)
    num_delivered: int = 1
    stream_seq: int | None = None
    at: datetime
