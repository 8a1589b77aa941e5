"""The bridge's FastAPI app: routers per concern, connections in the lifespan, errors as `{"detail": ...}`.

Routers and their guards:
- `root` (`GET /`), `health` (liveness/readiness) and `docs` (/docs, /openapi.json, /asyncapi,
  /asyncapi.json and their assets, served offline): public; `WS /ws` (in `root`) checks the bearer token
  on its handshake;
- `GET /metrics` (metrics.py, Prometheus): public, like `/healthz`;
- `webhooks` (`POST /events/{subject}`): HMAC signature (or the bearer token when no webhook secret);
- the seed's `/api/v1/...` routes: bearer token.
Browser origins: CORS with `CODETUNE_CORS_ORIGINS` and an Origin guard (`origins.py`).
JSON bodies are limited to `webhook_max_bytes` while they are read (413); the multipart upload is not
limited (it streams to S3 in constant memory).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from core import tracing
from core.settings import Settings, get_settings
from handlers.bridge import errors, metrics
from handlers.bridge.auth import Authenticated, secret
from handlers.bridge.limits import BodyLimit
from handlers.bridge.origins import OriginGuard, Origins, cors_options
from handlers.bridge.routes import (
    analytics,
    assistant,
    datasets,
    docs,
    health,
    models,
    ollama,
    root,
    settings_route,
    tuning,
    user_models,
    webhooks,
)
from handlers.bridge.services import Services
from handlers.bridge.signatures import standard_key

VERSION = "0.1.0"
API_ROUTERS = (datasets.router, models.router, tuning.router, ollama.router, user_models.router, assistant.router,
               settings_route.router, analytics.router)
UPLOAD_PATH = "/api/v1/datasets/upload"  # multipart: streamed to S3 in constant memory, not size-limited


class BridgeConfigError(ValueError):
    """A setting the bridge cannot serve with (it refuses to start; the message never holds a secret)."""


def check_secrets(settings: Settings) -> None:
    """Parse the webhook secret once, at startup: a bad one stops the bridge instead of 500s per request."""
    webhook_secret = secret(settings.webhook_secret)
    if webhook_secret is None:
        return
    try:
        standard_key(webhook_secret)
    except ValueError as e:
        raise BridgeConfigError(f"CODETUNE_WEBHOOK_SECRET is not usable: {e} (use whsec_<base64> or a raw "
                                "secret)") from None


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    check_secrets(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.services = await Services.start(settings)
        try:
            yield
        finally:
            await app.state.services.stop()
            tracing.flush()

    app = FastAPI(
        title="CodeTune bridge", version=VERSION, lifespan=lifespan,
        docs_url=None, redoc_url=None,  # /docs is served with local assets (routes/docs.py); no CDN page
        summary="Webhooks → events, and the CodeTune REST API over the event pipeline.",
        description="Events published here follow the contract in `/asyncapi` (AsyncAPI 3.0).",
    )
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=settings.webhook_max_bytes, exempt=(UPLOAD_PATH,))
    app.add_middleware(CORSMiddleware, **cors_options(settings))
    app.add_middleware(OriginGuard, origins=Origins(settings))  # outermost: a refused origin reaches nothing
    # README "Tracing": FastAPI's own telemetry makes a server span per request, continuing the caller's
    # `traceparent`, once a tracer provider is configured; what the route publishes carries it on
    tracing.configure(settings, "codetune-bridge")
    # the webhook route first: the hot path is matched before every other route (FastAPI tries them in order)
    app.include_router(webhooks.router)
    metrics.install(app)  # GET /metrics (public, like /healthz) and request latency (times even refusals)
    app.include_router(root.router)  # GET / (public) and WS /ws (checks the token itself)
    app.include_router(health.router)
    docs.install(app)  # /docs, /asyncapi and their assets from installed packages (works offline)
    for router in API_ROUTERS:
        app.include_router(router, dependencies=[Authenticated])
    return app
