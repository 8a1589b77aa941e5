"""Compose stage routers into one FastStream app; any subset of stages can run alone.

    faststream run handlers.app:build_app --factory                          # every stage in one process
    CODETUNE_STAGES=tuning faststream run handlers.app:build_app --factory   # a GPU host runs tuning only
    codetune worker datasets tuning                                          # some stages, via the CLI

`build_app` is the app factory: importing this module builds nothing and connects to nothing.

The light stages (datasets, intake, models, ...) never import torch: a trainer busy for hours on a GPU
host does not delay the intake stage recording new jobs as `queued`.

Workers of one stage share its durable pull consumer, so N processes on any hosts split the work and
each message is handled once.

A worker running one stage connects to NATS as that stage's user, which may publish only the facts the
stage emits; a process running several stages connects as `stages` (README "Security").
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
from collections.abc import Iterable
from typing import Any

from faststream import FastStream
from faststream.nats import NatsBroker
from faststream.security import SASLPlaintext
from faststream.specification import AsyncAPI

from core import tracing
from core.settings import Settings, get_settings
from events.client import connect_options, provision_as_admin
from handlers.common import Services, StructuredTraceContext
from handlers.idle import IdleTracker
from handlers.metrics import WorkerMetrics
from storage.objects import ObjectStore

# Stage name → module exposing `router`. Imported lazily: a datasets worker never imports torch.
STAGES: dict[str, str] = {
    "datasets": "handlers.datasets.router",
    "intake": "handlers.intake.router",
    "models": "handlers.models.router",
    "tuning": "handlers.tuning.router",
    "export": "handlers.export.router",
    "serving": "handlers.serving.router",
    "ollama": "handlers.ollama.router",  # the core-NATS `ollama.*` requests: always on (README "Scaling out")
}


def available_stages() -> list[str]:
    out = []
    for name, mod in STAGES.items():
        try:
            if hasattr(importlib.import_module(mod), "router"):
                out.append(name)
        except ImportError:
            continue
    return out


def worker_role(stages: list[str]) -> str:
    """The NATS user a worker logs in as: the stage's own user when it runs one stage, else `stages`
    (the union of every stage's permissions: the all-in-one demo process and the tests)."""
    return stages[0] if len(stages) == 1 else "stages"


def build_app(
    stages: Iterable[str] | None = None, settings: Settings | None = None, *, access_log_level: int = logging.DEBUG,
    exit_when_idle: float | None = None, logger: logging.Logger | None = None,
) -> FastStream:
    """The stages' FastStream app (the factory `faststream run handlers.app:build_app --factory` calls).

    `stages`: which stages to run; by default those `CODETUNE_STAGES` names (comma or space separated),
    else every available stage. `access_log_level`: the level FastStream's per-message
    "Received"/"Processed" lines are logged at; DEBUG by default (two formatted lines per message cost
    a hop ~100 us of CPU; `codetune worker --access-log` logs them at INFO). `logger`: the broker's logger
    (default: FastStream's own, which prints INFO to stdout; in-process stages of a CLI command pass one
    that follows the process's logging).

    `exit_when_idle`: seconds; the app stops (drained, exit 0) once no message has been in flight or
    received for that long (handlers/idle.py), so a supervisor can scale the stage to zero."""
    settings = settings or get_settings()
    names = list(stages or env_stages() or available_stages())
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {sorted(STAGES)}")
    opts = connect_options(settings, worker_role(names))
    servers = opts.pop("servers")
    opts.pop("name")
    security = None
    if "user" in opts:  # FastStream takes user/password as a security object (never logged)
        security = SASLPlaintext(opts.pop("user"), opts.pop("password", ""))
    # a worker outlives NATS restarts: reconnect forever (the CLI's short-lived client gives up after 3 tries)
    idle = IdleTracker(exit_when_idle) if exit_when_idle else None
    given: dict[str, Any] = {"logger": logger} if logger is not None else {}  # else FastStream's default
    middlewares: list[Any] = [*traced(settings, worker_role(names)), *([idle.middleware] if idle else [])]
    # apply_types=False: FastStream calls each handler with the decoded body alone, the stages' `handler`
    # validates it and looks their context values up (handlers.common.handler; no per-message injection)
    broker = NatsBroker(servers, graceful_timeout=30.0, log_level=access_log_level, max_reconnect_attempts=-1,
                        apply_types=False, security=security, middlewares=middlewares, **given, **opts)
    for name in names:
        broker.include_router(importlib.import_module(STAGES[name]).router)
    app = FastStream(broker, specification=AsyncAPI(
        broker, title="CodeTune", version="0.1.0",
        description="Fine-tune open LLMs on your data and serve them with Ollama."))
    WorkerMetrics(settings, app_name=f"codetune-{worker_role(names)}").install(app, broker)  # README "Metrics"

    @app.on_startup
    async def _startup() -> None:
        from storage.db import init_db

        async def nats_ready() -> None:
            await broker.connect()
            await provision_as_admin(settings, broker.connection.jetstream())

        store = ObjectStore(settings)
        # the three stores are independent: a (cold) start waits for the slowest of them, not for their sum
        _, _, client = await asyncio.gather(nats_ready(), store.ensure_bucket(), init_db(settings))
        ctx = app.context
        ctx.set_global("settings", settings)
        ctx.set_global("store", store)
        ctx.set_global("mongo", client)
        ctx.set_global("max_payload", broker.connection.max_payload)  # the server's, for dead letters
        ctx.set_global("services", Services(settings=settings, store=store))
        logging.getLogger("codetune").info("stages %s ready", ", ".join(names))

    watcher: list[asyncio.Task[None]] = []
    if idle is not None:

        @app.after_startup
        async def _watch_idle() -> None:
            watcher.append(asyncio.create_task(idle.watch(app)))

    @app.on_shutdown
    async def _shutdown() -> None:
        for task in watcher:
            task.cancel()
        client = app.context.get("mongo")
        if client is not None:
            await client.close()
        tracing.flush()

    return app


def traced(settings: Settings, role: str) -> list[Any]:
    """FastStream's NATS telemetry middleware when tracing is on (README "Tracing"): it continues the trace of
    every message consumed (its `traceparent` header, or a structured CloudEvent's attribute) and injects it
    into every message published."""
    if not tracing.configure(settings, f"codetune-{role}"):
        return []
    from faststream.nats.opentelemetry import NatsTelemetryMiddleware

    return [StructuredTraceContext, NatsTelemetryMiddleware(include_messages_counters=False)]


def env_stages() -> list[str]:
    """The stages `CODETUNE_STAGES` names (comma or space separated); empty when unset."""
    return os.environ.get("CODETUNE_STAGES", "").replace(",", " ").split()
