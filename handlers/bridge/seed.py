"""The seed's REST shapes and how they map onto the typed contract (plain functions, no HTTP).

Tuning parameters: the seed's worker read camelCase keys from a free-form dict. They map onto
`TuningRequested` as follows (anything else that names a `Hyperparameters` field, e.g. `batch_size`,
`lora_r`, `max_seq_len`, is passed through typed; other keys are ignored and listed back as `ignored`):

| seed key        | typed field                          | note                                        |
|-----------------|--------------------------------------|---------------------------------------------|
| `repo_id`       | `base_model`                         | required (hub repo id, e.g. `org/name`)     |
| `name`          | `name` (Ollama model name)           | lowercase Ollama name                       |
| `epochs`        | `hyperparameters.epochs`             |                                             |
| `trainingSteps` | `hyperparameters.max_steps`          |                                             |
| `learningRate`  | `hyperparameters.learning_rate`      | seed default 5e-5 kept                      |
| `quantization`  | `export`                             | see QUANTIZATION                            |
| `push`          | —                                    | ignored (listed back): push a finished job  |
|                 |                                      | with `POST /api/v1/models/push`             |

The seed's "quantization" presets were not llama.cpp types. They map to real ones:
- `none` → GGUF `f16`, no quantization;
- `int8` → GGUF `q8_0` (llama.cpp's converter writes it directly);
- `int4` → GGUF `f16`, then Ollama quantizes to `q4_K_M` at create time (K-quants need `llama-quantize`,
  which the converters do not include; Ollama's `create(quantize=...)` does it from f16).

Statuses: jobs follow the OpenAI fine-tuning model (validating → waiting/queued → running → succeeded |
failed | cancelled, then the export/serving `stage`). The seed's web client polls for the seed's own
strings, so `status` is mapped back (`seed_status`) and the native values are returned as `job_status`
and `stage`. A job is `queued` from the moment its request was accepted (the intake stage records it);
while queued its views carry `queue_position` (1 = the next to start), otherwise `queue_position` is null.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from events.ids import new_job_id
from events.payloads import SEED_QUANTIZATION, ExportOptions, Hyperparameters, TuningRequested
from handlers.bridge.errors import field_errors, invalid, invalid_field
from storage.documents import Dataset, TuningJob, UserModel
from storage.jobs import TERMINAL
from storage.keys import job_prefix

SEED_LEARNING_RATE = 5e-5

Quantization = Literal["none", "int8", "int4"]
QUANTIZATION: dict[str, ExportOptions] = SEED_QUANTIZATION


class SeedParameters(BaseModel):
    """The seed's `parameters` object (camelCase keys), typed."""

    model_config = ConfigDict(extra="allow")

    repo_id: str | None = Field(None, description="base model (hub repo id)")
    name: str | None = Field(None, description="Ollama model name to publish as")
    epochs: float | None = None
    trainingSteps: int | None = None
    learningRate: float = SEED_LEARNING_RATE
    quantization: Quantization = "none"
    push: bool = False


class SeedTuningCreate(BaseModel):
    dataset_id: str
    parameters: SeedParameters = Field(default_factory=SeedParameters)


# Where a typed field's error is reported, in the seed's terms.
_LOC: dict[tuple[str | int, ...], tuple[str | int, ...]] = {
    ("base_model",): ("parameters", "repo_id"),
    ("name",): ("parameters", "name"),
    ("hyperparameters", "epochs"): ("parameters", "epochs"),
    ("hyperparameters", "max_steps"): ("parameters", "trainingSteps"),
    ("hyperparameters", "learning_rate"): ("parameters", "learningRate"),
    ("hyperparameters",): ("parameters",),
    ("export",): ("parameters", "quantization"),
}


def tuning_request(dataset_id: str, params: SeedParameters, *, base_model: str | None = None,
                   job_id: str | None = None) -> tuple[TuningRequested, list[str]]:
    """The typed command for a seed request, and the parameter keys it ignored. 422 names seed fields."""
    extra = dict(params.model_extra or {})
    typed = {k: v for k, v in extra.items() if k in Hyperparameters.model_fields}
    ignored = sorted(k for k in extra if k not in typed) + (["push"] if params.push else [])
    if not (params.repo_id or base_model):
        raise invalid_field(("body", "parameters", "repo_id"), "Field required (the base model's hub repo id)",
                            "missing")
    hyper = {"epochs": params.epochs, "max_steps": params.trainingSteps, "learning_rate": params.learningRate,
             **typed}
    try:
        request = TuningRequested(
            job_id=job_id or new_job_id(), base_model=params.repo_id or base_model or "", dataset_id=dataset_id,
            name=params.name, hyperparameters={k: v for k, v in hyper.items() if v is not None},
            export=QUANTIZATION[params.quantization],
        )
    except ValidationError as e:
        raise invalid(field_errors(e, ("body",), _LOC)) from None
    return request, ignored


def quantization_of(export: dict[str, Any] | None) -> Quantization:
    if not export:
        return "none"
    if export.get("outtype") == "q8_0":
        return "int8"
    if str(export.get("quantize") or "").lower().startswith("q4"):
        return "int4"
    return "none"


def seed_parameters(base_model: str, name: str | None, hyper: dict[str, Any], export: dict[str, Any] | None
                    ) -> dict[str, Any]:
    """Typed job fields shown as the seed's parameters (plus the typed ones, for new clients)."""
    return {
        "repo_id": base_model, "name": name, "epochs": hyper.get("epochs"), "trainingSteps": hyper.get("max_steps"),
        "learningRate": hyper.get("learning_rate"), "quantization": quantization_of(export),
        "hyperparameters": hyper, "export": export,
    }


def seed_status(job: TuningJob) -> str:
    """The seed's status strings (what its web client polls for) from the typed status and stage."""
    if job.status == "succeeded":
        if job.export is None:
            return "completed"
        if job.stage in ("export_failed", "publish_failed"):  # e.g. the quality gate: the client stops polling
            return "failed"
        return {"exporting": "converting", "exported": "creating_model", "publishing": "creating_model",
                "published": "completed"}.get(job.stage or "", "training_complete")
    return {"validating": "queued", "queued": "queued", "waiting": "downloading", "running": "training",
            "failed": "failed", "cancelled": "cancelled"}.get(job.status, job.status)


def job_result(job: TuningJob) -> dict[str, Any] | None:
    if job.status not in TERMINAL and job.stage is None:
        return None
    return {
        "error": job.error.model_dump() if job.error else None, "metrics": job.metrics,
        "adapter_key": job.adapter_key, "plot_key": job.plot_key, "artifacts": job.artifacts, "name": job.name,
    }


def tuning_view(job: TuningJob, queue_position: int | None = None) -> dict[str, Any]:
    """The seed's `Tuning` object (+ `job_status`, `stage`, `queue_position`)."""
    return {
        "id": job.job_id, "dataset_id": job.dataset_id,
        "parameters": seed_parameters(job.base_model, job.name, job.hyperparameters, job.export),
        "status": seed_status(job), "job_status": job.status, "stage": job.stage, "progress": job.progress,
        "queue_position": queue_position, "result": job_result(job), "created_at": job.created_at,
        "updated_at": job.updated_at,
    }


def requested_view(request: TuningRequested) -> dict[str, Any]:
    """The seed's `Tuning` object for a job requested but not recorded yet (the intake stage records it;
    this view is answered only when it did not within `intake_wait_s`: `job_status` is then null)."""
    at = datetime.now(UTC)
    return {
        "id": request.job_id, "dataset_id": request.dataset_id,
        "parameters": seed_parameters(request.base_model, request.name, request.hyperparameters.model_dump(),
                                      request.export.model_dump() if request.export else None),
        "status": "queued", "job_status": None, "stage": None, "progress": 0.0, "queue_position": None,
        "result": None, "created_at": at, "updated_at": at,
    }


def progress_view(job: TuningJob, queue_position: int | None = None) -> dict[str, Any]:
    """The seed's progress object (+ the live training figures and `queue_position`)."""
    return {
        "task_id": job.job_id, "progress": job.progress, "status": seed_status(job), "job_status": job.status,
        "stage": job.stage, "queue_position": queue_position, "result": job_result(job),
        "updated_at": job.updated_at, "step": job.step, "max_steps": job.max_steps, "epoch": job.epoch,
        "loss": job.loss, "eval_loss": job.eval_loss,
        "tokens_per_s": job.tokens_per_s, "eta_s": job.eta_s,
    }


def dataset_view(d: Dataset) -> dict[str, Any]:
    """The seed's dataset row `{name, path, size}`: path is the object key in the bucket."""
    return {
        "name": d.name, "path": d.key, "size": d.size, "dataset_id": d.dataset_id, "status": d.status,
        "format": d.format, "rows": (d.profile or {}).get("rows"),
        "error": d.error.model_dump() if d.error else None, "created_at": d.created_at,
    }


def saved_model_view(m: UserModel) -> dict[str, Any]:
    """The seed's `SavedModel`: local_path is the job's prefix in the bucket."""
    return {
        "id": m.model_id, "name": m.name, "dataset_id": m.dataset_id, "parameters": m.parameters,
        "result": m.result, "local_path": job_prefix(m.job_id) if m.job_id else None, "hf_repo_id": m.hf_repo_id,
        "job_id": m.job_id, "base_model": m.base_model, "created_at": m.created_at, "updated_at": m.updated_at,
    }
