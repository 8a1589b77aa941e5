"""One error hierarchy for CodeTune; every failure event carries `{code, message}` from these.

- `CodeTuneError`: base; `code` is a stable machine-readable string.
- `InvalidInputError`: the request itself is wrong; retrying cannot help (dead-letter / `*.failed`).
- `NotFoundError`: something named by the request does not exist (dataset id, hub repo, job).
- `TransientError`: a dependency is down or an object is not there yet; the message is retried with
  backoff, a bounded number of times, then dead-lettered.
"""

from __future__ import annotations


class CodeTuneError(Exception):
    code = "error"
    retryable = False

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code:
            self.code = code

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class InvalidInputError(CodeTuneError):
    code = "invalid_input"


class InvalidPayloadError(InvalidInputError):
    """A message body that is not JSON or fails its schema."""

    code = "invalid_payload"


class DatasetFormatError(InvalidInputError):
    code = "invalid_dataset"


class HyperparameterError(InvalidInputError):
    code = "invalid_hyperparameters"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class UnsafeKeyError(InvalidInputError):
    code = "unsafe_key"


class NotFoundError(CodeTuneError):
    code = "not_found"


class RepoNotFoundError(NotFoundError):
    code = "model_not_found"


class JobNotFoundError(NotFoundError):
    code = "job_not_found"


class FactMismatchError(InvalidInputError):
    """A fact that contradicts the recorded state (wrong stage, other sha, keys that are not the job's)."""

    code = "fact_mismatch"


class GatedRepoError(CodeTuneError):
    code = "model_gated"


class HubRefusedError(CodeTuneError):
    """The hub refused a push (bad or read-only token, a repo the token may not write, ...)."""

    code = "hub_refused"


class ExportError(CodeTuneError):
    code = "export_failed"


class QualityGateError(ExportError):
    """The job's evaluation report did not pass the quality gate: nothing is published."""

    code = "quality_gate"


class TransientError(CodeTuneError):
    code = "transient"
    retryable = True


class StorageUnavailableError(TransientError):
    code = "storage_unavailable"


class ConvertersUnavailableError(TransientError):
    """llama.cpp's converters could not be downloaded (registry unreachable): retried, not a job failure."""

    code = "converters_unavailable"


class OllamaError(CodeTuneError):
    """Ollama answered with an error (its message is kept verbatim)."""

    code = "ollama_error"

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class OllamaRequestError(InvalidInputError):
    code = "ollama_bad_request"


class OllamaModelNotFoundError(NotFoundError):
    code = "ollama_model_not_found"


class OllamaUnavailableError(TransientError):
    code = "ollama_unavailable"
