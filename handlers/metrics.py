"""Prometheus metrics: the one home of every metric the workers and the bridge expose (README "Metrics").

Message metrics (`faststream_*`) come from FastStream's own NATS Prometheus middleware, one per worker app,
with subjects labelled by their contract name (`tuning.progress.<job_id>`, never one series per job). The
product's own metrics are defined here, once, and observed where their rule lives:

- training step time, tokens and tokens/s: the tuning stage's step hook (handlers/tuning/runner.py);
- checkpoint upload time: the tuning stage's checkpoint upload (same file);
- export time: the export stage (handlers/export/service.py);
- dead letters by subject: the one place letters are filed (handlers/common.py `dead_letter`);
- bridge request latency by route and status: the bridge's ASGI middleware (handlers/bridge/metrics.py);
- jobs by status: a gauge the bridge computes from MongoDB on each scrape. Jobs are state in MongoDB,
  moved by several stages on any number of hosts; counting the query's answer is right however many
  workers run (a per-worker counter of transitions could not say how many jobs are queued now).

The product collectors are process-wide and registered into each app's own `CollectorRegistry` (one per
worker app, one per bridge app, never prometheus_client's global default), so several apps in one process
never clash; each app's page shows its own message metrics and its process's product metrics.

A worker serves its registry on `CODETUNE_METRICS_PORT` (unset: no endpoint; 0: any free port, logged) at
`CODETUNE_METRICS_HOST`; the bridge serves `GET /metrics` on its own port, public like `/healthz`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING, Any

from faststream.nats.prometheus import NatsPrometheusMiddleware
from faststream.nats.prometheus.provider import NatsMetricsSettingsProvider, settings_provider_factory
from faststream.prometheus import ConsumeAttrs, PrometheusMiddleware
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from events import subjects as s

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from faststream import FastStream
    from faststream.message.message import StreamMessage
    from faststream.nats import NatsBroker

    from core.settings import Settings

log = logging.getLogger("codetune")

# --------------------------------------------------------------------------- the product's metrics

TRAINING_STEP_SECONDS = Histogram(
    "codetune_training_step_seconds", "Time of one optimizer step (its micro-batches, backward and update)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0), registry=None)
TRAINING_TOKENS = Counter(
    "codetune_training_tokens_total", "Real (non-padding) tokens trained on; rate() is the tokens/s", registry=None)
TRAINING_TOKENS_PER_SECOND = Gauge(
    "codetune_training_tokens_per_second", "Tokens/s of the job trained last in this process (its mean so far)",
    registry=None)
CHECKPOINT_UPLOAD_SECONDS = Histogram(
    "codetune_checkpoint_upload_seconds", "Time to upload one training checkpoint to the bucket",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0), registry=None)
EXPORT_SECONDS = Histogram(
    "codetune_export_seconds", "Time to export one job (GGUF conversion, upload, GGUF check, quality gate)",
    ["mode", "outcome"], buckets=(1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0),
    registry=None)
DEAD_LETTERS = Counter(
    "codetune_dead_letters_total", "Messages dead-lettered (dlq.<subject>), by the subject they arrived on",
    ["subject"], registry=None)
WORKER_METRICS = (TRAINING_STEP_SECONDS, TRAINING_TOKENS, TRAINING_TOKENS_PER_SECOND, CHECKPOINT_UPLOAD_SECONDS,
                  EXPORT_SECONDS, DEAD_LETTERS)

BRIDGE_REQUEST_SECONDS = Histogram(
    "codetune_bridge_request_duration_seconds", "Bridge HTTP request latency (a stream: until it ends), by "
    "method, route template and status", ["method", "route", "status"], registry=None)
JOBS = Gauge("codetune_jobs", "Tuning jobs by status (MongoDB, counted on each scrape of the bridge)", ["status"],
             registry=None)
BRIDGE_METRICS = (BRIDGE_REQUEST_SECONDS, JOBS)
JOBS_QUERY_TIMEOUT_S = 2.0


@functools.lru_cache(maxsize=1024)
def subject_label(subject: str) -> str:
    """The contract's name for `subject`: a bounded label (`tuning.progress.<job_id>` for every job's
    progress, `dlq.` + the original's name for a letter, `other` for a subject not in the contract)."""
    head = s.DEAD_LETTER + "."
    if subject.startswith(head):
        return head + subject_label(subject[len(head):])
    try:
        return s.spec_for(subject).subject
    except KeyError:
        return "other"


def observe_step(step_s: float, step_tokens: int, tokens_per_s: float) -> None:
    """One optimizer step of a training job (called on the training thread; the client is thread-safe)."""
    TRAINING_STEP_SECONDS.observe(step_s)
    TRAINING_TOKENS.inc(step_tokens)
    TRAINING_TOKENS_PER_SECOND.set(tokens_per_s)


# --------------------------------------------------------------------------- worker apps


class _ContractSubjects(NatsMetricsSettingsProvider):
    """FastStream's NATS settings provider, subjects labelled by `subject_label`."""

    def get_consume_attrs_from_message(self, msg: StreamMessage[Any]) -> ConsumeAttrs:
        attrs = super().get_consume_attrs_from_message(msg)
        return {**attrs, "destination_name": subject_label(attrs["destination_name"])}

    def get_publish_destination_name_from_cmd(self, cmd: Any) -> str:
        return subject_label(str(super().get_publish_destination_name_from_cmd(cmd)))


def _provider(msg: Any) -> Any:
    found = settings_provider_factory(msg)  # FastStream's choice (batch, KV/object-store watch: none)
    return _ContractSubjects() if isinstance(found, NatsMetricsSettingsProvider) else found


class MessageMetrics(NatsPrometheusMiddleware):
    """FastStream's NATS Prometheus middleware with bounded subject labels."""

    def __init__(self, *, registry: CollectorRegistry, app_name: str) -> None:
        PrometheusMiddleware.__init__(self, settings_provider_factory=_provider, registry=registry, app_name=app_name)


class WorkerMetrics:
    """One worker app's registry, its message middleware and (when a port is set) its `/metrics` server."""

    def __init__(self, settings: Settings, app_name: str) -> None:
        self.settings, self.registry = settings, CollectorRegistry(auto_describe=True)
        for collector in WORKER_METRICS:
            self.registry.register(collector)
        self.middleware = MessageMetrics(registry=self.registry, app_name=app_name)
        self.server: WSGIServer | None = None
        self.url: str | None = None

    def install(self, app: FastStream, broker: NatsBroker) -> WorkerMetrics:
        """With a metrics port set: count the broker's messages (the outermost middleware, so it sees what
        FailurePolicy decided) and serve the registry while the app runs. Without one, nothing: the
        middleware costs a hop ~0.1 ms of CPU on 2 busy cores (bench/bench_metrics.py), not paid unscraped."""
        app.context.set_global("metrics", self)
        if self.settings.metrics_port is None:
            return self
        broker.insert_middleware(self.middleware)
        app.after_startup(self.start)
        app.on_shutdown(self.stop)
        return self

    async def start(self) -> None:
        port = self.settings.metrics_port
        if port is None:
            return
        self.server, _ = start_http_server(port, addr=self.settings.metrics_host, registry=self.registry)
        self.url = f"http://{self.settings.metrics_host}:{self.server.server_port}/metrics"
        log.info("metrics on %s", self.url)

    async def stop(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            await asyncio.to_thread(server.shutdown)
            server.server_close()


def bridge_registry() -> CollectorRegistry:
    """A bridge app's own registry (handlers/bridge/metrics.py serves it)."""
    registry = CollectorRegistry(auto_describe=True)
    for collector in BRIDGE_METRICS:
        registry.register(collector)
    return registry
