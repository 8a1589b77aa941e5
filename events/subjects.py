"""Subject names and the contract: each subject's payload, kind, meaning and its outside parties.

Which stage emits or consumes a subject is not written here: the stages declare it in code (their
routers' FastStream publishers and subscribers), and handlers/contract.py joins both into the README's
contract table and the NATS permissions (infra/natsauth.py), checked by `tests/unit/test_contract.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel

from events import payloads as p

DATASET_UPLOADED = "dataset.uploaded"
DATASET_VALIDATED = "dataset.validated"
DATASET_FAILED = "dataset.failed"
MODEL_PULL_REQUESTED = "model.pull.requested"
MODEL_PULLED = "model.pulled"
MODEL_PULL_FAILED = "model.pull.failed"
MODEL_PUSH_REQUESTED = "model.push.requested"
MODEL_PUSHED = "model.pushed"
MODEL_PUSH_FAILED = "model.push.failed"
TUNING_REQUESTED = "tuning.requested"
TUNING_PROGRESS = "tuning.progress"  # + ".<job_id>"
TUNING_CANCEL_REQUESTED = "tuning.cancel.requested"
TUNING_COMPLETED = "tuning.completed"
TUNING_FAILED = "tuning.failed"
TUNING_CANCELLED = "tuning.cancelled"
TUNING_EVALUATED = "tuning.evaluated"
MODEL_EXPORTED = "model.exported"
MODEL_EXPORT_FAILED = "model.export.failed"
MODEL_EVALUATED = "model.evaluated"
MODEL_PUBLISHED = "model.published"
MODEL_PUBLISH_FAILED = "model.publish.failed"
OLLAMA_MODELS = "ollama.models"
OLLAMA_PULL = "ollama.pull"
OLLAMA_SHOW = "ollama.show"
OLLAMA_DELETE = "ollama.delete"
OLLAMA_CHAT = "ollama.chat"
OLLAMA_CREATE = "ollama.create"
DEAD_LETTER = "dlq"  # + ".<original subject>"


def progress_subject(job_id: str) -> str:
    return f"{TUNING_PROGRESS}.{job_id}"


def dead_letter_subject(subject: str) -> str:
    return f"{DEAD_LETTER}.{subject}"


Kind = Literal["command", "fact", "request-reply"]


@dataclass(frozen=True)
class SubjectSpec:
    """`clients_emit` / `clients_consume`: the outside parties (CLI, bridge, any client, operators, anyone)
    that publish / read the subject, "" for none; the stages that do come from their routers."""

    subject: str
    payload: type[BaseModel]
    kind: Kind
    clients_emit: str
    clients_consume: str
    meaning: str


CONTRACT: tuple[SubjectSpec, ...] = (
    SubjectSpec(DATASET_UPLOADED, p.DatasetUploaded, "fact", "CLI, bridge, any client", "",
                "a file is in the bucket; validate and profile it"),
    SubjectSpec(DATASET_VALIDATED, p.DatasetValidated, "fact", "", "", "format, rows, token estimate"),
    SubjectSpec(DATASET_FAILED, p.DatasetFailed, "fact", "", "", "reason and line errors (line number + message)"),
    SubjectSpec(MODEL_PULL_REQUESTED, p.ModelPullRequested, "command", "CLI, bridge", "",
                "snapshot a hub repo (revision pinned) into the bucket"),
    SubjectSpec(MODEL_PULLED, p.ModelPulled, "fact", "", "", "base model is in the bucket under its commit sha"),
    SubjectSpec(MODEL_PULL_FAILED, p.ModelPullFailed, "fact", "", "", "the hub's reason (missing, gated, ...)"),
    SubjectSpec(MODEL_PUSH_REQUESTED, p.ModelPushRequested, "command", "CLI (pipeline --push), bridge", "",
                "push a finished job's adapter, GGUFs, Modelfile and model card to a hub repo"),
    SubjectSpec(MODEL_PUSHED, p.ModelPushed, "fact", "", "CLI, bridge, anyone",
                "the job's artifacts are in the hub repo (commit url, files)"),
    SubjectSpec(MODEL_PUSH_FAILED, p.ModelPushFailed, "fact", "", "CLI, bridge, anyone",
                "the reason (no token, job not exported, hub refused, ...)"),
    SubjectSpec(TUNING_REQUESTED, p.TuningRequested, "command", "CLI, bridge, user-model import", "",
                "a job spec: base model, dataset, typed hyperparameters"),
    SubjectSpec(TUNING_PROGRESS + ".<job_id>", p.TuningProgress, "fact", "", "CLI, bridge (SSE), anyone",
                "step, loss, eval loss, tokens/s, ETA"),
    SubjectSpec(TUNING_CANCEL_REQUESTED, p.TuningCancelRequested, "command", "CLI, bridge", "",
                "stop a job at the next step"),
    SubjectSpec(TUNING_EVALUATED, p.TuningEvaluated, "fact", "", "anyone",
                "evaluation report: base vs tuned loss and token accuracy on held-out rows, sample answers"),
    SubjectSpec(TUNING_COMPLETED, p.TuningCompleted, "fact", "", "", "adapter + metrics + loss history"),
    SubjectSpec(TUNING_FAILED, p.TuningFailed, "fact", "", "anyone", "a reason {code, message}"),
    SubjectSpec(TUNING_CANCELLED, p.TuningCancelled, "fact", "", "anyone", "the job stopped on request"),
    SubjectSpec(MODEL_EXPORTED, p.ModelExported, "fact", "", "", "GGUF (+ adapter GGUF) + Modelfile in the bucket"),
    SubjectSpec(MODEL_EVALUATED, p.ModelEvaluated, "fact", "", "anyone",
                "the complete report: GGUF runtime check (answers, stops, agrees) and the quality gate"),
    SubjectSpec(MODEL_EXPORT_FAILED, p.ModelExportFailed, "fact", "", "anyone",
                "a reason (code `quality_gate`: the report did not pass)"),
    SubjectSpec(MODEL_PUBLISHED, p.ModelPublished, "fact", "", "anyone", "the model exists in Ollama under its name"),
    SubjectSpec(MODEL_PUBLISH_FAILED, p.ModelPublishFailed, "fact", "", "anyone", "a reason"),
    SubjectSpec(OLLAMA_MODELS, p.OllamaListRequest, "request-reply", "CLI, bridge", "", "list models"),
    SubjectSpec(OLLAMA_PULL, p.OllamaModelRef, "request-reply", "CLI, bridge", "", "pull a model"),
    SubjectSpec(OLLAMA_SHOW, p.OllamaModelRef, "request-reply", "CLI, bridge", "", "show a model"),
    SubjectSpec(OLLAMA_DELETE, p.OllamaModelRef, "request-reply", "CLI, bridge", "", "delete a model"),
    SubjectSpec(OLLAMA_CHAT, p.OllamaChatRequest, "request-reply", "CLI, bridge", "",
                "chat once; reply `OllamaChatReply`: answer, done_reason, token counts, durations"),
    SubjectSpec(OLLAMA_CREATE, p.OllamaCreateRequest, "request-reply", "bridge", "",
                "create a model from a Modelfile + GGUF in the bucket"),
    SubjectSpec(DEAD_LETTER + ".<subject>", p.DeadLetter, "fact", "", "operators",
                "a message that could not be handled, with the reason"),
)


def spec_for(subject: str) -> SubjectSpec:
    for spec in CONTRACT:
        if spec.subject == subject:
            return spec
    for spec in CONTRACT:
        head, sep, _ = spec.subject.partition(".<")
        if sep and subject.startswith(head + "."):
            return spec
    raise KeyError(subject)


def payload_for(subject: str) -> type[BaseModel]:
    return spec_for(subject).payload


def subject_of(payload: BaseModel) -> str:
    """The subject a payload instance is emitted on (progress needs its job id)."""
    if isinstance(payload, p.TuningProgress):
        return progress_subject(payload.job_id)
    for spec in CONTRACT:
        if type(payload) is spec.payload and spec.kind == "fact" and "<" not in spec.subject:
            return spec.subject
    for spec in CONTRACT:
        if type(payload) is spec.payload and "<" not in spec.subject:
            return spec.subject
    raise KeyError(type(payload).__name__)
