"""All configuration, from the environment and `.env` (see `.env.example`).

Secrets (HF token, S3 keys, NATS passwords/token, webhook secret, bridge token) are `SecretStr`:
they never appear in a repr, a log line, a document or an object.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CODETUNE_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # --- NATS JetStream
    # One server, or a cluster's servers comma-separated (`nats://a:4222,nats://b:4222,nats://c:4222`): clients
    # connect to any of them and reconnect to the others when one goes away.
    nats_url: str = Field("nats://127.0.0.1:4222", validation_alias=AliasChoices("CODETUNE_NATS_URL", "NATS_URL"))
    # JetStream replicas of every stream, durable consumer and KV bucket (`codetune stack provision`): 3 on a
    # 3-node cluster, 1 on a single server. Unset, the local stack's: 3 when it is a cluster, else 1.
    nats_replicas: int = Field(1, ge=1, le=5)
    # Explicit user/password or token: every process connects with them (one shared identity).
    nats_user: str | None = None
    nats_password: SecretStr | None = None
    nats_token: SecretStr | None = None
    # Role passwords (see README "Security"): a process connects as the user of its role when the role's
    # password is set and `nats_user` is not. The local stack generates them into `<home>/nats-users.json`.
    nats_admin_password: SecretStr | None = None
    nats_client_password: SecretStr | None = None
    nats_stages_password: SecretStr | None = None
    nats_datasets_password: SecretStr | None = None
    nats_intake_password: SecretStr | None = None
    nats_models_password: SecretStr | None = None
    nats_tuning_password: SecretStr | None = None
    nats_export_password: SecretStr | None = None
    nats_serving_password: SecretStr | None = None
    nats_ollama_password: SecretStr | None = None

    # --- MongoDB (the seed's MONGODB_URI / MONGODB_DB keep working)
    mongodb_uri: str = Field(
        "mongodb://127.0.0.1:27017/?directConnection=true",
        validation_alias=AliasChoices("CODETUNE_MONGODB_URI", "MONGODB_URI"),
    )
    mongodb_db: str = Field("codetune", validation_alias=AliasChoices("CODETUNE_MONGODB_DB", "MONGODB_DB"))

    # --- S3 (MinIO in production; SeaweedFS in the local stack)
    s3_endpoint: str = "127.0.0.1:9000"
    s3_access_key: SecretStr = SecretStr("codetune")
    s3_secret_key: SecretStr = SecretStr("codetune-local-secret")
    s3_bucket: str = "codetune"
    s3_secure: bool = False
    s3_region: str = "us-east-1"

    # --- Hugging Face (the seed's HUGGINGFACE_TOKEN keeps working)
    hf_token: SecretStr | None = Field(
        None, validation_alias=AliasChoices("CODETUNE_HF_TOKEN", "HF_TOKEN", "HUGGINGFACE_TOKEN")
    )
    hf_endpoint: str | None = Field(None, validation_alias=AliasChoices("CODETUNE_HF_ENDPOINT", "HF_ENDPOINT"))
    hf_cache_dir: Path | None = Field(None, validation_alias=AliasChoices("CODETUNE_HF_CACHE_DIR", "HF_HUB_CACHE"))
    hf_offline: bool = Field(False, validation_alias=AliasChoices("CODETUNE_HF_OFFLINE", "HF_HUB_OFFLINE"))
    # the namespace a push goes to when its repo name has none (`my-model` → `<hf_user>/my-model`)
    hf_user: str | None = Field(None, validation_alias=AliasChoices("CODETUNE_HF_USER", "HF_USER"))
    hub_timeout_s: float = Field(3.0, gt=0, description="hub search (GET /api/v1/models/): give up after this")

    # --- Ollama
    ollama_host: str = Field(
        "http://127.0.0.1:11434", validation_alias=AliasChoices("CODETUNE_OLLAMA_HOST", "OLLAMA_HOST")
    )

    # --- llama.cpp converters (installed by `codetune setup-llamacpp`; override with a checkout)
    llamacpp_dir: Path | None = None

    # --- Webhook bridge
    bridge_host: str = "127.0.0.1"
    bridge_port: int = 8080
    bridge_token: SecretStr | None = None
    webhook_secret: SecretStr | None = None
    webhook_max_bytes: int = 1_048_576
    webhook_tolerance_s: int = 300
    # Browser origins allowed by CORS: comma-separated (`*` for any, empty for none). Unset: the loopback
    # origins (http(s)://localhost|127.0.0.1|[::1], any port) when no bridge token is set, none otherwise.
    cors_origins: Annotated[list[str] | None, NoDecode] = None
    # the Ollama model `POST /api/v1/assistant/chat` talks to when the request names none
    assistant_model: str | None = None

    # --- Metrics (README "Metrics"): a worker serves Prometheus metrics on this port (unset: none; 0: any
    # free port, logged); the bridge serves GET /metrics on its own port
    metrics_port: int | None = Field(None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"

    # --- Local stack (loopback only)
    home: Path = Path(".codetune")
    stack_nats_port: int = 4222
    stack_nats_monitor_port: int = 8222
    # nodes of the local NATS (`codetune stack start --nats-cluster 3`; the last start's count is kept in
    # `<home>/stack.json`): node i (0-based) listens on stack_nats_port + i, monitor + i, route port + i
    stack_nats_cluster: int = Field(1, ge=1, le=5)
    stack_nats_route_port: int = 6222
    stack_mongo_port: int = 27017
    stack_s3_port: int = 9000
    stack_weed_base_port: int = 19330
    stack_secantus_python: Path | None = None

    # --- Pipeline behaviour
    dataset_max_line_errors: int = 20
    # how long the bridge and `codetune tune` wait for the intake stage to record a submitted job before
    # answering anyway (it takes milliseconds when intake runs; the answer says whether it was recorded)
    intake_wait_s: float = 5.0
    work_dir: Path | None = None
    # training processes one tuning job may use on this worker (a job's `devices` is capped at it; on CUDA
    # also at the GPUs the worker sees). 1: every job trains in the worker's own process.
    tuning_max_devices: int = Field(1, ge=1, le=64)
    # --- Retention (README "Retention and disk"; `codetune gc` applies it by hand)
    retention_local_scratch: bool = Field(
        True, description="remove a job's local files (scratch, GGUF copies) once its stage's effect is stored")
    retention_prune_checkpoints: bool = Field(
        True, description="remove a succeeded job's checkpoints from the bucket once its final adapter is stored")
    retention_failed_days: float = Field(
        7.0, ge=0, description="days a failed or cancelled job keeps its newest checkpoint (older ones go at once)")

    # --- Retries (README "Retries and outages"; events.streams.RetryPolicy): a failed delivery N is
    # retried after retry_delays_s[N-1] (the last repeating, at most retry_cap_s). An unreachable store
    # (S3, MongoDB, NATS, Ollama) is retried until those delays add up to retry_window_s; any other
    # error of unknown kind gets retry_attempts deliveries; then the message is dead-lettered once.
    retry_delays_s: tuple[float, ...] = Field((1.0, 5.0, 15.0, 30.0, 60.0), min_length=1)
    retry_cap_s: float = Field(60.0, gt=0)
    retry_window_s: float = Field(600.0, ge=0, description="how long an unreachable store is retried")
    retry_attempts: int = Field(5, ge=1, description="deliveries for an error of unknown kind")

    # --- Tracing (README "Tracing"): one OpenTelemetry trace per job, the context in message headers.
    # off (default: nothing is imported), console (spans printed on stdout) or otlp (OTLP/HTTP to the endpoint).
    tracing: Literal["off", "console", "otlp"] = "off"
    otlp_endpoint: str = Field("http://127.0.0.1:4318", description="OTLP/HTTP collector (`/v1/traces` added)")

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [o.strip().rstrip("/") for o in v.split(",") if o.strip()]
        return v
    # --- Evaluation report and quality gate (README "Evaluation report and quality gate")
    eval_max_rows: int = Field(64, ge=1, description="held-out rows scored for loss / token accuracy")
    eval_max_new_tokens: int = Field(64, ge=1, description="token budget of every sample answer and the "
                                                           "GGUF check: an answer must stop within it")
    eval_agree_tokens: int = Field(8, ge=1, description="leading tokens compared, GGUF vs transformers")
    gate_min_loss_improvement: float = Field(
        0.02, ge=0, lt=1, description="tuned held-out loss must be at least this fraction below the base's")
    gate_require_stop: bool = True  # the GGUF's answer ends at an end-of-turn/stop token within the budget
    gate_require_answers: bool = True  # no empty answer (tuned samples and the GGUF's)
    gate_min_agree_tokens: int = Field(
        1, ge=0, description="leading tokens of transformers' greedy answer the GGUF must reproduce")

    @model_validator(mode="after")
    def _stack_nats_cluster(self) -> Settings:
        """Unset, the NATS URL and replicas are the local stack's: every node's URL, 3 replicas on a cluster."""
        if "stack_nats_cluster" not in self.model_fields_set and self.stack_file.is_file():
            try:
                nodes = json.loads(self.stack_file.read_text()).get("nats_cluster", 1)
            except (OSError, ValueError, AttributeError):
                nodes = 1
            if isinstance(nodes, int) and 1 <= nodes <= 5:
                self.stack_nats_cluster = nodes
        if self.stack_nats_cluster > 1:
            if "nats_url" not in self.model_fields_set:
                self.nats_url = ",".join(f"nats://127.0.0.1:{p}" for p in self.stack_nats_ports)
            if "nats_replicas" not in self.model_fields_set and self.nats_is_local_stack:
                self.nats_replicas = min(3, self.stack_nats_cluster)
        return self

    @model_validator(mode="after")
    def _stack_nats_passwords(self) -> Settings:
        """Role passwords not set explicitly come from the local stack's generated file, if there is one
        and `nats_url` is the local stack's server (they are never sent to another server)."""
        path = self.nats_users_file
        if self.nats_is_local_stack and path.is_file():
            try:
                generated = json.loads(path.read_text())
            except (OSError, ValueError):
                generated = {}
            for role, password in generated.items():
                field = f"nats_{role}_password"
                if field in type(self).model_fields and getattr(self, field) is None and isinstance(password, str):
                    setattr(self, field, SecretStr(password))
        return self

    def nats_password_for(self, role: str) -> SecretStr | None:
        value = getattr(self, f"nats_{role}_password", None)
        return value if isinstance(value, SecretStr) else None

    @property
    def nats_servers(self) -> list[str]:
        """`nats_url` as a list of server URLs."""
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]

    @property
    def stack_nats_ports(self) -> list[int]:
        return [self.stack_nats_port + i for i in range(self.stack_nats_cluster)]

    @property
    def nats_is_local_stack(self) -> bool:
        """Every server in `nats_url` is one of the local stack's nodes."""
        urls = [urlsplit(u) for u in self.nats_servers]
        return bool(urls) and all(u.hostname in {"127.0.0.1", "localhost", "::1"} and (u.port or 4222)
                                  in self.stack_nats_ports for u in urls)

    @property
    def stack_file(self) -> Path:
        return self.home / "stack.json"

    @property
    def nats_users_file(self) -> Path:
        return self.home / "nats-users.json"

    @property
    def data_dir(self) -> Path:
        return self.home.resolve()

    @property
    def scratch_dir(self) -> Path:
        return (self.work_dir or self.home / "work").resolve()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
