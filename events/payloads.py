"""Versioned pydantic payloads for every subject of the contract.

Commands (`*.requested`, request-reply) forbid unknown fields, so a typo such as `learning_rte` is an
error that names the field instead of a silently ignored value. Facts ignore unknown fields so that an
older consumer keeps working when a newer producer adds one.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from core import formats
from core.errors import UnsafeKeyError
from core.keys import check_key
from events.ids import ID_PATTERN

SCHEMA_VERSION = 1

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
_OLLAMA_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._/-]{0,127}(:[A-Za-z0-9._-]{1,64})?$")
_REVISION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")


# ---------------------------------------------------------------- the one rule for keys, ids and names
# Every key, id and name in a consumed payload (commands and facts alike: anyone may publish either) is
# checked here, before any handler sees it; a bad one is a schema failure (dead letter, invalid_payload).


def _key(v: str) -> str:
    try:
        return check_key(v)
    except UnsafeKeyError as e:
        raise ValueError(f"unsafe key: {e.message}") from None


def _sha(v: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", v) or v in {".", ".."}:
        raise ValueError("must be a commit sha (letters, digits, '.', '_', '-'; at most 128)")
    return v


def _revision(v: str) -> str:
    if not _REVISION_RE.match(v) or ".." in v:
        raise ValueError("must be a branch, tag or commit (letters, digits, '.', '_', '-', '/'; at most 128)")
    return v


def _repo_id(v: str) -> str:
    if not _REPO_RE.match(v) or ".." in v:
        raise ValueError("must look like 'org/name' (letters, digits, '.', '_', '-')")
    return v


def _ollama_name(v: str) -> str:
    if not _OLLAMA_NAME_RE.match(v) or ".." in v:
        raise ValueError("must be a lowercase Ollama model name such as 'my-model' or 'me/model:tag'")
    return v


Key = Annotated[str, AfterValidator(_key)]
"""A bucket key (or prefix) from outside: relative, no `..`/NUL, safe characters, bounded (core.keys)."""
Id = Annotated[str, Field(pattern=ID_PATTERN, description="3-64 of [A-Za-z0-9_-]")]
Sha = Annotated[str, AfterValidator(_sha)]
Revision = Annotated[str, AfterValidator(_revision)]
RepoId = Annotated[str, AfterValidator(_repo_id)]
OllamaName = Annotated[str, AfterValidator(_ollama_name)]
FileName = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f/\\]+$")]


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
    dead_letter_seq: int | None = Field(None, description="set when the failing message was dead-lettered: "
                                        "its sequence in the DEAD_LETTERS stream (`codetune dlq show SEQ`)")


# --------------------------------------------------------------------------- datasets

# Derived from the format registry (core/formats/, one module per format): never listed by hand.
DatasetFormat = Literal[formats.NAMES]  # type: ignore[valid-type]
UploadFormat = Literal[("auto", *formats.NAMES)]  # type: ignore[valid-type]  # "auto": detected from the file


class LineError(BaseModel):
    line: int = Field(description="1-based line number in the uploaded file")
    message: str


class LintWarning(BaseModel):
    """Something in the data that trains badly but is not an error (the dataset stays usable)."""

    code: Literal["duplicate_rows", "empty_assistant_turns", "no_trainable_tokens", "truncated_rows",
                  "train_eval_overlap"]
    count: int = Field(description="rows concerned")
    message: str
    lines: list[int] = Field(default_factory=list, description="1-based lines of the first ones (at most 20)")

    MAX_LINES: ClassVar[int] = 20

    @classmethod
    def of(cls, code: str, lines: list[int], message: str) -> LintWarning | None:
        """A warning for `lines` (None when there are none); `{n}` in `message` becomes their count. The one
        constructor the datasets stage (validation) and the tuning stage (lint at tokenization) share."""
        if not lines:
            return None
        return cls.model_validate({"code": code, "count": len(lines), "message": message.format(n=len(lines)),
                                   "lines": lines[:cls.MAX_LINES]})


class LengthBucket(BaseModel):
    upto: int | None = Field(description="rows of at most this many tokens (above the previous bucket); "
                                         "None: longer than max_seq_len")
    rows: int


class DatasetLint(BaseModel):
    """The dataset as the job's model sees it: token lengths with its tokenizer, after its chat template."""

    rows: int
    max_seq_len: int
    tokens: int = Field(description="tokens of all rows before truncation")
    max_tokens: int
    histogram: list[LengthBucket]
    truncated: int = Field(description="rows longer than max_seq_len (cut at max_seq_len)")
    no_trainable: int = Field(description="rows with no trainable token after templating and truncation "
                                          "(skipped)")
    duplicates: int = Field(description="rows identical to an earlier row")
    train_eval_overlap: int = Field(description="validation rows identical to a training row")
    train_rows: int
    eval_rows: int
    warnings: list[LintWarning] = Field(default_factory=list)


class TrainEstimate(BaseModel):
    """How long training should take: its tokens at the speed of its first optimizer steps."""

    tokens: int = Field(description="tokens the whole run processes (all steps)")
    tokens_per_s: float = Field(description="measured over the first `measured_steps` steps of this run")
    seconds: float = Field(description="tokens / tokens_per_s: the estimated training time")
    measured_steps: int


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
    warnings: list[LintWarning] = Field(default_factory=list, description="duplicates, rows with nothing to "
                                                                          "train on, empty assistant turns")


class DatasetUploaded(Payload):
    dataset_id: Id
    key: Key = Field(description="object key in the bucket")
    name: FileName
    format: UploadFormat = "auto"
    failure_subject: ClassVar[str | None] = "dataset.failed"


class DatasetValidated(Payload):
    dataset_id: Id
    key: Key
    name: FileName
    profile: DatasetProfile


class DatasetFailed(Payload):
    dataset_id: Id
    error: ErrorInfo
    line_errors: list[LineError] = Field(default_factory=list)


# --------------------------------------------------------------------------- base models


class ModelPullRequested(Command):
    repo_id: str
    revision: Revision = "main"
    failure_subject: ClassVar[str | None] = "model.pull.failed"

    @field_validator("repo_id")
    @classmethod
    def _repo(cls, v: str) -> str:
        return _repo_id(v)


class ModelPulled(Payload):
    repo_id: RepoId
    revision: Revision
    sha: Sha = Field(description="resolved commit sha on the hub")
    prefix: Key = Field(description="bucket prefix holding the snapshot")
    files: int
    bytes: int


class ModelPullFailed(Payload):
    repo_id: RepoId
    revision: Revision = "main"
    error: ErrorInfo


class ModelPushRequested(Command):
    """Push a finished job's artifacts (peft adapter, GGUF files, Modelfile, a model card) to a hub repo.
    The HF token is the models stage's setting, never part of the command."""

    job_id: Id
    repo_id: RepoId = Field(description="the hub repo to push to, with its namespace: 'user/name'")
    private: bool = True
    failure_subject: ClassVar[str | None] = "model.push.failed"

    @field_validator("repo_id")
    @classmethod
    def _namespaced(cls, v: str) -> str:
        if "/" not in v:
            raise ValueError("needs a namespace: 'user/name'")
        return v


class ModelPushed(Payload):
    job_id: Id
    repo_id: RepoId
    private: bool
    commit_url: str | None = Field(None, max_length=2048)
    files: list[Annotated[str, Field(max_length=1024)]] = Field(default_factory=list, max_length=10_000)


class ModelPushFailed(Payload):
    job_id: Id
    repo_id: RepoId
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
    eval_samples: int = Field(3, ge=0, le=32, description="held-out prompts answered greedily by base and "
                                                          "tuned model in the job's evaluation report")
    devices: int = Field(1, ge=1, le=64, description="training processes (one per GPU; gloo on CPU) sharing each "
                                                     "global batch; a worker caps it at CODETUNE_TUNING_MAX_DEVICES")
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description="with devices > 1: ddp replicates the model in "
                                             "every process; fsdp shards the frozen base across them (FSDP2), "
                                             "for a base larger than one GPU")

    @model_validator(mode="after")
    def _length(self) -> Hyperparameters:
        if self.epochs is None and self.max_steps is None:
            self.epochs = 1
        if self.parallel == "fsdp" and self.devices < 2:
            raise ValueError("parallel 'fsdp' shards the model across processes: it needs devices >= 2")
        return self


class ExportOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["adapter", "merged"] = "adapter"
    outtype: Literal["f16", "bf16", "q8_0"] = "f16"
    quantize: str | None = Field(None, pattern=r"^[A-Za-z0-9_]{1,32}$",
                                  description="Ollama create-time quantization, e.g. q4_K_M")
    system: str | None = None
    gate: bool = Field(True, description="publish only if the evaluation report passes the quality gate")


# The original CodeTune's "quantization" presets were not llama.cpp types; these are the real ones.
SEED_QUANTIZATION: dict[str, ExportOptions] = {
    "none": ExportOptions(outtype="f16"),
    "int8": ExportOptions(outtype="q8_0"),  # llama.cpp's converter writes q8_0 directly
    "int4": ExportOptions(outtype="f16", quantize="q4_K_M"),  # Ollama quantizes f16 → q4_K_M at create time
}


class TuningRequested(Command):
    job_id: Id | None = None
    base_model: str
    revision: Revision = "main"
    dataset_id: Id
    eval_dataset_id: Id | None = Field(None, description="a validated dataset of the same format whose rows "
                                                         "the evaluation report scores (default: the validation split)")
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
        return _ollama_name(v) if v is not None else None


JobStatus = Literal["validating", "waiting", "queued", "running", "succeeded", "failed", "cancelled"]


class TuningProgress(Payload):
    job_id: Id
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
    job_id: Id


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
    job_id: Id
    base_model: RepoId
    sha: Sha
    dataset_id: Id
    adapter_key: Key = Field(description="bucket prefix of the saved LoRA adapter")
    plot_key: Key | None = None
    metrics: TrainMetrics
    loss_history: list[LossPoint]
    name: OllamaName | None = None
    export: ExportOptions | None = None
    failure_subject: ClassVar[str | None] = "model.export.failed"


class TuningFailed(Payload):
    job_id: Id
    error: ErrorInfo


class TuningCancelled(Payload):
    job_id: Id
    step: int


# --------------------------------------------------------------------------- evaluation report

class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


_Text = Annotated[str, Field(max_length=4000)]


class EvalScores(BaseModel):
    """One model's scores on the held-out rows (teacher-forced over the answer tokens)."""

    loss: float | None = Field(None, description="mean next-token cross-entropy over the labelled tokens")
    token_accuracy: float | None = Field(None, description="share of labelled tokens that are the argmax")
    tokens: int = Field(0, description="labelled tokens scored")


class EvalSample(BaseModel):
    """A held-out prompt answered greedily by the base model and by the tuned adapter (transformers)."""

    prompt: _Text
    messages: list[ChatMessage] = Field(default_factory=list, max_length=64,
                                        description="chat rows: the prompt as messages (for the runtime check)")
    reference: _Text | None = None
    base: _Text
    tuned: _Text
    base_stopped: bool
    tuned_stopped: bool
    tuned_tokens: int
    tuned_ids: list[int] = Field(default_factory=list, max_length=64,
                                 description="first generated token ids of the tuned answer")


class RuntimeCheck(BaseModel):
    """The exported GGUF (+ adapter GGUF) answering a held-out prompt in llama.cpp (xllamacpp)."""

    prompt: _Text
    answer: _Text
    finish_reason: str = Field(description="'stop': an end-of-turn/stop token; 'length': the budget ran out")
    stopped: bool
    tokens: int
    budget: int
    expected: _Text = Field("", description="transformers' greedy answer for the same prompt")
    agree_tokens: int = Field(0, description="leading tokens of `expected` that the GGUF's answer reproduces")
    compared_tokens: int = 0
    error: str | None = None


class GateResult(BaseModel):
    enabled: bool
    passed: bool
    reasons: list[Annotated[str, Field(max_length=1000)]] = Field(default_factory=list, max_length=32)
    thresholds: dict[str, float | int | bool] = Field(default_factory=dict)


class EvaluationReport(BaseModel):
    """Per job: base vs tuned on the same held-out rows, sample answers, the GGUF check and the gate."""

    job_id: Id
    base_model: RepoId
    source: Literal["validation", "eval_file", "train", "none"] = Field(
        description="rows scored: the validation split, the request's eval dataset, or the training rows "
                    "when there is neither")
    rows: int = 0
    base: EvalScores = Field(default_factory=EvalScores)
    tuned: EvalScores = Field(default_factory=EvalScores)
    samples: list[EvalSample] = Field(default_factory=list, max_length=32)
    lint: list[Annotated[str, Field(max_length=1000)]] = Field(default_factory=list, max_length=64)
    runtime: RuntimeCheck | None = None
    gate: GateResult | None = None
    duration_s: float = 0.0
    error: str | None = Field(None, max_length=2000)
    json_key: Key | None = None
    markdown_key: Key | None = None


class TuningEvaluated(Payload):
    """The tuning stage scored base vs tuned right after training (the report's first part)."""

    job_id: Id
    report: EvaluationReport


class ModelEvaluated(Payload):
    """The export stage checked the GGUF and applied the gate (the complete report)."""

    job_id: Id
    passed: bool
    report: EvaluationReport


# --------------------------------------------------------------------------- export and serving


class ModelExported(Payload):
    job_id: Id
    name: OllamaName
    mode: Literal["adapter", "merged"]
    model_key: Key = Field(description="GGUF of the base (adapter mode) or merged model")
    adapter_key: Key | None = None
    modelfile_key: Key
    template: str = Field(max_length=65_536)
    stop: list[Annotated[str, Field(max_length=256)]] = Field(max_length=64)
    system: str | None = Field(None, max_length=65_536)
    quantize: str | None = Field(None, pattern=r"^[A-Za-z0-9_]{1,32}$")
    failure_subject: ClassVar[str | None] = "model.publish.failed"


class ModelExportFailed(Payload):
    job_id: Id
    error: ErrorInfo


class ModelPublished(Payload):
    job_id: Id
    name: OllamaName
    ollama_host: str


class ModelPublishFailed(Payload):
    job_id: Id
    name: str | None = None
    error: ErrorInfo


# --------------------------------------------------------------------------- Ollama request-reply


class OllamaListRequest(Command):
    pass


class OllamaModelRef(Command):
    model: str = Field(min_length=1, max_length=256)


class OllamaChatRequest(Command):
    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1)
    options: dict[str, Any] | None = None


class OllamaChatReply(BaseModel):
    """`ollama.chat`'s result: the answer and how it ended, as Ollama's /api/chat reports it. `done_reason`
    "stop" = the model ended its turn (end-of-turn/stop token), "length" = cut off at `num_predict`/context.
    Durations are nanoseconds; a field Ollama did not report is null."""

    message: ChatMessage
    done_reason: str | None = None
    prompt_eval_count: int | None = Field(None, description="prompt tokens evaluated")
    eval_count: int | None = Field(None, description="tokens generated")
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_duration: int | None = None
    eval_duration: int | None = None


class OllamaCreateRequest(Command):
    """Create a model from a Modelfile (the original's /ollama/create). `FROM` names a GGUF in the bucket
    (`gguf_key`, or a bucket key in FROM itself) or a model Ollama already has; `ADAPTER` a bucket key."""

    name: str = Field(min_length=1, max_length=256)
    modelfile: str = Field(min_length=4, max_length=65_536)
    # checked by the serving handler with the same key rule (core.keys.check_key), like the Modelfile's
    # FROM/ADAPTER keys, so that the bridge answers an unsafe key with 400 `unsafe_key`
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
    body_key: str | None = Field(None, description="bucket key of the full body when it did not fit the letter")
    body_size: int | None = Field(None, description="size in bytes of the original body")
    body_sha256: str | None = Field(None, description="sha256 (hex) of the original body")
    body_truncated: bool = Field(False, description="`body` is only a bounded prefix of the original")
